"""A self-contained HTML report of one run's focus, or of a baseline next to a candidate.

Everything is inlined (PNG images as base64 ``data:`` URIs, CSS in a ``<style>`` block),
so the file can be attached to a CI job, mailed or opened offline. Sections:

1. the verdict (comparisons): thresholds and what crossed them;
2. focus metrics side by side (energy-in-box with its chance level, pointing game, per
   class), map drift and attention-entropy drift;
3. focus over training (energy-in-box per class and drift from the previous point, per
   logging step) and attention-entropy curves per layer/head;
4. per probe image: the maps (element-wise maximum of the detections' maps) blended over
   the image with predicted (solid) and ground-truth (corner-marked) boxes, side by side,
   with that image's drift;
5. the box-embedding scatter of each run, where recorded.

Charts are drawn with matplotlib's object API (no pyplot state), images with
:mod:`detlens.render`.
"""

from __future__ import annotations

import base64
import html
import io
import math
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

import cv2
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from detlens.focus.compare import Comparison, TrainingCurves, training_curves
from detlens.focus.drift import ImageDrift, focus_metrics
from detlens.focus.evidence import Check
from detlens.focus.record import FocusImage, FocusRecord, MapPoint
from detlens.render.boxes import draw_boxes
from detlens.render.heatmap import merge_maps, overlay_heatmap
from detlens.render.scatter import OUTCOME_STYLES, render_scatter

__all__ = ["Track", "overlay_for", "render_comparison_report", "render_run_report", "write_report"]

T = TypeVar("T")
Track = Callable[[Iterable[T], str], Iterable[T]]
"""``track(items, description)``: yields ``items`` while showing progress (e.g. ``rich.progress.track``)."""

DISPLAY_SIDE = 192  # overlays are shown at least this large (small probe images are upscaled)


def _no_progress(items: Iterable[T], description: str) -> Iterable[T]:
    return items


def _png(pixels: np.ndarray) -> str:
    ok, data = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(pixels), cv2.COLOR_RGB2BGR))
    if not ok:  # pragma: no cover - OpenCV fails only on invalid arrays
        raise ValueError("PNG encoding failed")
    return "data:image/png;base64," + base64.b64encode(data.tobytes()).decode("ascii")


def _figure_png(fig: Figure) -> str:
    buffer = io.BytesIO()
    FigureCanvasAgg(fig)
    fig.savefig(buffer, format="png", dpi=100)
    fig.clear()
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _img(uri: str, alt: str, width: int | None = None) -> str:
    size = f' width="{width}"' if width else ""
    return f'<img src="{uri}" alt="{html.escape(alt)}"{size}>'


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:.{digits}f}"


# ---------------------------------------------------------------------------------------
# Pixels
# ---------------------------------------------------------------------------------------


def overlay_for(record: FocusRecord, point: MapPoint, image: FocusImage, class_names: dict[int, str]) -> np.ndarray:
    """``uint8[h, w, 3]``: the image's merged maps over its stored thumbnail (grey if none), with boxes."""
    thumb = record.probe_images.get((point.log_key, image.probe_index))
    if thumb is None:
        thumb = np.full((image.height, image.width, 3), 128, np.uint8)
    h, w = thumb.shape[:2]
    scale = max(1.0, DISPLAY_SIDE / max(h, w))
    if scale > 1.0:
        h, w = round(h * scale), round(w * scale)
        thumb = cv2.resize(thumb, (w, h), interpolation=cv2.INTER_LINEAR)
    sx, sy = w / image.width, h / image.height
    heat = merge_maps(image.maps.astype(np.float32)) if len(image) else np.zeros((8, 8), np.float32)
    pixels = overlay_heatmap(thumb, heat, alpha=0.5)
    factor = np.array([sx, sy, sx, sy], np.float32)
    if len(image.gt_boxes):
        pixels = draw_boxes(pixels, image.gt_boxes * factor, image.gt_labels, class_names=class_names, dashed=True, thickness=2)
    if len(image):
        pixels = draw_boxes(pixels, image.boxes * factor, image.labels, scores=image.scores, class_names=class_names)
    return pixels


def _step_axis(ax: object, steps: Sequence[int]) -> None:
    from matplotlib.ticker import MaxNLocator

    lo, hi = min(steps), max(steps)
    pad = max(1.0, 0.05 * (hi - lo))
    ax.set_xlim(lo - pad, hi + pad)  # type: ignore[attr-defined]
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # type: ignore[attr-defined]
    ax.set_xlabel("global step", fontsize=8)  # type: ignore[attr-defined]
    ax.tick_params(labelsize=7)  # type: ignore[attr-defined]
    ax.grid(True, lw=0.3, color="0.85")  # type: ignore[attr-defined]


