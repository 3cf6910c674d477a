"""Attention maps in image space, and attention rollout.

Input weights come from :class:`detlens.explainers.attention.AttentionCapture`
(``FloatTensor[B, heads, Q, S]`` per module, ``S = Hf * Wf`` feature cells in row-major
order ``i = y * Wf + x`` of the padded feature grid). Outputs are per image, because
images in a batch have different sizes:

* :func:`query_attention_maps` — what each DETR query (detection) reads: its decoder
  cross-attention (or its rollout) over the feature grid, upsampled to the image.
* :func:`point_attention_maps` — where a reference point (e.g. a box centre) attends in
  a self-attention over the feature grid (DETR encoder, ``SpatialSelfAttention``).
* :func:`attention_rollout` / :func:`decoder_rollout` — Abnar & Zuidema (2020),
  "Quantifying Attention Flow in Transformers": heads averaged, identity added for the
  residual path, rows renormalised, multiplied through the encoder layers; a query's
  cross-attention composed with the encoder rollout.

Padding: DETR pads images bottom/right; the feature cells that cover the image are the
non-padding cells of ``feature_padding_mask [B, Hf, Wf]`` (True = padding). Only that
valid region is upsampled to the image's ``(H, W)``, so maps align with the image even
when the network resized it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detlens.adapters.modules import named_modules

__all__ = [
    "AttentionMaps",
    "attention_rollout",
    "decoder_rollout",
    "minmax_normalize",
    "point_attention_maps",
    "query_attention_maps",
    "transformer_attention_names",
]

HeadReduction = Literal["mean", "none"]


@dataclass
class AttentionMaps:
    """Maps for one image.

    Attributes:
        raw: ``FloatTensor[N, (heads,) H, W]`` attention weight of the feature cell under
            each pixel (bilinear between cell centres); rows of the attention sum to 1
            over cells, so values are comparable across maps of the same grid.
        display: ``raw`` min-max scaled to ``[0, 1]`` per map, for overlays.
    """

    raw: Tensor
    display: Tensor


def minmax_normalize(maps: Tensor, eps: float = 1e-12) -> Tensor:
    """Scale each ``[..., H, W]`` map to ``[0, 1]``; a constant map becomes all zeros."""
    flat = maps.flatten(-2)
    lo = flat.min(-1, keepdim=True).values
    hi = flat.max(-1, keepdim=True).values
    span = hi - lo
    out = torch.where(span > eps, (flat - lo) / span.clamp(min=eps), torch.zeros_like(flat))
    return out.view_as(maps)


def _valid_grid(feature_padding_mask: Tensor | None, feature_size: tuple[int, int]) -> tuple[int, int]:
    """``(rows, cols)`` of feature cells covering the image (padding is bottom/right)."""
    if feature_padding_mask is None:
        return feature_size
    valid = ~feature_padding_mask.bool()
    rows = int(valid.any(1).sum())
    cols = int(valid.any(0).sum())
    if rows == 0 or cols == 0:
        raise ValueError("feature_padding_mask marks every feature cell as padding")
    return rows, cols


def _grid_to_image(cells: Tensor, feature_size: tuple[int, int], valid: tuple[int, int], image_size: tuple[int, int]) -> Tensor:
    """``[..., S]`` over the padded grid -> ``[..., H, W]`` over the image (valid region only)."""
    hf, wf = feature_size
    if cells.shape[-1] != hf * wf:
        raise ValueError(f"attention has {cells.shape[-1]} keys but feature_size {feature_size} has {hf * wf} cells")
    lead = cells.shape[:-1]
    grid = cells.reshape(-1, 1, hf, wf)[:, :, : valid[0], : valid[1]].float()
    up = F.interpolate(grid, size=tuple(int(s) for s in image_size), mode="bilinear", align_corners=False)
    return up.reshape(*lead, *up.shape[-2:])


def _reduce_heads(weights: Tensor, heads: HeadReduction) -> Tensor:
    """``[B, h, Q, S]`` -> ``[B, Q, S]`` (mean) or ``[B, Q, h, S]`` (none); ``[B, Q, S]`` passes."""
    if heads not in ("mean", "none"):
        raise ValueError(f"heads must be 'mean' or 'none', got {heads!r}")
    if weights.dim() == 3:
        return weights
    if weights.dim() != 4:
        raise ValueError(f"weights must be [B, heads, Q, S] or [B, Q, S], got {tuple(weights.shape)}")
    return weights.mean(1) if heads == "mean" else weights.transpose(1, 2)


def _check_batch(weights: Tensor, image_sizes: Sequence[tuple[int, int]], mask: Tensor | None) -> None:
    if len(image_sizes) != weights.shape[0]:
        raise ValueError(f"{len(image_sizes)} image sizes for a batch of {weights.shape[0]}")
    if mask is not None and mask.shape[0] != weights.shape[0]:
        raise ValueError(f"feature_padding_mask has batch {mask.shape[0]}, weights {weights.shape[0]}")


def query_attention_maps(
    weights: Tensor,
    feature_size: tuple[int, int],
    image_sizes: Sequence[tuple[int, int]],
    queries: Sequence[Tensor] | None = None,
    feature_padding_mask: Tensor | None = None,
    heads: HeadReduction = "mean",
) -> list[AttentionMaps]:
    """Each query's attention over the feature grid, as maps over its image.

    Args:
        weights: decoder cross-attention ``[B, heads, Q, S]`` (or a rollout ``[B, Q, S]``);
            average several layers' tensors first to get a multi-layer map.
        feature_size: ``(Hf, Wf)`` of the (padded) feature grid, ``Hf * Wf = S``.
        image_sizes: ``(H, W)`` of each image in pixels (the size maps are drawn at).
        queries: per image, ``LongTensor[N]`` of query indices to draw (e.g. the query of
            each detection); ``None`` = all ``Q`` queries.
        feature_padding_mask: ``BoolTensor[B, Hf, Wf]``, True = padding cell.
        heads: ``"mean"`` -> maps ``[N, H, W]``; ``"none"`` -> per head ``[N, heads, H, W]``.

    Returns:
        One :class:`AttentionMaps` per image.
    """
    _check_batch(weights, image_sizes, feature_padding_mask)
    per_query = _reduce_heads(weights, heads)  # [B, Q, (h,) S]
    out = []
    for b, size in enumerate(image_sizes):
        sel = per_query[b] if queries is None else per_query[b][queries[b].to(per_query.device).long()]
        valid = _valid_grid(None if feature_padding_mask is None else feature_padding_mask[b], feature_size)
        raw = _grid_to_image(sel, feature_size, valid, size)
        out.append(AttentionMaps(raw=raw, display=minmax_normalize(raw)))
    return out


def point_attention_maps(
    weights: Tensor,
    points: Sequence[Tensor],
    feature_size: tuple[int, int],
    image_sizes: Sequence[tuple[int, int]],
    feature_padding_mask: Tensor | None = None,
    heads: HeadReduction = "mean",
) -> list[AttentionMaps]:
    """Self-attention over the feature grid read at reference points, as maps over the image.

    Args:
        weights: self-attention ``[B, heads, S, S]`` (queries x keys, ``S = Hf * Wf``), e.g.
            a DETR encoder layer or ``SpatialSelfAttention.last_attention``; or ``[B, S, S]``
            (a rollout).
        points: per image, ``FloatTensor[P, 2]`` of ``(x, y)`` in image pixels (e.g. box
            centres); each picks the feature cell that covers it.
        feature_size, image_sizes, feature_padding_mask, heads: as in :func:`query_attention_maps`.

    Returns:
        One :class:`AttentionMaps` per image, ``[P, (heads,) H, W]``.
    """
    _check_batch(weights, image_sizes, feature_padding_mask)
    hf, wf = feature_size
    out = []
    for b, (h, w) in enumerate(image_sizes):
        valid = _valid_grid(None if feature_padding_mask is None else feature_padding_mask[b], feature_size)
        pts = points[b].to(weights.device).float().reshape(-1, 2)
        col = (pts[:, 0] / w * valid[1]).floor().long().clamp(0, valid[1] - 1)
        row = (pts[:, 1] / h * valid[0]).floor().long().clamp(0, valid[0] - 1)
        index = row * wf + col  # row-major over the padded grid
        rows = _reduce_heads(weights[b : b + 1], heads)[0][index]  # [P, (h,) S]
        raw = _grid_to_image(rows, feature_size, valid, (h, w))
        out.append(AttentionMaps(raw=raw, display=minmax_normalize(raw)))
    return out


def _with_residual(weights: Tensor, residual: float) -> Tensor:
    """Head-mean ``[B, h, S, S]`` -> ``(1 - r) * A + r * I`` with rows renormalised."""
    mean = weights.float().mean(1) if weights.dim() == 4 else weights.float()
    eye = torch.eye(mean.shape[-1], device=mean.device, dtype=mean.dtype)
    mixed = (1.0 - residual) * mean + residual * eye
    return mixed / mixed.sum(-1, keepdim=True)


def attention_rollout(layers: Sequence[Tensor], residual: float = 0.5) -> Tensor:
    """Attention rollout through a stack of self-attention layers (Abnar & Zuidema, 2020).

    ``R = A_L @ ... @ A_1`` with ``A_l = renorm((1 - residual) * mean_heads(W_l) + residual * I)``.

    Args:
        layers: per layer, ``[B, heads, S, S]`` (or head-averaged ``[B, S, S]``), first layer
            first. Padding keys must carry zero weight (they do in captured weights); a
            zero row (padded query of a NestedTensor call) becomes the identity row.
        residual: weight of the identity (the residual connection), in ``[0, 1)``; 0.5 as
            in the paper.

    Returns:
        ``FloatTensor[B, S, S]``: row ``i`` is how much output token ``i`` of the last layer
        draws on each input token; every row sums to 1.
    """
    if not layers:
        raise ValueError("attention_rollout needs at least one layer")
    if not 0.0 <= residual < 1.0:
        raise ValueError(f"residual must be in [0, 1), got {residual}")
    rollout = _with_residual(layers[0], residual)
    for w in layers[1:]:
        if w.shape[-1] != rollout.shape[-1]:
            raise ValueError(f"layers disagree on the number of tokens: {w.shape[-1]} vs {rollout.shape[-1]}")
        rollout = _with_residual(w, residual) @ rollout
    return rollout


def decoder_rollout(cross_attention: Tensor, encoder_rollout: Tensor) -> Tensor:
    """Compose a decoder layer's cross-attention with the encoder rollout.

    Args:
        cross_attention: ``[B, heads, Q, S]`` (or ``[B, Q, S]``): queries over encoder outputs.
        encoder_rollout: ``[B, S, S]`` from :func:`attention_rollout`.

    Returns:
        ``FloatTensor[B, Q, S]``: each query's attention traced back to the input feature
        cells; rows sum to 1 (the cross-attention is head-averaged and renormalised, as
        padding keys carry zero weight).
    """
    cross = cross_attention.float().mean(1) if cross_attention.dim() == 4 else cross_attention.float()
    cross = cross / cross.sum(-1, keepdim=True).clamp(min=1e-12)
    return cross @ encoder_rollout.to(cross.dtype)


def transformer_attention_names(model: nn.Module) -> dict[str, list[str]]:
    """Attention module names of standard ``nn.Transformer*Layer`` stacks, in model order.

    Returns ``{"encoder_self": [...], "decoder_self": [...], "decoder_cross": [...]}``,
    e.g. ``"encoder.layers.0.self_attn"`` and ``"decoder.layers.5.multihead_attn"`` for
    detlens' DETR. Feed them to ``AttentionCapture(model, modules=...)``.
    """
    names: dict[str, list[str]] = {"encoder_self": [], "decoder_self": [], "decoder_cross": []}
    for name, mod in named_modules(model):
        prefix = f"{name}." if name else ""
        if isinstance(mod, nn.TransformerEncoderLayer):
            names["encoder_self"].append(prefix + "self_attn")
        elif isinstance(mod, nn.TransformerDecoderLayer):
            names["decoder_self"].append(prefix + "self_attn")
            names["decoder_cross"].append(prefix + "multihead_attn")
    return names
