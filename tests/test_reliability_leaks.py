"""No leaks over a long run: a hundred logging events of every detlens callback in one process.

A callback that leaves one hook, one figure or a few megabytes behind per event is
harmless in a 2-epoch test and fatal in a week-long cluster run. One fit with every
callback explaining at every optimiser step, logging to an offline W&B run, must leave:

* no hook on any module of the model (forward, forward-pre, backward);
* no open matplotlib figure;
* a process resident set that stops growing: after a warm-up of ``WARMUP`` events
  (allocator pools, lazily imported modules, W&B's queues), the growth over the
  remaining events stays under ``RSS_BOUND_MB``. Measured on the development machine:
  see the figure this test prints with ``-s``.
"""

from __future__ import annotations

import gc
import os
import warnings

import matplotlib.pyplot as plt
import pytest
import pytorch_lightning as pl
import wandb
from pytorch_lightning.loggers import WandbLogger
from reliability_utils import every_callback, faster_rcnn, hooks_on, quiet_trainer, scenes

pytestmark = pytest.mark.usefixtures("one_thread")

EVENTS = 100
WARMUP = 20
RSS_BOUND_MB = 64.0
"""Largest allowed RSS growth between event ``WARMUP`` and event ``EVENTS`` (MiB)."""


def rss_mb() -> float:
    """Resident set size of this process now (Linux ``/proc``; ``ru_maxrss`` is a peak, not a level)."""
    with open(f"/proc/{os.getpid()}/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class RssProbe(pl.Callback):
    """Samples the RSS after each training batch (runs after the detlens callbacks of that step)."""

    def __init__(self) -> None:
        self.samples: dict[int, float] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, *args, **kwargs) -> None:
        if trainer.global_step in (WARMUP, EVENTS):
            gc.collect()
            self.samples[trainer.global_step] = rss_mb()


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads the RSS from Linux /proc")
def test_a_hundred_logging_events_leave_no_hooks_no_figures_and_bounded_memory(tmp_path):
    dm = scenes(str(tmp_path / "synthetic"), num_train=4, num_val=2, batch_size=1)
    model = faster_rcnn(dm)
    callbacks = every_callback(every_n_steps=1, num_probe_images=1)  # t-SNE falls back to PCA on few points
    rss = RssProbe()
    logger = WandbLogger(project="detlens-tests", save_dir=str(tmp_path), offline=True)
    trainer = quiet_trainer(
        max_steps=EVENTS, max_epochs=-1, limit_val_batches=0, callbacks=[*callbacks, rss], logger=logger
    )
    figures_before = set(plt.get_fignums())
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(model, dm)
    finally:
        wandb.finish()

    # Every event explained and logged; the collapse detector may well fire on this tiny,
    # barely trained attention block (that warning is the detector doing its job).
    failures = [str(w.message) for w in caught if "[detlens]" in str(w.message) and "collapse" not in str(w.message)]
    assert not failures, failures[:3]
    assert all(cb.num_logging_events == EVENTS for cb in callbacks), {type(cb).__name__: cb.num_logging_events for cb in callbacks}
    assert hooks_on(model) == {}, "hooks left on the model after 100 events"
    assert set(plt.get_fignums()) == figures_before, "matplotlib figures left open"
    growth = rss.samples[EVENTS] - rss.samples[WARMUP]
    print(f"\nRSS after event {WARMUP}: {rss.samples[WARMUP]:.0f} MiB, after event {EVENTS}: "
          f"{rss.samples[EVENTS]:.0f} MiB, growth {growth:+.1f} MiB over {EVENTS - WARMUP} events")
    assert growth < RSS_BOUND_MB, f"RSS grew {growth:.1f} MiB over {EVENTS - WARMUP} logging events (bound {RSS_BOUND_MB} MiB)"
