"""``explain(model, images, ...)``: detections and their maps in one call (notebooks, scripts).

Example::

    import detlens
    out = detlens.explain(model, [image], method="gradcam", layer="features", top_k=5)
    out[0].boxes        # FloatTensor[K, 4], pixels of `image`
    out[0].maps         # FloatTensor[K, H, W] in [0, 1] (display scale)
    out[0].raw          # FloatTensor[K, H, W] on the model's own scale

``model`` is a torchvision detector, detlens' DETR, either wrapped in a LightningModule,
or anything with an adapter (``adapter=MyAdapter(model)``, see :mod:`detlens.adapters.base`).
The model's train/eval flags are restored and its parameters' ``.grad`` are not touched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from detlens.adapters import adapter_for
from detlens.adapters.base import AdapterOutput, DetectorAdapter, prepare_images

from .boundary import BoundaryResult, Norm, boundary
from .cams import eigencam, feature_grid, input_gradient
from .drise import drise
from .gradcam import Target, gradcam
from .scale import display_maps, flat_maps

__all__ = [
    "METHODS", "Explanation", "Method", "box_focus", "explain", "focus_summary", "gradcam_explanations", "peak_values",
]

Method = Literal["gradcam", "elementwise", "layercam", "eigencam", "input_gradient", "feature_grid", "drise", "boundary"]
METHODS: tuple[str, ...] = get_args(Method)
_NEEDS_LAYER = {"gradcam", "elementwise", "layercam", "eigencam", "feature_grid"}
_GRADIENT_CAMS = ("gradcam", "elementwise", "layercam")


@dataclass(frozen=True)
class Explanation:
    """The detections of one image and their maps (CPU tensors, original-image pixels).

    Attributes:
        boxes: ``FloatTensor[K, 4]`` xyxy; scores: ``FloatTensor[K]`` (descending);
            labels: ``Int64Tensor[K]``.
        maps: ``FloatTensor[M, H, W]`` in ``[0, 1]``, per-map min-max: for display only.
        raw: ``FloatTensor[M, H, W]``, the maps on the model's own scale (>= 0): compare
            these (or :class:`~detlens.explainers.scale.FixedScale` of them) over time.
        method, layer, target: what was computed (``layer`` ``None`` where none applies).
        channels: ``feature_grid`` only: ``Int64Tensor[M]``, the channel of each map
            (then ``M`` is the number of channels, not of detections); else ``None``.
        boundary: ``"boundary"`` only: the margins, losses and perturbed images
            (:class:`~detlens.explainers.boundary.BoundaryResult`; ``raw`` is its ``delta_map``).

    ``M == K`` for every method but ``feature_grid``.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    maps: Tensor
    raw: Tensor
    method: str
    layer: str | None
    target: str
    channels: Tensor | None = None
    boundary: BoundaryResult | None = None

    def __len__(self) -> int:
        return int(self.boxes.shape[0])


