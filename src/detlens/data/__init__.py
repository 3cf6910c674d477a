"""detlens.data: COCO-format detection datasets, synthetic scenes, and their DataModules.

Items are ``(image, target)``: ``image`` a ``FloatTensor[3, H, W]`` (RGB, ``[0, 1]``),
``target`` a dict of ``boxes`` (``FloatTensor[N, 4]``, xyxy pixels), ``labels``
(``Int64Tensor[N]``, ``1..C``), ``image_id`` and ``file_name`` (docs/ARCHITECTURE.md).
"""

from detlens.data.coco import CocoDetectionDataset, collate_detection
from detlens.data.datamodule import CocoDataModule, SyntheticDataModule
from detlens.data.errors import DatasetError
from detlens.data.synthetic import generate_synthetic_scenes
from detlens.data.transforms import RandomHorizontalFlip

__all__ = [
    "CocoDataModule",
    "CocoDetectionDataset",
    "DatasetError",
    "RandomHorizontalFlip",
    "SyntheticDataModule",
    "collate_detection",
    "generate_synthetic_scenes",
]