def _curves_chart(curves: TrainingCurves, title: str) -> str | None:
    if not curves.steps:
        return None
    fig = Figure(figsize=(8.0, 3.3))
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for name, values in curves.metrics.items():
        if name == "energy_in_box":
            left.plot(curves.steps, values, marker="o", ms=4, lw=2.2, color="black", label="all classes")
        elif name.startswith("energy_in_box/"):
            left.plot(curves.steps, values, marker="o", ms=3, lw=1.2, label=name.split("/", 1)[1])
    if "energy_in_box_chance" in curves.metrics:
        left.plot(curves.steps, curves.metrics["energy_in_box_chance"], ls="--", marker="x", ms=4, color="0.5", lw=1, label="chance (box area)")
    left.set_title("energy in box (true positives)", fontsize=9)
    left.set_ylim(0, 1)
    left.legend(fontsize=7, frameon=False)
    right.plot(curves.steps, curves.drift_prev, marker="o", ms=4, color="tab:red", label="map drift vs previous point")
    if "pointing_game" in curves.metrics:
        right.plot(curves.steps, curves.metrics["pointing_game"], marker="s", ms=4, color="tab:blue", label="pointing game")
    right.set_title("drift (1 − Spearman ρ) · pointing game", fontsize=9)
    right.set_ylim(0, max([1.0, *(v for v in curves.drift_prev if math.isfinite(v))]) * 1.05)
    right.legend(fontsize=7, frameon=False)
    for ax in (left, right):
        _step_axis(ax, curves.steps)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _figure_png(fig)


def _entropy_chart(curves: TrainingCurves, title: str) -> str | None:
    if not curves.entropy_steps or not curves.entropy:
        return None
    heads = list(curves.entropy)
    prefix = _common_prefix(heads)
    rows = math.ceil(min(len(heads), 12) / 3)
    fig = Figure(figsize=(8.0, 3.0 + 0.22 * rows))
    ax = fig.add_subplot(1, 1, 1)
    for head, values in curves.entropy.items():
        ax.plot(curves.entropy_steps, values, marker="o", ms=3, lw=1.2, label=head[len(prefix):] or head)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("normalised entropy", fontsize=8)
    _step_axis(ax, curves.entropy_steps)
    if len(heads) <= 12:
        ax.legend(fontsize=7, frameon=False, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    fig.suptitle(title + (f"\n{prefix}…" if prefix else ""), fontsize=9)
    fig.tight_layout()
    return _figure_png(fig)


def _temperature_chart(curves: TrainingCurves, title: str) -> str | None:
    if not curves.entropy_steps or not curves.temperature:
        return None
    fig = Figure(figsize=(8.0, 3.0))
    ax = fig.add_subplot(1, 1, 1)
    for block, values in curves.temperature.items():
        ax.plot(curves.entropy_steps, values, marker="o", ms=3, lw=1.2, label=block)
    ax.set_ylabel("softmax temperature T", fontsize=8)
    _step_axis(ax, curves.entropy_steps)
    ax.legend(fontsize=7, frameon=False, ncol=2)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _figure_png(fig)


def _common_prefix(names: Sequence[str]) -> str:
    """The longest common prefix of ``names`` that ends at a ``/`` or ``.`` (``""`` for one name)."""
    if len(names) < 2:
        return ""
    import os

    prefix = os.path.commonprefix(list(names))
    cut = max(prefix.rfind("/"), prefix.rfind("."))
    return prefix[: cut + 1] if cut >= 0 else ""


def _scatter(record: FocusRecord) -> str | None:
    if not record.embeddings:
        return None
    point = max(record.embeddings, key=lambda p: p.step)
    outcomes = [o if o in OUTCOME_STYLES else "fp" for o in point.outcomes]
    pixels = render_scatter(
        point.coords, point.labels, outcomes=outcomes, class_names={**record.class_names(), **point.class_names},
        method=point.method, trustworthiness=point.trustworthiness if point.trustworthiness is not None else math.nan,
        silhouette=point.silhouette if point.silhouette is not None else math.nan,
        subtitle=f"{record.name} · step {point.step}", size=(640, 420),
    )
    return _png(pixels)


# ---------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------

_CSS = """
body { font-family: -apple-system, 'Segoe UI', Roboto, sans-serif; margin: 24px; color: #222; max-width: 1200px; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 13px; }
td, th { border: 1px solid #ddd; padding: 4px 8px; text-align: right; vertical-align: top; }
th { background: #f4f4f4; } td.name, th.name { text-align: left; }
.verdict { padding: 10px 14px; border-radius: 6px; font-weight: 600; }
.pass { background: #e7f6e7; color: #1b5e20; } .fail { background: #fdecea; color: #8e1c1c; }
.insufficient { background: #fff4e0; color: #7a4b00; }
.worse { color: #b00020; font-weight: 600; }
.images td { text-align: center; } .images img { image-rendering: auto; }
.caption { font-size: 11px; color: #555; }
.charts img { margin: 6px 12px 6px 0; border: 1px solid #eee; }
"""


def _page(title: str, body: list[str]) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>\n"
        + "\n".join(body)
        + f"\n<p class=\"caption\">written by detlens {time.strftime('%Y-%m-%d %H:%M:%S')}</p></body></html>\n"
    )


