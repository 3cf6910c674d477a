"""A picture of what an offline W&B run logged: the last event's images under one key, with
the W&B box overlays (ground truth dashed, predictions solid) drawn into the pixels.

W&B draws the boxes in its UI; a README or a slide needs them in the image. Reads the run
with the offline reader of detlens' tests (``tests/wandb_offline.py``), so it works before
(or without) ``wandb sync``.

    .venv/bin/python scripts/readme_figure.py wandb/offline-run-... --key gradcam/probe \
        --images 4 --out docs/images/demo_gradcam.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np

from detlens.render.boxes import draw_boxes

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from wandb_offline import read_offline_run  # noqa: E402 - the tests' reader, found through the path above


def _boxes(run_dir: Path, meta: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[int, str]]:
    data = json.loads((run_dir / "files" / meta["path"]).read_text())
    rows = data.get("box_data", [])
    boxes = np.array([[b["position"][k] for k in ("minX", "minY", "maxX", "maxY")] for b in rows], np.float32).reshape(-1, 4)
    labels = np.array([int(b["class_id"]) for b in rows], np.int64)
    scores = np.array([float((b.get("scores") or {}).get("score", np.nan)) for b in rows], np.float64)
    names = {int(k): str(v) for k, v in (data.get("class_labels") or {}).items()}
    return boxes, labels, scores, names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="an offline W&B run folder (offline-run-*)")
    parser.add_argument("--key", default="gradcam/probe")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--scale", type=int, default=2, help="upscale factor (the demo's images are 160 px)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    run = read_offline_run(args.run)
    events = [value for _, value in run.history_of(args.key) if isinstance(value, dict) and value.get("filenames")]
    if not events:
        print(f"{args.run}: nothing logged under {args.key!r}", file=sys.stderr)
        return 2
    event = events[-1]
    tiles = []
    for name, boxes_meta, caption in list(zip(event["filenames"], event.get("all_boxes", []), event.get("captions", [])))[: args.images]:
        pixels = cv2.cvtColor(cv2.imread(str(run.run_dir / "files" / name)), cv2.COLOR_BGR2RGB)
        pixels = cv2.resize(pixels, None, fx=args.scale, fy=args.scale, interpolation=cv2.INTER_NEAREST)
        for group, dashed in (("ground_truth", True), ("predictions", False)):
            if group in boxes_meta:
                boxes, labels, scores, names = _boxes(run.run_dir, boxes_meta[group])
                pixels = draw_boxes(pixels, boxes * args.scale, labels, scores=None if dashed else scores,
                                    class_names=names, dashed=dashed, thickness=2)
        band = np.full((22, pixels.shape[1], 3), 255, np.uint8)
        cv2.putText(band, caption, (4, 15), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        tiles.append(np.vstack([pixels, band]))
    height = max(t.shape[0] for t in tiles)
    tiles = [np.pad(t, ((0, height - t.shape[0]), (0, 4), (0, 0)), constant_values=255) for t in tiles]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(args.out), cv2.cvtColor(np.hstack(tiles), cv2.COLOR_RGB2BGR))
    print(f"{args.out}: {len(tiles)} images of {args.key} at step {event.get('captions', ['?'])[0].rsplit(' ', 1)[-1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
