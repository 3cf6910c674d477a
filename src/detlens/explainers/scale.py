"""Scales of saliency maps: a fixed per-layer scale for tracking, min-max for display.

Raw maps (Grad-CAM and friends) are on the model's own scale: it changes as the model
trains, so per-image min-max normalisation would hide exactly the drift detlens wants to
measure. Two scales are therefore kept apart:

* :class:`FixedScale` divides raw maps by a reference fixed, per key (method + layer),
  at the first logging point: the mean peak of the maps seen then. Later values are
  comparable to that point and across runs that share the reference (``state_dict``):
  ``1.0`` is a typical peak at the first logging point, ``2.0`` twice as strong.
* :func:`display_maps` min-max normalises each map to ``[0, 1]`` for drawing only.

**Flat maps.** A map that is spatially constant (:func:`flat_maps`: zero, positive or
negative, to float precision) carries no spatial information. detlens treats it as blank
everywhere: :func:`display_maps` draws it as zeros (an overlay shows the image untinted,
never a uniform tint that would read as "looks everywhere"), it never fixes a
:class:`FixedScale` reference, :func:`~detlens.explainers.metrics.pointing_game` counts it
as a miss, :func:`~detlens.explainers.api.box_focus` flags it (``flat``) and leaves its
energy-in-box and pointing game out (NaN), and the focus record stores it as zeros.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["FLAT_RTOL", "FixedScale", "display_maps", "flat_maps"]

FLAT_RTOL = 1e-5
"""A map whose span (max - min) is at most this fraction of its largest magnitude is flat.
Bilinear resampling of a constant grid in float32 leaves a few ulps (~1e-7 relative) of
noise; min-max scaling would blow that noise up to a full-contrast picture."""


def flat_maps(maps: Tensor) -> Tensor:
    """Which maps are spatially constant (see the module docstring).

    Args:
        maps: ``FloatTensor[K, H, W]`` (NaN/inf count as 0).

    Returns:
        ``BoolTensor[K]``: ``max - min <= FLAT_RTOL * max(|max|, |min|)``; all-zero maps
        are flat.
    """
    if maps.dim() != 3:
        raise ValueError(f"maps must be [K, H, W], got {list(maps.shape)}")
    if maps.shape[0] == 0 or maps.numel() == 0:
        return torch.ones(maps.shape[0], dtype=torch.bool, device=maps.device)
    m = torch.nan_to_num(maps.detach().double(), nan=0.0, posinf=0.0, neginf=0.0).flatten(1)
    hi, lo = m.amax(1), m.amin(1)
    return (hi - lo) <= FLAT_RTOL * torch.maximum(hi.abs(), lo.abs())


def display_maps(maps: Tensor) -> Tensor:
    """Per-map min-max to ``[0, 1]``, for display only.

    Args:
        maps: ``FloatTensor[K, H, W]`` (any scale, NaN/inf tolerated).

    Returns:
        ``FloatTensor[K, H, W]`` in ``[0, 1]``, finite; a flat map (:func:`flat_maps`:
        constant, whatever its sign, including all zero) becomes all zeros.
    """
    if maps.dim() != 3:
        raise ValueError(f"maps must be [K, H, W], got {list(maps.shape)}")
    m = torch.nan_to_num(maps.detach().float(), nan=0.0, posinf=0.0, neginf=0.0)
    if m.shape[0] == 0 or m.numel() == 0:
        return m
    lo = m.flatten(1).amin(1)[:, None, None]
    span = m.flatten(1).amax(1)[:, None, None] - lo
    tiny = torch.finfo(torch.float32).tiny
    keep = ~flat_maps(m)[:, None, None] & (span > tiny)
    out = torch.where(keep, (m - lo) / span.clamp_min(tiny), torch.zeros_like(m))
    return out.clamp_(0.0, 1.0)


class FixedScale:
    """Per-key references fixed at the first logging point (see the module docstring).

    Example::

        scale = FixedScale()
        scaled = scale("gradcam/features", raw_maps_per_image)   # fixes the reference
        later = scale("gradcam/features", later_maps)            # same reference
    """

    def __init__(self) -> None:
        self._reference: dict[str, float] = {}
        self._fixed_at: dict[str, int] = {}

    def reference(self, key: str) -> float | None:
        """The reference of ``key`` (``None`` until fixed)."""
        return self._reference.get(key)

    @property
    def references(self) -> dict[str, float]:
        """Every fixed reference, ``key -> value``."""
        return dict(self._reference)

    def fix(self, key: str, maps: Sequence[Tensor], step: int = 0) -> float | None:
        """Fix ``key``'s reference from ``maps`` unless already fixed; returns it.

        The reference is the mean of the per-map maxima over maps that are not flat
        (:func:`flat_maps`, all-zero ones included); with no such map it stays unfixed
        (``None``), so an untrained model's blank maps do not pin the scale.
        """
        if key in self._reference:
            return self._reference[key]
        peaks = [m.detach().float().flatten(1).amax(1)[~flat_maps(m)] for m in maps if m.numel() and m.shape[0]]
        if not peaks:
            return None
        peak = torch.nan_to_num(torch.cat(peaks), nan=0.0, posinf=0.0)
        peak = peak[peak > 0]
        if peak.numel() == 0:
            return None
        self._reference[key] = float(peak.double().mean())
        self._fixed_at[key] = int(step)
        return self._reference[key]

    def __call__(self, key: str, maps: Sequence[Tensor], step: int = 0) -> list[Tensor] | None:
        """``maps`` (raw, ``FloatTensor[K, H, W]`` each) divided by ``key``'s reference.

        Fixes the reference first if needed; ``None`` while it cannot be fixed.
        """
        ref = self.fix(key, maps, step)
        if ref is None:
            return None
        return [torch.nan_to_num(m.detach().float(), nan=0.0) / ref for m in maps]

    def state_dict(self) -> dict[str, Any]:
        return {"reference": dict(self._reference), "fixed_at": dict(self._fixed_at)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._reference = {str(k): float(v) for k, v in state.get("reference", {}).items()}
        self._fixed_at = {str(k): int(v) for k, v in state.get("fixed_at", {}).items()}