def _metrics_table(columns: Sequence[str], metrics: Sequence[dict[str, float]], *, compare: bool) -> str:
    keys = sorted({k for m in metrics for k in m}, key=lambda k: (k.split("/")[0], "/" in k, k))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns) + ("<th>Δ</th>" if compare else "")
    rows = []
    for key in keys:
        values = [m.get(key) for m in metrics]
        cells = "".join(f"<td>{_fmt(v)}</td>" for v in values)
        if compare:
            a, b = values
            delta = (b - a) if a is not None and b is not None else None
            worse = delta is not None and (
                (key.startswith(("energy_in_box", "pointing_game", "true_positive")) and not key.startswith("energy_in_box_chance") and delta < -0.05)
            )
            cells += f"<td class=\"{'worse' if worse else ''}\">{'' if delta is None else f'{delta:+.3f}'}</td>"
        rows.append(f"<tr><td class=\"name\">{html.escape(key)}</td>{cells}</tr>")
    return f"<table><tr><th class=\"name\">metric</th>{head}</tr>{''.join(rows)}</table>"


def _training_section(records: Sequence[FocusRecord], log_key: str | None, track: Track) -> list[str]:
    body = ["<h2>Focus over training</h2>", "<div class=\"charts\">"]
    entropy = []
    for record in track(records, "charts"):
        curves = training_curves(record, log_key)
        chart = _curves_chart(curves, f"{record.name}: focus per logging point")
        body.append(_img(chart, f"focus over training of {record.name}") if chart else f"<p>{html.escape(record.name)}: no map entries.</p>")
        ent = _entropy_chart(curves, f"{record.name}: attention entropy per layer/head ({'probe set' if any(p.origin == 'probe' for p in record.entropy) else 'training batches'})")
        if ent:
            entropy.append(_img(ent, f"attention entropy of {record.name}"))
        temperature = _temperature_chart(curves, f"{record.name}: learnable attention temperatures")
        if temperature:
            entropy.append(_img(temperature, f"attention temperatures of {record.name}"))
    body.append("</div>")
    if entropy:
        body += ["<h2>Attention entropy</h2>", "<div class=\"charts\">", *entropy, "</div>"]
    return body


def _boundary_section(records: Sequence[FocusRecord]) -> list[str]:
    """Median margin and share not lost per boundary point (``BoundaryCallback``), charted and tabled."""
    body: list[str] = []
    for record in records:
        points = record.boundary_points()
        if not points:
            continue
        names = record.class_names()
        summaries = [p.summary(names) for p in points]
        steps = [p.step for p in points]
        fig = Figure(figsize=(8.0, 3.0))
        left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
        for key in sorted({k for s in summaries for k in s}):
            values = [s.get(key, math.nan) for s in summaries]
            ax = left if key.startswith("margin_median") else right
            label = key.split("/", 1)[1] if "/" in key else "all classes"
            ax.plot(steps, values, marker="o", ms=3 if "/" in key else 4, lw=1.2 if "/" in key else 2.2,
                    color=None if "/" in key else "black", label=label)
        left.set_title(f"median margin ({points[-1].norm}, lost detections)", fontsize=9)
        right.set_title(f"share not lost within ε = {points[-1].epsilon:g}", fontsize=9)
        right.set_ylim(0, 1.05)
        for ax in (left, right):
            _step_axis(ax, steps)
            ax.legend(fontsize=7, frameon=False)
        fig.suptitle(f"{record.name}: decision-boundary margin per logging point", fontsize=10)
        fig.tight_layout()
        shown = points if len(points) <= 8 else [points[int(round(i))] for i in np.linspace(0, len(points) - 1, 8)]
        body += [f"<h2>Decision-boundary margin: {html.escape(record.name)}</h2>",
                 "<p>margin: size of the smallest perturbation a bounded attack found that makes the detector lose "
                 "the detection (verified by re-running it); larger is more robust.</p>",
                 _img(_figure_png(fig), f"margins over training of {record.name}"),
                 _metrics_table([f"step {p.step}" for p in shown], [p.summary(names) for p in shown], compare=False)]
    return body


