"""``log_media``: one call hands images, tables and scalars to every logger of a Trainer.

Rank 0 only (``log_results`` runs there); it runs no collectives. A logger that fails
costs one warning and never an exception into training.

W&B media are converted off the training thread (DESIGN.md rule 4): building a
``wandb.Image`` encodes a PNG and a ``wandb.Table`` infers its column types, ~6 ms per
image, seconds per logging event, time a GPU would otherwise sit idle. One worker thread
per process builds the payloads in order; the ``log`` calls themselves stay on the
training thread (``wandb.log`` is not thread-safe, wandb/wandb#1824): finished payloads
are logged at the next ``log_media`` or :func:`flush_media` call, which every detlens
callback makes after each training batch, and all of them at the end of a stage or on an
exception. Rows keep the step they were made at (``trainer/global_step``), so a later
``log`` call changes nothing on the dashboard. At most :data:`MAX_PENDING` events wait;
one more blocks until the oldest is logged, so memory stays bounded.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pytorch_lightning.loggers import Logger, TensorBoardLogger, WandbLogger
from pytorch_lightning.utilities import rank_zero_warn

from detlens.render.boxes import draw_boxes, wandb_boxes
from detlens.sinks.media import MediaImage, MediaTable

if TYPE_CHECKING:
    import pytorch_lightning as pl

__all__ = ["MAX_PENDING", "flush_media", "log_media"]

MAX_PENDING = 4
"""Logging events whose W&B payload may be waiting to be logged before ``log_media`` blocks."""

DRAIN_TIMEOUT_S = 120.0
"""How long the end of a stage waits for one payload before giving up on it with a warning."""


@dataclass
class _Pending:
    logger: WandbLogger
    payload: Future  # Future[dict[str, Any]]
    step: int


_pending: deque[_Pending] = deque()
_lock = threading.Lock()  # guards _pending and _executor (callbacks of two Trainers may share a thread)
_executor: ThreadPoolExecutor | None = None


def _worker() -> ThreadPoolExecutor:
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="detlens-media")
    return _executor


def log_media(
    trainer: pl.Trainer,
    *,
    images: Mapping[str, list[MediaImage]] | None = None,
    tables: Mapping[str, MediaTable] | None = None,
    scalars: Mapping[str, float] | None = None,
    step: int,
) -> None:
    """Logs media and scalars to every logger in ``trainer.loggers``.

    Args:
        trainer: the running Trainer (its ``loggers`` are used; none -> nothing happens).
        images: ``{key: [MediaImage, ...]}``; each key is one W&B media panel holding the list.
        tables: ``{key: MediaTable}``.
        scalars: ``{key: value}``.
        step: ``trainer.global_step`` (W&B records it as ``trainer/global_step``).

    Per logger: ``WandbLogger`` gets ``wandb.Image`` with box overlays, ``wandb.Table``
    and scalars in one ``log`` call (one history row), built on the media thread and
    logged from this one by a later call (see the module docstring); ``TensorBoardLogger``
    gets ``add_image`` (boxes drawn in), tables as Markdown text, and scalars; any other
    logger (``CSVLogger``, MLflow, ...) gets the scalars only. The arrays in ``images``
    and ``tables`` must not be changed after the call.
    """
    for logger in trainer.loggers:
        try:
            if isinstance(logger, WandbLogger):
                if images or tables or scalars:
                    with _lock:
                        future = _worker().submit(_wandb_payload, images, tables, scalars)
                        _pending.append(_Pending(logger, future, step))
            elif isinstance(logger, TensorBoardLogger):
                _log_tensorboard(logger, images, tables, scalars, step)
            elif scalars:
                _log_scalars(logger, scalars, step)
        except Exception as err:  # noqa: BLE001 - a logger failure must never stop training
            rank_zero_warn(f"[detlens] {type(logger).__name__} failed to log media at step {step}: {type(err).__name__}: {err}")
    flush_media(wait=False)
    while len(_pending) > MAX_PENDING:
        flush_media(wait=True, limit=1)


def flush_media(wait: bool = True, limit: int | None = None) -> int:
    """Logs the W&B payloads :func:`log_media` has finished building, oldest first.

    Call it from the thread that trains (``wandb.log`` is not thread-safe). With
    ``wait=False`` it stops at the first payload still being built (no waiting); with
    ``wait=True`` it waits for each one (at most :data:`DRAIN_TIMEOUT_S` apiece; one that
    takes longer is dropped with a warning). ``limit`` bounds how many are logged.

    Returns:
        how many payloads were logged or dropped.
    """
    done = 0
    while limit is None or done < limit:
        with _lock:
            if not _pending or not (wait or _pending[0].payload.done()):
                return done
            item = _pending.popleft()
        done += 1
        try:
            payload = item.payload.result(timeout=DRAIN_TIMEOUT_S if wait else 0)
            if payload:
                # Lightning's own log_image/log_table go through log_metrics too (prefix, global step).
                item.logger.log_metrics(payload, step=item.step)
        except FutureTimeout:
            item.payload.cancel()
            rank_zero_warn(f"[detlens] W&B media of step {item.step} took over {DRAIN_TIMEOUT_S:.0f} s to build; dropped")
        except Exception as err:  # noqa: BLE001 - a logger failure must never stop training
            rank_zero_warn(f"[detlens] WandbLogger failed to log media at step {item.step}: {type(err).__name__}: {err}")
    return done


def _log_scalars(logger: Logger, scalars: Mapping[str, float], step: int) -> None:
    logger.log_metrics({k: float(v) for k, v in scalars.items()}, step=step)


def _wandb_image(image: MediaImage) -> Any:
    import wandb

    boxes = wandb_boxes(
        image.size,
        gt_boxes=image.gt_boxes,
        gt_labels=image.gt_labels,
        pred_boxes=image.pred_boxes,
        pred_labels=image.pred_labels,
        pred_scores=image.pred_scores,
        class_names=image.class_names,
    )
    return wandb.Image(image.pixels, caption=image.caption or None, boxes=boxes or None)


def _wandb_payload(
    images: Mapping[str, list[MediaImage]] | None,
    tables: Mapping[str, MediaTable] | None,
    scalars: Mapping[str, float] | None,
) -> dict[str, Any]:
    """Runs on the media thread: touches no run, only builds wandb media objects."""
    import wandb

    payload: dict[str, Any] = {}
    for key, items in (images or {}).items():
        payload[key] = [_wandb_image(item) for item in items]
    for key, table in (tables or {}).items():
        rows = [[_wandb_image(c) if isinstance(c, MediaImage) else c for c in row] for row in table.rows]
        payload[key] = wandb.Table(columns=list(table.columns), data=rows)
    payload.update({k: float(v) for k, v in (scalars or {}).items()})
    return payload


def _log_tensorboard(
    logger: TensorBoardLogger,
    images: Mapping[str, list[MediaImage]] | None,
    tables: Mapping[str, MediaTable] | None,
    scalars: Mapping[str, float] | None,
    step: int,
) -> None:
    writer = logger.experiment
    for key, items in (images or {}).items():
        for i, item in enumerate(items):
            writer.add_image(f"{key}/{i}", _burn_in_boxes(item), global_step=step, dataformats="HWC")
    for key, table in (tables or {}).items():
        writer.add_text(key, _markdown_table(table), global_step=step)
    if scalars:
        _log_scalars(logger, scalars, step)


def _burn_in_boxes(image: MediaImage) -> Any:
    """TensorBoard has no box overlays: draw ground truth (corners) and predictions (solid)."""
    pixels = image.pixels
    if image.gt_boxes is not None:
        pixels = draw_boxes(pixels, image.gt_boxes, image.gt_labels, class_names=image.class_names, dashed=True)
    if image.pred_boxes is not None:
        pixels = draw_boxes(
            pixels, image.pred_boxes, image.pred_labels, scores=image.pred_scores, class_names=image.class_names
        )
    return pixels


def _markdown_table(table: MediaTable) -> str:
    keep = [i for i, _ in enumerate(table.columns) if not any(isinstance(r[i], MediaImage) for r in table.rows)]
    header = "| " + " | ".join(str(table.columns[i]) for i in keep) + " |"
    rule = "|" + "---|" * len(keep)
    body = ["| " + " | ".join(str(row[i]) for i in keep) + " |" for row in table.rows]
    return "\n".join([header, rule, *body])
