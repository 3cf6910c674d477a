"""The media jobs of detlens' callbacks: explanation results -> :class:`~detlens.render.media.Media`.

Each callback's ``log_results`` gathers plain data (CPU tensors, arrays, strings) and hands
``functools.partial(<job>, ...)`` to :func:`detlens.sinks.log_media_later`, which runs it
off the training thread: in detlens' media process (:mod:`detlens.sinks.media_process`),
or on its media thread (``detlens.sinks.fanout.MEDIA_PROCESS`` decides). So that the
process can run them, the jobs live here, at module level (picklable by reference), take
no callback, trainer or model, and import nothing from Lightning or ``detlens.callbacks``
(the process starts faster).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from torch import Tensor

from detlens.render.attention import entropy_heatmap, overlay_attention, to_uint8_image
from detlens.render.heatmap import merge_maps, overlay_heatmap, tile_images
from detlens.render.scatter import box_thumbnail, render_scatter
from detlens.render.media import Media, MediaImage, MediaTable

__all__ = [
    "attention_map_media",
    "embedding_media",
    "entropy_heatmap_media",
    "gradcam_media",
    "point_marker",
]


def gradcam_media(
    probes: Sequence[Mapping[str, Any]],
    *,
    key: str,
    alpha: float,
    colormap: str,
    class_names: Mapping[int, str] | None,
    scalars: Mapping[str, float],
) -> Media:
    """One heatmap overlay per probe image, with ground-truth and predicted boxes.

    Args:
        probes: per image ``{"image": FloatTensor[3, H, W], "raw": [K, h, w] maps,
            "boxes", "labels", "scores", "gt_boxes"?, "gt_labels"?, "caption"}``.

    An image without a map that says anything (no detection, or only flat maps) is shown
    untinted: a colour-mapped zero map would tint it uniformly, which reads as a map.
    """
    from detlens.explainers.scale import display_maps, flat_maps

    def pixels(p: Mapping[str, Any]) -> np.ndarray:
        image = to_uint8_image(p["image"])
        if not bool((~flat_maps(p["raw"])).any()):
            return image
        return overlay_heatmap(image, merge_maps(display_maps(p["raw"])), alpha=alpha, colormap=colormap)

    def caption(p: Mapping[str, Any]) -> str:
        if len(p["raw"]) and bool(flat_maps(p["raw"]).all()):
            return p["caption"] + " · flat maps (no spatial information)"
        return p["caption"]

    media = [
        MediaImage(
            pixels=pixels(p),
            caption=caption(p),
            gt_boxes=_numpy(p.get("gt_boxes")),
            gt_labels=_numpy(p.get("gt_labels")),
            pred_boxes=_numpy(p["boxes"]),
            pred_labels=_numpy(p["labels"]),
            pred_scores=_numpy(p["scores"]),
            class_names=dict(class_names) if class_names else None,
            file_type="jpg",
        )
        for p in probes
    ]
    return Media(images={key: media}, scalars=dict(scalars))


def point_marker(x: float, y: float, size: Sequence[int]) -> list[float]:
    """A small square box around a reference point, drawn by ``overlay_attention`` as its box."""
    r = max(2.0, min(int(size[0]), int(size[1])) / 40)
    return [x - r, y - r, x + r, y + r]


def attention_map_media(
    probes: Sequence[Mapping[str, Any]],
    *,
    keys: Mapping[str, str],
    class_names: Mapping[int, str] | None,
) -> Media:
    """The attention overlays: one per detection map (from its box), and one mosaic per
    probe image of its point maps (each panel the map from one reference point, marked, in
    the points' order: row by row for a grid).

    Args:
        probes: per image ``{"image": FloatTensor[3, H, W], "head": caption start,
            "step_text": "step N", "boxes", "scores", "labels", "points",
            "detection_maps": {map key: [K, h, w]}, "point_maps": {map key: [P, h, w]},
            "grid_size": points per row of the mosaic, "levels": the feature level of each
            detection (optional, shown in the captions of ``spatial/roi_level`` maps)}``.
        keys: map key -> logged key (the callback's ``log_key`` prefix applied).
    """
    panels: dict[str, list[MediaImage]] = {}
    for p in probes:
        # uint8 pixels once per image, not once per map (a 3x3 grid of every head: 36 maps)
        image, head, step_text = to_uint8_image(p["image"]), p["head"], p["step_text"]
        boxes, scores, labels, points = p["boxes"], p["scores"], p["labels"], p["points"]
        for key, maps in p["detection_maps"].items():
            for j in range(min(len(maps), len(boxes))):
                label, score = int(labels[j]), float(scores[j])
                name = (class_names or {}).get(label, f"class {label}")
                pixels = overlay_attention(image, maps[j], boxes[j].tolist(), label=label, score=score,
                                           class_names=class_names)
                detail = f"det {j} {name} {score:.2f}"
                if key.startswith(("encoder/", "spatial/")):
                    detail += " (from its box centre)"
                if key.startswith("spatial/roi_level") and j < len(p.get("levels") or ()):
                    detail += f" · level {p['levels'][j]}"
                panels.setdefault(keys[key], []).append(MediaImage(pixels, caption=f"{head} · {detail} · {step_text}", file_type="jpg"))
        # Point maps: one mosaic per image and key (a 3x3 grid of every head was 36 W&B images
        # per probe image; one picture also shows at a glance how attention moves over the image).
        columns = max(1, int(p.get("grid_size") or 1))
        for key, maps in p["point_maps"].items():
            n = min(len(maps), len(points))
            if n == 0:
                continue
            tiles = [overlay_attention(image, maps[j], point_marker(*(float(v) for v in points[j]), image.shape[:2]))
                     for j in range(n)]
            rows = -(-n // columns)
            detail = f"from {rows}x{min(columns, n)} reference points (marked), row by row"
            panels.setdefault(keys[key], []).append(
                MediaImage(tile_images(tiles, columns=columns), caption=f"{head} · {detail} · {step_text}", file_type="jpg")
            )
    return Media(images=panels)


def entropy_heatmap_media(
    entropies: Mapping[str, Tensor], *, key: str, title: str, caption: str, scalars: Mapping[str, float]
) -> Media:
    """The per-head attention-entropy heatmap (matplotlib) and the entropy scalars."""
    return Media(images={key: [MediaImage(entropy_heatmap(entropies, title=title), caption=caption)]},
                 scalars=dict(scalars))


def embedding_media(
    detections: Any,
    *,
    images: Mapping[int, Tensor],
    class_names: Mapping[int, str] | None,
    log_key: str,
    columns: Sequence[str],
    method: str,
    seed: int,
    max_rows: int,
    perplexity: float,
    n_jobs: int,
    thumbnail_size: int,
    num_images: int,
    step: int,
    scalars: Mapping[str, float],
) -> Media:
    """The 2-D projection of the detections' box features: table, scatter plot, scalars.

    ``detections`` is a :class:`~detlens.explainers.box_features.BoxFeatureSet`; ``images``
    the probe images the thumbnails are cut from (by probe index); ``columns`` the table's
    columns (see ``detlens.callbacks.embeddings.TABLE_COLUMNS``). ``Media.extra`` is the
    :class:`~detlens.explainers.embeddings.EmbeddingSummary`.
    """
    from detlens.explainers.embeddings import embed

    strata = [f"{int(label)}/{outcome}" for label, outcome in zip(detections.labels.tolist(), detections.outcome)]
    summary = embed(
        detections.features, detections.labels, method=method, seed=seed, max_rows=max_rows,
        stratify_by=strata, perplexity=perplexity, n_jobs=n_jobs,
    )
    rows = summary.indices.tolist()
    names = dict(class_names) if class_names else None
    scatter = render_scatter(
        summary.projection.coords,
        detections.labels[rows],
        outcomes=[detections.outcome[r] for r in rows],
        class_names=names,
        method=summary.projection.method,
        trustworthiness=summary.projection.trustworthiness,
        silhouette=summary.silhouette_2d,
        subtitle=f"{summary.description} from {num_images} probe images · step {step}"
        + (f" · {summary.projection.note}" if summary.projection.note else ""),
    )
    table = MediaTable(columns=list(columns))
    for row, (x, y) in zip(rows, summary.projection.coords.tolist()):
        label, outcome, source = int(detections.labels[row]), detections.outcome[row], int(detections.source[row])
        box = [round(v, 2) for v in detections.boxes[row].tolist()]
        cells: dict[str, Any] = {
            "class": (names or {}).get(label, f"class {label}"),
            "label": label,
            "score": round(float(detections.scores[row]), 4),
            "status": {"tp": "TP", "unknown": "n/a"}.get(outcome, "FP"),
            "fp_kind": "" if outcome in ("tp", "unknown") else outcome,
            "image_id": int(detections.image_id[row]),
            "probe_index": source,
            "box": box,
            "x": float(x),
            "y": float(y),
        }
        if "thumbnail" in columns:
            cells["thumbnail"] = MediaImage(
                pixels=box_thumbnail(images[source], box, size=thumbnail_size),
                caption=f"{cells['class']} {cells['score']:.2f} {cells['status']}",
                file_type="jpg",
            )
        if "embedding" in columns:
            cells["embedding"] = detections.features[row].tolist()
        table.rows.append([cells[c] for c in columns])
    return Media(
        images={f"{log_key}/scatter": [MediaImage(pixels=scatter, caption=f"{summary.projection.method} of {len(rows):,} detections · step {step}")]},
        tables={f"{log_key}/table": table},
        scalars={**scalars, **summary.scalars(log_key)},
        extra=summary,
    )


def _numpy(value: Any) -> np.ndarray | None:
    if value is None:
        return None
    return value.numpy() if isinstance(value, Tensor) else np.asarray(value)
