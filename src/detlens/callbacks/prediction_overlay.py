"""``PredictionOverlayCallback``: the detector's boxes on the probe images, logged as W&B overlays."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor

from detlens.adapters import DetectorAdapter
from detlens.adapters.observe import ForwardObserver, ObservedForward
from detlens.callbacks.base import ProbeCallback, ProbeResult, class_names_of
from detlens.render.attention import to_uint8_image
from detlens.sinks import MediaImage, log_media

__all__ = ["PredictionOverlayCallback", "ProbePrediction"]


@dataclass(frozen=True)
class ProbePrediction:
    """The kept detections on one probe image (CPU arrays, input-image pixels).

    Attributes:
        boxes: ``float32[K, 4]`` xyxy.
        scores: ``float32[K]``, descending.
        labels: ``int64[K]`` in ``1..C``.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray


class PredictionOverlayCallback(ProbeCallback):
    """Logs each probe image with ground-truth and predicted boxes as W&B box overlays.

    Per logging event: ``<log_key>/probe``, one list of ``wandb.Image`` (captions
    ``"img 17 (id 42) · step 300"``; toggleable ``ground_truth`` / ``predictions`` box
    groups with class names and scores); ``<log_key>/mean_score`` (mean score of the kept
    detections, absent when there are none) and ``<log_key>/detections_per_image``.
    TensorBoard gets the boxes drawn into the image.

    A LightningModule with its own ``forward`` (detlens' detectors) is called as
    ``pl_module(images)`` in eval mode and must return torchvision's
    ``list[dict(boxes[K, 4], scores[K], labels[K])]`` in input pixels. A module without
    one (the network held under any attribute), or with ``adapter``/``model_attr`` given,
    is run through its detector's adapter (:mod:`detlens.adapters.registry`).
    When the event follows a validation epoch whose ``validation_step`` makes that call
    on the probe images (as detlens' detectors do), their predictions are read from it
    and no forward of the callback's own runs for them (see
    :class:`~detlens.callbacks.base.ProbeCallback`).

    Args:
        score_threshold: keep detections with ``score >= score_threshold``.
        max_detections: keep at most this many per image (highest scores).
        every_n_epochs, every_n_steps, num_probe_images, probe_indices, probe_dir, log_key, adapter,
            model_attr: see :class:`~detlens.callbacks.base.ProbeCallback`.
    """

    def __init__(
        self,
        score_threshold: float = 0.3,
        max_detections: int = 20,
        every_n_epochs: int | None = 1,
        every_n_steps: int | None = None,
        num_probe_images: int = 8,
        probe_indices: list[int] | None = None,
        probe_dir: str | None = None,
        log_key: str = "predictions",
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
        if not 0.0 <= score_threshold <= 1.0:
            raise ValueError(f"PredictionOverlayCallback: score_threshold must be in [0, 1], got {score_threshold}")
        if not isinstance(max_detections, int) or max_detections < 1:
            raise ValueError(f"PredictionOverlayCallback: max_detections must be a positive int, got {max_detections!r}")
        self.score_threshold = float(score_threshold)
        self.max_detections = max_detections

    def explain_shard(
        self, pl_module: pl.LightningModule, images: list[Tensor], targets: list[dict[str, Any]], indices: list[int]
    ) -> list[ProbePrediction]:
        if self._through_adapter(pl_module):
            out = self.detector_adapter(pl_module).run(images, top_k=None, score_threshold=0.0, with_grad=False)
            return [self._keep({"boxes": d.boxes, "scores": d.scores, "labels": d.labels}) for d in out.detections]
        with torch.no_grad():  # predictions only: no graph needed
            detections = pl_module(images)
        return [self._keep(d) for d in detections]

    def _through_adapter(self, pl_module: pl.LightningModule) -> bool:
        return self.runs_through_adapter(pl_module)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self._through_adapter(pl_module):
            self.detector_adapter(pl_module)  # no adapter, or several detectors: an error before the first step

    reads_validation_forward = True

    def validation_observer(self, pl_module: pl.LightningModule) -> ForwardObserver:
        # The probe images the validation loop runs are read from its own pl_module(images) call.
        return ForwardObserver(pl_module)

    def from_validation(self, call: ObservedForward, position: int, target: dict[str, Any]) -> ProbePrediction:
        return self._keep(call.outputs[position])

    def _keep(self, detection: dict[str, Tensor]) -> ProbePrediction:
        scores = detection["scores"].detach().float()
        order = torch.argsort(scores, descending=True)
        order = order[scores[order] >= self.score_threshold][: self.max_detections]
        return ProbePrediction(
            boxes=detection["boxes"][order].detach().float().cpu().numpy(),
            scores=scores[order].cpu().numpy(),
            labels=detection["labels"][order].detach().long().cpu().numpy(),
        )

    def log_results(self, trainer: pl.Trainer, pl_module: pl.LightningModule, results: list[ProbeResult]) -> None:
        class_names = class_names_of(trainer, pl_module)
        media: list[MediaImage] = []
        all_scores: list[np.ndarray] = []
        for result in results:
            prediction: ProbePrediction = result.value
            image, target = self.probe_item(result.index)
            media.append(
                MediaImage(
                    pixels=to_uint8_image(image),
                    caption=self.caption(trainer, result.index, target),
                    gt_boxes=target["boxes"].numpy() if "boxes" in target else None,
                    gt_labels=target["labels"].numpy() if "labels" in target else None,
                    pred_boxes=prediction.boxes,
                    pred_labels=prediction.labels,
                    pred_scores=prediction.scores,
                    class_names=class_names,
                    file_type="jpg",
                )
            )
            all_scores.append(prediction.scores)
        scores = np.concatenate(all_scores) if all_scores else np.zeros(0)
        scalars = {self.key("detections_per_image"): len(scores) / max(len(results), 1)}
        if len(scores):
            scalars[self.key("mean_score")] = float(scores.mean())
        log_media(trainer, images={self.key("probe"): media}, scalars=scalars, step=self.model_step(trainer))
