"""A map-style dataset over any COCO-format detection annotation file.

Items follow ``docs/ARCHITECTURE.md``: ``(image, target)`` with ``image`` a
``FloatTensor[3, H, W]`` (RGB, ``[0, 1]``) and ``target`` a dict of ``boxes``
(``FloatTensor[N, 4]``, absolute pixels, ``x1, y1, x2, y2``), ``labels``
(``Int64Tensor[N]``, contiguous ``1..C`` in sorted COCO category-id order), ``image_id``
(the COCO image id) and ``file_name``.

The annotation file is read with the standard library's ``json`` rather than
``pycocotools.coco.COCO``: ``COCO`` neither validates records nor reports where a
malformed file breaks, and both are what a user needs when a dataset is wrong.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from detlens.data.errors import DatasetError
from detlens.data.image_io import load_rgb_image

Target = dict[str, Any]
Transform = Callable[[torch.Tensor, Target], tuple[torch.Tensor, Target]]

_IMAGE_KEYS = ("id", "file_name", "width", "height")
_ANNOTATION_KEYS = ("id", "image_id", "category_id", "bbox")
_CATEGORY_KEYS = ("id", "name")


@dataclass(frozen=True)
class CocoCategory:
    """One object category: its COCO id, name and the contiguous label (``1..C``) it maps to."""

    category_id: int
    name: str
    label: int


@dataclass(frozen=True)
class _ImageRecord:
    image_id: int
    file_name: str
    width: int
    height: int
    boxes: np.ndarray  # float32[N, 4], x1 y1 x2 y2, absolute pixels
    labels: np.ndarray  # int64[N], 1..C


def read_coco_json(annotation_file: str | Path) -> dict[str, Any]:
    """Parses a COCO annotation file; errors name the file (and line/column for bad JSON).

    Raises:
        DatasetError: the file is missing, unreadable, not JSON, or not a JSON object.
    """
    path = Path(annotation_file)
    if not path.is_file():
        raise DatasetError(f"{path}: annotation file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: cannot read annotation file: {err}") from err
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DatasetError(
            f"{path}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}"
        ) from err
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object at top level, got {type(data).__name__}")
    return data


def parse_categories(data: dict[str, Any], *, source: str | Path) -> list[CocoCategory]:
    """Validates the ``categories`` list and maps sorted COCO ids to labels ``1..C``.

    Raises:
        DatasetError: the list is missing or empty, a record lacks ``id``/``name``, or an id
            is not an integer or is repeated.
    """
    raw = data.get("categories")
    if not isinstance(raw, list) or not raw:
        raise DatasetError(f"{source}: 'categories' must be a non-empty list")
    by_id: dict[int, str] = {}
    for index, record in enumerate(raw):
        where = f"{source}: category #{index}"
        _require_keys(record, _CATEGORY_KEYS, where=where)
        category_id = _require_int(record["id"], what="id", where=where)
        if category_id in by_id:
            raise DatasetError(f"{source}: category id {category_id} is listed twice")
        by_id[category_id] = str(record["name"])
    return [
        CocoCategory(category_id=cid, name=by_id[cid], label=label)
        for label, cid in enumerate(sorted(by_id), start=1)
    ]


class CocoDetectionDataset(Dataset[tuple[torch.Tensor, Target]]):
    """Detection items from a folder of images and a COCO-format annotation file.

    Args:
        images_dir: folder that each image's ``file_name`` is relative to.
        annotation_file: COCO detection JSON (``images``, ``annotations``, ``categories``).
        transforms: optional ``(image, target) -> (image, target)`` applied to each item.
        box_tolerance: how far, in pixels, a box may reach past the image border before it is
            an error; boxes within the tolerance are clipped to the image.

        on_bad_image: an image file that exists but cannot be decoded (or whose size differs
            from the JSON) when its item is loaded: ``"raise"`` a :class:`DatasetError`, or
            ``"skip"`` it: one warning naming it, counted in :attr:`skipped`, and the item is
            replaced by the next readable one (a batch keeps its size).

    Checked at construction (cheap): JSON syntax, required keys, unique ids, annotations
    pointing at known images and categories, finite boxes inside the image, positive area.
    :meth:`check_files` (called by :class:`~detlens.data.CocoDataModule` at ``setup``,
    before the first step) finds every referenced file that does not exist. Checked when
    an item is loaded: the file decodes and has the ``width``/``height`` the JSON states.
    Annotations with ``iscrowd=1`` are skipped. Every error names the file and the record.
    """

    def __init__(
        self,
        images_dir: str | Path,
        annotation_file: str | Path,
        transforms: Transform | None = None,
        box_tolerance: float = 1.0,
        on_bad_image: Literal["raise", "skip"] = "raise",
    ) -> None:
        if on_bad_image not in ("raise", "skip"):
            raise ValueError(f"on_bad_image must be 'raise' or 'skip', got {on_bad_image!r}")
        self.images_dir = Path(images_dir)
        self.annotation_file = Path(annotation_file)
        self.transforms = transforms
        self.box_tolerance = float(box_tolerance)
        self.on_bad_image = on_bad_image
        self.skipped: dict[str, str] = {}
        """``file_name -> reason`` of each image skipped so far in this process (``on_bad_image="skip"``)."""
        data = read_coco_json(self.annotation_file)
        self.categories: list[CocoCategory] = parse_categories(data, source=self.annotation_file)
        self.info: dict[str, Any] = data.get("info") if isinstance(data.get("info"), dict) else {}
        self._records = _parse_records(
            data, self.categories, source=self.annotation_file, tolerance=self.box_tolerance
        )

    @property
    def num_classes(self) -> int:
        """Number of object categories ``C`` (background excluded)."""
        return len(self.categories)

    @property
    def class_names(self) -> dict[int, str]:
        """Contiguous label (``1..C``) -> category name."""
        return {c.label: c.name for c in self.categories}

    @property
    def label_to_category_id(self) -> dict[int, int]:
        """Contiguous label -> original COCO category id (to write predictions back as COCO)."""
        return {c.label: c.category_id for c in self.categories}

    @property
    def image_ids(self) -> list[int]:
        """COCO image ids in item order."""
        return [r.image_id for r in self._records]

    def __len__(self) -> int:
        return len(self._records)

    def missing_files(self) -> list[str]:
        """The ``file_name`` of every record whose file does not exist, in record order.

        Lists each image folder once (``os.scandir``) instead of one ``stat`` per image:
        on a network file system a folder listing is one round trip, a ``stat`` one per file.
        """
        by_folder: dict[str, set[str]] = {}
        missing = []
        for record in self._records:
            folder, _, name = record.file_name.replace("\\", "/").rpartition("/")
            if folder not in by_folder:
                try:
                    with os.scandir(self.images_dir / folder) as entries:
                        by_folder[folder] = {e.name for e in entries}
                except OSError:  # a missing folder: every file in it is missing
                    by_folder[folder] = set()
            if name not in by_folder[folder]:
                missing.append(record.file_name)
        return missing

    def check_files(self) -> None:
        """Raises one :class:`DatasetError` listing the missing image files (the first ten and
        the count), if any."""
        missing = self.missing_files()
        if missing:
            shown = ", ".join(repr(m) for m in missing[:10]) + (", ..." if len(missing) > 10 else "")
            raise DatasetError(
                f"{self.annotation_file}: {len(missing)} of {len(self)} image files not found in {self.images_dir}: {shown}"
            )

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        if self.on_bad_image == "raise":
            return self._load(index)
        for offset in range(len(self._records)):
            candidate = (index + offset) % len(self._records)
            try:
                return self._load(candidate)
            except DatasetError as err:
                name = self._records[candidate].file_name
                if name not in self.skipped:
                    self.skipped[name] = str(err)
                    warnings.warn(f"[detlens] skipped an unreadable image ({len(self.skipped)} so far in this process): "
                                  f"{err}", stacklevel=2)
        raise DatasetError(f"{self.annotation_file}: no image of the {len(self)} could be read")

    def _load(self, index: int) -> tuple[torch.Tensor, Target]:
        record = self._records[index]
        context = f"{self.annotation_file}: image {record.image_id} '{record.file_name}'"
        image = load_rgb_image(self.images_dir / record.file_name, context=context)
        height, width = image.shape[-2:]
        if (width, height) != (record.width, record.height):
            raise DatasetError(
                f"{context}: image file is {width}x{height} pixels but the annotation file "
                f"says {record.width}x{record.height} (width x height)"
            )
        target: Target = {
            "boxes": torch.from_numpy(record.boxes.copy()),
            "labels": torch.from_numpy(record.labels.copy()),
            "image_id": record.image_id,
            "file_name": record.file_name,
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(images_dir='{self.images_dir}', "
            f"annotation_file='{self.annotation_file}', images={len(self)}, "
            f"classes={self.num_classes})"
        )


def collate_detection(
    batch: Sequence[tuple[torch.Tensor, Target]],
) -> tuple[list[torch.Tensor], list[Target]]:
    """Batches detection items without stacking (images differ in size, targets in ``N``).

    Returns ``(images, targets)``: ``list[FloatTensor[3, H_i, W_i]]`` and ``list[dict]``.
    """
    images = [image for image, _ in batch]
    targets = [target for _, target in batch]
    return images, targets


def _parse_records(
    data: dict[str, Any], categories: list[CocoCategory], *, source: Path, tolerance: float
) -> list[_ImageRecord]:
    """Validates ``images``/``annotations`` and groups boxes per image, in ``images`` order."""
    images = data.get("images")
    annotations = data.get("annotations", [])
    if not isinstance(images, list):
        raise DatasetError(f"{source}: 'images' must be a list")
    if not isinstance(annotations, list):
        raise DatasetError(f"{source}: 'annotations' must be a list")

    image_meta: dict[int, tuple[str, int, int]] = {}
    for index, record in enumerate(images):
        where = f"{source}: image #{index}"
        _require_keys(record, _IMAGE_KEYS, where=where)
        image_id = _require_int(record["id"], what="id", where=where)
        where = f"{source}: image {image_id} '{record['file_name']}'"
        width = _require_int(record["width"], what="width", where=where)
        height = _require_int(record["height"], what="height", where=where)
        if width <= 0 or height <= 0:
            raise DatasetError(f"{where}: width and height must be positive, got {width}x{height}")
        if image_id in image_meta:
            raise DatasetError(f"{where}: image id {image_id} is listed twice")
        image_meta[image_id] = (str(record["file_name"]), width, height)

    label_of = {c.category_id: c.label for c in categories}
    boxes: dict[int, list[list[float]]] = {image_id: [] for image_id in image_meta}
    labels: dict[int, list[int]] = {image_id: [] for image_id in image_meta}
    seen_annotation_ids: set[int] = set()
    for index, ann in enumerate(annotations):
        _require_keys(ann, _ANNOTATION_KEYS, where=f"{source}: annotation #{index}")
        ann_id = _require_int(ann["id"], what="id", where=f"{source}: annotation #{index}")
        image_id = _require_int(ann["image_id"], what="image_id", where=f"{source}: annotation {ann_id}")
        if image_id not in image_meta:
            raise DatasetError(f"{source}: annotation {ann_id}: image id {image_id} is not in 'images'")
        file_name, width, height = image_meta[image_id]
        where = f"{source}: annotation {ann_id} (image {image_id} '{file_name}')"
        if ann_id in seen_annotation_ids:
            raise DatasetError(f"{where}: annotation id {ann_id} is listed twice")
        seen_annotation_ids.add(ann_id)
        if ann.get("iscrowd", 0):
            continue  # crowd regions are not instances; torchvision's COCO recipes drop them too
        category_id = ann["category_id"]
        if category_id not in label_of:
            known = ", ".join(str(c.category_id) for c in categories)
            raise DatasetError(f"{where}: unknown category id {category_id!r} (known ids: {known})")
        boxes[image_id].append(_check_box(ann["bbox"], width, height, where=where, tolerance=tolerance))
        labels[image_id].append(label_of[category_id])

    records = []
    for image_id, (file_name, width, height) in image_meta.items():
        records.append(
            _ImageRecord(
                image_id=image_id,
                file_name=file_name,
                width=width,
                height=height,
                boxes=np.asarray(boxes[image_id], dtype=np.float32).reshape(-1, 4),
                labels=np.asarray(labels[image_id], dtype=np.int64),
            )
        )
    return records


def _check_box(bbox: Any, width: int, height: int, *, where: str, tolerance: float) -> list[float]:
    """COCO ``[x, y, w, h]`` -> ``[x1, y1, x2, y2]`` clipped to the image, after validation."""
    if (
        not isinstance(bbox, list)
        or len(bbox) != 4
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)
    ):
        raise DatasetError(f"{where}: bbox must be a list of 4 numbers [x, y, width, height], got {bbox!r}")
    shown = "[" + ", ".join(f"{v:g}" for v in bbox) + "]"
    if not all(math.isfinite(v) for v in bbox):
        raise DatasetError(f"{where}: box {shown} has a non-finite coordinate")
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        kind = "zero" if (w == 0 or h == 0) and w >= 0 and h >= 0 else "negative"
        raise DatasetError(f"{where}: box {shown} has {kind} area")
    if x < -tolerance or y < -tolerance or x + w > width + tolerance or y + h > height + tolerance:
        raise DatasetError(
            f"{where}: box {shown} (x, y, width, height) lies outside the {width}x{height} image "
            f"by more than {tolerance:g} px"
        )
    x1, y1 = max(x, 0.0), max(y, 0.0)
    x2, y2 = min(x + w, float(width)), min(y + h, float(height))
    if x2 <= x1 or y2 <= y1:
        raise DatasetError(f"{where}: box {shown} has zero area inside the {width}x{height} image")
    return [x1, y1, x2, y2]


def _require_keys(record: Any, keys: Sequence[str], *, where: str) -> None:
    if not isinstance(record, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [k for k in keys if k not in record]
    if missing:
        raise DatasetError(f"{where}: missing required key(s) {', '.join(map(repr, missing))}")


def _require_int(value: Any, *, what: str, where: str) -> int:
    # JSON writers sometimes emit 3.0 for 3; accept integral floats, reject the rest.
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (isinstance(value, float) and not value.is_integer())
    ):
        raise DatasetError(f"{where}: {what} must be an integer, got {value!r}")
    return int(value)
