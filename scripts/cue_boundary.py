"""Decision boundary of the spurious-cue demo's models: how small a perturbation loses their detections, and where it goes.

For each run's newest checkpoint this attacks the true-positive detections on the demo's
probe images (the validation scenes, whose ``cue_bbox`` fields say where each object's
mark was drawn) with :func:`detlens.explainers.boundary.boundary` and prints per run:

* the **margin**: median over the detections lost within the budget, the share not lost;
* **|delta| on marks**: share of each perturbation's mass (|delta| summed over colour
  channels) on the image's marks, next to its chance level (the marks' area share): a
  model that relies on the rings is moved most cheaply by repainting them;
* the same for the detection's own mark (the ring around the object it found).

With ``--figure`` it also writes a picture: per run, the |delta| map of one marked true
positive over its image, with the detection's box.

    .venv/bin/python scripts/cue_boundary.py data/synthetic_..._cue1.0_probe0.9 clean=runs/x/clean cue=runs/x/cue

``SCENES`` is the scenes folder both runs validated on (``annotations/instances_val.json``
inside); each ``NAME=DIR`` a run's ``default_root_dir`` (newest ``*.ckpt`` below it).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import box_iou

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cue_focus import cue_boxes

from detlens.adapters import adapter_for
from detlens.data.image_io import load_rgb_image
from detlens.data.scenes import ring_hole
from detlens.explainers.boundary import boundary
from detlens.explainers.matching import match_detections
from detlens.explainers.metrics import box_area_fraction, energy_in_box
from detlens.lightning_modules import TorchvisionDetector


def newest_checkpoint(folder: Path) -> Path:
    found = sorted(folder.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"no *.ckpt under {folder}")
    return found[-1]


def probe_items(scenes: Path, count: int) -> list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The first ``count`` validation images: ``(image_id, image [3, H, W], gt boxes, gt labels)``."""
    import json

    data = json.loads((scenes / "annotations" / "instances_val.json").read_text())
    anns = defaultdict(list)
    for a in data["annotations"]:
        anns[int(a["image_id"])].append(a)
    items = []
    for image in sorted(data["images"], key=lambda im: im["id"])[:count]:
        pixels = load_rgb_image(scenes / "val" / image["file_name"], context="probe image")
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in anns[image["id"]]], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([a["category_id"] for a in anns[image["id"]]], dtype=torch.long)
        items.append((int(image["id"]), pixels, boxes, labels))
    return items


def ring_shares(maps: torch.Tensor, det_boxes: torch.Tensor, marks, height: int, width: int):
    """Per map: (mass on all rings, chance, mass on own ring, chance)."""
    objects = torch.tensor([m[0] for m in marks], dtype=torch.float32)
    outer = torch.tensor([m[1] for m in marks], dtype=torch.float32)
    holes = torch.tensor([ring_hole(tuple(b)) for b in objects.tolist()], dtype=torch.float32)
    per = torch.stack([energy_in_box(maps, b.expand(len(maps), 4)) - energy_in_box(maps, h.expand(len(maps), 4))
                       for b, h in zip(outer, holes)], 1)  # [K, marks]
    area = box_area_fraction(outer, height, width) - box_area_fraction(holes, height, width)
    own = box_iou(det_boxes, objects).argmax(1)
    idx = torch.arange(len(maps))
    return per.sum(1), area.sum().expand(len(maps)), per[idx, own], area[own]


