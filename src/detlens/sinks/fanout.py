"""``log_media``: one call hands images, tables and scalars to every logger of a Trainer.

Rank 0 only (``log_results`` runs there); it runs no collectives. A logger that fails
costs one warning and never an exception into training.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pytorch_lightning.loggers import Logger, TensorBoardLogger, WandbLogger
from pytorch_lightning.utilities import rank_zero_warn

from detlens.render.boxes import draw_boxes, wandb_boxes
from detlens.sinks.media import MediaImage, MediaTable

if TYPE_CHECKING:
    import pytorch_lightning as pl

__all__ = ["log_media"]


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
    and scalars in one ``log`` call (one history row); ``TensorBoardLogger`` gets
    ``add_image`` (boxes drawn in), tables as Markdown text, and scalars; any other
    logger (``CSVLogger``, MLflow, ...) gets the scalars only.
    """
    for logger in trainer.loggers:
        try:
            if isinstance(logger, WandbLogger):
                _log_wandb(logger, images, tables, scalars, step)
            elif isinstance(logger, TensorBoardLogger):
                _log_tensorboard(logger, images, tables, scalars, step)
            elif scalars:
                _log_scalars(logger, scalars, step)
        except Exception as err:  # noqa: BLE001 - a logger failure must never stop training
            rank_zero_warn(f"[detlens] {type(logger).__name__} failed to log media at step {step}: {type(err).__name__}: {err}")


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


def _log_wandb(
    logger: WandbLogger,
    images: Mapping[str, list[MediaImage]] | None,
    tables: Mapping[str, MediaTable] | None,
    scalars: Mapping[str, float] | None,
    step: int,
) -> None:
    import wandb

    payload: dict[str, Any] = {}
    for key, items in (images or {}).items():
        payload[key] = [_wandb_image(item) for item in items]
    for key, table in (tables or {}).items():
        rows = [[_wandb_image(c) if isinstance(c, MediaImage) else c for c in row] for row in table.rows]
        payload[key] = wandb.Table(columns=list(table.columns), data=rows)
    payload.update({k: float(v) for k, v in (scalars or {}).items()})
    if payload:
        # Lightning's own log_image/log_table go through log_metrics too (prefix, global step).
        logger.log_metrics(payload, step=step)


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