def explain(
    model: nn.Module | DetectorAdapter,
    images: Sequence[Tensor] | Tensor,
    method: Method = "gradcam",
    layer: str | None = None,
    target: Target = "class",
    top_k: int | None = 10,
    score_threshold: float = 0.0,
    *,
    adapter: DetectorAdapter | None = None,
    fast: bool = True,
    grid_channels: int = 8,
    num_masks: int = 500,
    mask_batch_size: int = 16,
    seed: int = 0,
    norm: Norm = "l2",
    epsilon: float | None = None,
    steps: int = 20,
    step_size: float | None = None,
) -> list[Explanation]:
    """Detect and explain every detection of each image.

    Args:
        model: the detector (or an adapter).
        images: ``B`` images ``FloatTensor[C, H, W]`` (``C`` 1 or 3, values in ``[0, 1]``),
            or a batch ``[B, C, H, W]``.
        method: ``"gradcam"`` (channel-mean gradients), ``"elementwise"`` (gradient x
            activation, HiResCAM/ODAM), ``"layercam"`` (positive gradients x activation,
            element-wise), ``"eigencam"``, ``"input_gradient"``,
            ``"feature_grid"`` (top channels of ``layer``) or ``"drise"`` (black box,
            ``num_masks`` forwards per image).
        layer: target layer; ``None`` -> the adapter's default (``adapter.layer_names()``
            lists the valid ones; an unknown name raises with the closest matches).
        target: ``"class"``, ``"box"`` or ``"both"`` (gradient methods).
        top_k: explain at most this many detections per image (highest scores).
        score_threshold: only detections scoring above it.
        adapter: explicit adapter (custom detectors).
        fast: the one-backward fast paths (``False``: per-detection reference loop).
        grid_channels: channels of ``feature_grid``.
        num_masks, mask_batch_size, seed: D-RISE.
        norm, epsilon, steps, step_size: ``"boundary"`` (:func:`detlens.explainers.boundary.boundary`):
            a bounded attack per detection; its maps are ``|delta|`` of the perturbation that
            lost the detection, and ``score_threshold`` (required ``> 0``) is the score below
            which a detection counts as lost.

    Returns:
        One :class:`Explanation` per image.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0 or None, got {top_k}")
    ad = adapter if adapter is not None else adapter_for(model)
    if method in _NEEDS_LAYER and layer is None:
        layer = ad.default_layer()
        if method == "feature_grid" and layer in ad.level_layers():  # one concrete level: the finest
            layer = next(n for n in ad.layer_names() if n.startswith(ad.level_layers()[layer]))
    if method == "feature_grid" and layer in ad.level_layers():
        raise ValueError(
            f"feature_grid needs one feature map, and {layer!r} is a per-detection level; pick one of "
            f"{[n for n in ad.layer_names() if n.startswith(ad.level_layers()[layer])]}"
        )
    if method not in _NEEDS_LAYER:
        layer = None
    layers = [layer] if layer is not None else []
    with_grad = method in (*_GRADIENT_CAMS, "input_gradient")
    inputs = prepare_images(images)
    if method == "boundary":
        if not 0.0 < score_threshold < 1.0:
            raise ValueError(f"method='boundary' needs score_threshold in (0, 1) (the score below which a detection "
                             f"counts as lost), got {score_threshold}")
        output = ad.run(inputs, [], top_k=top_k, score_threshold=score_threshold, with_grad=False)
        results = boundary(ad, [x.detach() for x in inputs], output.detections, norm=norm, epsilon=epsilon,
                           steps=steps, step_size=step_size, score_threshold=score_threshold)
        out = _explanations(output, [r.delta_map for r in results], [None] * len(inputs), method, None, "class")
        return [replace(e, boundary=r) for e, r in zip(out, results)]
    output = ad.run(inputs, layers, top_k=top_k, score_threshold=score_threshold, with_grad=with_grad)
    channels: list[Tensor | None] = [None] * len(inputs)
    if method in _GRADIENT_CAMS:
        raw = gradcam(output, layer, target=target, weighting=method, fast=fast)  # type: ignore[arg-type]
    elif method == "eigencam":
        raw = eigencam(output, layer)  # type: ignore[arg-type]
    elif method == "input_gradient":
        raw = input_gradient(output, target=target)
    elif method == "feature_grid":
        grids = feature_grid(output, layer, grid_channels)  # type: ignore[arg-type]
        channels = [c for c, _ in grids]
        raw = [m for _, m in grids]
    else:
        with torch.no_grad():
            raw = drise(
                ad, [x.detach() for x in inputs], output.detections,
                num_masks=num_masks, batch_size=mask_batch_size, seed=seed,
            )
    return _explanations(output, raw, channels, method, layer, target)


def gradcam_explanations(
    output: AdapterOutput,
    layer: str,
    method: Literal["gradcam", "elementwise", "layercam"] = "gradcam",
    target: Target = "class",
    fast: bool = True,
) -> list[Explanation]:
    """:func:`explain` of a gradient method on a forward already at hand.

    ``output`` is an adapter run (``run(..., with_grad=True)``) or one rebuilt from the
    model's own forward (``detlens.adapters.two_stage.RoIReplay``, which serves the
    two-stage RoI fast path); ``layer`` one of its captured layers or a per-detection-level
    layer such as ``"features"``.
    """
    if method not in _GRADIENT_CAMS:
        raise ValueError(f"method must be one of {list(_GRADIENT_CAMS)}, got {method!r}")
    raw = gradcam(output, layer, target=target, weighting=method, fast=fast)
    return _explanations(output, raw, [None] * len(raw), method, layer, target)


def _explanations(
    output: AdapterOutput, raw: list[Tensor], channels: list[Tensor | None], method: str, layer: str | None, target: str
) -> list[Explanation]:
    result = []
    for det, maps, ch in zip(output.detections, raw, channels):
        maps = torch.nan_to_num(maps.detach().float().cpu(), nan=0.0).clamp_min(0)
        result.append(
            Explanation(
                boxes=det.boxes.detach().float().cpu(),
                scores=det.scores.detach().float().cpu(),
                labels=det.labels.detach().long().cpu(),
                maps=display_maps(maps),
                raw=maps,
                method=method,
                layer=layer,
                target=target,
                channels=ch,
            )
        )
    return result


def box_focus(explanation: Explanation, gt_boxes: Tensor, gt_labels: Tensor, iou_threshold: float = 0.5) -> dict[str, Tensor]:
    """Honest-map metrics of one image's per-detection maps against its ground truth.

    Each detection is matched COCO-style (``detlens.explainers.matching``); for true
    positives the map is scored against the matched GT box.

    Returns:
        ``{"is_tp": BoolTensor[K], "flat": BoolTensor[K], "energy_in_box", "chance",
        "pointing_game": FloatTensor[K]}``. ``flat`` marks maps without spatial information
        (:func:`~detlens.explainers.scale.flat_maps`: constant or all zero). The last three
        are NaN for false positives and for flat maps, which are not scored (a flat map's
        energy-in-box would be its box's area fraction or 0, a statement about the box, not
        about the model); ``chance`` is the GT box's area fraction.
    """
    from .matching import match_detections
    from .metrics import box_area_fraction, energy_in_box, pointing_game

    if explanation.channels is not None:
        raise ValueError("box_focus needs per-detection maps; feature_grid maps are per channel")
    k = len(explanation)
    match = match_detections(
        explanation.boxes, explanation.labels, explanation.scores,
        gt_boxes.detach().float().cpu().reshape(-1, 4), gt_labels.detach().long().cpu().reshape(-1),
        iou_threshold=iou_threshold,
    )
    is_tp = match.is_tp
    flat = flat_maps(explanation.raw)
    scored = is_tp & ~flat
    nan = torch.full((k,), float("nan"))
    energy, chance, pointing = nan.clone(), nan.clone(), nan.clone()
    if bool(scored.any()):
        maps = explanation.raw[scored]
        boxes = gt_boxes.detach().float().cpu().reshape(-1, 4)[match.matched_gt[scored]]
        h, w = maps.shape[-2:]
        energy[scored] = energy_in_box(maps, boxes)
        chance[scored] = box_area_fraction(boxes, int(h), int(w))
        pointing[scored] = pointing_game(maps, boxes).float()
    return {"is_tp": is_tp, "flat": flat, "energy_in_box": energy, "chance": chance, "pointing_game": pointing}


def focus_summary(
    focus: Sequence[dict[str, Tensor]],
    labels: Sequence[Tensor],
    class_names: dict[int, str] | None = None,
) -> dict[str, float]:
    """Means of :func:`box_focus` results over images, ready for a logger.

    Args:
        focus: one :func:`box_focus` dict per image; labels: each image's ``Int64Tensor[K]``.
        class_names: label -> name for the per-class keys.

    Returns:
        ``{"true_positive_rate", "flat_map_rate"}`` (over all detections; the second is
        the share of flat maps) and, over true positives with a map that is not flat,
        ``"energy_in_box"``, ``"energy_in_box_chance"``, ``"pointing_game"`` and their
        per-class ``"<name>/<class>"`` means; keys without a value (no detection, no true
        positive) are left out.
    """
    from .metrics import summarise

    if len(focus) != len(labels):
        raise ValueError(f"{len(focus)} focus results for {len(labels)} label tensors")
    if not focus:
        return {}
    is_tp = torch.cat([f["is_tp"].bool().reshape(-1) for f in focus])
    if is_tp.numel() == 0:
        return {}
    out = {"true_positive_rate": float(is_tp.float().mean())}
    if all("flat" in f for f in focus):
        out["flat_map_rate"] = float(torch.cat([f["flat"].bool().reshape(-1) for f in focus]).float().mean())
    if bool(is_tp.any()):
        tp_labels = torch.cat([torch.as_tensor(l).long().reshape(-1) for l in labels])[is_tp]
        metrics = {
            name: torch.cat([f[src].float().reshape(-1) for f in focus])[is_tp]
            for name, src in (("energy_in_box", "energy_in_box"), ("energy_in_box_chance", "chance"), ("pointing_game", "pointing_game"))
        }
        out.update(summarise(metrics, tp_labels, class_names))
    return out


def peak_values(maps: Sequence[Tensor]) -> Tensor:
    """The peak of every map, ``FloatTensor[sum K]`` (maps ``[K, H, W]`` per image)."""
    peaks = [m.detach().float().flatten(1).amax(1) for m in maps if m.shape[0]]
    return torch.cat(peaks) if peaks else torch.zeros(0)
