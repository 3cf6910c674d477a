"""An Ultralytics YOLO ``DetectionModel`` as a detlens LightningModule, trained with Ultralytics' own loss."""

from __future__ import annotations

import os
from typing import Any, Literal

import torch
from torch import Tensor, nn
from ultralytics.cfg import get_cfg
from ultralytics.nn.tasks import DetectionModel
from ultralytics.utils.loss import v8DetectionLoss

from detlens.lightning_modules.base import Batch, DetectionModule

from .adapter import UltralyticsAdapter

__all__ = ["UltralyticsDetector", "build_detection_model", "load_ultralytics_checkpoint"]


def build_detection_model(model_yaml: str, num_classes: int) -> DetectionModel:
    """A ``DetectionModel`` from one of Ultralytics' bundled YAMLs (``"yolov8n.yaml"``,
    ``"yolo11n.yaml"``, ...) or a YAML path, with random weights; nothing is downloaded."""
    model = DetectionModel(model_yaml, nc=num_classes, verbose=False)
    model.args = get_cfg()  # the loss reads its gains (box, cls, dfl) from model.args
    return model


def load_ultralytics_checkpoint(path: str | os.PathLike[str]) -> DetectionModel:
    """The ``DetectionModel`` of a checkpoint Ultralytics' trainer wrote (``last.pt``/``best.pt``),
    in float32: its EMA weights when saved, else its model. Loading unpickles Ultralytics
    classes: only open checkpoints you trust."""
    ckpt = torch.load(os.fspath(path), map_location="cpu", weights_only=False)
    model = ckpt.get("ema") or ckpt.get("model") if isinstance(ckpt, dict) else ckpt
    if not isinstance(model, DetectionModel):
        raise TypeError(f"{path} holds no Ultralytics DetectionModel (found {type(model).__name__})")
    model = model.float()
    if not hasattr(model, "args") or isinstance(model.args, dict):
        model.args = get_cfg(overrides={k: v for k, v in dict(getattr(model, "args", {}) or {}).items()
                                        if k in ("box", "cls", "dfl")})
    for p in model.parameters():
        p.requires_grad_(True)
    return model


class UltralyticsDetector(DetectionModule):
    """A YOLOv8/YOLO11 ``DetectionModel`` trained by Lightning with Ultralytics' ``v8DetectionLoss``.

    ``self.model`` is the ``DetectionModel`` itself (never the ``ultralytics.YOLO`` wrapper,
    whose ``train()`` starts an Ultralytics training run). detlens' labels are ``1..C``; the
    model's class ``c`` is label ``c + 1`` (``model.label_offset = 1``, read by
    :class:`~detlens_ultralytics.UltralyticsAdapter`). Eval ``forward`` gives the adapter's
    post-NMS detections above ``score_thresh``.

    Args:
        num_classes: ``C``.
        model_yaml: an Ultralytics model YAML (bundled name or path), built with random weights.
        checkpoint: optional Ultralytics checkpoint whose model replaces the built one
            (its class count must be ``num_classes``).
        score_thresh: eval detections scoring at or below it are dropped.
        max_detections: eval detections kept per image.
        class_names, optimizer, lr, weight_decay, momentum, warmup_steps: see
            :class:`detlens.lightning_modules.DetectionModule`.
    """

    def __init__(
        self,
        num_classes: int,
        model_yaml: str = "yolov8n.yaml",
        checkpoint: str | None = None,
        score_thresh: float = 0.001,
        max_detections: int = 100,
        class_names: dict[int, str] | None = None,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 5e-4,
        momentum: float = 0.9,
        warmup_steps: int = 50,
    ) -> None:
        super().__init__(num_classes, class_names, optimizer, lr, weight_decay, momentum, warmup_steps)
        model = load_ultralytics_checkpoint(checkpoint) if checkpoint else build_detection_model(model_yaml, num_classes)
        if int(model.model[-1].nc) != num_classes:
            raise ValueError(f"the model has {int(model.model[-1].nc)} classes, num_classes={num_classes}")
        model.label_offset = 1
        self.model: nn.Module = model
        self.score_thresh = float(score_thresh)
        self.max_detections = int(max_detections)
        self._criterion: v8DetectionLoss | None = None

    @property
    def adapter(self) -> UltralyticsAdapter:
        return UltralyticsAdapter(self.model)

    def forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """Eval-mode detections: ``list[dict(boxes[K, 4] xyxy px, scores[K], labels[K] in 1..C)]``."""
        if self.model.training:
            raise RuntimeError("UltralyticsDetector.forward returns detections in eval mode; call .eval() first")
        out = self.adapter.run(images, top_k=self.max_detections, score_threshold=self.score_thresh, with_grad=False)
        return [{"boxes": d.boxes, "scores": d.scores, "labels": d.labels} for d in out.detections]

    def ultralytics_batch(self, images: list[Tensor], targets: list[dict[str, Any]]) -> dict[str, Tensor]:
        """The padded image batch and Ultralytics' target layout (``batch_idx``, ``cls`` =
        label - 1, ``bboxes`` normalised ``cx, cy, w, h`` of the padded batch)."""
        img = self.adapter.preprocess([im.float() for im in images])
        hp, wp = int(img.shape[-2]), int(img.shape[-1])
        idx, cls, boxes = [], [], []
        for i, t in enumerate(targets):
            b = t["boxes"].float().reshape(-1, 4)
            idx.append(torch.full((len(b),), float(i), device=img.device))
            cls.append(t["labels"].float().reshape(-1) - 1)
            scale = b.new_tensor([wp, hp, wp, hp])
            boxes.append(torch.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], 1) / scale)
        return {"img": img, "batch_idx": torch.cat(idx), "cls": torch.cat(cls)[:, None], "bboxes": torch.cat(boxes)}

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        images, targets = batch
        ubatch = self.ultralytics_batch(images, targets)
        if self._criterion is None or self._criterion.device != ubatch["img"].device:
            self._criterion = v8DetectionLoss(self.model)
        preds = self.model(ubatch["img"])  # training mode: the raw per-level head outputs
        loss, items = self._criterion(preds, ubatch)
        # v8DetectionLoss returns (box, cls, dfl) x batch size, as Ultralytics' trainer backpropagates them.
        total = loss.sum()
        names = self._criterion.loss_names
        size = len(images)
        self.log("train/loss", total, prog_bar=True, on_step=True, on_epoch=False, batch_size=size)
        values = items.values() if isinstance(items, dict) else items
        self.log_dict({f"train/{n}": v.detach().float() for n, v in zip(names, values)},
                      on_step=True, on_epoch=False, batch_size=size)
        return total
