"""``Media`` -> the dict of ``wandb.Image`` / ``wandb.Table`` / floats handed to ``wandb.log``.

Touches no run: it only builds wandb media objects, each ``wandb.Image`` from a PNG or JPEG file
detlens writes into its media folder (:func:`media_dir`), so it can run on detlens' media
thread or in its media process (:mod:`detlens.sinks.media_process`). ``wandb.log`` copies
the files into the run; the caller removes them after logging (:func:`build_payload`
returns their paths). Imports neither Lightning nor the rest of detlens' sinks, which
keeps the media process's start-up short.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import cv2
import numpy as np

from detlens.render.boxes import wandb_boxes
from detlens.render.media import FILE_TYPES, Media, MediaImage, MediaTable

__all__ = [
    "JPEG_QUALITY", "PNG_COMPRESSION", "build_payload", "given", "media_dir", "remove_files", "wandb_payload",
    "wandb_table", "write_image",
]

PNG_COMPRESSION = 1
"""zlib level (0-9) of the PNGs detlens writes for W&B. ``wandb.Image`` of an array encodes
with PIL's default, 6; level 1 with OpenCV encoded the demo's 160 px overlays about 4x
faster (2.9 ms vs 13 ms each) into larger files, and PNG encoding was 2.9 of the media
worker's 6.7 s per demo fit. PNG is lossless: the pixels are the same.

Every row is filtered with PNG's "up" filter instead of libpng's default, which tries all
five filters on each row and keeps the best: on the demo's media 1.7x faster for the
160 px attention overlays (1.8 vs 3.0 ms), 2.5x for the box-embedding scatter plot
(8 vs 22 ms) and the entropy heatmap, for files 1-4% larger. Where OpenCV has no filter
option (before 4.11) its default stays."""

_PNG_FILTER = [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_UP] if hasattr(cv2, "IMWRITE_PNG_FILTER_UP") else []

JPEG_QUALITY = 90
"""JPEG quality (0-100) of the overlays on photographs (``MediaImage.file_type == "jpg"``:
Grad-CAM and attention overlays, probe images under their W&B boxes, table thumbnails),
with full-resolution colour (4:4:4, no chroma subsampling: a heatmap's colours stay sharp
on a 160 px image). On the demo's media, against PNG level 1: the 484 px attention
mosaics 1 ms instead of 13 ms to encode and 85 KiB instead of 380 KiB, the 160 px
overlays 0.1 ms instead of 1.9 ms and 12 KiB instead of 55 KiB, at a mean absolute pixel
error of 3-5 levels of 255 (no difference to see side by side). The whole demo run's media
went from 12 MB to 3.4 MB: less to ``wandb sync`` and to keep. Plots stay PNG."""

_JPEG_COLOUR = (
    [cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]
    if hasattr(cv2, "IMWRITE_JPEG_SAMPLING_FACTOR_444") else []
)

_WRITE_PARAMS = {
    "png": [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION, *_PNG_FILTER],
    "jpg": [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY, *_JPEG_COLOUR],
}
"""OpenCV's ``imwrite`` parameters for each of ``media.FILE_TYPES``."""
assert set(_WRITE_PARAMS) == set(FILE_TYPES)

_MEDIA_DIR_ENV = "DETLENS_MEDIA_TMP"


def media_dir() -> str:
    """The folder detlens' W&B image files wait in until they are logged.

    One per training process, removed when it exits; its media process inherits it
    (``DETLENS_MEDIA_TMP`` in the environment it is started with).
    """
    path = os.environ.get(_MEDIA_DIR_ENV)
    if path and os.path.isdir(path):
        return path
    path = tempfile.mkdtemp(prefix="detlens-media-")
    os.environ[_MEDIA_DIR_ENV] = path
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def write_image(pixels: np.ndarray, file_type: str = "png") -> str:
    """``uint8[H, W, 3]`` RGB -> a new ``file_type`` file (``"png"``: :data:`PNG_COMPRESSION`;
    ``"jpg"``: :data:`JPEG_QUALITY`) in :func:`media_dir`; its path."""
    params = _WRITE_PARAMS.get(file_type)
    if params is None:
        raise ValueError(f"file_type must be one of {FILE_TYPES}, got {file_type!r}")
    path = os.path.join(media_dir(), f"{uuid.uuid4().hex}.{file_type}")
    bgr = np.ascontiguousarray(np.asarray(pixels, dtype=np.uint8)[..., ::-1])
    if not cv2.imwrite(path, bgr, params):
        raise OSError(f"could not write {path}")
    return path


