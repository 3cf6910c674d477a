"""Does a trained detector rely on the spurious-cue marks? Its accuracy with and without them.

The ground truth behind ``spurious_cue_demo.sh``: a model that took the shortcut loses
accuracy when the marks are taken away. For each run's last checkpoint this validates on
the same validation objects twice — every object marked, and no object marked (the
synthetic generator draws objects and marks from separate streams, so the two sets differ
only by the marks) — and prints val mAP@0.5 for both and the difference.

    .venv/bin/python scripts/cue_reliance.py --placement beside clean=runs/x/clean cue=runs/x/cue

Each ``NAME=DIR`` is a run's ``default_root_dir``; its newest ``*.ckpt`` below it is used.
The scenes use the demo config's sizes (``--image-size``, ``--num-val``, ``--seed``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

import pytorch_lightning as pl

from detlens.data import SyntheticDataModule
from detlens.lightning_modules import TorchvisionDetector


def newest_checkpoint(folder: Path) -> Path:
    found = sorted(folder.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"no *.ckpt under {folder}")
    return found[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="NAME=DIR (a run's default_root_dir)")
    parser.add_argument("--placement", choices=("anywhere", "beside", "ring"), default="beside")
    parser.add_argument("--object-colours", choices=("class", "random"), default="class")
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--num-val", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default="data", help="folder for the two validation sets")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)

    def val_set(marks: float) -> SyntheticDataModule:
        root = Path(args.data) / f"cue_reliance_{args.object_colours}_{args.placement}_marks{marks:g}"
        return SyntheticDataModule(
            root=str(root), num_train=0, num_val=args.num_val, image_size=args.image_size, seed=args.seed,
            spurious_cue=0.0, spurious_cue_val=marks, object_colours=args.object_colours,
            cue_placement=args.placement, batch_size=8,
        )

    sets = {"marked": val_set(1.0), "unmarked": val_set(0.0)}
    print(f"{'run':<14s} {'mAP@0.5 marked':>15s} {'unmarked':>9s} {'marks add':>10s}")
    for spec in args.runs:
        name, _, folder = spec.partition("=")
        if not folder:
            raise SystemExit(f"expected NAME=DIR, got {spec!r}")
        model = TorchvisionDetector.load_from_checkpoint(newest_checkpoint(Path(folder)), map_location="cpu")
        scores = {}
        for key, datamodule in sets.items():
            trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
            scores[key] = float(trainer.validate(model, datamodule, verbose=False)[0]["val/mAP_50"])
        print(f"{name:<14s} {scores['marked']:>15.3f} {scores['unmarked']:>9.3f} {scores['marked'] - scores['unmarked']:>+10.3f}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
