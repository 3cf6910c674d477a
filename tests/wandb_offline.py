"""Read an offline W&B run (``wandb/offline-run-*``) back from disk, without the network.

The tests (and ``scripts/readme_figure.py``) read what a run logged through it, rather than
mocking wandb.

The ``run-<id>.wandb`` file is W&B's transaction log: a 7-byte file header
(``":W&B"``, magic ``0xBEE1`` little-endian uint16, version byte ``0``) followed by the
LevelDB log framing — 32 KiB blocks of chunks, each with a 7-byte header (CRC-32 (IEEE,
over the type byte and the payload), payload length (uint16 LE), type: 1 FULL, 2 FIRST,
3 MIDDLE, 4 LAST); a block's last < 7 bytes are zero padding. Each reassembled record
is a protobuf ``wandb.proto.wandb_internal_pb2.Record``. Framing per
``wandb/sdk/internal/datastore.py`` (wandb < 0.19) and ``core/pkg/leveldb/record.go``
(the Go ``wandb-core`` writer of current releases); checked against files written by
the installed wandb.

W&B offers no public offline reader (``wandb.Api`` needs the server; the old Python
``DataStore`` was removed and asserted it ran inside the internal process), hence this
module.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["OfflineRun", "OfflineRunError", "find_offline_runs", "read_offline_run", "read_records"]

_FILE_HEADER = struct.Struct("<4sHB")
_FILE_IDENT = b":W&B"
_FILE_MAGIC = 0xBEE1
_FILE_VERSION = 0
_CHUNK_HEADER = struct.Struct("<IHB")
_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


class OfflineRunError(ValueError):
    """The folder or file is not a readable offline W&B run."""


@dataclass
class OfflineRun:
    """What an offline run logged.

    Attributes:
        run_dir: the ``offline-run-<date>-<id>`` folder.
        run_id, project: from the run record (``None`` if the file ended before it).
        history: one dict per ``wandb.log`` row, values JSON-decoded, nested keys as nested
            dicts (an image list is ``{"_type": "images/separated", "filenames": [...],
            "captions": [...], ...}``), with ``_step``.
        config: the final config (W&B's internal ``_wandb`` entry left out).
        summary: the final summary (``_wandb`` left out).
        files: every file under ``files/media/`` (images, box JSON, tables), sorted.
        exit_code: the run's exit code once it has finished (its ``exit`` record), else
            ``None``: the run is still being written (W&B's writer process may still be
            flushing for a moment after ``wandb.finish()`` returns) or was killed.
        truncated: the log ended inside a record (a run killed mid-write, or read while
            being written); everything before that record was read.
        skipped_chunks: chunks dropped for a bad checksum or broken framing.
    """

    run_dir: Path
    run_id: str | None = None
    project: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    exit_code: int | None = None
    truncated: bool = False
    skipped_chunks: int = 0

    def history_of(self, key: str) -> list[tuple[int, Any]]:
        """``[(_step, value), ...]`` for every history row that has ``key``."""
        return [(row.get("_step", -1), row[key]) for row in self.history if key in row]


def find_offline_runs(root: str | Path) -> list[Path]:
    """Offline run folders under ``root`` (any depth), oldest first by folder name."""
    runs = {p.parent for p in Path(root).rglob("run-*.wandb") if p.parent.name.startswith("offline-run-")}
    return sorted(runs, key=lambda p: p.name)


def read_offline_run(run_dir: str | Path) -> OfflineRun:
    """Parses ``run_dir/run-*.wandb`` and lists ``run_dir/files/media``.

    Raises:
        OfflineRunError: no ``run-*.wandb`` in ``run_dir``, or its header is not W&B's.
    """
    from wandb.proto import wandb_internal_pb2

    run_dir = Path(run_dir)
    candidates = sorted(run_dir.glob("run-*.wandb"))
    if len(candidates) != 1:
        raise OfflineRunError(f"expected one run-*.wandb file in {run_dir}, found {[p.name for p in candidates]}")
    run = OfflineRun(run_dir=run_dir)
    payloads, run.truncated, run.skipped_chunks = read_records(candidates[0])
    config: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    for payload in payloads:
        record = wandb_internal_pb2.Record()
        try:
            record.ParseFromString(payload)
        except Exception:  # noqa: BLE001 - protobuf's DecodeError; a damaged record is skipped
            run.skipped_chunks += 1
            continue
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.run_id = record.run.run_id or None
            run.project = record.run.project or None
            _apply_updates(config, record.run.config.update, record.run.config.remove)
        elif kind == "config":
            _apply_updates(config, record.config.update, record.config.remove)
        elif kind == "summary":
            _apply_updates(summary, record.summary.update, record.summary.remove)
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                _assign(row, _item_path(item), _item_value(item))
            if "_step" not in row and record.history.HasField("step"):
                row["_step"] = record.history.step.num
            run.history.append(row)
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    config.pop("_wandb", None)
    summary.pop("_wandb", None)
    run.config, run.summary = config, summary
    media = run_dir / "files" / "media"
    run.files = sorted(p for p in media.rglob("*") if p.is_file()) if media.is_dir() else []
    return run


def read_records(path: str | Path) -> tuple[list[bytes], bool, int]:
    """The record payloads of a W&B LevelDB-framed log.

    Returns:
        ``(payloads, truncated, skipped_chunks)``: the reassembled records in file order;
        whether the file ended inside a chunk or a multi-chunk record (that record is
        dropped); how many chunks were skipped for a bad checksum or out-of-order type
        (after which reading resumes, as LevelDB does, at the next FULL/FIRST chunk).

    Raises:
        OfflineRunError: the file header is missing or not W&B's.
    """
    path = Path(path)
    data = path.read_bytes()
    if len(data) < _FILE_HEADER.size:
        raise OfflineRunError(f"{path}: {len(data)} bytes, shorter than the 7-byte W&B header")
    ident, magic, version = _FILE_HEADER.unpack_from(data, 0)
    if ident != _FILE_IDENT or magic != _FILE_MAGIC:
        raise OfflineRunError(f"{path}: not a W&B log (header {data[:7]!r})")
    if version != _FILE_VERSION:
        raise OfflineRunError(f"{path}: W&B log format version {version}; this reader knows version {_FILE_VERSION}")

    payloads: list[bytes] = []
    pending: list[bytes] | None = None  # chunks of a FIRST..LAST record being assembled
    skipped = 0
    pos = _FILE_HEADER.size
    end = len(data)
    while pos < end:
        space = _BLOCK - pos % _BLOCK
        if space < _CHUNK_HEADER.size:  # block trailer: zero padding
            pos += space
            continue
        if pos + _CHUNK_HEADER.size > end:
            return payloads, not _all_zero(data, pos, end) or pending is not None, skipped
        checksum, length, kind = _CHUNK_HEADER.unpack_from(data, pos)
        if checksum == 0 and length == 0 and kind == 0:
            # A zeroed rest of block (preallocated/mmapped file, or a writer that stopped): skip it.
            if not _all_zero(data, pos, min(pos + space, end)):
                skipped += 1
            pos += space
            continue
        start, stop = pos + _CHUNK_HEADER.size, pos + _CHUNK_HEADER.size + length
        if stop > end:
            return payloads, True, skipped
        if stop > pos + space or zlib.crc32(data[start - 1 : stop]) & 0xFFFFFFFF != checksum:
            # data[start - 1] is the type byte: the CRC covers type + payload.
            skipped += 1
            pending = None
            pos += space  # LevelDB recovery: drop the rest of this block
            continue
        chunk = data[start:stop]
        pos = stop
        if kind == _FULL:
            skipped += pending is not None
            pending = None
            payloads.append(chunk)
        elif kind == _FIRST:
            skipped += pending is not None
            pending = [chunk]
        elif kind in (_MIDDLE, _LAST) and pending is not None:
            pending.append(chunk)
            if kind == _LAST:
                payloads.append(b"".join(pending))
                pending = None
        else:
            skipped += 1
    return payloads, pending is not None, skipped


def _all_zero(data: bytes, start: int, stop: int) -> bool:
    return data[start:stop].count(0) == stop - start


def _item_path(item: Any) -> list[str]:
    return [item.key] if item.key else list(item.nested_key)


def _item_value(item: Any) -> Any:
    """A history/summary/config item's value: ``value_json``, or the typed oneof of newer protos."""
    if item.value_json:
        return json.loads(item.value_json)
    oneofs = item.DESCRIPTOR.oneofs_by_name
    if "value" in oneofs:
        kind = item.WhichOneof("value")
        if kind == "none" or kind is None:
            return None
        if kind == "json":
            return json.loads(item.json)
        return getattr(item, kind)
    return None


def _assign(target: dict[str, Any], path: list[str], value: Any) -> None:
    node = target
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    if path:
        node[path[-1]] = value


def _apply_updates(target: dict[str, Any], updates: Any, removes: Any) -> None:
    for item in updates:
        _assign(target, _item_path(item), _item_value(item))
    for item in removes:
        path = _item_path(item)
        node: Any = target
        for part in path[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and path:
            node.pop(path[-1], None)
