"""The fixed probe set: which dataset items a callback explains, and where they come from.

The probe set is read from a dataset by index (``dataset[i]``), never by iterating a
DataLoader, so no training or validation iterator (and no sampler's RNG) ever advances.
"""

from __future__ import annotations

import hashlib
import os
import threading
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

__all__ = [
    "IMAGE_SUFFIXES",
    "PROBE_CACHE_MIB",
    "BatchDigests",
    "ImageFolderProbeDataset",
    "ProbeItemCache",
    "batch_digests",
    "evenly_spaced_indices",
    "pixel_digest",
    "probe_cache",
    "probe_folder_dataset",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

PROBE_CACHE_MIB = float(os.environ.get("DETLENS_PROBE_CACHE_MIB", "256"))
"""How much memory (MiB, per process) the probe items read from datasets may keep, all
callbacks together (``DETLENS_PROBE_CACHE_MIB``; ``0`` reads every item from its dataset at
every use). See :class:`ProbeItemCache`."""


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


class ProbeItemCache:
    """Probe items read from a dataset once per process and shared by every callback reading
    that dataset object.

    Each callback used to read ``dataset[i]`` at every logging event (its explaining pass, its
    overlays, thumbnails and focus record), and five callbacks on one validation set read
    most images five times: JPEG decoding on the training thread, 0.3 s per demo fit of
    160 px PNGs and tens of milliseconds per image at detection resolutions. Items are kept
    per dataset object (weakly: they go with the dataset), in the form the dataset returned
    them, until ``max_bytes`` is used; later items are read each time. A dataset that is not
    hashable or not weakly referenceable is read each time. The items are assumed not to
    change while the dataset object lives (as the probe set's image ids and pixel digests
    already are); callers get the cached item itself and must not change it in place.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self._items: weakref.WeakKeyDictionary[Any, dict[int, tuple[Any, int]]] = weakref.WeakKeyDictionary()
        self._digests: weakref.WeakKeyDictionary[Any, dict[int, tuple[Any, tuple]]] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def digest(self, dataset: Any, index: int, read: Callable[[], tuple[Any, torch.Tensor]]) -> tuple[Any, tuple]:
        """``(image_id, pixel_digest(image))`` of ``dataset[index]``, computed once per dataset
        object and index (outside the byte budget: a few dozen bytes each). ``read()`` gives
        ``(image_id, image)`` when it is not known yet. Every callback on a dataset checks the
        validation batches against the same probe digests (30 ms of hashing per 800 x 1,333
        image each)."""
        with self._lock:
            try:
                known = self._digests.get(dataset, {}).get(index)
            except TypeError:  # not hashable, or not weakly referenceable
                known, dataset = None, None
        if known is not None:
            return known
        image_id, image = read()
        found = (image_id, pixel_digest(image))
        if dataset is not None:
            with self._lock:
                self._digests.setdefault(dataset, {})[index] = found
        return found

    def get(self, dataset: Any, index: int) -> Any | None:
        """The item of ``dataset[index]`` if kept, else ``None``."""
        with self._lock:
            try:
                entry = self._items.get(dataset, {}).get(index)
            except TypeError:  # not hashable, or not weakly referenceable
                return None
        return None if entry is None else entry[0]

    def put(self, dataset: Any, index: int, item: Any, nbytes: int) -> bool:
        """Keeps ``item`` (``nbytes`` of tensor data) if the budget allows; whether it was kept."""
        with self._lock:
            if self.nbytes() + nbytes > self.max_bytes:
                return False
            try:
                self._items.setdefault(dataset, {})[index] = (item, int(nbytes))
            except TypeError:
                return False
        return True

    def nbytes(self) -> int:
        """Tensor bytes kept for the datasets still alive."""
        return sum(size for per_dataset in list(self._items.values()) for _, size in per_dataset.values())

    def clear(self) -> None:
        with self._lock:
            self._items = weakref.WeakKeyDictionary()
            self._digests = weakref.WeakKeyDictionary()


class BatchDigests:
    """:func:`pixel_digest` of the images of the validation batch the callbacks are looking
    at, computed once for all of them: every detlens callback that reads the validation
    forward checks the same probe images of a batch against its probe set (30 ms of hashing,
    and a device-to-host copy, per 800 x 1,333 image and callback).

    Kept for one batch at a time (``key``: ``id`` of the batch object Lightning hands to each
    callback's ``on_validation_batch_start``; a digest is never taken on the key alone), for image tensors that are
    still the same live objects (weakly referenced, same storage, and, outside inference
    mode, not changed in place since: same version counter); anything else is hashed again."""

    def __init__(self) -> None:
        self._key: Any = None
        self._digests: dict[tuple[int, int | None], tuple[weakref.ref, tuple, tuple]] = {}

    def get(self, key: Any, source: torch.Tensor, position: int | None = None) -> tuple:
        """``pixel_digest`` of an image of the batch ``key``: ``source`` itself, or with
        ``position`` the image ``source[position]`` of a stacked ``[B, 3, H, W]`` batch."""
        if key != self._key:
            self._key, self._digests = key, {}
        stamp = (source.data_ptr(), _version(source))
        known = self._digests.get((id(source), position))
        if known is not None and known[0]() is source and known[1] == stamp:
            return known[2]
        digest = pixel_digest(source if position is None else source[position])
        self._digests[(id(source), position)] = (weakref.ref(source), stamp, digest)
        return digest


def _version(tensor: torch.Tensor) -> int | None:
    """The tensor's in-place version counter; ``None`` for inference tensors, which have none."""
    try:
        return int(tensor._version)
    except RuntimeError:
        return None


probe_cache = ProbeItemCache(int(PROBE_CACHE_MIB * 2**20))
"""The process's :class:`ProbeItemCache`, used by :meth:`detlens.callbacks.ProbeCallback.probe_item`."""

batch_digests = BatchDigests()
"""The process's :class:`BatchDigests`, used by the callbacks' ``on_validation_batch_start`` (main thread)."""
