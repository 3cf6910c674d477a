"""Gradient-free and input-level maps: EigenCAM, input-gradient saliency, feature-map grid.

All take an :class:`~detlens.adapters.AdapterOutput` (one forward done) and return maps
at original-image resolution on the model's own scale (see :mod:`detlens.explainers.scale`).

* :func:`eigencam` -- the first principal component of a layer's activations
  (Muhammad & Yeasin, 2020). No gradients and no class: it shows what the layer
  responds to most in the image, the same map for every detection on that layer.
* :func:`input_gradient` -- ``max_c |d score / d x_c|`` per pixel (Simonyan et al., 2014),
  per detection, from one vectorised backward through the whole detector
  (pre-processing and resize included, so it lands on the original pixels).
* :func:`feature_grid` -- the ``k`` channels of a layer with the highest mean activation
  on an image, each as a map.
"""

from __future__ import annotations

import torch
from torch import Tensor

from detlens.adapters.base import AdapterOutput, unknown_layer_error

from ._autograd import per_output_grads
from .gradcam import Target, combine_targets, detection_layers, target_outputs

__all__ = ["eigencam", "feature_grid", "input_gradient"]


def _principal_map(act: Tensor) -> Tensor:
    """``[C, h, w]`` -> ``[h, w]``: projection on the first principal direction, ReLU.

    The sign of a singular vector is arbitrary; it is chosen so that the projection
    correlates positively with the channel-summed activation (the component points
    where the layer fires), then negative values are cut as in EigenCAM.
    """
    c, h, w = act.shape
    x = act.reshape(c, h * w).T.double()  # [hw, C]
    x = x - x.mean(0, keepdim=True)
    if h * w < 2 or not torch.isfinite(x).all() or float(x.abs().max()) == 0.0:
        return act.new_zeros((h, w), dtype=torch.float32)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    proj = x @ vh[0]  # [hw]
    energy = act.reshape(c, h * w).double().sum(0)
    if float(((proj - proj.mean()) * (energy - energy.mean())).sum()) < 0:
        proj = -proj
    return proj.clamp_min(0).reshape(h, w).float()


def eigencam(output: AdapterOutput, layer: str) -> list[Tensor]:
    """EigenCAM maps, per image ``FloatTensor[K, H, W]`` (one map per detection; detections
    explained on the same layer share it; a fused layer takes the element-wise maximum of its
    members' maps). Needs no gradients (``with_grad=False`` is fine).
    """
    if layer in output.fused_layers:  # per member layer, element-wise maximum at image resolution
        per_member = [eigencam(output, name) for name in output.fused_layers[layer]]
        return [torch.stack(maps).amax(0) for maps in zip(*per_member)]
    result = []
    for i, det in enumerate(output.detections):
        names = detection_layers(output, layer, i)
        H, W = output.geometry[i].original_size
        maps = torch.zeros((len(det), H, W))
        for name in sorted(set(names)):
            act = output.activations[name].detach()[i].float()
            image_map = output.to_image(_principal_map(act)[None], i)[0].cpu()
            rows = torch.tensor([d for d, n in enumerate(names) if n == name])
            maps[rows] = image_map
        result.append(maps)
    return result


def input_gradient(output: AdapterOutput, target: Target = "class") -> list[Tensor]:
    """Input-gradient saliency, per image ``FloatTensor[K, H, W]``: ``max_c |grad|``.

    One forward (the adapter's) and one vectorised backward for all detections of all
    images; for ``target="box"``/``"both"`` each output's map is normalised by its
    maximum and the element-wise maximum taken (as in :func:`~detlens.explainers.gradcam.gradcam`).
    """
    outs, owners = [], []
    for i, det in enumerate(output.detections):
        if len(det):
            o = target_outputs(det, target)  # [K, T]
            outs.append(o)
            owners.append(i)
    result = [torch.zeros((len(d), *g.original_size)) for d, g in zip(output.detections, output.geometry)]
    if not outs:
        return result
    t = outs[0].shape[1]
    flat = torch.cat([o.reshape(-1) for o in outs])
    # Only the owning image's leaf can have a nonzero gradient, but one call over all
    # inputs keeps it to a single vectorised backward.
    grads = per_output_grads(flat, output.inputs)  # per input: [R, 3, H, W]
    start = 0
    for o, i in zip(outs, owners):
        rows = o.numel()
        g = grads[i][start : start + rows].float()  # [K*T, 3, H, W]
        sal = g.abs().amax(1).reshape(o.shape[0], t, *g.shape[-2:])
        result[i] = combine_targets(torch.nan_to_num(sal), target).cpu()
        start += rows
    return result


def feature_grid(output: AdapterOutput, layer: str, k: int = 8) -> list[tuple[Tensor, Tensor]]:
    """The ``k`` most active channels of ``layer`` per image.

    Channels are ranked by their mean activation over the part of the grid that covers
    the image (padding excluded).

    Returns:
        Per image ``(channels Int64Tensor[k'], maps FloatTensor[k', H, W])`` with
        ``k' = min(k, C)``, most active first; maps are the raw activations resampled to
        the image.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if layer not in output.activations:
        raise unknown_layer_error(layer, list(output.activations), "captured layer")
    act = output.activations[layer].detach().float()
    out = []
    for i, geom in enumerate(output.geometry):
        a = act[i]  # [C, h, w]
        h = max(1, round(a.shape[-2] * geom.input_size[0] / geom.batch_size[0]))
        w = max(1, round(a.shape[-1] * geom.input_size[1] / geom.batch_size[1]))
        strength = torch.nan_to_num(a[:, :h, :w]).mean(dim=(1, 2))
        channels = torch.argsort(strength, descending=True, stable=True)[: min(k, a.shape[0])]
        out.append((channels.cpu(), output.to_image(a[channels], i).cpu()))
    return out
