"""Where do a run's Grad-CAM maps sit: on the objects, or on the spurious-cue marks?

Reads the focus records of one or more runs (W&B run folders, ``detlens_focus`` folders or
``focus.jsonl`` files) and the synthetic scenes' validation annotations, whose
``cue_bbox`` fields say where each object's class mark was drawn
(``detlens.data.SyntheticDataModule(spurious_cue_val=...)``), and prints per run, over the
true-positive detections of its last logging point:

* energy in box: share of each map's mass inside the detection's ground-truth box (as
  ``detlens compare``), next to its chance level (the box's area share);
* energy on marks: share of the mass inside the image's cue marks, next to its chance
  level (the marks' area share);
* the same for the detection's own mark (the mark drawn for the object it found).

This is specific to the synthetic scenes (real data has no recorded shortcut), which is why
it is a script beside ``spurious_cue_demo.sh`` and not part of ``detlens compare``.

    .venv/bin/python scripts/cue_focus.py data/synthetic_cue_probe0.9/annotations/instances_val.json RUN [RUN ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import box_iou

from detlens.data.scenes import ring_hole
from detlens.explainers.metrics import box_area_fraction, energy_in_box
from detlens.focus.record import read_focus_record


def cue_boxes(annotation_file: Path) -> tuple[dict[int, list[tuple[list[float], list[float]]]], bool]:
    """(image id -> [(object box xyxy, cue box xyxy)] for every object whose mark was
    drawn, whether the marks are rings around their objects)."""
    data = json.loads(annotation_file.read_text())
    rings = data.get("info", {}).get("detlens_synthetic", {}).get("cue_placement") == "ring"
    out: dict[int, list[tuple[list[float], list[float]]]] = defaultdict(list)
    for ann in data["annotations"]:
        if ann.get("cue_bbox"):
            x, y, w, h = ann["bbox"]
            cx, cy, cw, ch = ann["cue_bbox"]
            out[int(ann["image_id"])].append(([x, y, x + w, y + h], [cx, cy, cx + cw, cy + ch]))
    return out, rings


def run_figures(
    run: str, cues: dict[int, list[tuple[list[float], list[float]]]], log_key: str, rings: bool = False
) -> dict[str, float]:
    record = read_focus_record(run)
    points = record.map_points(log_key)
    if not points:
        raise SystemExit(f"{run}: its focus record has no {log_key!r} map points (it has {record.map_keys() or 'none'})")
    point = points[-1]
    rows: dict[str, list[float]] = defaultdict(list)
    for image in point.images:
        tp = np.asarray(image.is_tp, bool)
        if image.image_id is None or not tp.any():
            continue
        marks = cues.get(int(image.image_id), [])
        k, mh, mw = image.maps.shape
        scale = torch.tensor([mw / image.width, mh / image.height] * 2, dtype=torch.float32)
        maps = torch.from_numpy(np.asarray(image.maps, np.float32))[torch.from_numpy(tp)]
        det_boxes = torch.from_numpy(np.asarray(image.boxes, np.float32))[torch.from_numpy(tp)]
        rows["energy_in_box"] += np.asarray(image.energy_in_box)[tp].tolist()
        rows["energy_in_box_chance"] += np.asarray(image.chance)[tp].tolist()
        if not marks:
            continue
        objects = torch.tensor([m[0] for m in marks], dtype=torch.float32)
        mark_boxes = torch.tensor([m[1] for m in marks], dtype=torch.float32)
        # Energy on all marks: patches do not overlap (drawn in free squares), so shares add
        # up; a ring is its outer box minus its hole (rings of close objects may overlap).
        per_mark = torch.stack([energy_in_box(maps, (b * scale).expand(len(maps), 4)) for b in mark_boxes], 1)
        mark_area = box_area_fraction(mark_boxes, image.height, image.width)
        if rings:
            holes = torch.tensor([ring_hole(tuple(box)) for box in objects.tolist()], dtype=torch.float32)
            per_mark = per_mark - torch.stack(
                [energy_in_box(maps, (b * scale).expand(len(maps), 4)) for b in holes], 1)
            mark_area = mark_area - box_area_fraction(holes, image.height, image.width)
        rows["energy_on_marks"] += per_mark.sum(1).tolist()
        rows["energy_on_marks_chance"] += [float(mark_area.sum())] * len(maps)
        # The detection's own mark: that of the object it overlaps most.
        own = box_iou(det_boxes, objects).argmax(1)
        rows["energy_on_own_mark"] += per_mark[torch.arange(len(maps)), own].tolist()
        rows["energy_on_own_mark_chance"] += mark_area[own].tolist()
    figures = {name: float(np.mean(values)) for name, values in rows.items() if values}
    figures["true_positives"] = float(len(rows["energy_in_box"]))
    figures["step"] = float(point.step)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("annotations", type=Path, help="instances_val.json of the probe scenes (with cue_bbox)")
    parser.add_argument("runs", nargs="+", help="W&B run folders / focus records; NAME=PATH to label one")
    parser.add_argument("--log-key", default="gradcam")
    args = parser.parse_args(argv)
    cues, rings = cue_boxes(args.annotations)
    print(f"{'run':<14s} {'step':>5s} {'TPs':>4s}  {'energy in box':>16s}  {'energy on marks':>16s}  {'on own mark':>14s}")
    print(f"{'':<14s} {'':>5s} {'':>4s}  {'(chance)':>16s}  {'(chance)':>16s}  {'(chance)':>14s}")
    for item in args.runs:
        name, _, path = item.rpartition("=")
        f = run_figures(path, cues, args.log_key, rings)

        def pair(key: str) -> str:
            return f"{f.get(key, float('nan')):.3f} ({f.get(key + '_chance', float('nan')):.3f})"

        print(f"{name or Path(path).name:<14s} {int(f['step']):>5d} {int(f['true_positives']):>4d}  {pair('energy_in_box'):>16s}  "
              f"{pair('energy_on_marks'):>16s}  {pair('energy_on_own_mark'):>14s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
