"""``Media`` -> the dict of ``wandb.Image`` / ``wandb.Table`` / floats handed to ``wandb.log``.

Touches no run: it only builds wandb media objects (each ``wandb.Image`` encodes its PNG
into wandb's temporary media folder), so it can run on detlens' media thread or in its
media process (:mod:`detlens.sinks.media_process`). Imports neither Lightning nor the
rest of detlens' sinks, which keeps the media process's start-up short.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from detlens.render.boxes import wandb_boxes
from detlens.sinks.media import Media, MediaImage, MediaTable

__all__ = ["build_payload", "given", "wandb_payload"]


def wandb_image(image: MediaImage) -> Any:
    """One ``wandb.Image`` with ground-truth / prediction box groups, decoded and ready to log.

    ``wandb.Image`` writes its PNG and drops the pixels; logging a list of images then
    re-reads every PNG to check that their sizes match (``Image.seq_to_json``), on the
    thread that calls ``wandb.log`` -- the training thread. Reading the public ``image``
    property here loads the pixels back on this (media) side, so that check is free.
    """
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
    result = wandb.Image(image.pixels, caption=image.caption or None, boxes=boxes or None)
    result.image  # noqa: B018 - loads the decoded image (see above)
    return result


def wandb_payload(
    images: Mapping[str, list[MediaImage]] | None,
    tables: Mapping[str, MediaTable] | None,
    scalars: Mapping[str, float] | None,
) -> dict[str, Any]:
    """``{key: [wandb.Image, ...] | wandb.Table | float}``: one ``wandb.log`` call's worth."""
    import wandb

    payload: dict[str, Any] = {}
    for key, items in (images or {}).items():
        payload[key] = [wandb_image(item) for item in items]
    for key, table in (tables or {}).items():
        rows = [[wandb_image(c) if isinstance(c, MediaImage) else c for c in row] for row in table.rows]
        payload[key] = wandb.Table(columns=list(table.columns), data=rows)
    payload.update({k: float(v) for k, v in (scalars or {}).items()})
    return payload


def build_payload(build: Callable[[], Media]) -> tuple[Media, dict[str, Any]]:
    """``build()`` and its W&B payload: the whole job of the media thread or process."""
    media = build()
    return media, wandb_payload(media.images, media.tables, media.scalars)


def given(media: Media) -> Media:
    """``functools.partial(given, media)``: a picklable build of media made beforehand."""
    return media