def run_figures(model, items, cues, args) -> tuple[dict[str, float], tuple | None]:
    adapter = adapter_for(model)
    rows: dict[str, list[float]] = defaultdict(list)
    example = None
    for image_id, image, gt_boxes, gt_labels in items:
        found = adapter.run([image], top_k=args.top_k, score_threshold=args.score_threshold, with_grad=False).detections[0]
        match = match_detections(found.boxes, found.labels, found.scores, gt_boxes, gt_labels,
                                 iou_threshold=args.iou_threshold, background_threshold=min(0.1, args.iou_threshold))
        tp = torch.nonzero(match.is_tp | args.all_detections).flatten()
        if not len(tp):
            continue
        (res,) = boundary(adapter, [image], [found.select(tp)], norm=args.norm, steps=args.steps,
                          epsilon=args.epsilon, score_threshold=args.score_threshold)
        rows["margin"] += res.margin.tolist()
        marks = cues.get(image_id, [])
        if not marks:
            continue
        h, w = image.shape[-2:]
        on, chance, own, own_chance = ring_shares(res.delta_map, res.boxes, marks, int(h), int(w))
        rows["delta_on_marks"] += on.tolist()
        rows["delta_on_marks_chance"] += chance.tolist()
        rows["delta_on_own_mark"] += own.tolist()
        rows["delta_on_own_mark_chance"] += own_chance.tolist()
        if example is None:
            example = (image, res.delta_map[0], res.boxes[:1], res.labels[:1], float(res.margin[0]))
    margins = np.asarray(rows["margin"], np.float64)
    lost = np.isfinite(margins)
    figures = {name: float(np.mean(v)) for name, v in rows.items() if v and name != "margin"}
    figures["detections"] = float(len(margins))
    figures["margin_median"] = float(np.median(margins[lost])) if lost.any() else math.nan
    figures["not_lost_share"] = float((~lost).mean()) if len(margins) else math.nan
    return figures, example


def write_figure(examples: dict[str, tuple], path: Path) -> None:
    import cv2

    from detlens.render.heatmap import overlay_heatmap, tile_images

    tiles = []
    for name, (image, delta, boxes, labels, margin) in examples.items():
        heat = (delta / delta.max().clamp_min(1e-12)).numpy()
        pixels = overlay_heatmap(image, heat, alpha=0.6, colormap="magma", boxes=boxes.numpy(), labels=labels.numpy())
        pixels = cv2.resize(pixels, (pixels.shape[1] * 2, pixels.shape[0] * 2), interpolation=cv2.INTER_NEAREST)
        text = f"{name}: margin {margin:.3g}" if math.isfinite(margin) else f"{name}: not lost"
        cv2.putText(pixels, text, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
        tiles.append(pixels)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(tile_images(tiles, columns=len(tiles)), cv2.COLOR_RGB2BGR))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenes", type=Path, help="the probe scenes folder (annotations/instances_val.json with cue_bbox)")
    parser.add_argument("runs", nargs="+", help="NAME=DIR (a run's default_root_dir)")
    parser.add_argument("--num-images", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--score-threshold", type=float, default=0.5)
    parser.add_argument("--iou-threshold", type=float, default=0.5, help="IoU with a same-class GT box of a true positive")
    parser.add_argument("--all-detections", action="store_true",
                        help="attack every detection above the threshold, not only true positives (smoke runs on untrained models)")
    parser.add_argument("--norm", choices=("l2", "linf"), default="l2")
    parser.add_argument("--epsilon", type=float, default=None)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--figure", type=Path, default=None, help="PNG: one |delta| overlay per run")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    cues, _ = cue_boxes(args.scenes / "annotations" / "instances_val.json")
    items = probe_items(args.scenes, args.num_images)
    print(f"{'run':<14s} {'dets':>5s} {'margin median':>14s} {'not lost':>9s}  {'|delta| on marks':>17s}  "
          f"{'on own mark':>14s}  {'s':>5s}")
    print(f"{'':<14s} {'':>5s} {f'({args.norm})':>14s} {'':>9s}  {'(chance)':>17s}  {'(chance)':>14s}")
    examples = {}
    for spec in args.runs:
        name, _, folder = spec.partition("=")
        if not folder:
            raise SystemExit(f"expected NAME=DIR, got {spec!r}")
        model = TorchvisionDetector.load_from_checkpoint(newest_checkpoint(Path(folder)), map_location="cpu").eval()
        start = time.perf_counter()
        f, example = run_figures(model, items, cues, args)
        if example is not None:
            examples[name] = example

        def pair(key: str, f: dict[str, float] = f) -> str:
            return f"{f.get(key, math.nan):.3f} ({f.get(key + '_chance', math.nan):.3f})"

        print(f"{name:<14s} {int(f['detections']):>5d} {f['margin_median']:>14.4f} {f['not_lost_share']:>9.2f}  "
              f"{pair('delta_on_marks'):>17s}  {pair('delta_on_own_mark'):>14s}  {time.perf_counter() - start:>5.0f}", flush=True)
    if args.figure is not None and examples:
        write_figure(examples, args.figure)
        print(f"figure: {args.figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
