"""``GradCAMCallback``: per-detection maps of the probe set, blended over the images, with honest-map metrics."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, get_args

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor

from detlens.adapters import DetectorAdapter
from detlens.adapters.observe import ForwardObserver, ObservedForward
from detlens.callbacks.base import ProbeCallback, ProbeResult, class_names_of
from detlens.callbacks.focus import FocusRecorder, record_map_point
from detlens.explainers.api import Explanation, Method, box_focus, explain, focus_summary, gradcam_explanations, peak_values
from detlens.explainers.drise import MAX_MASKS
from detlens.explainers.gradcam import check_target
from detlens.explainers.scale import FixedScale, flat_maps
from detlens.render.media_jobs import gradcam_media
from detlens.sinks import log_media_later

__all__ = ["GradCAMCallback", "ProbeMaps"]

_CALLBACK_METHODS = tuple(m for m in get_args(Method) if m not in ("feature_grid", "boundary"))  # boundary: BoundaryCallback


@dataclass(frozen=True)
class ProbeMaps:
    """One probe image's explained detections (CPU, original-image pixels).

    Attributes:
        boxes: ``FloatTensor[K, 4]`` xyxy; scores: ``FloatTensor[K]``; labels: ``Int64Tensor[K]``.
        raw: ``FloatTensor[K, H, W]`` maps on the model's own scale.
        focus: per-detection metrics of :func:`detlens.explainers.api.box_focus`
            (``is_tp``, ``flat``, ``energy_in_box``, ``chance``, ``pointing_game``), or
            ``None`` when the probe image has no ground truth; below-threshold detections
            are never true positives and have NaN metrics.
        below_threshold: ``BoolTensor[K]``: shown as a best guess below ``score_threshold``.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    raw: Tensor
    focus: dict[str, Tensor] | None
    below_threshold: Tensor

    def confident(self) -> tuple[dict[str, Tensor] | None, Tensor]:
        """``(focus, labels)`` of the detections above the threshold only (for the metrics)."""
        keep = ~self.below_threshold
        focus = None if self.focus is None else {k: v[keep] for k, v in self.focus.items()}
        return focus, self.labels[keep]