def wandb_image(image: MediaImage, files: list[str] | None = None, held: bool = True) -> Any:
    """One ``wandb.Image`` with ground-truth / prediction box groups, ready to log.

    Its file (``image.file_type``) is written by :func:`write_image` (its path is appended
    to ``files``). The image is a :class:`_HeldImage`: ``wandb.Image`` of a path decodes the file, keeps only its size
    and drops the pixels; logging a list of images then decodes every file again to check
    their sizes match (``Image.seq_to_json``) on the thread that calls ``wandb.log``, the
    training thread (0.8 s per demo fit in a profile). ``_HeldImage`` answers that check,
    and wandb's own read of the file's size, from the pixels detlens already holds.

    ``held=False`` makes a plain ``wandb.Image`` (wandb reads the file back once, for its size):
    for table cells, whose column type W&B infers from the exact class (a subclass would be
    typed as a Python object, and named by its class in the run's copy of the table).
    """
    path = write_image(image.pixels, image.file_type)
    if files is not None:
        files.append(path)
    boxes = wandb_boxes(
        image.size,
        gt_boxes=image.gt_boxes,
        gt_labels=image.gt_labels,
        pred_boxes=image.pred_boxes,
        pred_labels=image.pred_labels,
        pred_scores=image.pred_scores,
        class_names=image.class_names,
    )
    if not held:
        import wandb

        return wandb.Image(path, caption=image.caption or None, boxes=boxes or None)
    return _held_image_class()(path, image.pixels, caption=image.caption or None, boxes=boxes or None)


_HELD_IMAGE: type | None = None


def _held_image_class() -> type:
    """``_HeldImage``, a ``wandb.Image`` whose ``image`` is the PIL view of pixels it was
    given instead of a decode of its file. Made on first use: wandb is imported lazily, and
    the class is reachable as ``detlens.sinks.wandb_payload._HeldImage`` (module
    ``__getattr__``), which is what pickle looks up when the media process sends one back."""
    global _HELD_IMAGE
    if _HELD_IMAGE is None:
        import wandb
        from PIL import Image as PILImage

        class _HeldImage(wandb.Image):  # type: ignore[misc, name-defined]
            def __init__(self, path: str, pixels: np.ndarray, **kwargs: Any) -> None:
                self._held = PILImage.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8))
                super().__init__(path, **kwargs)

            def _initialize_from_path(self, path: str) -> None:
                # wandb's own (unchanged for years) opens the file again only to learn its
                # size and then drops the pixels; the same steps with the pixels at hand.
                # is_tmp: the file is detlens' own staging copy, so wandb.log moves it into
                # the run instead of copying it (as for a wandb.Image of an array).
                # Should a wandb release change these internals, its own method runs.
                try:
                    self._set_file(path, is_tmp=True)
                    self._image = self._held
                    self.format = os.path.splitext(path)[1][1:]
                except Exception:  # noqa: BLE001  any change of those internals
                    super()._initialize_from_path(path)

            @property
            def image(self) -> Any:  # set before wandb's __init__ reads it
                return self._held

        _HeldImage.__module__ = __name__
        _HeldImage.__qualname__ = "_HeldImage"
        _HELD_IMAGE = _HeldImage
    return _HELD_IMAGE


def __getattr__(name: str) -> Any:
    if name == "_HeldImage":
        return _held_image_class()
    if name == "_JsonReadyTable":
        return _json_ready_table_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def wandb_payload(
    images: Mapping[str, list[MediaImage]] | None,
    tables: Mapping[str, MediaTable] | None,
    scalars: Mapping[str, float] | None,
    files: list[str] | None = None,
) -> dict[str, Any]:
    """``{key: [wandb.Image, ...] | wandb.Table | float}``: one ``wandb.log`` call's worth.

    The paths of the image files written for it are appended to ``files`` (remove them once logged).
    """
    payload: dict[str, Any] = {}
    for key, items in (images or {}).items():
        payload[key] = [wandb_image(item, files) for item in items]
    for key, table in (tables or {}).items():
        rows = [[wandb_image(c, files, held=False) if isinstance(c, MediaImage) else c for c in row] for row in table.rows]
        payload[key] = wandb_table(table.columns, rows)
    payload.update({k: float(v) for k, v in (scalars or {}).items()})
    return payload


_LIST_ELEMENT_TYPES = (str, int, float, bool)
_SCALAR_TYPES = (*_LIST_ELEMENT_TYPES, type(None))


