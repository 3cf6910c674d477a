"""Honest-map metrics: do per-detection maps point at the object, and do they depend on the model?

An explanation that draws pretty maps unrelated to the model is worse than none, so
detlens measures its own maps:

* :func:`energy_in_box` -- the share of a map's mass inside a box (the detection's
  ground-truth box), next to its chance level :func:`box_area_fraction` (the share a
  uniform map would put there). A map is informative when its energy is well above chance.
* :func:`pointing_game` -- whether the map's maximum falls inside the box, within a
  tolerance (Zhang et al., "Top-down neural attention by excitation backprop", ECCV 2016;
  15 px is their tolerance).
* :func:`deletion_insertion` / :func:`perturbation_curve` -- black-box faithfulness
  (Petsiuk et al., RISE, BMVC 2018; for detectors as in D-RISE, CVPR 2021): pixels are
  removed from (deletion) or inserted into (insertion) the image in the map's order,
  the detector is re-run, and the best score of a same-class detection overlapping the
  explained box is tracked. A faithful map makes the score fall fast when deleting
  (low deletion AUC) and rise fast when inserting (high insertion AUC).
* :func:`randomisation_check` -- the model-randomisation sanity check (Adebayo et al.,
  "Sanity checks for saliency maps", NeurIPS 2018): Spearman rank correlation between the
  maps of the trained model and those of a copy with randomised weights. A map that
  explains the model must change when the weights do: **low correlation is the honest
  outcome**; a correlation near 1 means the map shows the image (edges, contrast), not
  what the model learnt.
* :func:`summarise` -- overall and per-class means of per-detection metrics, as flat
  scalar dicts ready for a logger.

Every function here is pure tensor maths or calls a detector the caller hands in; none
imports Lightning or wandb, changes the caller's model, or draws from the global RNG.

Pixel convention: pixel ``(i, j)`` (row, column) covers ``[j, j + 1) x [i, i + 1)`` in
``x1, y1, x2, y2`` box coordinates, the frame of torchvision's boxes; boxes are given in
the map's own pixel frame (maps at image resolution -> image pixels).
"""

from __future__ import annotations

import copy
import difflib
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torchvision.ops import box_iou
from torchvision.transforms.v2.functional import gaussian_blur

from detlens.adapters.modules import named_modules
from detlens.explainers.scale import flat_maps

__all__ = [
    "Baseline",
    "Detect",
    "PerturbationCurve",
    "RandomisationResult",
    "box_area_fraction",
    "deletion_insertion",
    "detect_with",
    "energy_in_box",
    "perturbation_curve",
    "pointing_game",
    "randomisation_check",
    "spearman_per_map",
    "summarise",
]

Detect = Callable[[list[Tensor]], list[dict[str, Tensor]]]
"""A detector as a function: images ``[3, H, W]`` -> per image ``dict(boxes [M, 4], scores [M], labels [M])``
(torchvision's output convention, boxes in input-image pixels)."""

Baseline = Literal["blur", "mean", "zero"]


# ---------------------------------------------------------------------------------------
# Localisation: energy-in-box, its chance level, pointing game
# ---------------------------------------------------------------------------------------


