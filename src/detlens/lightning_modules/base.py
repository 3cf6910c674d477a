"""The LightningModule every detlens detector subclasses: training loop, mAP, optimiser."""

from __future__ import annotations

import math
import os
import warnings
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics.detection import MeanAveragePrecision

from detlens.lightning_modules.checkpoint import load_weights

__all__ = ["DetectionModule", "WarmupCosineSchedule"]

Batch = tuple[list[Tensor], list[dict[str, Any]]]


class WarmupCosineSchedule:
    """LR factor: linear warm-up from ``1/warmup_steps`` to 1, then cosine decay to 0.

    A callable class rather than a lambda so ``LambdaLR.state_dict()`` can save it.
    ``total_steps=None`` (unknown length, e.g. ``max_epochs=-1``) keeps the factor at 1
    after warm-up.
    """

    def __init__(self, warmup_steps: int, total_steps: int | None) -> None:
        self.warmup_steps = max(int(warmup_steps), 0)
        self.total_steps = total_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.total_steps is None or self.total_steps <= self.warmup_steps:
            return 1.0
        progress = min((step - self.warmup_steps) / (self.total_steps - self.warmup_steps), 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))


class DetectionModule(pl.LightningModule):
    """Base LightningModule for detectors that follow torchvision's calling convention.

    Subclasses build ``self.model``, an ``nn.Module`` that in training mode maps
    ``(images, targets)`` to a dict of scalar losses and in eval mode maps ``images`` to
    ``list[dict(boxes[K, 4] xyxy input pixels, scores[K], labels[K] in 1..C)]``.

    Batches are ``(list[FloatTensor[3, H, W] in [0, 1]], list[dict(boxes, labels, ...)])``
    as produced by ``detlens.data.collate_detection``.

    Logged keys: ``train/loss`` and ``train/<loss term>`` (every logged step),
    ``val/mAP``, ``val/mAP_50``, ``val/mAP_75`` (and ``test/...``) once per epoch from
    ``torchmetrics.detection.MeanAveragePrecision(iou_type="bbox")``, whose state
    torchmetrics gathers over DDP ranks in ``compute()``.

    Args:
        num_classes: ``C``, object categories without background (labels are ``1..C``).
        class_names: optional ``{label: name}`` for ``1..C`` (used by loggers/callbacks).
        optimizer: ``"adamw"`` or ``"sgd"`` (momentum ``momentum``, Nesterov off).
        lr: peak learning rate after warm-up.
        weight_decay: decoupled (AdamW) or L2 (SGD) decay; not applied to norms and biases.
        momentum: SGD momentum (ignored by AdamW).
        warmup_steps: optimiser steps of linear warm-up; a cosine decay to 0 follows over
            ``trainer.estimated_stepping_batches``.
    """

    model: nn.Module

    def __init__(
        self,
        num_classes: int,
        class_names: dict[int, str] | None = None,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        lr: float = 1e-4,
        weight_decay: float = 1e-4,
        momentum: float = 0.9,
        warmup_steps: int = 100,
    ) -> None:
        super().__init__()
        # Collects the init args of the subclass too (Lightning walks the __init__ frames).
        self.save_hyperparameters()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 (background excluded), got {num_classes}")
        if optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {optimizer!r}")
        if class_names is not None:
            class_names = {int(k): str(v) for k, v in class_names.items()}
            unknown = sorted(set(class_names) - set(range(1, num_classes + 1)))
            if unknown:
                raise ValueError(f"class_names has labels {unknown} outside 1..{num_classes}")
        self.num_classes = num_classes
        self.class_names = class_names
        self.val_map = MeanAveragePrecision(iou_type="bbox")
        self.test_map = MeanAveragePrecision(iou_type="bbox")

    # ------------------------------------------------------------------ inference
    def forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """Eval-mode detections: ``list[dict(boxes[K,4] xyxy px, scores[K], labels[K])]``."""
        if self.model.training:
            raise RuntimeError("DetectionModule.forward returns detections in eval mode; call .eval() first")
        return self.model(images)

    def predict_step(self, batch: Batch, batch_idx: int) -> list[dict[str, Tensor]]:
        images, _ = batch
        return self(images)

    # ------------------------------------------------------------------ training
    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        images, targets = batch
        losses: dict[str, Tensor] = self.model(images, _model_targets(targets))
        loss = torch.stack([v.float() for v in losses.values()]).sum()
        batch_size = len(images)
        # on_step only: Lightning would rename the keys to "<key>_step"/"<key>_epoch" if both were on.
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=batch_size)
        self.log_dict(
            {f"train/{k}": v.detach().float() for k, v in losses.items()},
            on_step=True,
            on_epoch=False,
            batch_size=batch_size,
        )
        return loss

    # ------------------------------------------------------------------ evaluation
    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._update_map(self.val_map, batch)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._update_map(self.test_map, batch)

    def on_validation_epoch_end(self) -> None:
        self._log_map(self.val_map, "val")

    def on_test_epoch_end(self) -> None:
        self._log_map(self.test_map, "test")

    def _update_map(self, metric: MeanAveragePrecision, batch: Batch) -> None:
        images, targets = batch
        detections = self(images)
        metric.update(
            [{k: d[k].detach().float() if k != "labels" else d[k].detach() for k in ("boxes", "scores", "labels")}
             for d in detections],
            [{"boxes": t["boxes"].float(), "labels": t["labels"].long()} for t in targets],
        )

    def _log_map(self, metric: MeanAveragePrecision, stage: str) -> None:
        result = metric.compute()  # gathers the state of every rank first
        metric.reset()
        values = {
            f"{stage}/mAP": result["map"],
            f"{stage}/mAP_50": result["map_50"],
            f"{stage}/mAP_75": result["map_75"],
        }
        # The values are already identical on every rank; sync_dist=True merely averages
        # identical scalars and keeps Lightning's epoch-level DDP warning quiet.
        self.log_dict({k: v.float() for k, v in values.items()}, prog_bar=stage == "val", sync_dist=True)

    # ------------------------------------------------------------------ optimisation
    def parameter_groups(self) -> list[dict[str, Any]]:
        """Trainable parameters split into decayed weights and undecayed norms/biases."""
        decay, no_decay = [], []
        seen: set[int] = set()  # a module shared by several parents (e.g. one head for every decoder layer)
        for module in self.model.modules():
            for name, param in module.named_parameters(recurse=False):
                if not param.requires_grad or id(param) in seen:
                    continue
                seen.add(id(param))
                is_norm = isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm))
                (no_decay if is_norm or name == "bias" or param.ndim <= 1 else decay).append(param)
        return [
            {"params": decay, "weight_decay": self.hparams.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def configure_optimizers(self) -> dict[str, Any]:
        groups = [g for g in self.parameter_groups() if g["params"]]
        hp = self.hparams
        if hp.optimizer == "sgd":
            optimizer: torch.optim.Optimizer = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum)
        else:
            optimizer = torch.optim.AdamW(groups, lr=hp.lr)
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else math.inf
        schedule = WarmupCosineSchedule(hp.warmup_steps, None if math.isinf(total) else int(total))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ weights
    def load_weights(self, path: str | os.PathLike[str]) -> None:
        """Load a state_dict / Lightning checkpoint into ``self.model`` and log what matched."""
        report = load_weights(self.model, path)
        rank_zero_info(f"[detlens] {report.summary()}")
        if report.missing or report.unexpected or report.shape_mismatch:
            warnings.warn(f"[detlens] partial checkpoint load: {report.summary()}", stacklevel=2)


def _model_targets(targets: list[dict[str, Any]]) -> list[dict[str, Tensor]]:
    """Keep the tensors the detectors train on (drops ``image_id``/``file_name``)."""
    return [{"boxes": t["boxes"].float(), "labels": t["labels"].long()} for t in targets]