class GradCAMCallback(ProbeCallback):
    """Logs, per probe image, the maps of its top detections blended over it, with
    ground-truth and predicted boxes as W&B box overlays, and how well the maps sit on
    the objects.

    Per logging event (keys under ``log_key``, default ``"gradcam"``):

    * ``<log_key>/probe``: one ``wandb.Image`` per probe image: the element-wise maximum of
      the detections' display maps (each min-max normalised) blended over the image;
      ``ground_truth`` and ``predictions`` box groups (the explained detections, with
      scores); caption ``"img 17 (id 42) · step 300"``.
    * ``<log_key>/energy_in_box``: mean share of a true positive's map inside its
      ground-truth box, next to ``<log_key>/energy_in_box_chance`` (the same for a uniform
      map: the box's area fraction); ``<log_key>/pointing_game``: share of true positives
      whose map peaks inside the box (15 px tolerance); per-class variants
      ``<log_key>/energy_in_box/<class>`` etc. Absent when there is no true positive.
    * ``<log_key>/peak``: mean peak of the raw maps divided by a reference fixed at the
      first logging point (per method and layer, kept in ``state_dict``): ``1.0`` = as
      strong as then; comparable over the run and across resumed runs.
    * ``<log_key>/detections_per_image`` (above ``score_threshold``),
      ``<log_key>/below_threshold_per_image`` (best guesses shown below it, see
      ``min_detections``), ``<log_key>/true_positive_rate`` and ``<log_key>/flat_map_rate``
      (share of maps without spatial information, drawn blank and not scored).

    When an event explains no detection above the threshold, the callback says so once in
    the log (how many candidates, the highest score, the threshold), and with
    ``min_detections`` it still shows each image's best guesses, captioned "below
    threshold" and left out of every true-positive metric, drift and gate. An overlay
    without any map shows the image untinted, captioned "no detection explained".

    On a torchvision two-stage detector with ``method="gradcam"``, ``"elementwise"`` or ``"layercam"`` and a
    per-detection-level layer (the default ``"features"``), the probe images the validation
    loop ran need no forward of the callback's own: the detections, proposals and FPN maps
    of the validation forward feed the one-backward RoI path
    (:class:`detlens.adapters.two_stage.RoIReplay`), with the same maps as the callback's
    own forward. Other methods, layers and families, and probe images the validation loop
    did not run, get the callback's forward (see :class:`~detlens.callbacks.base.ProbeCallback`).

    Args:
        method: ``"gradcam"``, ``"elementwise"`` (gradient x activation), ``"layercam"`` (positive
            gradients x activation), ``"eigencam"``,
            ``"input_gradient"`` or ``"drise"`` (black box: ``num_masks`` forwards per image).
        layer: target layer (``None``: the adapter's default, e.g. ``"features"`` = each
            detection's own FPN level on torchvision detectors). Checked at ``setup``; an
            unknown name raises with the closest valid names.
        target: explain the ``"class"`` score, the ``"box"`` coordinates or ``"both"``.
        top_k: detections explained per image (highest scores).
        score_threshold: only detections scoring above it.
        iou_threshold: IoU with a same-class ground-truth box that makes a true positive.
        alpha: weight of the colour-mapped map in the blend; colormap: matplotlib name.
        num_masks: D-RISE masks per image (``<=`` 5000).
        min_detections: explain at least this many detections per image, the highest
            scoring ones, even below ``score_threshold`` (early in training nothing may pass
            it); ``0`` shows only detections above it.
        every_n_epochs, every_n_steps, num_probe_images, probe_indices, probe_dir, log_key, adapter,
            model_attr:
            see :class:`~detlens.callbacks.base.ProbeCallback`.
    """

    def __init__(
        self,
        method: str = "gradcam",
        layer: str | None = None,
        target: str = "class",
        top_k: int = 5,
        score_threshold: float = 0.3,
        iou_threshold: float = 0.5,
        alpha: float = 0.5,
        colormap: str = "jet",
        num_masks: int = 500,
        min_detections: int = 1,
        every_n_epochs: int | None = 1,
        every_n_steps: int | None = None,
        num_probe_images: int = 8,
        probe_indices: list[int] | None = None,
        probe_dir: str | None = None,
        log_key: str = "gradcam",
        adapter: dict[str, Any] | DetectorAdapter | None = None,
        model_attr: str | None = None,
    ) -> None:
        super().__init__(
            every_n_epochs=every_n_epochs,
            every_n_steps=every_n_steps,
            num_probe_images=num_probe_images,
            probe_indices=probe_indices,
            probe_dir=probe_dir,
            log_key=log_key,
            adapter=adapter,
            model_attr=model_attr,
        )
        self.focus_recorder = FocusRecorder()  # the run's focus record, if this is its first recording callback
        name = type(self).__name__
        if method not in _CALLBACK_METHODS:
            raise ValueError(f"{name}: method must be one of {list(_CALLBACK_METHODS)}, got {method!r}")
        try:
            check_target(target)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from err
        if not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"{name}: top_k must be a positive int, got {top_k!r}")
        if not 0.0 <= score_threshold <= 1.0:
            raise ValueError(f"{name}: score_threshold must be in [0, 1], got {score_threshold}")
        if not 0.0 < iou_threshold <= 1.0:
            raise ValueError(f"{name}: iou_threshold must be in (0, 1], got {iou_threshold}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"{name}: alpha must be in [0, 1], got {alpha}")
        if not 1 <= num_masks <= MAX_MASKS:
            raise ValueError(f"{name}: num_masks must be in [1, {MAX_MASKS}], got {num_masks}")
        if isinstance(min_detections, bool) or not isinstance(min_detections, int) or not 0 <= min_detections <= top_k:
            raise ValueError(f"{name}: min_detections must be an int in [0, top_k={top_k}], got {min_detections!r}")
        from matplotlib import colormaps

        if colormap not in colormaps:
            raise ValueError(f"{name}: unknown matplotlib colormap {colormap!r}")
        self.method = method
        self.layer = layer
        self.target = target
        self.top_k = top_k
        self.score_threshold = float(score_threshold)
        self.iou_threshold = float(iou_threshold)
        self.alpha = float(alpha)
        self.colormap = colormap
        self.num_masks = num_masks
        self.min_detections = min_detections
        self.scale = FixedScale()
        self._layer_in_use: str | None = layer

    # ------------------------------------------------------------------ checks and state
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        adapter = self.detector_adapter(pl_module)  # TypeError for a model detlens has no adapter for
        if self.method in ("gradcam", "elementwise", "layercam", "eigencam"):
            self._layer_in_use = self.layer if self.layer is not None else adapter.default_layer()
            adapter.resolve_layers([self._layer_in_use])  # ValueError listing the closest names
        super().setup(trainer, pl_module, stage)

    @property
    def scale_key(self) -> str:
        """Key of this callback's fixed-scale reference: ``"<method>/<layer>/<target>"``."""
        return f"{self.method}/{self._layer_in_use or '-'}/{self.target}"

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            log_key=self.log_key, every_n_epochs=self.every_n_epochs, every_n_steps=self.every_n_steps,
            method=self.method,
        )

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "scale": self.scale.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.scale.load_state_dict(state_dict.get("scale", {}))

    # ------------------------------------------------------------------ ProbeCallback API
    def explain_shard(
        self, pl_module: pl.LightningModule, images: list[Tensor], targets: list[dict[str, Any]], indices: list[int]
    ) -> list[ProbeMaps]:
        explanations = explain(
            pl_module,
            images,
            adapter=self.detector_adapter(pl_module),
            method=self.method,  # type: ignore[arg-type]
            layer=self._layer_in_use,
            target=self.target,  # type: ignore[arg-type]
            top_k=self.top_k,
            score_threshold=self._explain_threshold,
            num_masks=self.num_masks,
        )
        return [self._probe_maps(ex, tgt) for ex, tgt in zip(explanations, targets)]

    @property
    def _explain_threshold(self) -> float:
        # With min_detections, the top_k highest scores are explained whatever they are, and
        # _probe_maps keeps those above the threshold plus best guesses up to min_detections.
        return 0.0 if self.min_detections else self.score_threshold

    @property
    def reads_validation_forward(self) -> bool:  # type: ignore[override]
        # Gradient maps on a two-stage detector's per-detection FPN level (the default layer)
        # need no forward of their own: the RoI fast path runs on the validation forward's
        # feature maps and proposals (detlens.adapters.two_stage.RoIReplay).
        return self.method in ("gradcam", "elementwise", "layercam")

    def validation_observer(self, pl_module: pl.LightningModule) -> ForwardObserver | None:
        adapter = self.detector_adapter(pl_module)
        if self._layer_in_use not in adapter.level_layers():
            return None
        observer = ForwardObserver(adapter.model, adapter=adapter)
        return observer if observer.replays_roi else None

    def from_validation(self, call: ObservedForward, position: int, target: dict[str, Any]) -> ProbeMaps:
        if call.replay is None or call.detections is None:
            raise RuntimeError("the observed forward cannot be replayed")  # the probe forward explains this image
        # The validation loop runs under inference mode; the backward of the RoI path needs it off.
        with torch.inference_mode(False), torch.enable_grad():
            output = call.replay.output(position, call.detections[position], self.top_k, self._explain_threshold)
            (ex,) = gradcam_explanations(output, self._layer_in_use, method=self.method, target=self.target)
        return self._probe_maps(ex, target)

    def _probe_maps(self, ex: Explanation, target: dict[str, Any]) -> ProbeMaps:
        above = int((ex.scores > self.score_threshold).sum())  # scores are sorted, highest first
        keep = max(above, min(self.min_detections, len(ex)))
        ex = Explanation(ex.boxes[:keep], ex.scores[:keep], ex.labels[:keep], ex.maps[:keep], ex.raw[:keep],
                         ex.method, ex.layer, ex.target)
        below = ex.scores <= self.score_threshold
        focus = None
        if "boxes" in target and "labels" in target:
            focus = box_focus(ex, target["boxes"], target["labels"], self.iou_threshold)
            if bool(below.any()):  # best guesses: never true positives, never scored
                focus["is_tp"] = focus["is_tp"] & ~below
                for name in ("energy_in_box", "chance", "pointing_game"):
                    focus[name] = focus[name].masked_fill(below, float("nan"))
        return ProbeMaps(boxes=ex.boxes, scores=ex.scores, labels=ex.labels, raw=ex.raw, focus=focus, below_threshold=below)

    def log_results(self, trainer: pl.Trainer, pl_module: pl.LightningModule, results: list[ProbeResult]) -> None:
        class_names = class_names_of(trainer, pl_module)
        step = self.model_step(trainer)
        probes = []
        for result in results:
            image, target = self.probe_item(result.index)
            maps: ProbeMaps = result.value
            probes.append({
                "image": image, "raw": maps.raw, "boxes": maps.boxes, "labels": maps.labels, "scores": maps.scores,
                "gt_boxes": target.get("boxes"), "gt_labels": target.get("labels"),
                "caption": self.caption(trainer, result.index, target) + self._caption_note(maps),
            })
        self._say_if_empty(results, step)
        scalars = self._scalars(results, class_names, step)
        # The overlays are drawn by detlens' media worker (detlens.render.media_jobs).
        build = functools.partial(
            gradcam_media, probes, key=self.key("probe"), alpha=self.alpha, colormap=self.colormap,
            class_names=class_names, scalars=scalars,
        )
        log_media_later(trainer, build, step=step)
        # detlens focus record (detlens.callbacks.focus): this point's maps, detections and metrics.
        record_map_point(self, trainer, results, method=self.method, layer=self._layer_in_use, class_names=class_names)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self.focus_recorder.publish(trainer)  # online runs: the focus record as a W&B artifact

    def _caption_note(self, maps: ProbeMaps) -> str:
        if len(maps.scores) == 0:
            return f" · no detection explained (none above {self.score_threshold:g})"
        below = int(maps.below_threshold.sum())
        if below:
            return (f" · {below} below threshold {self.score_threshold:g} (best guesses, highest "
                    f"{float(maps.scores[maps.below_threshold].max()):.2f})")
        return ""

    def _say_if_empty(self, results: list[ProbeResult], step: int) -> None:
        """One log line per event that explains no detection above the threshold."""
        values: list[ProbeMaps] = [r.value for r in results]
        if not values or any(bool((~v.below_threshold).any()) for v in values):
            return
        scores = torch.cat([v.scores for v in values]) if values else torch.zeros(0)
        best = f"highest score {float(scores.max()):.3f}" if len(scores) else "no candidate at all"
        shown = (f"showing each image's top {self.min_detections} below it, captioned 'below threshold'"
                 if self.min_detections and len(scores) else "nothing to show (min_detections=0)")
        rank_zero_info(
            f"[detlens] {type(self).__name__} at step {step}: no detection scored above score_threshold "
            f"{self.score_threshold:g} on the {len(values)} probe images ({len(scores)} candidates explained, {best}); "
            f"{shown}; {self.key('detections_per_image')} is 0"
        )

    def _scalars(self, results: list[ProbeResult], class_names: dict[int, str] | None, step: int) -> dict[str, float]:
        values: list[ProbeMaps] = [r.value for r in results]
        confident = sum(int((~v.below_threshold).sum()) for v in values)
        scalars = {"detections_per_image": confident / max(len(values), 1),
                   "below_threshold_per_image": sum(int(v.below_threshold.sum()) for v in values) / max(len(values), 1)}
        scaled = self.scale(self.scale_key, [v.raw[~v.below_threshold] for v in values], step)
        if scaled is not None:  # over maps that say something: flat ones never set the scale either
            peaks = peak_values([m[~flat_maps(m)] for m in scaled])
            if len(peaks):
                scalars["peak"] = float(peaks.mean())
        with_gt = [v.confident() for v in values if v.focus is not None]
        scalars.update(focus_summary([f for f, _ in with_gt], [labels for _, labels in with_gt], class_names))
        return {self.key(k): float(v) for k, v in scalars.items() if np.isfinite(v)}
