"""How each detector family exposes detections, scores, target layers and box features.

``adapter_for(model)`` picks the adapter from an open registry of detector families
(:mod:`detlens.adapters.registry`: ``register(predicate, adapter_class)`` or the
``detlens.adapters`` entry points), finding the network anywhere in a LightningModule;
see :mod:`detlens.adapters.base` for the protocol and an example of your own adapter.
"""

from __future__ import annotations

from torch import nn

from .base import AdapterOutput, Detections, DetectorAdapter, ImageGeometry, LayerCapture, RoIScoring
from .damo_yolo import DamoYoloAdapter, is_damo_yolo
from .dense_head import DenseHeadAdapter, DenseLevels
from .detr import DetrAdapter, is_detr
from .hf_detr import HFDetrAdapter, hf_detector_kind
from .one_stage import OneStageAdapter
from .registry import AdapterRegistry, find_network, register, resolve_adapter
from .two_stage import TwoStageAdapter

__all__ = [
    "AdapterOutput",
    "AdapterRegistry",
    "DamoYoloAdapter",
    "DenseHeadAdapter",
    "DenseLevels",
    "Detections",
    "DetectorAdapter",
    "DetrAdapter",
    "HFDetrAdapter",
    "ImageGeometry",
    "LayerCapture",
    "OneStageAdapter",
    "RoIScoring",
    "TwoStageAdapter",
    "adapter_for",
    "find_network",
    "register",
    "resolve_adapter",
]


def _two_stage(net: nn.Module) -> bool:
    from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

    return isinstance(net, GeneralizedRCNN) and hasattr(net, "roi_heads")


def _one_stage(net: nn.Module) -> bool:
    from torchvision.models.detection.fcos import FCOS
    from torchvision.models.detection.retinanet import RetinaNet
    from torchvision.models.detection.ssd import SSD

    return isinstance(net, (RetinaNet, FCOS, SSD))


# detlens' own families, registered like any other (third-party ones: register() or the
# "detlens.adapters" entry points, see detlens.adapters.registry).
register(_two_stage, TwoStageAdapter, "torchvision two-stage (Faster/Mask/Keypoint R-CNN)")
register(_one_stage, OneStageAdapter, "torchvision one-stage (RetinaNet, FCOS, SSD)")
register(is_detr, DetrAdapter, "detlens DETR")
register(lambda net: hf_detector_kind(net) is not None, HFDetrAdapter, "Hugging Face transformers DETR family")
register(is_damo_yolo, DamoYoloAdapter, "DAMO-YOLO (modelscope's Detector with ZeroHead)")


def adapter_for(
    model: nn.Module | DetectorAdapter, adapter: DetectorAdapter | dict | None = None, model_attr: str | None = None
) -> DetectorAdapter:
    """The adapter that explains ``model`` (see :func:`detlens.adapters.registry.resolve_adapter`).

    ``model`` is a network, a LightningModule holding one under any attribute name, or an
    adapter (returned as is). Raises ``TypeError`` when no registered family recognises a
    network in it (the message says how to add one) and ``ValueError`` when several do
    (it names them and how to choose: ``model_attr=`` or ``adapter=``).
    """
    if isinstance(model, DetectorAdapter):
        return model
    return resolve_adapter(model, adapter, model_attr)