def _image_drift_text(d: ImageDrift | None) -> str:
    if d is None:
        return ""
    return (f"drift {_fmt(d.mean_drift)} · {len(d.pairs)} matched of {d.count_a}/{d.count_b}"
            + (f" · cosine {_fmt(float(d.cosine.mean()))}" if len(d.cosine) else ""))


def _overlays_section(
    records: Sequence[FocusRecord], points: Sequence[MapPoint | None], drifts: dict[int, ImageDrift], track: Track
) -> list[str]:
    indices = sorted({im.probe_index for p in points if p is not None for im in p.images})
    if not indices:
        return []
    names = {}
    for r in records:
        names.update(r.class_names())
    head = "".join(
        f"<th>{html.escape(r.name)}<br><span class=\"caption\">step {p.step if p else '–'}</span></th>" for r, p in zip(records, points)
    )
    rows = []
    for index in track(indices, "overlays"):
        cells = []
        for record, point in zip(records, points):
            image = point.image(index) if point is not None else None
            if image is None:
                cells.append("<td>not explained</td>")
                continue
            pixels = overlay_for(record, point, image, names)
            metrics = focus_metrics(MapPoint(point.log_key, point.step, point.epoch, point.method, point.layer, [image]), names)
            caption = f"{len(image)} detections · energy in box {_fmt(metrics.get('energy_in_box'))}"
            cells.append(f"<td>{_img(_png(pixels), f'probe image {index} in {record.name}')}<div class=\"caption\">{html.escape(caption)}</div></td>")
        drift_cell = f"<td class=\"caption\">{html.escape(_image_drift_text(drifts.get(index)))}</td>" if drifts else ""
        rows.append(f"<tr><td class=\"name\">img {index}</td>{''.join(cells)}{drift_cell}</tr>")
    drift_head = "<th>drift</th>" if drifts else ""
    return ["<h2>Probe images</h2>",
            "<p class=\"caption\">Maps of each image's explained detections (element-wise maximum) over the image; "
            "solid boxes: detections with scores, corner-marked boxes: ground truth.</p>",
            f"<table class=\"images\"><tr><th class=\"name\">probe</th>{head}{drift_head}</tr>{''.join(rows)}</table>"]


def _embedding_section(records: Sequence[FocusRecord], track: Track) -> list[str]:
    images = []
    for record in track(records, "embeddings"):
        uri = _scatter(record)
        if uri:
            images.append(_img(uri, f"box embedding scatter of {record.name}"))
    return ["<h2>Box embeddings</h2>", "<div class=\"charts\">", *images, "</div>"] if images else []


def _checks_table(checks: Sequence[Check]) -> list[str]:
    """Each gated metric: value, 95% interval, count, threshold, verdict."""
    if not checks:
        return ["<p>No threshold set: nothing was gated.</p>"]
    words = {"pass": "pass", "fail": "FAIL", "insufficient": "not enough evidence"}
    rows = "".join(
        f"<tr class=\"{c.verdict}\"><td class=\"name\">{html.escape(c.name)}</td><td>{_fmt(c.value)}</td>"
        f"<td>{'–' if not math.isfinite(c.low) else f'[{c.low:.3f}, {c.high:.3f}]'}</td><td>{c.count} (min {c.min_count})</td>"
        f"<td>{c.bound} {c.threshold:g}</td><td class=\"name\">{words[c.verdict]}</td></tr>"
        for c in checks
    )
    return ["<h2>Gated metrics</h2>",
            "<p class=\"caption\">Means over detections with their 95% bootstrap interval; a threshold is crossed only "
            "when the whole interval lies beyond it, and too few detections give no verdict.</p>",
            "<table><tr><th class=\"name\">metric</th><th>mean</th><th>95% interval</th><th>count</th><th>threshold</th>"
            f"<th class=\"name\">verdict</th></tr>{rows}</table>"]


