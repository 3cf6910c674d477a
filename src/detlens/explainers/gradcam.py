"""Per-detection Grad-CAM, element-wise gradient x activation (HiResCAM / ODAM style) and LayerCAM.

Both take an :class:`~detlens.adapters.AdapterOutput` (one forward already done) and
return, per image, ``FloatTensor[K, H, W]`` raw maps (non-negative, the model's own
scale) at original-image resolution.

* ``weighting="gradcam"``: ``ReLU(sum_c alpha_c A_c)`` with ``alpha_c`` the spatial
  mean of ``d score / d A_c`` (Selvaraju et al.).
* ``weighting="elementwise"``: ``ReLU(sum_c (d score / d A_c) * A_c)`` per position
  (HiResCAM, Draelos & Collins; ODAM, Zhao et al.).
* ``weighting="layercam"``: ``ReLU(sum_c ReLU(d score / d A_c) * A_c)`` per position
  (LayerCAM, Jiang et al., 2021): only positive gradients weigh each position.

``target``: ``"class"`` explains the detection's class probability; ``"box"`` the four
box coordinates (each map normalised by its maximum, then the element-wise max);
``"both"`` the element-wise max of the normalised class map and the box map.

The fast paths (``fast=True``, the default) never run one forward per detection:

* Two-stage (``output.roi`` present, layer a pooled feature level): every detection's
  score depends only on its own RoIAlign output (proposals are detached), so the box
  head and predictor are re-run on the ``K`` pooled tensors and one backward of the
  summed scores gives every detection's exact gradient ``g_d [C, P, P]``. Pulling
  ``g_d`` back through RoIAlign (its backward, on a crop around the RoI) gives the exact
  feature-map gradient ``G_d``; Grad-CAM's channel weights are ``sum(G_d) / (H_l W_l)``.
  RoIAlign's bilinear weights of a sampling point sum to one, so this equals the sum
  of ``g_d`` over bins divided by ``H_l W_l`` -- except for sampling points outside
  ``[-1, H_l] x [-1, W_l]``, which RoIAlign gives zero weight; using the backward
  itself makes that border case exact too.
* Otherwise: ``torch.autograd.grad(scores, activation, grad_outputs=eye(K),
  is_grads_batched=True)``, looping with a retained graph where vmap cannot batch.

``fast=False`` is the reference: one backward per detection (and per box coordinate)
through the full forward graph, w.r.t. the same layer.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor
from torchvision.ops import roi_align

from detlens.adapters.base import AdapterOutput, Detections, unknown_layer_error

from ._autograd import GRAD_MEMORY_BUDGET, looped_grads, per_output_grads

__all__ = [
    "WEIGHTINGS", "Target", "Weighting", "check_target", "combine_targets", "detection_layers", "gradcam",
    "target_outputs",
]

Target = Literal["class", "box", "both"]
Weighting = Literal["gradcam", "elementwise", "layercam"]
WEIGHTINGS: tuple[str, ...] = ("gradcam", "elementwise", "layercam")

_EPS = 1e-12


def detection_layers(output: AdapterOutput, layer: str, image_index: int) -> list[str]:
    """The captured activation each detection of an image is explained on.

    A per-detection-level layer (e.g. ``"features"``) resolves to the level the detection
    was read from (``"features/<level>"``); any other layer is used for every detection.
    """
    det = output.detections[image_index]
    if layer in output.level_layers:
        prefix = output.level_layers[layer]
        names = [prefix + lvl for lvl in det.level]
        missing = sorted({n for n in names if n not in output.activations})
        if missing:
            raise ValueError(f"Layer {layer!r} needs {missing}, which were not captured; run the adapter with it.")
        return names
    if layer not in output.activations:
        raise unknown_layer_error(layer, list(output.activations) + list(output.level_layers), "captured layer")
    return [layer] * len(det)


def check_target(target: str) -> None:
    """Raises ``ValueError`` unless ``target`` is one of :data:`Target`."""
    if target not in get_args(Target):
        raise ValueError(f"target must be one of {list(get_args(Target))}, got {target!r}")


def target_outputs(det: Detections, target: Target) -> Tensor:
    """Differentiable outputs to explain, ``[K, T]`` (T = 1, 4 or 5)."""
    check_target(target)
    cols = []
    if target in ("class", "both"):
        cols.append(det.score_graph.reshape(-1, 1))
    if target in ("box", "both"):
        if det.box_graph is None:
            raise ValueError("This adapter gives no differentiable box coordinates; use target='class'")
        cols.append(det.box_graph.reshape(-1, 4))
    return torch.cat([c.float() for c in cols], dim=1)


def _normalise(maps: Tensor) -> Tensor:
    """Divide each map (leading dims) by its maximum; all-zero maps stay zero."""
    peak = maps.flatten(-2).amax(-1).clamp_min(_EPS)
    return maps / peak[..., None, None]


def combine_targets(maps: Tensor, target: Target) -> Tensor:
    """``[K, T, h, w]`` per-output maps -> ``[K, h, w]`` (see module docstring)."""
    if target == "class":
        return maps[:, 0]
    box = _normalise(maps[:, -4:]).amax(1)
    if target == "box":
        return box
    return torch.maximum(_normalise(maps[:, 0]), box)


def _cam(grads: Tensor, acts: Tensor, weighting: Weighting) -> Tensor:
    """``grads``, ``acts``: ``[R, C, h, w]`` -> ``[R, h, w]`` non-negative maps."""
    if weighting == "gradcam":
        alpha = grads.mean(dim=(2, 3))
        return torch.einsum("rc,rchw->rhw", alpha, acts).clamp_min(0)
    if weighting == "elementwise":
        return (grads * acts).sum(1).clamp_min(0)
    if weighting == "layercam":
        return (grads.clamp_min(0) * acts).sum(1).clamp_min(0)
    raise ValueError(f"weighting must be one of {list(WEIGHTINGS)}, got {weighting!r}")


def gradcam(
    output: AdapterOutput,
    layer: str,
    target: Target = "class",
    weighting: Weighting = "gradcam",
    fast: bool = True,
) -> list[Tensor]:
    """Per-detection gradient maps.

    Args:
        output: an adapter run that captured ``layer`` (with gradients).
        layer: a captured layer, a per-detection-level layer such as ``"features"``, or a
            fused layer (``output.fused_layers``, e.g. ``"neck_fused"``: every detection's map
            on each member layer at image resolution, element-wise maximum).
        target: ``"class"``, ``"box"`` or ``"both"``.
        weighting: ``"gradcam"`` (channel-mean gradients), ``"elementwise"`` or ``"layercam"``.
        fast: use the fast paths (module docstring); ``False`` runs the per-detection
            reference loop.

    Returns:
        Per image ``FloatTensor[K, H, W]``: raw maps (>= 0, finite) at original size.
    """
    check_target(target)
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {list(WEIGHTINGS)}, got {weighting!r}")
    if layer in output.fused_layers:
        return _fused(output, output.fused_layers[layer], target, weighting, fast)
    layers = [detection_layers(output, layer, i) for i in range(len(output.detections))]
    if fast and output.roi is not None and _roi_fast_applies(output, layers):
        return _two_stage_fast(output, layers, target, weighting)
    return _from_graph(output, layers, target, weighting, fast)


def _empty_maps(output: AdapterOutput) -> list[Tensor]:
    return [torch.zeros((len(d), *g.original_size)) for d, g in zip(output.detections, output.geometry)]


# --------------------------------------------------------------------- general path
def _from_graph(output: AdapterOutput, layers: list[list[str]], target: Target, weighting: Weighting, fast: bool) -> list[Tensor]:
    """Gradients through the adapter's forward graph, grouped by activation layer."""
    result = _empty_maps(output)
    groups: dict[str, list[tuple[int, int]]] = {}
    for i, names in enumerate(layers):
        for d, name in enumerate(names):
            groups.setdefault(name, []).append((i, d))
    outputs = [target_outputs(det, target) if len(det) else None for det in output.detections]
    for name, members in groups.items():
        act = output.activations[name]
        if not act.requires_grad:
            raise RuntimeError(f"Activation {name!r} is not on the autograd graph (was the adapter run with_grad?)")
        # rows of one chunk: gradients [rows*T, B, C, h, w] must fit the budget
        per_row = act.numel() * 4 * (5 if target == "both" else 4 if target == "box" else 1)
        chunk = max(1, GRAD_MEMORY_BUDGET // max(per_row, 1))
        for start in range(0, len(members), chunk):
            part = members[start : start + chunk]
            outs = torch.stack([outputs[i][d] for i, d in part])  # [n, T]
            t = outs.shape[1]
            grads_fn = per_output_grads if fast else looped_grads
            (grads,) = grads_fn(outs.reshape(-1), [act])  # [n*T, B, C, h, w]
            img = torch.tensor([i for i, _ in part for _ in range(t)], device=act.device)
            rows = torch.arange(len(img), device=act.device)
            g = grads[rows, img].float()  # [n*T, C, h, w]
            a = act.detach()[img].float()
            cams = _cam(g, a, weighting).reshape(len(part), t, *act.shape[-2:])
            cams = combine_targets(cams, target)
            for i in sorted({i for i, _ in part}):
                sel = [k for k, (j, _) in enumerate(part) if j == i]
                dets = torch.tensor([part[k][1] for k in sel])
                result[i][dets] = output.to_image(cams[sel], i)
    return result


def _fused(output: AdapterOutput, members: list[str], target: Target, weighting: Weighting, fast: bool) -> list[Tensor]:
    """Every detection on each member layer (one backward w.r.t. all of them), maps resampled
    to the image, element-wise maximum over the members."""
    result = _empty_maps(output)
    missing = [n for n in members if n not in output.activations]
    if missing:
        raise ValueError(f"The fused layer needs {missing}, which were not captured; run the adapter with it.")
    part_all = [(i, d) for i, det in enumerate(output.detections) for d in range(len(det))]
    if not part_all:
        return result
    acts = [output.activations[n] for n in members]
    outputs = [target_outputs(det, target) if len(det) else None for det in output.detections]
    t = int(next(o for o in outputs if o is not None).shape[1])
    chunk = max(1, GRAD_MEMORY_BUDGET // max(sum(a.numel() for a in acts) * 4 * t, 1))
    grads_fn = per_output_grads if fast else looped_grads
    for start in range(0, len(part_all), chunk):
        part = part_all[start : start + chunk]
        outs = torch.stack([outputs[i][d] for i, d in part])  # [n, T]
        grads = grads_fn(outs.reshape(-1), acts)  # per member [n*T, B, C, h, w]
        img = torch.tensor([i for i, _ in part for _ in range(t)], device=acts[0].device)
        rows = torch.arange(len(img), device=acts[0].device)
        for act, g_all in zip(acts, grads):
            cams = _cam(g_all[rows, img].float(), act.detach()[img].float(), weighting)
            cams = combine_targets(cams.reshape(len(part), t, *act.shape[-2:]), target)
            for i in sorted({i for i, _ in part}):
                sel = [k for k, (j, _) in enumerate(part) if j == i]
                dets = torch.tensor([part[k][1] for k in sel])
                result[i][dets] = torch.maximum(result[i][dets], output.to_image(cams[sel], i).cpu())
    return result


# ------------------------------------------------------------------ two-stage path
def _roi_fast_applies(output: AdapterOutput, layers: list[list[str]]) -> bool:
    prefix = output.level_layers.get("features", "features/")
    return all(n.startswith(prefix) for names in layers for n in names)


def _two_stage_fast(output: AdapterOutput, layers: list[list[str]], target: Target, weighting: Weighting) -> list[Tensor]:
    roi = output.roi
    assert roi is not None
    result = _empty_maps(output)
    prefix = output.level_layers.get("features", "features/")
    for i, det in enumerate(output.detections):
        if len(det) == 0:
            continue
        pooled = roi.pooled[i].detach().clone().requires_grad_(True)  # [K, C, P, P]
        with torch.enable_grad():
            probs, boxes = roi.score_fn(pooled, det.labels, roi.rois[i], i)
            cols = []
            if target in ("class", "both"):
                cols.append(probs.float().reshape(-1, 1))
            if target in ("box", "both"):
                cols.append(boxes.float().reshape(-1, 4))
            outs = torch.cat(cols, 1)  # [K, T]
            # column sums: row d of the gradient is exactly d outs[d, t] / d pooled[d]
            g = torch.stack(
                [torch.autograd.grad(outs[:, t].sum(), pooled, retain_graph=t < outs.shape[1] - 1)[0]
                 for t in range(outs.shape[1])],
                dim=1,
            )  # [K, T, C, P, P]
        for lvl_idx, lvl_name in enumerate(roi.featmap_names):
            name = prefix + lvl_name
            rows = [d for d, n in enumerate(layers[i]) if n == name and int(roi.level_index[i][d]) == lvl_idx]
            if not rows or name not in output.activations:
                continue
            feat = output.activations[name].detach()[i].float()  # [C, H_l, W_l]
            idx = torch.tensor(rows)
            cams = _roi_cams(
                g[idx].float(), roi.rois[i][idx].float(), feat, roi.scales[lvl_idx], roi.sampling_ratio, weighting
            )  # [n, T, H_l, W_l]
            result[i][idx] = output.to_image(combine_targets(cams, target), i)
        # detections whose layer is a level they were not pooled from keep zero maps (exact:
        # their score does not depend on that level).
    return result


def _roi_cams(
    g: Tensor, rois: Tensor, feat: Tensor, scale: float, sampling_ratio: int, weighting: Weighting
) -> Tensor:
    """Maps on one feature level from RoIAlign-output gradients.

    Args:
        g: ``[n, T, C, P, P]`` gradients w.r.t. each RoI's pooled features.
        rois: ``[n, 4]`` boxes in input pixels; ``feat``: ``[C, H, W]`` the level.
        scale: the level's spatial scale (a power of two, as MultiScaleRoIAlign infers).

    Returns:
        ``[n, T, H, W]`` non-negative maps.
    """
    n, t, c, ph, pw = g.shape
    _, H, W = feat.shape
    # RoI in feature coordinates as torchvision's kernel sees it (aligned=False):
    # start = x1 * scale, extent max((x2 - x1) * scale, 1); bilinear taps reach floor(.) + 1.
    x0f, y0f = rois[:, 0] * scale, rois[:, 1] * scale
    x1f, y1f = rois[:, 2] * scale, rois[:, 3] * scale
    x_end = x0f + torch.clamp(x1f - x0f, min=1.0)
    y_end = y0f + torch.clamp(y1f - y0f, min=1.0)
    cx0 = x0f.floor().clamp(0, W - 1).long()
    cy0 = y0f.floor().clamp(0, H - 1).long()
    cx1 = (x_end.floor().long() + 2).clamp(1, W)
    cy1 = (y_end.floor().long() + 2).clamp(1, H)
    cw = int((cx1 - cx0).max().clamp(1, W))
    ch = int((cy1 - cy0).max().clamp(1, H))
    cx0 = torch.minimum(cx0, torch.full_like(cx0, W - cw))
    cy0 = torch.minimum(cy0, torch.full_like(cy0, H - ch))
    # Crop-local RoIs, still scaled (spatial_scale=1): subtracting an integer from a
    # power-of-two-scaled float is exact, so sampling points match the full-map kernel.
    batch = torch.arange(n * t, dtype=rois.dtype)  # one leaf image per (detection, output)
    local = torch.stack([x0f - cx0, y0f - cy0, x1f - cx0, y1f - cy0], 1).repeat_interleave(t, 0)
    leaf = torch.zeros((n * t, c, ch, cw), requires_grad=True)
    with torch.enable_grad(), torch.autocast(device_type=leaf.device.type, enabled=False):
        pooled = roi_align(
            leaf, torch.cat([batch[:, None], local], 1), output_size=(ph, pw), spatial_scale=1.0,
            sampling_ratio=sampling_ratio, aligned=False,
        )
        (grad,) = torch.autograd.grad(pooled, leaf, grad_outputs=g.reshape(n * t, c, ph, pw))
    grad = grad.reshape(n, t, c, ch, cw)  # exact d out / d feat on the crop, zero elsewhere
    rows = cy0[:, None] + torch.arange(ch)  # [n, ch]
    cols = cx0[:, None] + torch.arange(cw)  # [n, cw]
    out = feat.new_zeros((n, t, H, W))
    if weighting == "gradcam":
        alpha = grad.sum(dim=(3, 4)) / float(H * W)  # [n, T, C] spatial mean over the level
        out = torch.einsum("ntc,chw->nthw", alpha, feat).clamp_min(0)
    else:
        crops = feat[:, rows[:, :, None], cols[:, None, :]].permute(1, 0, 2, 3)  # [n, C, ch, cw]
        if weighting == "layercam":
            grad = grad.clamp_min(0)
        local_maps = (grad * crops[:, None]).sum(2).clamp_min(0)  # [n, T, ch, cw]
        k = torch.arange(n)[:, None, None, None]
        tt = torch.arange(t)[None, :, None, None]
        out[k, tt, rows[:, None, :, None], cols[:, None, None, :]] = local_maps
    return out
