"""The fixed probe set: which dataset items a callback explains, and where they come from.

The probe set is read from a dataset by index (``dataset[i]``), never by iterating a
DataLoader, so no training or validation iterator (and no sampler's RNG) ever advances.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

__all__ = ["IMAGE_SUFFIXES", "ImageFolderProbeDataset", "evenly_spaced_indices", "pixel_digest", "probe_folder_dataset"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def evenly_spaced_indices(dataset_size: int, count: int) -> list[int]:
    """``min(count, dataset_size)`` distinct indices spread evenly over ``0..dataset_size-1``.

    Deterministic (no RNG): ``evenly_spaced_indices(10, 3) == [0, 4, 9]`` on every rank
    and every run, so probe sets line up across runs of the same dataset.
    """
    if dataset_size < 1:
        raise ValueError("the probe dataset is empty")
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if count >= dataset_size:
        return list(range(dataset_size))
    if count == 1:
        return [0]
    step = (dataset_size - 1) / (count - 1)
    return [round(i * step) for i in range(count)]


class ImageFolderProbeDataset(Dataset[tuple[torch.Tensor, dict[str, Any]]]):
    """Images in a folder (sorted by name), without annotations.

    Items follow ``docs/ARCHITECTURE.md`` with no objects: ``boxes`` is ``[0, 4]``,
    ``labels`` ``[0]``, ``image_id`` the item's index, ``file_name`` the file's name.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.files = sorted(p for p in self.folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise ValueError(f"probe_dir {self.folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        from detlens.data.image_io import load_rgb_image

        path = self.files[index]
        image = load_rgb_image(path, context=f"probe_dir item {index}")
        target = {
            "boxes": torch.zeros((0, 4), dtype=torch.float32),
            "labels": torch.zeros((0,), dtype=torch.int64),
            "image_id": index,
            "file_name": path.name,
        }
        return image, target


def pixel_digest(image: torch.Tensor) -> tuple[tuple[int, ...], torch.dtype, bytes]:
    """``(shape, dtype, BLAKE2b of the bytes)`` of ``image`` (any device): equal for two
    images exactly when their pixels are bit-identical (``-0.0`` and ``0.0`` differ), so a
    probe image is read from disk once and a validation batch is checked against its digest."""
    data = image.detach().to("cpu").contiguous()
    return tuple(data.shape), data.dtype, hashlib.blake2b(data.view(torch.uint8).numpy().tobytes(), digest_size=16).digest()


def probe_folder_dataset(folder: str | Path) -> Dataset:
    """The dataset behind ``probe_dir``.

    A folder with exactly one ``*.json`` file is read as COCO (``images_dir=folder``) with
    :class:`detlens.data.coco.CocoDetectionDataset`, so ground truth is drawn and labels
    map to ``1..C`` as in training; otherwise every image in it is a probe image.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"probe_dir {folder} is not a folder")
    annotations: Sequence[Path] = sorted(folder.glob("*.json"))
    if len(annotations) > 1:
        raise ValueError(
            f"probe_dir {folder} holds {len(annotations)} JSON files ({[p.name for p in annotations]}); "
            "keep exactly one COCO annotation file, or none"
        )
    if annotations:
        from detlens.data.coco import CocoDetectionDataset

        return CocoDetectionDataset(images_dir=folder, annotation_file=annotations[0])
    return ImageFolderProbeDataset(folder)