def _check_maps_boxes(maps: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
    if not isinstance(maps, Tensor) or maps.dim() != 3:
        raise ValueError(f"maps must be a tensor [K, H, W], got {_shape(maps)}")
    if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be a tensor [K, 4] (x1, y1, x2, y2 pixels), got {_shape(boxes)}")
    if maps.shape[0] != boxes.shape[0]:
        raise ValueError(f"maps has {maps.shape[0]} maps but boxes has {boxes.shape[0]} rows; one box per map")
    maps = maps.detach()
    if maps.numel() and not bool(torch.isfinite(maps).all()):
        raise ValueError("maps contain NaN or infinite values")
    if maps.numel() and bool((maps < 0).any()):
        raise ValueError(f"maps must be non-negative (ReLU'd saliency), min is {float(maps.min()):.3g}")
    return maps, boxes.detach().to(device=maps.device)


def _shape(x: object) -> str:
    return f"shape {list(x.shape)}" if isinstance(x, Tensor) else type(x).__name__


def _coverage(lo: Tensor, hi: Tensor, n: int) -> Tensor:
    """``[K, n]``: how much of each unit pixel ``[p, p + 1)`` the interval ``[lo, hi]`` covers (0..1)."""
    start = torch.arange(n, dtype=torch.float64, device=lo.device)  # [n]
    left = torch.maximum(lo.double()[:, None], start[None, :])
    right = torch.minimum(hi.double()[:, None], start[None, :] + 1.0)
    return (right - left).clamp(min=0.0)


def energy_in_box(maps: Tensor, boxes: Tensor) -> Tensor:
    """Share of each map's mass inside its box.

    Pixels the box covers partially count with the covered fraction of their area, so a
    uniform map gives exactly :func:`box_area_fraction` (the chance level) and a map whose
    mass lies inside the box gives exactly 1.

    Args:
        maps: ``FloatTensor[K, H, W]``, non-negative (raw or display scale: the ratio does
            not depend on the scale).
        boxes: ``FloatTensor[K, 4]``, ``x1, y1, x2, y2`` in the maps' pixel frame; parts
            outside the map are ignored.

    Returns:
        ``FloatTensor[K]`` in ``[0, 1]``; 0 for a map that sums to 0 (no evidence anywhere).
    """
    maps, boxes = _check_maps_boxes(maps, boxes)
    k, h, w = maps.shape
    if k == 0:
        return torch.zeros(0, dtype=torch.float32, device=maps.device)
    wy = _coverage(boxes[:, 1], boxes[:, 3], h)  # [K, H]
    wx = _coverage(boxes[:, 0], boxes[:, 2], w)  # [K, W]
    m = maps.double()
    inside = torch.einsum("khw,kh,kw->k", m, wy, wx)
    total = m.sum(dim=(1, 2))
    share = torch.where(total > 0, inside / total.clamp(min=torch.finfo(torch.float64).tiny), 0.0)
    return share.clamp(0.0, 1.0).float()


def box_area_fraction(boxes: Tensor, height: int, width: int) -> Tensor:
    """Chance level of :func:`energy_in_box`: the box's area (clipped to the image) over the image's.

    Args:
        boxes: ``FloatTensor[K, 4]``, ``x1, y1, x2, y2`` pixels.
        height, width: the image (map) size in pixels.

    Returns:
        ``FloatTensor[K]`` in ``[0, 1]``.
    """
    if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be a tensor [K, 4] (x1, y1, x2, y2 pixels), got {_shape(boxes)}")
    if height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive, got {height} x {width}")
    b = boxes.detach().double()
    bw = (b[:, 2].clamp(0, width) - b[:, 0].clamp(0, width)).clamp(min=0)
    bh = (b[:, 3].clamp(0, height) - b[:, 1].clamp(0, height)).clamp(min=0)
    return (bw * bh / (height * width)).float()


def pointing_game(maps: Tensor, boxes: Tensor, tolerance: int = 15) -> Tensor:
    """Whether each map's maximum points into its box, within ``tolerance`` pixels.

    The maximum is the first arg-max in raster order; its pixel centre ``(j + 0.5, i + 0.5)``
    is a hit when its Euclidean distance to the box is at most ``tolerance`` (0 = strictly
    inside the box). A flat map (:func:`~detlens.explainers.scale.flat_maps`: all zero or
    spatially constant) has no maximum to point with: a miss.

    Args:
        maps: ``FloatTensor[K, H, W]``, non-negative.
        boxes: ``FloatTensor[K, 4]``, ``x1, y1, x2, y2`` in the maps' pixel frame.
        tolerance: slack in pixels (Zhang et al. use 15), ``>= 0``.

    Returns:
        ``BoolTensor[K]``.
    """
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0 pixels, got {tolerance}")
    maps, boxes = _check_maps_boxes(maps, boxes)
    k, h, w = maps.shape
    if k == 0:
        return torch.zeros(0, dtype=torch.bool, device=maps.device)
    flat = maps.reshape(k, -1)
    idx = flat.argmax(dim=1)
    px = (idx % w).double() + 0.5
    py = torch.div(idx, w, rounding_mode="floor").double() + 0.5
    b = boxes.double()
    dx = torch.clamp(torch.maximum(b[:, 0] - px, px - b[:, 2]), min=0.0)
    dy = torch.clamp(torch.maximum(b[:, 1] - py, py - b[:, 3]), min=0.0)
    hit = torch.hypot(dx, dy) <= tolerance
    return hit & ~flat_maps(maps)


# ---------------------------------------------------------------------------------------
# Deletion / insertion
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PerturbationCurve:
    """Score of one detection while pixels are deleted or inserted in a map's order.

    Attributes:
        mode: ``"deletion"`` or ``"insertion"``.
        fractions: ``FloatTensor[S + 1]``, share of the pixels removed (deletion) or
            inserted (insertion) at each point, from 0 to 1.
        scores: ``FloatTensor[S + 1]``, at each point the highest score of a detection with
            the explained label and IoU ``>= iou_threshold`` with the explained box; 0 when
            there is none.
        auc: area under ``scores`` over ``fractions`` (trapezoid rule), in ``[0, 1]`` for
            scores in ``[0, 1]``. Deletion: lower is better; insertion: higher is better.
    """

    mode: Literal["deletion", "insertion"]
    fractions: Tensor
    scores: Tensor
    auc: float


def detect_with(model: nn.Module) -> Detect:
    """Wrap a detector ``nn.Module`` as a :data:`Detect` callable for :func:`deletion_insertion`.

    Each call runs ``model(images)`` in eval mode under ``torch.no_grad()`` and then restores
    every submodule's own ``training`` flag (so a model with, e.g., frozen BatchNorm layers
    comes back exactly as it was). Outputs are detached and moved to the CPU.
    """

    def detect(images: list[Tensor]) -> list[dict[str, Tensor]]:
        flags = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            with torch.no_grad():
                outputs = model(images)
        finally:
            for module, flag in flags:
                module.training = flag
        return [{k: v.detach().cpu() for k, v in o.items() if isinstance(v, Tensor)} for o in outputs]

    return detect


def _baseline_image(image: Tensor, baseline: Baseline | Tensor, blur_sigma: float | None) -> Tensor:
    """``[C, H, W]``: what removed pixels become."""
    if isinstance(baseline, Tensor):
        if baseline.shape != image.shape:
            raise ValueError(
                f"a baseline tensor must have the image's shape {list(image.shape)}, got {list(baseline.shape)}"
            )
        return baseline.to(device=image.device, dtype=image.dtype)
    if baseline == "zero":
        return torch.zeros_like(image)
    if baseline == "mean":
        return image.mean(dim=(1, 2), keepdim=True).expand_as(image).clone()
    if baseline == "blur":
        h, w = image.shape[-2:]
        sigma = float(blur_sigma) if blur_sigma is not None else max(h, w) / 10.0
        if sigma <= 0:
            raise ValueError(f"blur_sigma must be > 0, got {sigma}")
        kernel = 2 * math.ceil(3.0 * sigma) + 1
        kernel = min(kernel, 2 * min(h, w) - 1)  # reflect padding needs pad < size; stays odd
        if kernel < 3:
            return image.mean(dim=(1, 2), keepdim=True).expand_as(image).clone()
        return gaussian_blur(image, kernel_size=[kernel, kernel], sigma=[sigma, sigma])
    raise ValueError(f"baseline must be 'blur', 'mean', 'zero' or a tensor like the image, got {baseline!r}")


def _best_score(output: Mapping[str, Tensor], box: Tensor, label: int, iou_threshold: float) -> float:
    boxes = output["boxes"].detach().float().cpu().reshape(-1, 4)
    if boxes.shape[0] == 0:
        return 0.0
    scores = output["scores"].detach().float().cpu().reshape(-1)
    labels = output["labels"].detach().cpu().reshape(-1)
    iou = box_iou(boxes, box[None])[:, 0]
    ok = (labels == label) & (iou >= iou_threshold)
    return float(scores[ok].max()) if bool(ok.any()) else 0.0


def perturbation_curve(
    detect: Detect,
    image: Tensor,
    saliency: Tensor,
    box: Tensor,
    label: int,
    mode: Literal["deletion", "insertion"] = "deletion",
    *,
    steps: int = 32,
    baseline: Baseline | Tensor = "blur",
    blur_sigma: float | None = None,
    iou_threshold: float = 0.5,
    batch_size: int = 16,
) -> PerturbationCurve:
    """Deletion or insertion curve of one detection (see :func:`deletion_insertion`)."""
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
    if not isinstance(image, Tensor) or image.dim() != 3:
        raise ValueError(f"image must be a tensor [C, H, W], got {_shape(image)}")
    if not isinstance(saliency, Tensor) or saliency.dim() != 2:
        raise ValueError(f"saliency must be one map [H, W], got {_shape(saliency)}")
    if not bool(torch.isfinite(saliency).all()):
        raise ValueError("saliency contains NaN or infinite values")
    box = torch.as_tensor(box).detach().float().cpu().reshape(-1)
    if box.numel() != 4:
        raise ValueError(f"box must have 4 values (x1, y1, x2, y2), got {box.numel()}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")

    with torch.no_grad():
        image = image.detach()
        h, w = image.shape[-2:]
        sal = saliency.detach().to(device=image.device, dtype=torch.float32)
        if sal.shape != (h, w):  # a map at another resolution: bilinear to the image's
            sal = torch.nn.functional.interpolate(
                sal[None, None], size=(h, w), mode="bilinear", align_corners=False
            )[0, 0]
        n_pixels = h * w
        # rank[p] = position of pixel p in the map's order (most salient first; ties in
        # raster order, so the curve is deterministic).
        order = torch.sort(sal.reshape(-1), descending=True, stable=True).indices
        rank = torch.empty_like(order)
        rank[order] = torch.arange(n_pixels, device=order.device)
        counts = torch.round(torch.linspace(0, n_pixels, steps + 1, dtype=torch.float64)).long()  # [S + 1]
        base = _baseline_image(image, baseline, blur_sigma)
        start, end = (image, base) if mode == "deletion" else (base, image)

        scores: list[float] = []
        for chunk in counts.split(batch_size):
            # changed[b, p]: pixel p already swapped from `start` to `end` at this step.
            changed = (rank[None, :] < chunk.to(rank.device)[:, None]).reshape(-1, 1, h, w)  # [B, 1, H, W]
            batch = torch.where(changed, end[None], start[None])  # [B, C, H, W]
            outputs = detect(list(batch.unbind(0)))
            if len(outputs) != len(chunk):
                raise ValueError(f"detect returned {len(outputs)} results for {len(chunk)} images")
            scores.extend(_best_score(o, box, int(label), iou_threshold) for o in outputs)

    fractions = counts.double() / n_pixels
    curve = torch.tensor(scores, dtype=torch.float64)
    auc = float(torch.trapezoid(curve, fractions))
    return PerturbationCurve(mode=mode, fractions=fractions.float(), scores=curve.float(), auc=auc)


def deletion_insertion(
    detect: Detect,
    image: Tensor,
    saliency: Tensor,
    box: Tensor,
    label: int,
    *,
    steps: int = 32,
    baseline: Baseline | Tensor = "blur",
    blur_sigma: float | None = None,
    iou_threshold: float = 0.5,
    batch_size: int = 16,
) -> tuple[PerturbationCurve, PerturbationCurve]:
    """Deletion and insertion curves (and AUCs) of one detection's map.

    Deletion starts from the image and replaces its pixels, most salient first, with the
    baseline; insertion starts from the baseline and puts the image's pixels back in the
    same order. ``steps + 1`` images per curve (0, 1/steps, ..., all pixels) are passed to
    ``detect`` in batches of at most ``batch_size`` (one call per batch, never one per
    step when a batch fits); at each the tracked score is the best score of a detection
    with the same ``label`` and IoU ``>= iou_threshold`` with ``box`` (0 if none).

    Args:
        detect: the detector, e.g. :func:`detect_with(model) <detect_with>` (eval mode,
            no_grad); any callable with torchvision's output convention works.
        image: ``FloatTensor[C, H, W]`` in the detector's input range.
        saliency: ``FloatTensor[h, w]``, the detection's map; bilinearly resized to ``H x W``
            if needed. Only its order matters (ties: raster order).
        box: ``FloatTensor[4]``, the explained detection's box, image pixels.
        label: the explained detection's class label.
        steps: number of increments; each curve has ``steps + 1`` points.
        baseline: what deleted pixels become (and insertion starts from). ``"blur"``
            (default; RISE's "highly blurred" insertion start): the image under a Gaussian
            blur of ``blur_sigma`` pixels, default ``max(H, W) / 10`` (22 px at 224 px), so
            that objects fade to colour blobs a detector no longer recognises while the
            deleted region adds no sharp edges it could fire on (a mild blur, e.g. RISE's
            5 px at 224 px, leaves objects detectable and deletion flat); ``"mean"``: the
            image's per-channel mean colour (flat, but its borders are sharp);
            ``"zero"``: black; or a tensor like ``image``.
        iou_threshold: IoU with ``box`` a re-detection needs to count (COCO's ``>=``).
        batch_size: most images per ``detect`` call (bounds memory).

    Returns:
        ``(deletion, insertion)`` :class:`PerturbationCurve` objects.
    """
    deletion, insertion = (
        perturbation_curve(
            detect, image, saliency, box, label, mode,
            steps=steps, baseline=baseline, blur_sigma=blur_sigma,
            iou_threshold=iou_threshold, batch_size=batch_size,
        )
        for mode in ("deletion", "insertion")
    )
    return deletion, insertion


# ---------------------------------------------------------------------------------------
# Model-randomisation sanity check
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RandomisationResult:
    """Spearman rank correlation of maps before and after weights were randomised.

    Attributes:
        stages: what was randomised, cumulatively: ``("all",)`` for ``mode="full"``; for
            ``mode="cascading"`` the module names, output side first (stage ``s`` has
            modules ``0..s`` randomised).
        correlations: ``FloatTensor[S, K]``, the signed Spearman correlation of each of the
            ``K`` maps at each stage; NaN where undefined (a constant map).

    Expectation: honest maps depend on the weights, so ``mean_abs`` should be low (well
    below ~0.5 at the ``"all"`` stage); values near 1 mean the map would look the same
    for any model.
    """

    stages: tuple[str, ...]
    correlations: Tensor

    @property
    def mean(self) -> Tensor:
        """``FloatTensor[S]``: mean signed correlation per stage (NaN maps left out)."""
        return _nanmean_rows(self.correlations)

    @property
    def mean_abs(self) -> Tensor:
        """``FloatTensor[S]``: mean absolute correlation per stage (Adebayo et al. report this)."""
        return _nanmean_rows(self.correlations.abs())

    def scalars(self, prefix: str = "randomisation/spearman") -> dict[str, float]:
        """``{"<prefix>/<stage>": mean signed correlation}``, stable keys for a logger."""
        return {f"{prefix}/{stage}": float(v) for stage, v in zip(self.stages, self.mean)}


def _nanmean_rows(x: Tensor) -> Tensor:
    if x.shape[-1] == 0:
        return torch.full(x.shape[:-1], float("nan"))
    return torch.nanmean(x, dim=-1)


def _as_map_rows(maps: Tensor | Sequence[Tensor], what: str) -> list[Tensor]:
    """One flattened ``[N]`` float64 CPU row per map, from ``[K, H, W]`` or a list of them."""
    parts = [maps] if isinstance(maps, Tensor) else list(maps)
    rows: list[Tensor] = []
    for part in parts:
        if not isinstance(part, Tensor) or part.dim() < 2:
            raise ValueError(f"{what} must be tensors [K, H, W] (or a list of them), got {_shape(part)}")
        flat = part.detach().to("cpu", torch.float64).reshape(part.shape[0], -1)
        rows.extend(flat.unbind(0))
    return rows


def spearman_per_map(maps_a: Tensor | Sequence[Tensor], maps_b: Tensor | Sequence[Tensor]) -> Tensor:
    """Spearman rank correlation of corresponding maps (ties get average ranks).

    Args:
        maps_a, maps_b: ``FloatTensor[K, H, W]`` or a list of such (e.g. one per image),
            same shapes in the same order.

    Returns:
        ``FloatTensor[K]``, in ``[-1, 1]``; NaN where a map is constant (rank correlation is
        undefined there).
    """
    from scipy.stats import spearmanr  # scipy's tie handling and exactness beat a hand-rolled rank

    rows_a, rows_b = _as_map_rows(maps_a, "maps_a"), _as_map_rows(maps_b, "maps_b")
    if len(rows_a) != len(rows_b):
        raise ValueError(f"got {len(rows_a)} maps from the trained model but {len(rows_b)} after randomisation")
    out = torch.full((len(rows_a),), float("nan"))
    for i, (a, b) in enumerate(zip(rows_a, rows_b)):
        if a.shape != b.shape:
            raise ValueError(f"map {i} has {a.numel()} pixels before and {b.numel()} after randomisation")
        if bool((a == a[0]).all()) or bool((b == b[0]).all()):
            continue  # constant map: correlation undefined (scipy would warn and return NaN)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rho = spearmanr(a.numpy(), b.numpy()).statistic
        out[i] = float(rho)
    return out


def _randomise_(module: nn.Module, generator: torch.Generator) -> None:
    """Re-draw every floating parameter of ``module`` in place from ``N(mean, std)`` of its own values.

    Keeping each tensor's mean and spread keeps activations at their trained scale (no
    explosion or vanishing that would make any map look random), while destroying what was
    learnt. A constant tensor (std 0: a single bias, weights all equal) is drawn with its
    mean's magnitude as spread instead; an all-zero tensor stays zero. Buffers (BatchNorm
    running statistics) are left alone: they are statistics, not weights.
    Draws come from ``generator`` only, never from the global RNG.
    """
    with torch.no_grad():
        for param in module.parameters():
            if not param.dtype.is_floating_point or param.numel() == 0:
                continue
            values = param.detach().double()
            mean = float(values.mean())
            std = float(values.std()) if values.numel() > 1 else 0.0
            if std == 0.0:
                std = abs(mean)
            if std == 0.0 or not math.isfinite(std):
                continue
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float64)
            param.copy_((noise * std + mean).to(device=param.device, dtype=param.dtype))