def wandb_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Any:
    """``wandb.Table(columns=columns, data=rows)``: the same rows, the same column types and
    the same JSON once logged, for a fraction of wandb's per-value Python work.

    wandb walks every value of a table twice, in Python, element by element inside lists:
    typing each row as it is added (``Table.add_data`` -> ``TypedDictType.assign``; 7 ms a
    row of the box embeddings' table, whose embedding holds 256 values: 1.3-1.8 s for 2,000
    rows), and again turning each cell into JSON when the table is logged, on the thread
    that calls ``wandb.log``: the training thread (``Table.to_json`` -> ``_json_helper`` for
    the run's table artifact, ``Table.bind_to_run`` -> ``_numpy_arrays_to_lists`` for the
    run's own copy; 2.3-2.9 s for those 2,000 rows; ``benchmarks/wandb_table.py``). So:

    * A row whose cells have the Python types of the row before it (scalars of one class,
      flat lists of one scalar class and the same length, images and numpy values of the
      same W&B type) cannot change what that row's typing produced (assigning a value of a type
      already assigned returns the same type): it is appended to ``table.data`` without
      being typed again. Other rows go through ``add_data`` (which raises wandb's errors).
    * The table is a ``_JsonReadyTable``: the cells that already are JSON (strings, ints,
      booleans, None, finite or infinite floats and flat lists of those, found here on
      the media worker) stand aside while wandb converts the rest (images, numpy values,
      NaN) and are put back into its output unchanged, which is what wandb's conversion
      returns for them; for the run's copy its list cells go past the walk wrapped
      (:class:`_JsonList`). The same JSON, 2.4-2.8x sooner (0.8-1.2 s for those rows).

    Hand-written because wandb has no bulk or pre-typed path for list cells: its shortcut,
    1-D numpy cells, is serialised to a separate npz file beyond 150 values, which hides
    the embedding from the W&B projector this column is for.
    """
    import wandb

    try:
        from wandb.sdk.data_types._dtypes import TypeRegistry
    except ImportError:  # a wandb release that moved its type registry: wandb's own table, row by row
        return wandb.Table(columns=list(columns), data=[list(row) for row in rows])

    typed_by_wandb = (wandb.Image, np.ndarray, np.generic)
    table = _json_ready_table_class()(columns=list(columns))
    previous: tuple | None = None
    json_cells: list[tuple[int, ...]] = []
    for row in rows:
        signature, ready = _describe_row(row, TypeRegistry, typed_by_wandb)
        if signature is not None and signature == previous:
            table.data.append(list(row))
        else:
            table.add_data(*row)
        previous = signature
        json_cells.append(ready)
    table._json_cells = json_cells
    return table


def _describe_row(
    row: Sequence[Any], registry: Any, typed_by_wandb: tuple[type, ...]
) -> tuple[tuple | None, tuple[int, ...]]:
    """What a row's W&B column types depend on (``None`` when a cell is not covered; cells of
    ``typed_by_wandb`` enter by the type wandb gives them), and the indices of its cells that
    are JSON as they are (wandb's conversion returns them unchanged: it only turns NaN into
    null and converts non-Python values)."""
    signature: list | None = []
    ready = []
    for i, cell in enumerate(row):
        kind = type(cell)
        if kind in _SCALAR_TYPES:
            nan = kind is float and cell != cell  # wandb types NaN as None, and writes it as null
            if signature is not None:
                signature.append("NaN" if nan else kind)
            if not nan:
                ready.append(i)
        elif kind is list or kind is tuple:
            kinds = set(map(type, cell))  # C speed, unlike wandb's per-element typing
            if len(kinds) > 1 or (kinds and next(iter(kinds)) not in _LIST_ELEMENT_TYPES) or (
                float in kinds and any(map(math.isnan, cell))
            ):
                signature = None
                continue
            if signature is not None:
                signature.append((kind, len(cell), *kinds))
            ready.append(i)
        elif signature is not None and isinstance(cell, typed_by_wandb):
            try:  # its W&B type, as wandb infers it
                signature.append(json.dumps(registry.type_of(cell).to_json(), sort_keys=True, default=str))
            except Exception:  # noqa: BLE001 - not describable: typed by add_data
                signature = None
        else:  # anything else (e.g. wandb's table keys, which add_data casts): typed by add_data
            signature = None
    return (None if signature is None else tuple(signature)), tuple(ready)


class _JsonList:
    """A list cell that is JSON as it is, hidden from wandb's numpy-to-list walk (not a
    ``Sequence``); wandb's JSON encoder writes it through its ``json_encode`` hook."""

    __slots__ = ("values",)

    def __init__(self, values: list | tuple) -> None:
        self.values = values

    def json_encode(self) -> list | tuple:
        return self.values


