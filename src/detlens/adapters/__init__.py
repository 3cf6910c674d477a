"""How each detector family exposes detections, scores, target layers and box features.

``adapter_for(model)`` picks the adapter; see :mod:`detlens.adapters.base` for the
protocol and an example of plugging in your own detector.
"""

from __future__ import annotations

from torch import nn

from .base import AdapterOutput, Detections, DetectorAdapter, ImageGeometry, LayerCapture, RoIScoring
from .detr import DetrAdapter, is_detr
from .one_stage import OneStageAdapter
from .two_stage import TwoStageAdapter

__all__ = [
    "AdapterOutput",
    "Detections",
    "DetectorAdapter",
    "DetrAdapter",
    "ImageGeometry",
    "LayerCapture",
    "OneStageAdapter",
    "RoIScoring",
    "TwoStageAdapter",
    "adapter_for",
]


def _unwrap(model: nn.Module) -> nn.Module:
    """A LightningModule (or any wrapper) holding the network in ``.model`` -> the network."""
    seen = 0
    while isinstance(getattr(model, "model", None), nn.Module) and seen < 4:
        if hasattr(model, "roi_heads") or hasattr(model, "head") or is_detr(model):
            break
        model = model.model
        seen += 1
    return model


def adapter_for(model: nn.Module) -> DetectorAdapter:
    """The adapter for a torchvision two-stage / one-stage detector or the project's DETR.

    A LightningModule's ``.model`` is unwrapped. Raises ``TypeError`` for other models,
    explaining how to write an adapter.
    """
    if isinstance(model, DetectorAdapter):
        return model
    net = _unwrap(model)
    from torchvision.models.detection.fcos import FCOS
    from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
    from torchvision.models.detection.retinanet import RetinaNet
    from torchvision.models.detection.ssd import SSD

    if isinstance(net, GeneralizedRCNN) and hasattr(net, "roi_heads"):
        return TwoStageAdapter(net)
    if isinstance(net, (RetinaNet, FCOS, SSD)):
        return OneStageAdapter(net)
    if is_detr(net):
        return DetrAdapter(net)
    raise TypeError(
        f"detlens has no adapter for {type(net).__name__}. Supported: torchvision Faster/Mask/"
        "Keypoint R-CNN, RetinaNet, FCOS, SSD/SSDlite and detlens' DETR. For another detector, "
        "subclass detlens.adapters.DetectorAdapter (implement layer_names() and _forward(); "
        "see the example in detlens.adapters.base) and pass adapter=MyAdapter(model)."
    )
