"""The detlens adapter of an Ultralytics ``DetectionModel`` (YOLOv8, YOLO11: one-to-many ``Detect`` head)."""

from __future__ import annotations

import sys

from torch import Tensor, nn

from detlens.adapters.dense_head import DenseHeadAdapter, DenseLevels

__all__ = ["UltralyticsAdapter", "is_ultralytics_detector"]


def _head(model: nn.Module) -> nn.Module:
    return model.model[-1]  # type: ignore[index,return-value]


def is_ultralytics_detector(net: nn.Module) -> bool:
    """An Ultralytics ``DetectionModel`` whose ``Detect`` head has its one-to-many branch (the
    one NMS reads: YOLOv8, YOLO11). End-to-end (NMS-free) heads are not this family.

    Imports nothing from Ultralytics until a network could be one: detlens loads this family
    through its entry point in every process, and importing Ultralytics has side effects
    (it patches ``PIL.Image.open`` globally)."""
    if "ultralytics" not in sys.modules or not type(net).__module__.startswith("ultralytics."):
        return False
    from ultralytics.nn.modules.head import Detect
    from ultralytics.nn.tasks import DetectionModel

    if not isinstance(net, DetectionModel):
        return False
    head = _head(net)
    return isinstance(head, Detect) and getattr(head, "cv2", None) is not None and not head.end2end


class UltralyticsAdapter(DenseHeadAdapter):
    """Explains an Ultralytics ``DetectionModel`` through :class:`~detlens.adapters.dense_head.DenseHeadAdapter`.

    The network runs layer by layer as its own ``_predict_once`` does, up to the ``Detect``
    head, whose box (``cv2``) and class (``cv3``) branches then give the per-level outputs:
    sigmoid class scores, DFL box distances (``reg_max`` bins) in grid cells from the cell
    centres, as ``Detect`` decodes them. NMS follows Ultralytics' defaults for validation
    (class-aware, IoU 0.7, best class per anchor, at most 300 per image). Images are padded
    with Ultralytics' letterbox grey (114/255) to a multiple of the largest stride.

    ``labels`` are the model's class indices plus ``model.label_offset`` when the model has
    that attribute (:class:`detlens_ultralytics.UltralyticsDetector` sets 1, detlens' labels
    being ``1..C``); a model trained by Ultralytics reports its own class indices ``0..C-1``.
    Target layers: the ``neck*`` virtual layers and ``model.<i>`` for every layer before the head.
    """

    family = "ultralytics_yolo"
    grid_offset = 0.5
    distance_scale = "stride"
    nms_iou = 0.7
    max_det = 300
    pad_value = 114.0 / 255.0

    def __init__(self, model: nn.Module):
        if not is_ultralytics_detector(model):
            raise TypeError(f"{type(model).__name__} is not an Ultralytics DetectionModel with a one-to-many Detect head")
        super().__init__(model)
        self.head = _head(model)

    def strides(self) -> list[float]:
        return [float(s) for s in self.head.stride]

    def module_layers(self) -> list[str]:
        return [f"model.{i}" for i in range(len(self.model.model) - 1)]

    def dense_forward(self, batch: Tensor) -> DenseLevels:
        y: list[Tensor | None] = []
        x = batch
        net = self.model
        for m in net.model:
            if m.f != -1:
                x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            if m is self.head:
                break
            x = m(x)
            y.append(x if m.i in net.save else None)
        feats = list(x)
        head = self.head
        return DenseLevels(
            cls_logits=[head.cv3[i](f) for i, f in enumerate(feats)],
            box_regression=[head.cv2[i](f) for i, f in enumerate(feats)],
            head_inputs=feats,
            strides=self.strides(),
        )

    def label_offset(self) -> int:
        return int(getattr(self.model, "label_offset", 0))