def render_comparison_report(comparison: Comparison, track: Track = _no_progress) -> str:
    """The HTML of a baseline-vs-candidate report."""
    c = comparison
    records = [c.baseline, c.candidate]
    if c.verdict == "pass":
        verdict = "<div class=\"verdict pass\">PASS: focus within thresholds</div>"
    elif c.verdict == "fail":
        verdict = "<div class=\"verdict fail\">FAIL: " + "<br>".join(html.escape(v) for v in c.violations) + "</div>"
    else:
        verdict = ("<div class=\"verdict insufficient\">NOT ENOUGH EVIDENCE: no verdict. "
                   + "<br>".join(html.escape(v) for v in c.insufficient) + "</div>")
    thresholds = ", ".join(f"{k} = {'–' if v is None else f'{v:g}'}" for k, v in c.thresholds.items())
    body = [
        f"<h1>detlens focus comparison: {html.escape(c.baseline.name)} → {html.escape(c.candidate.name)}</h1>",
        f"<p>baseline: <code>{html.escape(str(c.baseline.path))}</code><br>candidate: <code>{html.escape(str(c.candidate.path))}</code><br>"
        f"maps: <code>{html.escape(c.log_key)}</code> at steps {c.point_a.step if c.point_a else '–'} / {c.point_b.step if c.point_b else '–'}"
        f" · thresholds: {html.escape(thresholds)}</p>",
        verdict,
        *_checks_table(c.checks),
        "<h2>Focus metrics (last logging point)</h2>",
        _metrics_table(["baseline", "candidate"], [c.metrics_a, c.metrics_b], compare=True),
    ]
    rows = []
    if c.drift is not None:
        d = c.drift
        rows += [("map drift (1 − Spearman ρ)", _fmt(d.drift)), ("mean Spearman ρ", _fmt(d.spearman)),
                 ("mean cosine similarity", _fmt(d.similarity)),
                 ("matched detections", f"{d.matched} of {d.count_a} / {d.count_b}"
                  + (f" ({d.match_rate:.0%})" if math.isfinite(d.match_rate) else " (no detections to match)"))]
    if c.entropy is not None:
        rows += [("attention-entropy drift (mean |ΔH|)", _fmt(c.entropy.mean)), ("attention-entropy drift (max |ΔH|)", _fmt(c.entropy.max))]
    for block, (ta, tb) in c.temperatures.items():
        rows.append((f"attention temperature {block} (baseline → candidate)", f"{_fmt(ta)} → {_fmt(tb)}"))
    if rows:
        body += ["<h2>Drift from the baseline</h2>", "<table>" + "".join(
            f"<tr><td class=\"name\">{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in rows) + "</table>"]
    body += _training_section(records, c.log_key, track)
    body += _boundary_section(records)
    drifts = {d.probe_index: d for d in c.drift.images} if c.drift is not None else {}
    body += _overlays_section(records, [c.point_a, c.point_b], drifts, track)
    body += _embedding_section(records, track)
    return _page(f"detlens compare {c.baseline.name} {c.candidate.name}", body)


def render_run_report(record: FocusRecord, log_key: str | None = None, track: Track = _no_progress) -> str:
    """The HTML of one run's report: metrics at every logging point, curves, overlays, scatter."""
    points = record.map_points(log_key)
    names = record.class_names()
    key = points[0].log_key if points else (log_key or "")
    body = [f"<h1>detlens focus report: {html.escape(record.name)}</h1>",
            f"<p>record: <code>{html.escape(str(record.path))}</code> · maps: <code>{html.escape(key)}</code> · "
            f"{len(points)} logging points" + (" · <b>truncated</b> (the run stopped mid-write)" if record.truncated else "") + "</p>"]
    if points:
        shown = points if len(points) <= 8 else [points[int(round(i))] for i in np.linspace(0, len(points) - 1, 8)]
        body += ["<h2>Focus metrics per logging point</h2>",
                 _metrics_table([f"step {p.step}" for p in shown], [focus_metrics(p, names) for p in shown], compare=False)]
    body += _training_section([record], key or None, track)
    body += _boundary_section([record])
    first_last = [points[0], points[-1]] if len(points) > 1 else points
    if first_last:
        from detlens.focus.drift import point_drift

        drifts = {d.probe_index: d for d in point_drift(first_last[0], first_last[-1]).images} if len(first_last) == 2 else {}
        body += _overlays_section([record] * len(first_last), first_last, drifts, track)
    body += _embedding_section([record], track)
    return _page(f"detlens report {record.name}", body)


def write_report(html_text: str, out: str | Path) -> Path:
    """Writes the report (creating parent folders); returns its path."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html_text, encoding="utf-8")
    return path

