"""The adapter of DAMO-YOLO as modelscope ships it (TinyNAS backbone, GiraffeNeckV2, ZeroHead).

Nothing here imports modelscope: the network is recognised by its classes' names and
modules, and run through its own submodules (``backbone``, ``neck``, and the ZeroHead's
per-level ``cls_convs``/``reg_convs``/``gfl_cls``/``gfl_reg``/``scales``, as its
``forward_single`` runs them).
"""

from __future__ import annotations

from torch import Tensor, nn

from .dense_head import DenseHeadAdapter, DenseLevels

__all__ = ["DamoYoloAdapter", "is_damo_yolo"]

_DAMO_PACKAGE = "modelscope.models.cv.tinynas_detection.damo"


def is_damo_yolo(net: nn.Module) -> bool:
    """modelscope's DAMO-YOLO ``Detector`` with a ``ZeroHead``."""
    head = getattr(net, "head", None)
    return (
        type(net).__name__ == "Detector"
        and type(net).__module__.startswith(_DAMO_PACKAGE)
        and head is not None
        and type(head).__name__ == "ZeroHead"
    )


class DamoYoloAdapter(DenseHeadAdapter):
    """DAMO-YOLO through :class:`~detlens.adapters.dense_head.DenseHeadAdapter`, as ZeroHead's own
    ``forward_eval`` + ``postprocess`` score and decode:

    * class scores: sigmoid of the first ``num_classes`` of ZeroHead's ``num_classes + 1``
      logits; candidates are every (anchor, class) pair above ``head.nms_conf_thre``
      (``multiclass_nms``), NMS at ``head.nms_iou_thre``, at most 500 per image;
    * boxes: distribution-focal distances (``reg_max + 1`` bins, after the level's ``Scale``)
      times the stride, from priors at ``(x * s, y * s)`` (no half-cell offset);
    * input: RGB pixel values in ``[0, 255]`` (DAMO-YOLO's own transforms do not divide by
      255), zero-padded to a multiple of 32 at the bottom and right;
    * labels: class index + 1 (``postprocess`` reports ``labels + 1``), detlens' ``1..C``.

    Target layers: the ``neck*`` virtual layers (the GiraffeNeckV2 outputs ZeroHead reads),
    ``backbone.block_list.<i>`` (TinyNAS stages) and the neck's modules.
    """

    family = "damo_yolo"
    grid_offset = 0.0
    distance_scale = "stride"
    multi_label = True
    max_det = 500
    pre_nms_top_n = 1 << 30  # multiclass_nms keeps every candidate for NMS

    def __init__(self, model: nn.Module):
        if not is_damo_yolo(model):
            raise TypeError(f"{type(model).__name__} is not modelscope's DAMO-YOLO Detector with a ZeroHead")
        super().__init__(model)
        head = model.head
        self.candidate_threshold = float(head.nms_conf_thre)
        self.nms_iou = float(head.nms_iou_thre)

    def strides(self) -> list[float]:
        return [float(s) for s in self.model.head.strides]

    def size_divisor(self) -> int:
        return 32

    def label_offset(self) -> int:
        return 1

    def preprocess(self, images: list[Tensor]) -> Tensor:
        return super().preprocess([im * 255.0 for im in images])

    def module_layers(self) -> list[str]:
        m = self.model
        names = [f"backbone.block_list.{i}" for i in range(len(m.backbone.block_list))]
        # the neck's upsample module runs twice per forward: no single activation to explain
        return names + [f"neck.{n}" for n, _ in m.neck.named_children() if n != "upsample"]

    def dense_forward(self, batch: Tensor) -> DenseLevels:
        m = self.model
        head = m.head
        feats = list(m.neck(m.backbone(batch)))
        cls, reg = [], []
        for i, x in enumerate(feats):
            cls_feat, reg_feat = x, x
            for cls_conv, reg_conv in zip(head.cls_convs[i], head.reg_convs[i]):
                cls_feat, reg_feat = cls_conv(cls_feat), reg_conv(reg_feat)
            cls.append(head.gfl_cls[i](cls_feat)[:, : head.num_classes])
            reg.append(head.scales[i](head.gfl_reg[i](reg_feat)).float())
        return DenseLevels(cls_logits=cls, box_regression=reg, head_inputs=feats, strides=self.strides())
