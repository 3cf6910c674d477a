"""A picture of one probe image's per-detection attention maps on two FPN levels, side by side.

Reads what ``AttentionMapCallback(per_level=True)`` logged to an offline W&B run (e.g. of
``configs/fasterrcnn_fpn_attention_synthetic.yaml``): the last event's overlays under
``attention_maps/spatial/backbone.fpn_attention.<level>`` for two levels, keeps the
detections of one probe image, and lays them out one detection per row, one level per
column, each column headed by its level.

    .venv/bin/python scripts/fpn_attention_figure.py wandb/offline-run-... --levels 0 1 \
        --out docs/images/fpn_attention_levels.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

from detlens.render.heatmap import tile_images

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from wandb_offline import read_offline_run  # noqa: E402 - the tests' reader, found through the path above


def _event(run, key: str) -> dict | None:
    events = [value for _, value in run.history_of(key) if isinstance(value, dict) and value.get("filenames")]
    return events[-1] if events else None


def _band(text: str, width: int, height: int = 22) -> np.ndarray:
    band = np.full((height, width, 3), 255, np.uint8)
    cv2.putText(band, text, (4, height - 7), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return band


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="an offline W&B run folder (offline-run-*)")
    parser.add_argument("--levels", nargs=2, default=["0", "1"], help="the two FPN levels to show")
    parser.add_argument("--image", default=None, help="the probe image's caption start, e.g. 'img 3' (default: the first)")
    parser.add_argument("--log-key", default="attention_maps")
    parser.add_argument("--scale", type=int, default=2, help="upscale factor (the demo's images are 160 px)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    run = read_offline_run(args.run)
    columns = []
    for level in args.levels:
        key = f"{args.log_key}/spatial/backbone.fpn_attention.{level}"
        event = _event(run, key)
        if event is None:
            print(f"{args.run}: nothing logged under {key!r} (AttentionMapCallback(per_level=True)?)", file=sys.stderr)
            return 2
        columns.append((level, event))
    captions = columns[0][1]["captions"]
    image = args.image or captions[0].split(" (id")[0].split(" · ")[0]
    rows = []
    for level, event in columns:
        picked = [(name, caption) for name, caption in zip(event["filenames"], event["captions"])
                  if caption.split(" (id")[0].split(" · ")[0] == image]
        if not picked:
            print(f"{args.run}: no detection of {image!r} under level {level}", file=sys.stderr)
            return 2
        rows.append(picked)
    # The level each detection's RoI was pooled from, from the captions of the RoI-level maps ("... · level 1 · step N").
    roi_event = _event(run, f"{args.log_key}/spatial/roi_level") or {"captions": []}
    roi_level = {c.split(" · ")[1].removesuffix(" (from its box centre)"): c.rsplit(" · level ", 1)[-1].split(" · ")[0]
                 for c in roi_event["captions"] if c.split(" (id")[0].split(" · ")[0] == image and " · level " in c}
    tiles, step = [], captions[0].rsplit(" · ", 1)[-1]
    for per_level in zip(*rows):  # one detection: its map on each level
        for level, (name, caption) in zip(args.levels, per_level):
            pixels = cv2.cvtColor(cv2.imread(str(run.run_dir / "files" / name)), cv2.COLOR_BGR2RGB)
            pixels = cv2.resize(pixels, None, fx=args.scale, fy=args.scale, interpolation=cv2.INTER_LINEAR)
            detection = caption.split(" · ")[1].removesuffix(" (from its box centre)")
            mark = " (its RoI's level)" if roi_level.get(detection) == level else ""
            tiles.append(np.concatenate([_band(f"level {level}{mark} · {detection}", pixels.shape[1]), pixels]))
    figure = tile_images(tiles, columns=len(args.levels), gap=4)
    title = _band(f"{image}: each detection's attention, FPN level {' | '.join(args.levels)} · {step}",
                  figure.shape[1], 26)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(args.out), cv2.cvtColor(np.concatenate([title, figure]), cv2.COLOR_RGB2BGR))
    print(f"{args.out}: {len(tiles) // len(args.levels)} detections of {image} on levels {args.levels}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