def _default_stages(model: nn.Module) -> list[str]:
    """Top-level children that hold parameters, output side (last registered) first."""
    names = [name for name, child in model.named_children() if any(True for _ in child.parameters())]
    return names[::-1]


def randomisation_check(
    model: nn.Module,
    explain: Callable[[nn.Module], Tensor | Sequence[Tensor]],
    *,
    mode: Literal["full", "cascading"] = "full",
    stages: Sequence[str] | None = None,
    seed: int = 0,
) -> RandomisationResult:
    """Model-randomisation sanity check (Adebayo et al. 2018) for any map-producing function.

    ``explain(model)`` is called once on ``model`` and once per stage on a deep copy whose
    weights are progressively randomised; the Spearman rank correlation between
    corresponding maps is returned. The caller's ``model`` is never modified (its weights,
    buffers and train/eval flags are untouched by this function), and the global RNG is not
    consumed: random weights come from a local ``torch.Generator`` seeded with ``seed``.

    For per-detection maps, ``explain`` must return maps *for the same detections* from
    both models (a randomised detector finds other boxes): for example explain fixed
    boxes/proposals, or the trained model's top detections by index.

    Args:
        model: the trained model (any ``nn.Module``; pass a LightningModule's bare network,
            e.g. ``pl_module.model``, so the copy does not drag a Trainer along).
        explain: ``model -> FloatTensor[K, H, W]`` (or a list of such, one per image).
        mode: ``"full"`` randomises every parameter at once; ``"cascading"`` randomises the
            ``stages`` one after another (cumulatively), output side first.
        stages: for ``"cascading"``: module names (from ``named_modules()``) in the order to
            randomise; default: the top-level children that hold parameters, last first.
        seed: seed of the local generator (same seed, same random weights, same result).

    Returns:
        :class:`RandomisationResult`. Low correlation = the map depends on the weights =
        honest; correlation near 1 = the map ignores the model.
    """
    if mode not in ("full", "cascading"):
        raise ValueError(f"mode must be 'full' or 'cascading', got {mode!r}")
    if mode == "full" and stages is not None:
        raise ValueError("stages applies to mode='cascading' only")
    modules = dict(named_modules(model))
    if mode == "cascading":
        names = list(stages) if stages is not None else _default_stages(model)
        if not names:
            raise ValueError("model has no child module with parameters to randomise; pass stages=[...]")
        for name in names:
            if name not in modules or name == "":
                close = difflib.get_close_matches(name, [n for n in modules if n], n=5, cutoff=0.4)
                hint = f" Closest: {', '.join(repr(c) for c in close)}." if close else ""
                raise ValueError(f"Unknown module {name!r} to randomise.{hint}")
    else:
        names = ["all"]

    reference = explain(model)
    generator = torch.Generator().manual_seed(int(seed))
    randomised = copy.deepcopy(model)
    copies = dict(named_modules(randomised))
    rows: list[Tensor] = []
    for name in names:
        _randomise_(randomised if name == "all" else copies[name], generator)
        rows.append(spearman_per_map(reference, explain(randomised)))
    del randomised, copies
    return RandomisationResult(stages=tuple(names), correlations=torch.stack(rows))


