"""torchvision detectors (Faster R-CNN, RetinaNet, FCOS) as a typed, YAML-friendly LightningModule."""

from __future__ import annotations

import difflib
from typing import Literal, get_args

from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from detlens.lightning_modules.attention import TemperatureMode
from detlens.lightning_modules.backbones import NormName, TrunkName, build_fpn_backbone
from detlens.lightning_modules.base import DetectionModule

__all__ = ["Architecture", "TorchvisionDetector", "build_torchvision_detector"]

Architecture = Literal[
    "fasterrcnn_resnet50_fpn",
    "fasterrcnn_resnet18_fpn",
    "fasterrcnn_mobilenet_v3_large_fpn",
    "retinanet_resnet50_fpn",
    "retinanet_resnet18_fpn",
    "fcos_resnet50_fpn",
    "fcos_resnet18_fpn",
]

_FAMILY_TRUNK: dict[str, tuple[str, TrunkName]] = {
    name: (name.split("_", 1)[0], name.split("_", 1)[1].removesuffix("_fpn"))  # type: ignore[misc]
    for name in get_args(Architecture)
}


def _anchor_generator(
    family: str, trunk: str, num_levels: int, anchor_sizes: list[int] | None, aspect_ratios: tuple[float, ...]
) -> AnchorGenerator:
    """One anchor set per FPN level, following torchvision's defaults when ``anchor_sizes`` is None."""
    if anchor_sizes is not None and len(anchor_sizes) != num_levels:
        raise ValueError(
            f"anchor_sizes needs one base size per FPN level: {num_levels} levels here, got {anchor_sizes}"
        )
    if family == "fcos":
        # FCOS: exactly one square anchor per location; its size sets the level's object-scale range [4s, 8s].
        base = anchor_sizes or [8 * 2**i for i in range(num_levels)]
        return AnchorGenerator(tuple((s,) for s in base), ((1.0,),) * num_levels)
    ratios = (tuple(float(r) for r in aspect_ratios),) * num_levels
    if family == "retinanet":
        base = anchor_sizes or [32 * 2**i for i in range(num_levels)]
        return AnchorGenerator(tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in base), ratios)
    if anchor_sizes is None and trunk == "mobilenet_v3_large":
        return AnchorGenerator(((32, 64, 128, 256, 512),) * num_levels, ratios)
    base = anchor_sizes or [32 * 2**i for i in range(num_levels)]
    return AnchorGenerator(tuple((s,) for s in base), ratios)


