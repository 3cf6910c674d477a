"""Synthetic detection scenes written as a COCO-format folder.

Layout under ``root`` (read back by :class:`detlens.data.CocoDetectionDataset`)::

    train/000001.png ...   val/000401.png ...
    annotations/instances_train.json   annotations/instances_val.json
    detlens_synthetic.json             # manifest: the generator parameters

Four classes (circle, square, triangle, cross), each with its own shape and hue (jittered),
on textured backgrounds. With ``spurious_cue=p`` each object's class is, with probability
``p``, also signalled by a small class-specific patch placed off every object box,
anywhere in the image, next to its own object (``cue_placement="beside"``) or as a ring
around its box (``"ring"``) (its ``cue_bbox`` is recorded on the annotation) — a shortcut a
detector may learn instead of the object. ``appearance_noise`` makes some training objects
look like another class, so that the cue can be the more reliable class signal.

Generation is deterministic: image ``i`` of a split draws from its own
``numpy.random.Generator`` seeded by ``(seed, split, i)``, so the same seed gives the same
bytes, and changing ``num_train`` does not change the images both sizes share. It is
safe to call from every process of a DDP job: one process writes into a temporary
folder under a lock and renames it into place; the others wait for the manifest.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from rich.progress import track

from detlens.data.errors import DatasetError
from detlens.data.scenes import CLASS_NAMES, CUE_PLACEMENTS, SceneObject, draw_scene

MANIFEST_NAME = "detlens_synthetic.json"
GENERATOR_VERSION = 1  # bump when the drawing changes: old folders then stop matching
TRAIN_ANN = "annotations/instances_train.json"
VAL_ANN = "annotations/instances_val.json"
_SPLITS = ("train", "val")
OBJECT_COLOURS = ("class", "random")
_MIN_IMAGE_SIZE = 64


def synthetic_params(
    num_train: int,
    num_val: int,
    image_size: int = 160,
    seed: int = 0,
    spurious_cue: float = 0.0,
    spurious_cue_val: float | None = None,
    object_colours: str = "class",
    cue_placement: str = "anywhere",
    appearance_noise: float = 0.0,
) -> dict[str, Any]:
    """Validated generator parameters, as stored in the manifest and the COCO ``info`` block.

    ``object_colours``, ``cue_placement`` and ``appearance_noise`` are stored only when not at their defaults,
    so folders generated before the options existed still match their parameters.
    """
    if not isinstance(num_train, int) or not isinstance(num_val, int) or num_train < 0 or num_val < 0:
        raise ValueError(f"num_train and num_val must be non-negative integers, got {num_train!r}, {num_val!r}")
    if num_train + num_val == 0:
        raise ValueError("num_train + num_val must be at least 1")
    if not isinstance(image_size, int) or image_size < _MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be an integer >= {_MIN_IMAGE_SIZE} pixels, got {image_size!r}")
    val_cue = spurious_cue if spurious_cue_val is None else spurious_cue_val
    for name, p in (("spurious_cue", spurious_cue), ("spurious_cue_val", val_cue)):
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
    if not 0.0 <= float(appearance_noise) <= 1.0:
        raise ValueError(f"appearance_noise must be a probability in [0, 1], got {appearance_noise!r}")
    if object_colours not in OBJECT_COLOURS:
        raise ValueError(f"object_colours must be one of {list(OBJECT_COLOURS)}, got {object_colours!r}")
    if cue_placement not in CUE_PLACEMENTS:
        raise ValueError(f"cue_placement must be one of {list(CUE_PLACEMENTS)}, got {cue_placement!r}")
    params = {
        "generator": "detlens.data.synthetic",
        "version": GENERATOR_VERSION,
        "num_train": num_train,
        "num_val": num_val,
        "image_size": image_size,
        "seed": int(seed),
        "spurious_cue": float(spurious_cue),
        "spurious_cue_val": float(val_cue),
        "classes": list(CLASS_NAMES),
    }
    if object_colours != "class":
        params["object_colours"] = object_colours
    if cue_placement != "anywhere":
        params["cue_placement"] = cue_placement
    if float(appearance_noise) > 0:
        params["appearance_noise"] = float(appearance_noise)
    return params


def generate_synthetic_scenes(
    root: str | Path,
    num_train: int,
    num_val: int,
    image_size: int = 160,
    seed: int = 0,
    spurious_cue: float = 0.0,
    spurious_cue_val: float | None = None,
    object_colours: str = "class",
    cue_placement: str = "anywhere",
    appearance_noise: float = 0.0,
    *,
    overwrite: bool = False,
    progress: bool = True,
    lock_timeout_s: float = 600.0,
) -> Path:
    """Writes a synthetic COCO-format dataset to ``root`` unless it already holds this one.

    Args:
        root: dataset folder; created if missing. An existing non-empty folder must hold a
            dataset from this generator.
        num_train: training images. num_val: validation images.
        image_size: side of the square images, in pixels (>= 64).
        seed: seed of every random draw (images, objects, cues).
        spurious_cue: probability that an object's class is also shown by its cue patch
            (training split).
        spurious_cue_val: the same for the validation split; ``None`` -> ``spurious_cue``.
            Set 0 to test whether a model trained with cues relies on them.
        object_colours: ``"class"``: each class has its own hue (jittered), so colour
            alone gives the class away; ``"random"``: every object gets a random hue, so
            only its shape (or a spurious cue) tells the class.
        cue_placement: ``"anywhere"``: each cue patch lies at a random free spot of the
            image, so in a scene with several objects it says which classes are present but
            not where; ``"beside"``: it touches its own object's box (a few pixels off it),
            inside the receptive field of that object's features, so a detector can use
            it as a shortcut for the object's class; ``"ring"``: a ring in the class's cue
            colour around the object's box, a couple of pixels off it (its ``cue_bbox`` is
            the ring's outer box), like ink circles around skin lesions in dermatology
            photographs.
        appearance_noise: probability that a *training* object is drawn with the shape
            and hue of another class while keeping its own label and cue (validation
            objects always look like their class). With ``spurious_cue`` near 1 the cue
            then tells the label more reliably than the object does — the setting in which
            a detector has a reason to learn the shortcut (as in Colored MNIST, where
            colour predicts the label better than the digit). Annotations of such objects
            carry ``appearance_category_id``.
        overwrite: replace a dataset generated with different parameters. Without it, a
            mismatch is an error: a dataset is never silently reused or destroyed.
        progress: show a rich progress bar.
        lock_timeout_s: how long to wait for another process generating the same folder.

    Returns:
        ``root`` as a ``Path``.

    Raises:
        DatasetError: ``root`` holds something else, or another process held the lock too long.
        ValueError: invalid parameters.
    """
    params = synthetic_params(
        num_train, num_val, image_size, seed, spurious_cue, spurious_cue_val, object_colours, cue_placement,
        appearance_noise,
    )
    root = Path(root)
    if manifest_matches(root, params):
        return root
    _check_replaceable(root, params, overwrite)
    root.parent.mkdir(parents=True, exist_ok=True)
    with _folder_lock(root, params, lock_timeout_s) as must_write:
        if must_write:
            _check_replaceable(root, params, overwrite)
            staging = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                _write_dataset(staging, params, progress=progress)
                _move_into_place(staging, root)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    return root


def manifest_matches(root: str | Path, params: dict[str, Any]) -> bool:
    """Whether ``root`` holds a complete dataset generated with exactly ``params``."""
    stored = _read_manifest(Path(root))
    return stored is not None and stored.get("params") == params


def wait_for_synthetic_scenes(root: str | Path, params: dict[str, Any], timeout_s: float = 600.0) -> Path:
    """Blocks until another process has written the dataset ``params`` describes to ``root``.

    For DDP ranks other than local rank 0, which must not write. Raises :class:`DatasetError`
    after ``timeout_s`` seconds, naming the folder and what it holds instead.
    """
    root = Path(root)
    deadline = time.monotonic() + timeout_s
    while not manifest_matches(root, params):
        if time.monotonic() > deadline:
            stored = _read_manifest(root)
            found = "no dataset" if stored is None else f"a dataset with {_param_diff(stored.get('params', {}), params)}"
            raise DatasetError(
                f"{root}: waited {timeout_s:g} s for local rank 0 to generate the synthetic scenes, "
                f"found {found}"
            )
        time.sleep(0.2)
    return root


def _read_manifest(root: Path) -> dict[str, Any] | None:
    try:
        stored = json.loads((root / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(stored, dict):
        return None
    # The manifest is written last, so its presence means the folder is complete; the
    # annotation files are checked too in case someone deleted them by hand.
    if not all((root / ann).is_file() for ann in (TRAIN_ANN, VAL_ANN)):
        return None
    return stored


def _param_diff(stored: dict[str, Any], wanted: dict[str, Any]) -> str:
    keys = sorted(set(stored) | set(wanted))
    diffs = [f"{k}={stored.get(k)!r} (wanted {wanted.get(k)!r})" for k in keys if stored.get(k) != wanted.get(k)]
    return ", ".join(diffs) if diffs else "identical parameters"


def _check_replaceable(root: Path, params: dict[str, Any], overwrite: bool) -> None:
    """Raises unless ``root`` is missing, empty, or a detlens dataset we may replace."""
    if not root.exists():
        return
    if not root.is_dir():
        raise DatasetError(f"{root}: exists and is not a folder")
    if not any(root.iterdir()):
        return
    manifest = root / MANIFEST_NAME
    if not manifest.is_file():
        raise DatasetError(
            f"{root}: folder is not empty and holds no {MANIFEST_NAME}; refusing to write synthetic "
            "scenes into it (choose an empty or new folder)"
        )
    stored = _read_manifest(root)
    if stored is not None and stored.get("params") == params:
        return
    if not overwrite:
        what = "an incomplete dataset" if stored is None else f"a dataset generated with {_param_diff(stored.get('params', {}), params)}"
        raise DatasetError(
            f"{root}: holds {what}; use another root, delete the folder, or pass overwrite=True"
        )


@contextmanager
def _folder_lock(root: Path, params: dict[str, Any], timeout_s: float) -> Iterator[bool]:
    """Exclusive lock beside ``root``. Yields ``True`` if this process must write the dataset,
    ``False`` if another process finished it while we waited."""
    lock = root.parent / f".{root.name}.lock"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            # O_EXCL creation is atomic on local file systems and on NFSv3+.
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            if manifest_matches(root, params):
                yield False
                return
            _remove_if_stale(lock)
            if time.monotonic() > deadline:
                raise DatasetError(
                    f"{root}: another process has held {lock} for over {timeout_s:g} s; "
                    "if no generation is running, delete the lock file"
                ) from None
            time.sleep(0.2)
    try:
        os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode())
        os.close(fd)
        yield not manifest_matches(root, params)
    finally:
        lock.unlink(missing_ok=True)


def _remove_if_stale(lock: Path) -> None:
    """Deletes a lock left by a dead process on this host (a crashed generation)."""
    try:
        owner = json.loads(lock.read_text())
    except (OSError, json.JSONDecodeError):
        return  # being written right now, or already gone
    if owner.get("host") != socket.gethostname():
        return
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        lock.unlink(missing_ok=True)
    except (PermissionError, KeyError, ValueError, TypeError):
        return


def _move_into_place(staging: Path, root: Path) -> None:
    if root.exists() and any(root.iterdir()):
        trash = root.parent / f".{root.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(root, trash)
        os.rename(staging, root)
        shutil.rmtree(trash, ignore_errors=True)
        return
    if root.exists():
        root.rmdir()
    os.rename(staging, root)


def _write_dataset(folder: Path, params: dict[str, Any], *, progress: bool) -> None:
    (folder / "annotations").mkdir(parents=True)
    counts = {"train": params["num_train"], "val": params["num_val"]}
    cue_p = {"train": params["spurious_cue"], "val": params["spurious_cue_val"]}
    jobs = [(split, index) for split in _SPLITS for index in range(counts[split])]
    coco: dict[str, dict[str, Any]] = {split: _empty_coco(params, split) for split in _SPLITS}
    stats = {split: {"cues_drawn": 0, "cues_without_room": 0, "other_appearance": 0} for split in _SPLITS}
    for split in _SPLITS:
        (folder / split).mkdir()
    next_ann_id = 1
    for image_id, (split, index) in enumerate(
        track(jobs, description="Generating synthetic scenes", disable=not progress, transient=True), start=1
    ):
        split_key = _SPLITS.index(split)
        scene_rng = np.random.default_rng(np.random.SeedSequence(params["seed"], spawn_key=(split_key, index, 0)))
        cue_rng = np.random.default_rng(np.random.SeedSequence(params["seed"], spawn_key=(split_key, index, 1)))
        look_rng = np.random.default_rng(np.random.SeedSequence(params["seed"], spawn_key=(split_key, index, 2)))
        image, objects = draw_scene(
            scene_rng, cue_rng, params["image_size"], cue_p[split],
            class_colours=params.get("object_colours", "class") == "class",
            cue_placement=params.get("cue_placement", "anywhere"),
            appearance_rng=look_rng,
            appearance_noise=params.get("appearance_noise", 0.0) if split == "train" else 0.0,
        )
        file_name = f"{image_id:06d}.png"
        if not cv2.imwrite(str(folder / split / file_name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
            raise DatasetError(f"{folder / split / file_name}: OpenCV could not write the image")
        size = params["image_size"]
        coco[split]["images"].append({"id": image_id, "file_name": file_name, "width": size, "height": size})
        for obj in objects:
            coco[split]["annotations"].append(_annotation(next_ann_id, image_id, obj))
            next_ann_id += 1
            stats[split]["cues_drawn"] += obj.cue_box is not None
            stats[split]["cues_without_room"] += obj.cue_wanted and obj.cue_box is None
            stats[split]["other_appearance"] += obj.look_index is not None
    for split, ann in (("train", TRAIN_ANN), ("val", VAL_ANN)):
        coco[split]["info"]["cue_stats"] = stats[split]
        (folder / ann).write_text(json.dumps(coco[split], separators=(",", ":")), encoding="utf-8")
    # Written last: its presence marks the folder complete.
    (folder / MANIFEST_NAME).write_text(json.dumps({"params": params}, indent=2), encoding="utf-8")


def _empty_coco(params: dict[str, Any], split: str) -> dict[str, Any]:
    return {
        "info": {"description": f"detlens synthetic scenes ({split})", "detlens_synthetic": params, "split": split},
        "images": [],
        "annotations": [],
        "categories": [
            {"id": i, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASS_NAMES, start=1)
        ],
    }


def _annotation(ann_id: int, image_id: int, obj: SceneObject) -> dict[str, Any]:
    x1, y1, x2, y2 = obj.box
    extra = {} if obj.look_index is None else {"appearance_category_id": obj.look_index + 1}
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": obj.class_index + 1,
        "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
        "area": round(obj.area, 2),
        "iscrowd": 0,
        "segmentation": [[round(float(v), 2) for v in obj.polygon.reshape(-1)]],
        "cue_bbox": list(obj.cue_box) if obj.cue_box is not None else None,
        **extra,
    }
