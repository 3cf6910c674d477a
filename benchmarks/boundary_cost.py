"""Cost of the decision-boundary attack: batched vs one attack per detection, and BoundaryCallback's share of a fit.

1. Time per detection for K = 1, 10, 50 detections of one image, attacked together
   (:func:`detlens.explainers.boundary.boundary`, the default) against the reference loop
   that attacks one detection at a time (``batched=False``), in the same process, same
   model, same attack (``steps`` gradient steps, L2). The model is the demo's detector
   (Faster R-CNN ResNet-18 FPN, 160 px), untrained, so that K detections are there to
   attack whatever K is (the score threshold is set just under the K-th score). The
   budget (``epsilon``) is so small that nothing is lost, so every detection takes all
   ``steps``: the cost of a full attack, without the verification forwards of losses.
2. BoundaryCallback's share of a demo fit's wall time: one epoch of the demo config
   (``configs/fasterrcnn_synthetic.yaml``, its other detlens callbacks removed) with
   ``BoundaryCallback`` logging once at the epoch's end (defaults otherwise); the time in
   the callback's hooks is measured, and its share at the default cadence (every 5
   epochs) is ``event / (5 * epoch + event)``.

    python benchmarks/boundary_cost.py            # K = 1, 10, 50, 20 steps; one demo epoch (minutes)
    python benchmarks/boundary_cost.py --quick    # K = 1, 10, 3 steps, a 64 px model, a tiny fit (smoke run)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from detlens.adapters import adapter_for
from detlens.explainers.boundary import boundary
from detlens.lightning_modules import TorchvisionDetector


def detector(size: int, num_classes: int = 4) -> TorchvisionDetector:
    torch.manual_seed(0)
    return TorchvisionDetector(
        "fasterrcnn_resnet18_fpn", num_classes=num_classes, min_size=size, max_size=size, fpn_channels=64 if size > 64 else 16,
        representation_size=256 if size > 64 else 32, rpn_proposals_test=300 if size > 64 else 100,
        anchor_sizes=[8, 16, 32, 64, 128], score_thresh=0.0, attention_stage="layer3" if size > 64 else None,
    ).eval()


def per_detection_times(size: int, ks: list[int], steps: int, repeats: int) -> None:
    model = detector(size)
    adapter = adapter_for(model)
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, size, size, generator=g)
    everything = adapter.run([image], with_grad=False).detections[0]
    print(f"image {size} px, {len(everything)} candidate detections, {steps} L2 steps, budget too small to lose any "
          f"(every detection takes the full attack), best of {repeats}")
    print(f"{'K':>4s} {'batched s/det':>14s} {'loop s/det':>11s} {'loop / batched':>15s}")
    for k in ks:
        if k > len(everything):
            print(f"{k:>4d}  (only {len(everything)} detections)")
            continue
        threshold = float(everything.scores[k - 1]) * 0.999
        found = everything.select(torch.arange(k))
        times = {}
        for batched in (True, False):
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                res = boundary(adapter, [image], [found], norm="l2", epsilon=1e-6, step_size=1e-7, steps=steps,
                               score_threshold=threshold, batched=batched)[0]
                best = min(best, time.perf_counter() - start)
            assert not bool(res.lost.any()), "the budget must be too small to lose anything"
            times[batched] = best / k
        print(f"{k:>4d} {times[True]:>14.4f} {times[False]:>11.4f} {times[False] / times[True]:>14.2f}x", flush=True)


class _Timed:
    """Wraps a callback's ``_run`` (its whole logging event) to time it."""

    def __init__(self, callback) -> None:  # type: ignore[no-untyped-def]
        self.seconds: list[float] = []
        original = callback._run

        def run(*args, **kwargs):  # type: ignore[no-untyped-def]
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds.append(time.perf_counter() - start)

        callback._run = run


def callback_share(quick: bool) -> None:
    import pytorch_lightning as pl

    from detlens.callbacks import BoundaryCallback

    warnings.filterwarnings("ignore")
    callback = BoundaryCallback(every_n_epochs=1)
    timer = _Timed(callback)
    with tempfile.TemporaryDirectory() as tmp:
        if quick:
            from detlens.data import SyntheticDataModule

            dm = SyntheticDataModule(root=str(Path(tmp) / "scenes"), num_train=16, num_val=4, image_size=64, batch_size=4)
            model = TorchvisionDetector(
                "fasterrcnn_resnet18_fpn", num_classes=dm.num_classes, class_names=dm.class_names, min_size=64,
                max_size=64, fpn_channels=16, representation_size=32, rpn_proposals_train=50, rpn_proposals_test=20,
                box_batch_size_per_image=16, anchor_sizes=[8, 16, 32, 64, 128], score_thresh=0.0, warmup_steps=1,
            )
            callback = BoundaryCallback(every_n_epochs=1, score_threshold=0.05, num_probe_images=4)
            timer = _Timed(callback)
            trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                                 enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                                 callbacks=[callback])
            what = "tiny fit (16 images of 64 px, score_threshold 0.05: the untrained model scores low)"
        else:
            from detlens.cli import build_cli

            cli = build_cli(["--config", "configs/fasterrcnn_synthetic.yaml", "--trainer.max_epochs=1",
                             f"--trainer.default_root_dir={tmp}", "--trainer.logger=false",
                             "--trainer.enable_checkpointing=false", "--data.init_args.root=data/synthetic"], run=False)
            trainer, model, dm = cli.trainer, cli.model, cli.datamodule
            trainer.callbacks[:] = [c for c in trainer.callbacks if not type(c).__module__.startswith(("detlens.", "pytorch_lightning.callbacks.lr_monitor"))]
            trainer.callbacks.append(callback)  # no logger here: the LR monitor, which needs one, goes too
            what = "one epoch of the demo config (its other detlens callbacks removed)"
        pl.seed_everything(0)
        start = time.perf_counter()
        trainer.fit(model, dm)
        wall = time.perf_counter() - start
    event = sum(timer.seconds)
    epoch = wall - event
    print(f"\n{what}: wall {wall:.1f} s, {len(timer.seconds)} BoundaryCallback event(s) {event:.2f} s")
    if timer.seconds:
        per_event = event / len(timer.seconds)
        print(f"share of the fit at every_n_epochs=1: {100 * per_event / (epoch + per_event):.2f}%")
        print(f"share at the default cadence (every 5 epochs): {100 * per_event / (5 * epoch + per_event):.2f}%")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: K = 1, 10, 3 steps, 64 px, a tiny fit")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-fit", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.quick:
        per_detection_times(64, [1, 10], steps=3, repeats=1)
    else:
        per_detection_times(160, [1, 10, 50], steps=20, repeats=args.repeats)
    if not args.skip_fit:
        callback_share(args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
