"""Spatial self-attention block for convolutional backbones.

The block is the non-local / SAGAN-style attention used by attention-augmented
detectors: every position of a feature map attends to every other position,
and the result is added back through a learnable gate that starts at zero, so
a freshly inserted block is an exact identity and cannot disturb a detector
at the start of training.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SpatialSelfAttention", "TemperatureMode"]

TemperatureMode = Literal["fixed", "learnable"]


class SpatialSelfAttention(nn.Module):
    """Multi-head self-attention over all ``H * W`` positions of a feature map.

    ``out = x + gamma * proj(softmax(q k^T / (sqrt(d) * T)) v)`` with ``q``, ``k``, ``v``
    1x1 convolutions of ``x``, ``gamma`` a learnable scalar initialised to 0 and ``T``
    the softmax temperature: 1 (``temperature="fixed"``), or ``exp(log_temperature)``
    with ``log_temperature`` a learnable scalar initialised to 0 (``"learnable"``), so
    ``T`` stays positive and starts at exactly 1, the fixed block's value. A temperature
    running towards 0 sharpens every row towards one key (attention collapse).

    Shapes:
        input ``x``: ``[B, C, H, W]``; output: ``[B, C, H, W]`` (same as input).
        ``q``/``k`` use ``C // qk_reduction`` channels (rounded up to a multiple of
        ``heads``), ``v`` uses ``C`` channels; both are split evenly over ``heads``.

    Attention probe protocol (``docs/ARCHITECTURE.md``):
        ``detlens_attention_probe`` is ``False`` by default, and the block then stores
        nothing, so training pays nothing for the probe. While the flag is ``True`` the
        block also computes ``softmax(q k^T / sqrt(d))`` explicitly and keeps
        ``last_attention: FloatTensor[B, heads, H*W, H*W]`` (queries x keys, row-major
        positions ``i = y * W + x``; every row sums to 1). The output is computed by the
        same fused ``F.scaled_dot_product_attention`` call either way: an explicit
        ``softmax(...) @ v`` rounds differently under bf16 autocast, which would change a
        training step whose weights are read. The stored tensor is not detached (it
        carries gradients to ``q`` and ``k``, not to the output); readers clear it
        (``last_attention = None``) when done. Optional protocol attributes read by
        detlens' callbacks: ``temperature`` (the current ``T``, a 0-d tensor) with
        ``learnable_temperature`` (whether ``T`` trains: logged as
        ``attention/temperature/<block>``), and ``detlens_feature_level`` (the key of the
        detector's feature dict whose map the block attends over, e.g. ``"0"`` for the
        finest FPN level; ``None`` for a block between trunk stages).

    Args:
        channels: ``C``, the number of input (and output) channels.
        heads: number of attention heads; must divide ``C``.
        qk_reduction: channel reduction of queries/keys (8 in SAGAN).
        temperature: ``"fixed"`` (``T = 1``, no parameter: the state_dict of earlier
            blocks) or ``"learnable"`` (adds the parameter ``log_temperature``).
        feature_level: the feature-dict key the block attends over, when it sits on one
            level of a feature pyramid (``detlens_feature_level``).
    """

    detlens_attention_probe: bool
    detlens_feature_level: str | None
    last_attention: Tensor | None

    def __init__(
        self,
        channels: int,
        heads: int = 1,
        qk_reduction: int = 8,
        temperature: TemperatureMode = "fixed",
        feature_level: str | None = None,
    ) -> None:
        super().__init__()
        if channels <= 0 or heads <= 0 or qk_reduction <= 0:
            raise ValueError(
                f"channels, heads and qk_reduction must be positive, got {channels}, {heads}, {qk_reduction}"
            )
        if channels % heads:
            raise ValueError(f"heads={heads} must divide channels={channels}")
        if temperature not in ("fixed", "learnable"):
            raise ValueError(f"temperature must be 'fixed' or 'learnable', got {temperature!r}")
        qk_channels = max(channels // qk_reduction, heads)
        qk_channels = math.ceil(qk_channels / heads) * heads
        self.channels = channels
        self.heads = heads
        self.qk_channels = qk_channels
        self.query = nn.Conv2d(channels, qk_channels, kernel_size=1)
        self.key = nn.Conv2d(channels, qk_channels, kernel_size=1)
        self.value = nn.Conv2d(channels, channels, kernel_size=1)
        self.out_proj = nn.Conv2d(channels, channels, kernel_size=1)
        # Residual gate (SAGAN): zero at init, so the block starts as the identity.
        self.gamma = nn.Parameter(torch.zeros(1))
        # T = exp(log_temperature): positive, and exactly 1 at init (exp(0) == 1 in every float format).
        self.log_temperature: nn.Parameter | None = (
            nn.Parameter(torch.zeros(1)) if temperature == "learnable" else None
        )
        self.detlens_feature_level = feature_level
        self.detlens_attention_probe = False
        self.last_attention = None

    @property
    def learnable_temperature(self) -> bool:
        """Whether the softmax temperature ``T`` is a trained parameter."""
        return self.log_temperature is not None

    @property
    def temperature(self) -> Tensor:
        """The softmax temperature ``T`` (0-d, detached; ``1`` for a fixed one)."""
        if self.log_temperature is None:
            return torch.ones((), device=self.gamma.device)
        return self.log_temperature.detach().exp().reshape(())

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``[B, C, H, W]`` -> ``[B, C, H, W]``."""
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"expected [B, {self.channels}, H, W], got {tuple(x.shape)}")
        b, c, h, w = x.shape
        # [B, C', H, W] -> [B, heads, HW, C'/heads]
        q = self.query(x).reshape(b, self.heads, -1, h * w).transpose(2, 3)
        k = self.key(x).reshape(b, self.heads, -1, h * w).transpose(2, 3)
        v = self.value(x).reshape(b, self.heads, -1, h * w).transpose(2, 3)
        if self.log_temperature is not None:
            # softmax(q k^T / (sqrt(d) T)) as softmax((q / T) k^T / sqrt(d)): the fused kernel's
            # scale is a Python float, T a parameter that must receive gradients.
            q = q / self.log_temperature.exp().to(q.dtype)
        if self.detlens_attention_probe:  # read beside the output, which is computed as when unread
            scale = 1.0 / math.sqrt(q.shape[-1])
            self.last_attention = torch.softmax((q @ k.transpose(2, 3)) * scale, dim=-1)  # [B, heads, HW, HW]
        attended = F.scaled_dot_product_attention(q, k, v)
        attended = attended.transpose(2, 3).reshape(b, c, h, w)
        return x + self.gamma * self.out_proj(attended)

    def extra_repr(self) -> str:
        extra = ", temperature=learnable" if self.learnable_temperature else ""
        level = f", feature_level={self.detlens_feature_level!r}" if self.detlens_feature_level is not None else ""
        return f"channels={self.channels}, heads={self.heads}, qk_channels={self.qk_channels}{extra}{level}"