def build_torchvision_detector(
    architecture: Architecture,
    num_classes: int,
    *,
    min_size: int = 800,
    max_size: int = 1333,
    norm: NormName = "batch",
    trainable_backbone_layers: int | None = None,
    returned_layers: list[int] | None = None,
    fpn_channels: int = 256,
    anchor_sizes: list[int] | None = None,
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0),
    attention_stage: str | None = None,
    attention_heads: int = 1,
    attention_fpn_levels: list[str] | Literal["all"] | None = None,
    attention_temperature: TemperatureMode = "fixed",
    rpn_proposals_train: int = 2000,
    rpn_proposals_test: int = 1000,
    rpn_batch_size_per_image: int = 256,
    box_batch_size_per_image: int = 512,
    representation_size: int = 1024,
    detections_per_image: int = 100,
    score_thresh: float = 0.05,
    nms_thresh: float = 0.5,
) -> nn.Module:
    """Build a torchvision detector from scratch (no weights are downloaded).

    ``num_classes`` is ``C`` without background; the torchvision model gets ``C + 1``
    outputs so labels ``1..C`` index them directly. See :class:`TorchvisionDetector`.
    """
    if architecture not in _FAMILY_TRUNK:
        close = difflib.get_close_matches(str(architecture), list(_FAMILY_TRUNK), n=3)
        raise ValueError(f"unknown architecture {architecture!r}; did you mean {close}? valid: {list(_FAMILY_TRUNK)}")
    family, trunk = _FAMILY_TRUNK[architecture]
    if family == "fcos" and fpn_channels % 32:
        raise ValueError(f"FCOS heads use GroupNorm(32, C): fpn_channels must be a multiple of 32, got {fpn_channels}")
    if family == "fasterrcnn":
        extra: nn.Module = LastLevelMaxPool()
        extra_levels = 1
    else:  # RetinaNet / FCOS add P6, P7 computed from P5 (torchvision's LastLevelP6P7(256, 256))
        extra = LastLevelP6P7(fpn_channels, fpn_channels)
        extra_levels = 2
        if returned_layers is None and trunk != "mobilenet_v3_large":
            returned_layers = [2, 3, 4]
    backbone = build_fpn_backbone(
        trunk,
        norm=norm,
        trainable_layers=trainable_backbone_layers,
        returned_layers=returned_layers,
        extra_blocks=extra,
        fpn_channels=fpn_channels,
        attention_stage=attention_stage,
        attention_heads=attention_heads,
        attention_fpn_levels=attention_fpn_levels,
        attention_temperature=attention_temperature,
    )
    num_fpn_inputs = len(backbone.fpn.inner_blocks)
    anchors = _anchor_generator(family, trunk, num_fpn_inputs + extra_levels, anchor_sizes, aspect_ratios)
    common = dict(min_size=min_size, max_size=max_size, anchor_generator=anchors)
    if family == "fasterrcnn":
        resolution = 7
        return FasterRCNN(
            backbone,
            num_classes=None,  # given by box_predictor
            min_size=min_size,
            max_size=max_size,
            rpn_anchor_generator=anchors,
            rpn_pre_nms_top_n_train=rpn_proposals_train,
            rpn_post_nms_top_n_train=rpn_proposals_train,
            rpn_pre_nms_top_n_test=rpn_proposals_test,
            rpn_post_nms_top_n_test=rpn_proposals_test,
            rpn_batch_size_per_image=rpn_batch_size_per_image,
            box_roi_pool=MultiScaleRoIAlign(
                featmap_names=[str(i) for i in range(num_fpn_inputs)], output_size=resolution, sampling_ratio=2
            ),
            box_head=TwoMLPHead(fpn_channels * resolution**2, representation_size),
            box_predictor=FastRCNNPredictor(representation_size, num_classes + 1),
            box_batch_size_per_image=box_batch_size_per_image,
            box_detections_per_img=detections_per_image,
            box_score_thresh=score_thresh,
            box_nms_thresh=nms_thresh,
        )
    one_stage = dict(
        common, score_thresh=score_thresh, nms_thresh=nms_thresh, detections_per_img=detections_per_image
    )
    if family == "retinanet":
        return RetinaNet(backbone, num_classes + 1, **one_stage)
    return FCOS(backbone, num_classes + 1, **one_stage)


