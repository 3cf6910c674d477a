"""DAMO-YOLO (modelscope's own code) as a detlens LightningModule, trained with ZeroHead's own losses.

Needs the optional extra ``pip install 'detlens[damo]'`` (modelscope and the few packages its
DAMO-YOLO modules import); only ``modelscope.models.cv.tinynas_detection.damo`` is imported,
when a model is built.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detlens.lightning_modules.base import Batch, DetectionModule

__all__ = ["DAMO_YOLO_T", "DamoYolo", "build_damo_yolo", "damo_batch"]


def damo_batch(images: list[Tensor], divisor: int = 32) -> Tensor:
    """DAMO-YOLO's input: ``B`` images ``[3, H_i, W_i]`` in ``[0, 1]`` -> ``[B, 3, Hp, Wp]`` in
    ``0..255``, zero-padded bottom-right to a multiple of ``divisor`` (its largest stride)."""
    hp = -(-max(int(im.shape[-2]) for im in images) // divisor) * divisor
    wp = -(-max(int(im.shape[-1]) for im in images) // divisor) * divisor
    return torch.stack([F.pad(im.float() * 255.0, (0, wp - int(im.shape[-1]), 0, hp - int(im.shape[-2]))) for im in images])

#: The TinyNAS backbone of DAMO-YOLO-T: ``tinynas_L20_k1kx.txt`` of DAMO-YOLO's repository
#: (github.com/tinyvision/DAMO-YOLO, ``damo/base_models/backbones/nas_backbones/``, Apache-2.0),
#: written out here without its quantisation fields (``nbitsA``/``nbitsW``, which modelscope's
#: ``load_tinynas_net`` deletes anyway); the neck and head settings are those of its
#: ``configs/damoyolo_tinynasL20_T.py``.
DAMO_YOLO_T: dict[str, Any] = {
    "structure": [
        {"class": "ConvKXBNRELU", "in": 3, "k": 3, "out": 24, "s": 1},
        {"L": 2, "btn": 24, "class": "SuperResConvK1KX", "in": 24, "inner_class": "ResConvK1KX", "k": 3, "out": 64, "s": 2},
        {"L": 2, "btn": 64, "class": "SuperResConvK1KX", "in": 64, "inner_class": "ResConvK1KX", "k": 3, "out": 96, "s": 2},
        {"L": 2, "btn": 96, "class": "SuperResConvK1KX", "in": 96, "inner_class": "ResConvK1KX", "k": 3, "out": 192, "s": 2},
        {"L": 2, "btn": 152, "class": "SuperResConvK1KX", "in": 192, "inner_class": "ResConvK1KX", "k": 3, "out": 192, "s": 1},
        {"L": 1, "btn": 192, "class": "SuperResConvK1KX", "in": 192, "inner_class": "ResConvK1KX", "k": 3, "out": 384, "s": 2},
    ],
    "backbone": {"name": "TinyNAS_res", "out_indices": (2, 4, 5), "with_spp": True, "use_focus": True, "act": "relu",
                 "reparam": True},
    "neck": {"name": "GiraffeNeckV2", "depth": 1.0, "hidden_ratio": 1.0, "in_channels": [96, 192, 384],
             "out_channels": [64, 128, 256], "act": "relu", "spp": False, "block_name": "BasicBlock_3x3_Reverse"},
    "head": {"name": "ZeroHead", "in_channels": [64, 128, 256], "stacked_convs": 0, "reg_max": 16, "act": "silu",
             "nms_conf_thre": 0.05, "nms_iou_thre": 0.7},
}


def build_damo_yolo(num_classes: int, nms_conf_thre: float = 0.05, nms_iou_thre: float = 0.7) -> nn.Module:
    """modelscope's DAMO-YOLO ``Detector`` (DAMO-YOLO-T structure) with random weights, built from
    its own config and initialised by its own ``init_model``; nothing is downloaded."""
    try:
        from modelscope.models.cv.tinynas_detection.damo.detectors.detector import Detector
        from modelscope.utils.config import ConfigDict
    except ImportError as err:
        raise ImportError(
            f"DAMO-YOLO needs modelscope's DAMO-YOLO code: pip install 'detlens[damo]' ({err})"
        ) from err
    spec = DAMO_YOLO_T
    with tempfile.TemporaryDirectory() as tmp:
        # modelscope's load_tinynas_net reads the structure from a file (structure_file)
        structure_file = os.path.join(tmp, "tinynas_L20_k1kx.txt")
        with open(structure_file, "w") as f:
            f.write(repr(spec["structure"]))
        config = ConfigDict({"model": {
            "backbone": {**spec["backbone"], "structure_file": structure_file},
            "neck": dict(spec["neck"]),
            "head": {**spec["head"], "num_classes": num_classes, "nms_conf_thre": nms_conf_thre,
                     "nms_iou_thre": nms_iou_thre},
        }})
        model = Detector(config)
    model.init_model()  # DAMO-YOLO's own initialisation (BN eps/momentum, head priors)
    return model


class DamoYolo(DetectionModule):
    """DAMO-YOLO-T from modelscope's code, trained with ZeroHead's losses (quality focal, GIoU,
    distribution focal; AlignedOTA assignment), evaluated with ZeroHead's own decoding and NMS (``detlens.adapters.DamoYoloAdapter``
    gives the same detections, differentiable).

    Batches are detlens' (``[0, 1]`` images, boxes in pixels, labels ``1..C``); the images go
    to the network as DAMO-YOLO's own loader gives them (pixel values ``0..255``, padded to a
    multiple of 32) and the targets as its ``BoxList`` with ``labels`` (ZeroHead subtracts 1).

    Args:
        num_classes: ``C``.
        score_thresh: eval detections scoring at or below it are dropped (ZeroHead's
            ``nms_conf_thre``: also its candidate threshold).
        nms_thresh: IoU of the class-aware NMS.
        max_detections: eval detections kept per image.
        class_names, optimizer, lr, weight_decay, momentum, warmup_steps: see
            :class:`~detlens.lightning_modules.DetectionModule`.
    """

    def __init__(
        self,
        num_classes: int,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.7,
        max_detections: int = 100,
        class_names: dict[int, str] | None = None,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 5e-4,
        momentum: float = 0.9,
        warmup_steps: int = 50,
    ) -> None:
        super().__init__(num_classes, class_names, optimizer, lr, weight_decay, momentum, warmup_steps)
        self.model: nn.Module = build_damo_yolo(num_classes, score_thresh, nms_thresh)
        self.max_detections = int(max_detections)

    def forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """Eval-mode detections: ``list[dict(boxes[K, 4] xyxy px, scores[K], labels[K] in 1..C)]``."""
        if self.model.training:
            raise RuntimeError("DamoYolo.forward returns detections in eval mode; call .eval() first")
        outputs = self.model(damo_batch(images))  # ZeroHead's own decoding and multiclass NMS: BoxLists
        results = []
        for image, found in zip(images, outputs):
            scores = found.get_field("scores")
            order = torch.argsort(scores, descending=True, stable=True)[: self.max_detections]
            h, w = int(image.shape[-2]), int(image.shape[-1])
            boxes = found.bbox[order].float()
            boxes = torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h), boxes[:, 2].clamp(0, w),
                                 boxes[:, 3].clamp(0, h)], 1)
            results.append({"boxes": boxes, "scores": scores[order], "labels": found.get_field("labels")[order].long()})
        return results

    def damo_targets(self, images: list[Tensor], targets: list[dict[str, Any]]) -> tuple[Tensor, list[Any]]:
        """The padded ``0..255`` batch and one DAMO-YOLO ``BoxList`` (xyxy pixels, ``labels``) per image."""
        from modelscope.models.cv.tinynas_detection.damo.structures.bounding_box import BoxList

        batch = damo_batch(images)
        size = (int(batch.shape[-1]), int(batch.shape[-2]))  # BoxList sizes are (w, h)
        boxes = []
        for t in targets:
            box = BoxList(t["boxes"].float().reshape(-1, 4), size, mode="xyxy")
            box.add_field("labels", t["labels"].long().reshape(-1))
            boxes.append(box)
        return batch, boxes

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        images, targets = batch
        tensor, boxes = self.damo_targets(images, targets)
        losses: dict[str, Tensor] = self.model(tensor, boxes)  # ZeroHead.forward_train
        loss = losses["total_loss"]
        size = len(images)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=size)
        self.log_dict({f"train/{k}": v.detach().float() for k, v in losses.items() if k != "total_loss"},
                      on_step=True, on_epoch=False, batch_size=size)
        return loss
