"""Per-detection attention maps of query-based detectors read by an adapter (``HFDetrAdapter.query_attention``).

Dense attention (DETR, Conditional DETR, YOLOS) is drawn with :mod:`detlens.explainers.rollout`;
this module adds multi-scale deformable attention (Deformable DETR, RT-DETR, D-FINE, ...).

Deformable attention does not weigh every feature cell: each query's head samples ``P``
points per feature level with bilinear interpolation (``grid_sample``,
``align_corners=False``, zero padding) and sums the samples with softmaxed weights
(over levels x points). The *effective* weight a query puts on a feature cell is therefore
the sum, over the points that fall near it, of the point's weight times its bilinear
coefficient for that cell. :func:`splat_deformable_attention` computes exactly that (a
bilinear "splat", the adjoint of the sampling), so that for any value tensor
``sum_cells map * value == what the attention sampled``.

No library ships this reduction (``output_attentions`` gives the weights alone, the
locations stay inside the attention module), hence the few lines here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F

from detlens.adapters.hf_detr import DenseQueryAttention, QueryAttention
from detlens.explainers.rollout import (
    attention_rollout,
    decoder_rollout,
    minmax_normalize,
    point_attention_maps,
    query_attention_maps,
)
from torch import Tensor

__all__ = ["detection_attention_maps", "fuse_levels", "splat_deformable_attention"]


def splat_deformable_attention(
    weights: Tensor, locations: Tensor, shapes: Sequence[tuple[int, int]], heads: Literal["mean", "none"] = "mean"
) -> list[Tensor]:
    """Effective attention over each level's cells, per query.

    Args:
        weights: ``FloatTensor[N, heads, L, P]`` softmaxed attention weights of ``N`` queries.
        locations: ``FloatTensor[N, heads, L, P, 2]`` sampling locations ``(x, y)`` in
            ``[0, 1]`` of each level's grid (``grid_sample`` convention, ``align_corners=False``).
        shapes: the ``L`` grid sizes ``(h_l, w_l)``.
        heads: ``"mean"``: maps ``[N, h_l, w_l]`` averaged over heads; ``"none"``:
            ``[N, heads, h_l, w_l]``.

    Returns:
        ``L`` tensors, level ``l``'s effective weights. Summed over every level and cell they
        give each head's total weight on points inside the grids (1 when no point falls
        outside), the mass a sample outside the grid loses to zero padding is lost here too.
    """
    if weights.dim() != 4 or locations.shape != (*weights.shape, 2):
        raise ValueError(f"weights [N, heads, L, P] and locations [N, heads, L, P, 2] expected, got "
                         f"{tuple(weights.shape)} and {tuple(locations.shape)}")
    if len(shapes) != weights.shape[2]:
        raise ValueError(f"{len(shapes)} level shapes for {weights.shape[2]} levels")
    if heads not in ("mean", "none"):
        raise ValueError(f"heads must be 'mean' or 'none', got {heads!r}")
    n, h = weights.shape[:2]
    out = []
    for level, (gh, gw) in enumerate(shapes):
        w = weights[:, :, level].float().reshape(n * h, -1)  # [NH, P]
        loc = locations[:, :, level].float().reshape(n * h, -1, 2)
        x = loc[..., 0] * gw - 0.5  # pixel-centre coordinates of the grid (align_corners=False)
        y = loc[..., 1] * gh - 0.5
        x0, y0 = x.floor(), y.floor()
        fx, fy = x - x0, y - y0
        cells = torch.zeros(n * h, gh * gw, dtype=torch.float32, device=weights.device)
        for dx, dy, coef in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
            cx, cy = x0 + dx, y0 + dy
            inside = (cx >= 0) & (cx < gw) & (cy >= 0) & (cy < gh)
            index = (cy.clamp(0, gh - 1) * gw + cx.clamp(0, gw - 1)).long()
            cells.scatter_add_(1, index, torch.where(inside, w * coef, torch.zeros_like(w)))
        maps = cells.reshape(n, h, gh, gw)
        out.append(maps.mean(1) if heads == "mean" else maps)
    return out


def fuse_levels(level_maps: Sequence[Tensor], level_shapes: Sequence[tuple[int, int]], batch_size: tuple[int, int],
                to_image: callable) -> Tensor:  # type: ignore[valid-type]
    """One map at image resolution from per-level effective weights.

    Each level's weight per cell becomes a density (weight per padded-input pixel: divided by
    the cell's area), is resampled onto the image by ``to_image`` (``grid [K, h, w] ->
    [K, H, W]``, e.g. :meth:`detlens.adapters.AdapterOutput.to_image` of the image) and the
    levels are summed: a coarse level's cell counts by the weight on it, not by its size.

    Args:
        level_maps: ``L`` tensors ``[K, h_l, w_l]``.
        level_shapes: their ``(h_l, w_l)``; ``batch_size``: ``(Hp, Wp)`` of the padded input.
    """
    hp, wp = batch_size
    fused = None
    for maps, (gh, gw) in zip(level_maps, level_shapes):
        density = maps / ((hp / gh) * (wp / gw))
        image = to_image(density)
        fused = image if fused is None else fused + image
    if fused is None:
        raise ValueError("no levels to fuse")
    return fused


def detection_attention_maps(
    attention: QueryAttention,
    map_sizes: Sequence[tuple[int, int]],
    *,
    heads: Literal["mean", "none"] = "mean",
    reference_points: Sequence[Tensor] | None = None,
    encoder_layer: int | None = None,
    rollout: bool = False,
) -> list[dict[str, Tensor]]:
    """Display maps of each image's detections, from one :class:`QueryAttention`.

    Args:
        map_sizes: per image ``(h, w)`` the maps are drawn at (the image's aspect).
        heads: ``"none"`` adds a ``.../head<h>`` map per head.
        reference_points: per image ``FloatTensor[P, 2]`` ``(x, y)`` in map pixels, where the
            dense encoder's self-attention is read (``encoder/layer<l>``).
        encoder_layer: which dense encoder layer to read at the reference points.
        rollout: the last decoder layer's cross-attention through the encoder rollout (dense).

    Returns:
        Per image, key -> ``FloatTensor[K, h, w]`` in ``[0, 1]`` (min-max per map):
        ``decoder/layer<l>`` (deformable: all levels fused at image resolution),
        ``decoder/layer<l>/level<n>`` (deformable), ``.../head<h>``, ``encoder/layer<l>``
        (``[P, h, w]``, one per reference point) and ``rollout``.
    """
    out = attention.output
    queries = [d.origin for d in out.detections]
    result: list[dict[str, Tensor]] = [{} for _ in out.detections]

    def put(key: str, b: int, maps: Tensor) -> None:  # maps [K, (heads,) H, W] raw
        if heads == "none" and maps.dim() == 4:
            for h in range(maps.shape[1]):
                result[b][f"{key}/head{h}"] = minmax_normalize(maps[:, h]).cpu()
            maps = maps.mean(1)
        result[b][key] = minmax_normalize(maps).cpu()

    padding = None
    for layer, att in attention.decoder.items():
        key = f"decoder/layer{layer}"
        if isinstance(att, DenseQueryAttention):
            padding = None if att.key_padding is None else att.key_padding.reshape(-1, *att.grid)
            for reduce in (["mean", "none"] if heads == "none" else ["mean"]):
                maps = query_attention_maps(att.weights, att.grid, map_sizes, queries, padding, heads=reduce)  # type: ignore[arg-type]
                for b, m in enumerate(maps):
                    if reduce == "mean":
                        result[b][key] = m.display.cpu()
                    else:
                        for h in range(m.display.shape[1]):
                            result[b][f"{key}/head{h}"] = m.display[:, h].cpu()
            continue
        for b, q in enumerate(queries):
            per_level = splat_deformable_attention(att.weights[b, q], att.locations[b, q], att.shapes, heads=heads)
            to_image = _resampler(out, b, map_sizes[b])
            fused = fuse_levels(per_level, att.shapes, out.geometry[b].batch_size, to_image)
            put(key, b, fused)
            for n, level in enumerate(per_level):
                put(f"{key}/level{n}", b, to_image(level))
    if encoder_layer is not None and encoder_layer in attention.encoder and reference_points is not None:
        att = attention.encoder[encoder_layer]
        padding = None if att.key_padding is None else att.key_padding.reshape(-1, *att.grid)
        maps = point_attention_maps(att.weights, list(reference_points), att.grid, map_sizes, padding, heads="mean")
        for b, m in enumerate(maps):
            result[b][f"encoder/layer{encoder_layer}"] = m.display.cpu()
    if rollout and attention.encoder and attention.decoder:
        last = attention.decoder[max(attention.decoder)]
        if isinstance(last, DenseQueryAttention):
            layers = [attention.encoder[i].weights for i in sorted(attention.encoder)]
            rolled = decoder_rollout(last.weights, attention_rollout(layers))
            padding = None if last.key_padding is None else last.key_padding.reshape(-1, *last.grid)
            for b, m in enumerate(query_attention_maps(rolled, last.grid, map_sizes, queries, padding)):
                result[b]["rollout"] = m.display.cpu()
    return result


def _resampler(out: Any, b: int, size: tuple[int, int]) -> Any:
    """``grid [K, (heads,) h, w]`` on the padded batch -> ``[K, (heads,) size]`` over image ``b``."""

    def to_image(grid: Tensor) -> Tensor:
        lead = grid.shape[:-2]
        image = out.to_image(grid.reshape(-1, *grid.shape[-2:]), b)  # [N, H, W] original size
        if image.shape[0] and tuple(image.shape[-2:]) != tuple(size):
            image = F.interpolate(image[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
        return image.reshape(*lead, *image.shape[-2:])

    return to_image
