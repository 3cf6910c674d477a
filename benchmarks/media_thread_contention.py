"""How much detlens' media worker (a thread, or its media process) slows the training steps next to it.

The media thread (``detlens.sinks.fanout``) builds W&B media while training goes on:
matplotlib figures, overlays, ``wandb.Image`` PNGs. Much of that is Python holding the
GIL, and a training step is hundreds of short C++ ops, each of which has to take the GIL
back when it returns; while another thread holds it, the training thread waits up to the
interpreter's switch interval (5 ms) at every op boundary. On a CPU-only machine the
media thread also takes cores from training's OpenMP threads, and one late thread holds
up its whole parallel region.

This times training steps of the demo model (``configs/fasterrcnn_synthetic.yaml``, one
batch, AdamW) alone, then while a thread runs a logging event's media work in a loop
(detlens' own renderers: a t-SNE scatter plot of 150 detections, an attention-entropy
heatmap, and ``wandb.Image`` payloads for 27 attention overlays of 160 px) at each
``--niceness`` value, through the library's own ``MEDIA_THREAD_NICENESS`` code path.
``--worker process`` runs the same work in detlens' media process
(``detlens.sinks.media_process``), which has its own GIL, at the same niceness values.
Steps alone and steps with the media worker alternate in blocks (median per condition),
so a machine whose speed drifts affects every condition alike. It is the worst case: in
a fit the media thread is busy for seconds after each logging event, idle otherwise
(``benchmarks/callback_overhead.py`` measures the fit).

Run: ``.venv/bin/python benchmarks/media_thread_contention.py [--steps 8 --niceness 0 10 19 --worker thread process]``
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]


def media_event(rng: np.random.Generator) -> None:
    """One logging event's media work, as the media thread does it."""
    from detlens.render.attention import entropy_heatmap
    from detlens.render.scatter import render_scatter
    from detlens.sinks.wandb_payload import remove_files, wandb_payload
    from detlens.render.media import MediaImage

    labels = rng.integers(1, 5, size=150)
    render_scatter(rng.normal(size=(150, 2)) * 10, labels, outcomes=["tp"] * 120 + ["fp"] * 30, method="tsne",
                   class_names={1: "square", 2: "circle", 3: "triangle", 4: "cross"})
    entropy_heatmap({"backbone.body.layer3_attention": rng.random(2)}, title="step 0")
    overlays = [MediaImage(pixels=rng.integers(0, 255, size=(160, 160, 3), dtype=np.uint8), caption=f"point {i}")
                for i in range(27)]
    files: list[str] = []
    wandb_payload({"attention_maps/probe": overlays}, None, None, files)
    remove_files(files)


def media_job(seed: int) -> None:
    """:func:`media_event` as a job of detlens' media process (module level: it pickles by reference)."""
    media_event(np.random.default_rng(seed))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "fasterrcnn_synthetic.yaml"))
    parser.add_argument("--steps", type=int, default=8, help="training steps per block")
    parser.add_argument("--blocks", type=int, default=2, help="blocks per condition, interleaved")
    parser.add_argument("--niceness", type=int, nargs="+", default=[0, 10, 19],
                        help="MEDIA_THREAD_NICENESS values to compare (the library's default is 10)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for training")
    parser.add_argument("--worker", nargs="+", choices=("thread", "process"), default=["thread", "process"],
                        help="where the media work runs: a thread of this process, or detlens' media process")
    args = parser.parse_args()

    from detlens.data import SyntheticDataModule
    from detlens.lightning_modules import TorchvisionDetector
    from detlens.sinks import fanout
    from detlens.sinks.media_process import MediaProcess

    torch.set_num_threads(args.threads)
    config = yaml.safe_load(Path(args.config).read_text())
    data_args = dict(config["data"]["init_args"])
    if not Path(data_args.get("root", ".")).is_absolute():
        data_args["root"] = str(REPO / data_args["root"])
    dm = SyntheticDataModule(**data_args)
    dm.prepare_data()
    dm.setup("fit")
    model = TorchvisionDetector(**{**config["model"]["init_args"], "num_classes": dm.num_classes,
                                   "class_names": dm.class_names})
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = [dm.train_dataset[i] for i in range(data_args.get("batch_size", 8))]
    images, targets = [b[0] for b in batch], [b[1] for b in batch]

    def step() -> float:
        start = time.perf_counter()
        loss = sum(model.model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    rng = np.random.default_rng(0)
    media_event(rng)  # imports and font caches, outside the timing
    start = time.perf_counter()
    for _ in range(3):
        media_event(rng)
    event_s = (time.perf_counter() - start) / 3
    for _ in range(2):
        step()

    def steps_while_busy(first: Callable[[], None], again: Callable[[], None]) -> list[float]:
        """Training steps while a thread runs ``first()`` once, then ``again()`` until the steps are done."""
        stop = threading.Event()

        def busy() -> None:
            first()
            while not stop.is_set():
                again()

        thread = threading.Thread(target=busy, name="detlens-media-bench")
        thread.start()
        time.sleep(0.2)
        try:
            return [step() for _ in range(args.steps)]
        finally:
            stop.set()
            thread.join()

    def with_media_thread(niceness: int) -> list[float]:
        def lower_priority() -> None:  # what the media thread does first
            fanout.MEDIA_THREAD_NICENESS = niceness
            fanout._set_up_media_thread()

        local = np.random.default_rng(1)
        return steps_while_busy(lower_priority, lambda: media_event(local))

    # This file runs as __main__, which the media process cannot import: refer to the job by module name.
    job = importlib.import_module("media_thread_contention").media_job

    def with_media_process(niceness: int) -> list[float]:
        worker = MediaProcess(niceness=niceness)
        worker.submit(job, 0).result()  # started, imports done, outside the timing
        seeds = itertools.count(1)
        try:  # keeps the process busy, one event after another
            return steps_while_busy(lambda: None, lambda: worker.submit(job, next(seeds)).result())
        finally:
            worker.close()

    conditions = ["alone"] + [f"{w} nice {n}" for w in args.worker for n in args.niceness]
    times: dict[str, list[float]] = {c: [] for c in conditions}
    for block in range(args.blocks):
        for condition in conditions if block % 2 == 0 else reversed(conditions):
            if condition == "alone":
                times[condition] += [step() for _ in range(args.steps)]
            elif condition.startswith("thread"):
                times[condition] += with_media_thread(int(condition.split()[-1]))
            else:
                times[condition] += with_media_process(int(condition.split()[-1]))

    print(f"demo model ({config['model']['init_args']['architecture']}), batch {len(images)}, "
          f"{args.threads} torch threads; one logging event's media work alone: {1e3 * event_s:.0f} ms")
    alone = statistics.median(times["alone"])
    for condition in conditions:
        median = statistics.median(times[condition])
        change = "" if condition == "alone" else f"  ({100 * (median / alone - 1):+.0f}%)"
        label = "training step alone" if condition == "alone" else f"with the media {condition.split()[0]} busy, {condition.split(' ', 1)[1]}"
        print(f"{label:<42s} {1e3 * median:7.0f} ms (median of {len(times[condition])}){change}")


if __name__ == "__main__":
    main()
