"""LightningModules for detectors: torchvision Faster R-CNN / RetinaNet / FCOS, a compact DETR and
DAMO-YOLO (modelscope's code, the ``detlens[damo]`` extra).

Every detector subclasses :class:`DetectionModule` (``self.model``, ``num_classes``,
``class_names``, eval ``forward(images) -> list[dict(boxes, scores, labels)]``, losses
logged as ``train/*``, ``val/mAP`` and ``val/mAP_50``); see ``docs/ARCHITECTURE.md``.
"""

from detlens.lightning_modules.attention import SpatialSelfAttention
from detlens.lightning_modules.base import DetectionModule
from detlens.lightning_modules.damo_yolo import DamoYolo
from detlens.lightning_modules.detr import DETR
from detlens.lightning_modules.hf_detector import HFDetector
from detlens.lightning_modules.torchvision_detector import TorchvisionDetector

__all__ = ["DETR", "DamoYolo", "DetectionModule", "HFDetector", "SpatialSelfAttention", "TorchvisionDetector"]
