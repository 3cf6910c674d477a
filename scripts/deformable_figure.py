"""One probe image's per-detection deformable attention (fused, and per feature level) next to its
Grad-CAM, from what an offline W&B run of a transformers deformable detector logged.

    .venv/bin/python scripts/deformable_figure.py wandb/offline-run-... --image 0 --detections 2 \
        --out docs/images/hf_deformable_attention.png

Rows: the image's first ``--detections`` detections (score order); columns: the fused map
(``attention_maps/decoder/layer<l>``), each level (``.../level<n>``) and the image's Grad-CAM.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from wandb_offline import read_offline_run  # noqa: E402 - the tests' reader, found through the path above


def _last_event(run, key: str) -> dict:
    events = [v for _, v in run.history_of(key) if isinstance(v, dict) and v.get("filenames")]
    if not events:
        raise SystemExit(f"nothing logged under {key!r}")
    return events[-1]


def _label(tile: np.ndarray, text: str) -> np.ndarray:
    out = cv2.copyMakeBorder(tile, 22, 0, 0, 0, cv2.BORDER_CONSTANT, value=(255, 255, 255))
    cv2.putText(out, text, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--layer", type=int, default=1, help="decoder layer")
    parser.add_argument("--image", type=int, default=0, help="probe image index (the caption's 'img N')")
    parser.add_argument("--detections", type=int, default=2)
    parser.add_argument("--scale", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    run = read_offline_run(args.run)
    base = f"attention_maps/decoder/layer{args.layer}"
    levels = sorted({k for row in run.history for k in row if k.startswith(base + "/level")})
    keys = [base, *levels]
    prefix = f"img {args.image} ("
    cam = _last_event(run, "gradcam/probe")
    cam_file = next(f for c, f in zip(cam["captions"], cam["filenames"]) if c.startswith(prefix))
    rows = []
    for det in range(args.detections):
        tiles = []
        for key in keys:
            event = _last_event(run, key)
            found = [(c, f) for c, f in zip(event["captions"], event["filenames"])
                     if c.startswith(prefix) and f" det {det} " in c]
            if not found:
                raise SystemExit(f"{key}: no detection {det} of probe image {args.image}")
            caption, name = found[0]
            image = cv2.imread(str(run.run_dir / "files" / name))
            what = "fused" if key == base else key.rsplit("/", 1)[1]
            tiles.append(_label(image, f"{what} - {caption.split(' · ')[1]}"))
        tiles.append(_label(cv2.imread(str(run.run_dir / "files" / cam_file)), "Grad-CAM (all detections)"))
        rows.append(np.hstack([cv2.copyMakeBorder(t, 2, 2, 2, 2, cv2.BORDER_CONSTANT, value=(255, 255, 255)) for t in tiles]))
    figure = np.vstack(rows)
    figure = cv2.resize(figure, None, fx=args.scale, fy=args.scale, interpolation=cv2.INTER_NEAREST)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(args.out), figure)
    print(f"wrote {args.out} ({figure.shape[1]} x {figure.shape[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