# ---------------------------------------------------------------------------------------
# Summaries
# ---------------------------------------------------------------------------------------


def summarise(
    metrics: Mapping[str, Tensor],
    labels: Tensor,
    class_names: Mapping[int, str] | None = None,
) -> dict[str, float]:
    """Overall and per-class means of per-detection metrics.

    Args:
        metrics: name -> ``Tensor[K]`` (float or bool; bool averages to an accuracy), e.g.
            ``{"energy_in_box": ..., "chance": box_area_fraction(...), "pointing_game": ...}``.
            NaN entries are left out of the means.
        labels: ``Int64Tensor[K]``, the class of each detection.
        class_names: label -> name for the keys; the label number when missing.

    Returns:
        ``{"<name>": mean over all K, "<name>/<class>": mean over that class}`` as floats;
        a class (or a metric) with no finite value gets no key, so nothing logs a NaN.
    """
    labels = torch.as_tensor(labels).detach().cpu().reshape(-1)
    out: dict[str, float] = {}
    for name, values in metrics.items():
        v = torch.as_tensor(values).detach().cpu().reshape(-1).double()
        if v.shape[0] != labels.shape[0]:
            raise ValueError(f"metric {name!r} has {v.shape[0]} values for {labels.shape[0]} labels")
        finite = torch.isfinite(v)
        if bool(finite.any()):
            out[name] = float(v[finite].mean())
        for label in torch.unique(labels).tolist():
            keep = (labels == label) & finite
            if bool(keep.any()):
                cls = class_names.get(int(label), str(label)) if class_names else str(label)
                out[f"{name}/{cls}"] = float(v[keep].mean())
    return out