def _stand_in_rows(
    rows: list[list[Any]], ready: list[tuple[int, ...]], stand_in: Callable[[Any], Any]
) -> list[list[Any]]:
    """``rows`` with ``stand_in(cell)`` in place of each JSON-ready cell (rows without such
    cells are the same list objects; the rows themselves are not changed)."""
    out = []
    for row, cells in zip(rows, ready):
        if cells:
            row = list(row)
            for i in cells:
                row[i] = stand_in(row[i])
        out.append(row)
    return out


def _as_json_list(cell: Any) -> Any:
    return _JsonList(cell) if type(cell) in (list, tuple) else cell


_JSON_READY_TABLE: type | None = None


def _json_ready_table_class() -> type:
    """``_JsonReadyTable``: a ``wandb.Table`` whose ``to_json`` for the run's table artifact
    leaves the cells listed in ``_json_cells`` out of wandb's per-value conversion and puts
    them back into its output as they are, and whose ``bind_to_run`` (the run's own copy)
    hands their lists to wandb's writer past its numpy walk. Made on first use, like ``_HeldImage`` (and
    reachable by pickle as ``detlens.sinks.wandb_payload._JsonReadyTable``)."""
    global _JSON_READY_TABLE
    if _JSON_READY_TABLE is None:
        import wandb

        class _JsonReadyTable(wandb.Table):  # type: ignore[misc, name-defined]
            _json_cells: list[tuple[int, ...]] | None = None

            def _ready_cells(self) -> list[tuple[int, ...]] | None:
                """``_json_cells`` while they describe ``data`` row for row (incremental
                tables log rows past the last logged one: left to wandb)."""
                ready = self._json_cells
                if ready is None or len(ready) != len(self.data) or self.log_mode != "IMMUTABLE":
                    return None
                return ready

            @contextmanager
            def _data_with(self, stand_in: Callable[[Any], Any]) -> Iterator[None]:
                rows = self.data
                self.data = _stand_in_rows(rows, self._json_cells, stand_in)
                try:
                    yield
                finally:
                    self.data = rows

            def to_json(self, run_or_artifact: Any) -> dict[str, Any]:
                rows, ready = self.data, self._ready_cells()
                if not isinstance(run_or_artifact, wandb.Artifact) or ready is None or not any(ready):
                    return super().to_json(run_or_artifact)
                with self._data_with(lambda cell: None):
                    json_dict = super().to_json(run_or_artifact)
                out = json_dict.get("data")
                if not isinstance(out, list) or len(out) > len(rows) or any(
                    not isinstance(r, list) or len(r) != len(self.columns) for r in out
                ):  # a wandb release that lays its JSON out otherwise: its own conversion of every cell
                    return super().to_json(run_or_artifact)
                for row, out_row, cells in zip(rows, out, ready):
                    for i in cells:
                        out_row[i] = row[i]
                return json_dict

            def bind_to_run(self, *args: Any, **kwargs: Any) -> None:
                # wandb writes the run's own copy of the table here, after walking every
                # value (``_numpy_arrays_to_lists``) to turn numpy arrays into lists; the
                # list cells that already are JSON go past that walk wrapped, and the JSON
                # writer (wandb's encoder fallback) writes them as the lists they are.
                if self._ready_cells() is None:
                    return super().bind_to_run(*args, **kwargs)
                with self._data_with(_as_json_list):
                    return super().bind_to_run(*args, **kwargs)

        _JsonReadyTable.__module__ = __name__
        _JsonReadyTable.__qualname__ = "_JsonReadyTable"
        _JSON_READY_TABLE = _JsonReadyTable
    return _JSON_READY_TABLE


def build_payload(build: Callable[[], Media]) -> tuple[Media, dict[str, Any], list[str]]:
    """``build()``, its W&B payload and the image files written for it: the whole job of the
    media thread or process. Remove the files once the payload is logged (or dropped)."""
    media = build()
    files: list[str] = []
    try:
        return media, wandb_payload(media.images, media.tables, media.scalars, files), files
    except BaseException:
        remove_files(files)
        raise


def remove_files(files: list[str]) -> None:
    """Removes the image files of a logged (or dropped) payload; missing ones are skipped."""
    for path in files:
        try:
            os.remove(path)
        except OSError:
            pass


def given(media: Media) -> Media:
    """``functools.partial(given, media)``: a picklable build of media made beforehand."""
    return media