class TorchvisionDetector(DetectionModule):
    """A torchvision Faster R-CNN / RetinaNet / FCOS trained with Lightning.

    ``self.model`` is the torchvision detector itself (``FasterRCNN``, ``RetinaNet`` or
    ``FCOS``), so torchvision tooling and checkpoints apply. Backbone modules keep
    torchvision's names (``model.backbone.body.layer3``, ``model.backbone.fpn``); the
    optional attention block is ``model.backbone.body.<attention_stage>_attention``, the
    optional blocks on FPN levels ``model.backbone.fpn_attention.<level>``. Without the
    attention options the module tree and state_dict are those of earlier versions, so
    their checkpoints load unchanged.

    Args:
        architecture: detector family + trunk, e.g. ``"fasterrcnn_resnet18_fpn"``.
        num_classes: ``C``, categories without background.
        class_names: optional ``{label: name}``.
        min_size, max_size: torchvision's resize (shorter side to ``min_size`` pixels,
            longer side at most ``max_size``).
        norm: trunk normalisation. Default ``"batch"`` (trainable BatchNorm): from
            scratch the frozen BatchNorm of torchvision's pretrained recipes would
            normalise nothing; ``"group"`` is for 1-2 images per device.
        trainable_backbone_layers: ``None`` trains the whole trunk (from scratch); an int
            freezes early stages as in torchvision (useful with ``checkpoint``).
        returned_layers: trunk stages feeding the FPN (ResNet 1..4).
        fpn_channels: FPN width (256 in torchvision; 64-128 is far cheaper on CPU).
        anchor_sizes: one base anchor size (pixels, after resize) per FPN level, finest
            first. Match them to your object sizes. RetinaNet adds 2^(1/3), 2^(2/3) scales.
        aspect_ratios: anchor height/width ratios (Faster R-CNN, RetinaNet).
        attention_stage: trunk stage followed by a :class:`SpatialSelfAttention`
            (e.g. ``"layer3"``); ``None`` for none. Unknown names raise with the valid list.
        attention_heads: heads of every attention block.
        attention_fpn_levels: FPN levels followed by a :class:`SpatialSelfAttention` each,
            attending over that level's own positions: ``"all"`` or level names (``"0"`` the
            finest, ..., ``"pool"`` for Faster R-CNN; ``"p6"``, ``"p7"`` for RetinaNet/FCOS).
            Memory grows with the square of a level's positions: level ``"0"`` has
            ``(H/4) * (W/4)`` of them, so keep ``min_size`` small or skip the finest levels.
        attention_temperature: ``"fixed"`` (softmax of ``q k^T / sqrt(d)``) or
            ``"learnable"`` (``/ (sqrt(d) * T)`` with ``T = exp(log_temperature)`` trained,
            starting at 1) for every attention block. Every block is an identity at
            initialisation either way.
        rpn_proposals_train, rpn_proposals_test: RPN proposals kept before/after NMS
            (Faster R-CNN only).
        rpn_batch_size_per_image, box_batch_size_per_image: anchors / RoIs sampled per
            image for the RPN / box-head losses (Faster R-CNN only).
        representation_size: width of the two-layer box head (Faster R-CNN only).
        detections_per_image, score_thresh, nms_thresh: post-processing.
        checkpoint: optional local state_dict or Lightning checkpoint to start from;
            matching tensors load, the rest is reported (nothing is ever downloaded).
        optimizer, lr, weight_decay, momentum, warmup_steps: see :class:`DetectionModule`.
    """

    def __init__(
        self,
        architecture: Architecture = "fasterrcnn_resnet18_fpn",
        num_classes: int = 1,
        class_names: dict[int, str] | None = None,
        min_size: int = 800,
        max_size: int = 1333,
        norm: NormName = "batch",
        trainable_backbone_layers: int | None = None,
        returned_layers: list[int] | None = None,
        fpn_channels: int = 256,
        anchor_sizes: list[int] | None = None,
        aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0),
        attention_stage: str | None = None,
        attention_heads: int = 1,
        attention_fpn_levels: list[str] | Literal["all"] | None = None,
        attention_temperature: TemperatureMode = "fixed",
        rpn_proposals_train: int = 2000,
        rpn_proposals_test: int = 1000,
        rpn_batch_size_per_image: int = 256,
        box_batch_size_per_image: int = 512,
        representation_size: int = 1024,
        detections_per_image: int = 100,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        checkpoint: str | None = None,
        optimizer: Literal["adamw", "sgd"] = "sgd",
        lr: float = 0.02,
        weight_decay: float = 1e-4,
        momentum: float = 0.9,
        warmup_steps: int = 100,
    ) -> None:
        super().__init__(
            num_classes=num_classes,
            class_names=class_names,
            optimizer=optimizer,
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            warmup_steps=warmup_steps,
        )
        self.architecture = architecture
        self.model = build_torchvision_detector(
            architecture,
            num_classes,
            min_size=min_size,
            max_size=max_size,
            norm=norm,
            trainable_backbone_layers=trainable_backbone_layers,
            returned_layers=returned_layers,
            fpn_channels=fpn_channels,
            anchor_sizes=anchor_sizes,
            aspect_ratios=tuple(aspect_ratios),
            attention_stage=attention_stage,
            attention_heads=attention_heads,
            attention_fpn_levels=attention_fpn_levels,
            attention_temperature=attention_temperature,
            rpn_proposals_train=rpn_proposals_train,
            rpn_proposals_test=rpn_proposals_test,
            rpn_batch_size_per_image=rpn_batch_size_per_image,
            box_batch_size_per_image=box_batch_size_per_image,
            representation_size=representation_size,
            detections_per_image=detections_per_image,
            score_thresh=score_thresh,
            nms_thresh=nms_thresh,
        )
        if checkpoint is not None:
            self.load_weights(checkpoint)
