"""Training is untouched (docs/DESIGN.md rule 1), for every detlens callback at once.

A fit with every callback on at its most frequent cadence (every optimiser step, plus the
attention-entropy reading of every training forward) and a fit with none, same seed,
``torch.use_deterministic_algorithms(True)``, must end bit-identical in:

* the weights and buffers (BatchNorm statistics included),
* the optimiser state (momentum buffers) and the learning-rate scheduler's state,
* the global random streams (torch CPU, numpy, Python ``random``), which dropout, the
  sampler's shuffling and user code draw from.

On a Faster R-CNN with a spatial attention block, one with a block on every FPN level
(learnable temperatures), and on a DETR with dropout on, with and without gradient
accumulation, in one process and under 2-process CPU DDP.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import wandb
from pytorch_lightning.loggers import WandbLogger
from reliability_utils import (
    differing_leaves,
    every_callback,
    faster_rcnn,
    faster_rcnn_fpn_attention,
    hf_detector,
    quiet_trainer,
    rng_state,
    same_rng_state,
    scenes,
    tiny_detr,
)

from wandb_offline import find_offline_runs


@pytest.fixture(autouse=True)
def deterministic_one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(False)


def fit_and_snapshot(
    root: str, make_model: Any, callbacks: list[pl.Callback], accumulate: int, logger: Any = False,
    precision: str = "32-true",
) -> dict:
    """Seeds everything, fits 2 epochs (4 batches each), returns what training must not lose."""
    pl.seed_everything(0)
    torch.use_deterministic_algorithms(True)
    dm = scenes(root, batch_size=2)
    model = make_model(dm)
    trainer = quiet_trainer(
        max_epochs=2, deterministic=True, callbacks=callbacks, accumulate_grad_batches=accumulate,
        limit_val_batches=1, logger=logger, precision=precision,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, dm)
    return {
        "weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "optimizer": trainer.optimizers[0].state_dict(),
        "scheduler": [config.scheduler.state_dict() for config in trainer.lr_scheduler_configs],
        "rng": rng_state(),
        "global_step": trainer.global_step,
        "detlens_warnings": [str(w.message) for w in caught if "[detlens]" in str(w.message)],
    }


def assert_same_training(with_callbacks: dict, without: dict) -> None:
    """Weights and buffers, optimiser and scheduler state, global RNG streams: bit-identical."""
    differing = [k for k in without["weights"] if not torch.equal(with_callbacks["weights"][k], without["weights"][k])]
    assert not differing, f"weights/buffers differ: {differing[:5]}"
    assert not differing_leaves(with_callbacks["optimizer"], without["optimizer"]), "optimizer state differs"
    assert not differing_leaves(with_callbacks["scheduler"], without["scheduler"]), "LR scheduler state differs"
    assert not same_rng_state(with_callbacks["rng"], without["rng"]), "global RNG streams differ"


NEEDS_HF = pytest.mark.skipif(sys.version_info < (3, 11), reason="detlens[hf] (transformers 5) needs Python >= 3.11")
CASES = [
    pytest.param(faster_rcnn, 1, id="faster_rcnn+attention"),
    pytest.param(tiny_detr, 1, id="detr"),
    pytest.param(faster_rcnn, 2, id="faster_rcnn+attention-accumulate2"),
    pytest.param(faster_rcnn_fpn_attention, 1, id="faster_rcnn+fpn_attention+learnable_temperature"),
    pytest.param(tiny_detr, 2, id="detr-accumulate2"),
    pytest.param(hf_detector("detr"), 1, id="hf-detr", marks=NEEDS_HF),
    pytest.param(hf_detector("deformable_detr"), 1, id="hf-deformable-detr", marks=NEEDS_HF),
]


@pytest.mark.slow
@pytest.mark.parametrize(("make_model", "accumulate"), CASES)
def test_every_callback_at_every_step_leaves_weights_optimizer_and_rng_bit_identical(scenes_root, make_model, accumulate):
    callbacks = every_callback(every_n_steps=1)
    with_callbacks = fit_and_snapshot(scenes_root, make_model, callbacks, accumulate)
    without = fit_and_snapshot(scenes_root, make_model, [], accumulate)

    steps = 8 // accumulate  # 2 epochs x 4 batches
    assert with_callbacks["global_step"] == without["global_step"] == steps
    # Every callback really explained the probe set at every step, without a failure.
    assert [c.num_logging_events for c in callbacks] == [steps] * len(callbacks)
    assert with_callbacks["detlens_warnings"] == []
    assert callbacks[3]._last_train_step == steps - 1  # the entropy callback read a training forward every step

    assert_same_training(with_callbacks, without)


@pytest.mark.slow
@pytest.mark.parametrize("make_model", [faster_rcnn, tiny_detr], ids=["faster_rcnn+attention", "detr"])
def test_bf16_mixed_training_with_every_callback_at_every_step_is_bit_identical(scenes_root, make_model):
    """Under bf16 autocast the attention block's fused kernel and an explicit softmax round differently,
    so reading the block's weights on a training step must not change how its output is computed."""
    callbacks = every_callback(every_n_steps=1)
    with_callbacks = fit_and_snapshot(scenes_root, make_model, callbacks, 1, precision="bf16-mixed")
    without = fit_and_snapshot(scenes_root, make_model, [], 1, precision="bf16-mixed")

    assert [c.num_logging_events for c in callbacks] == [8] * len(callbacks)
    assert with_callbacks["detlens_warnings"] == []
    assert callbacks[3]._last_train_step == 7  # the entropy callback read a training forward every step
    assert_same_training(with_callbacks, without)


@pytest.mark.slow
def test_events_at_validation_that_read_its_forward_leave_training_bit_identical(scenes_root):
    """At the epoch cadence the overlay, embedding and Grad-CAM callbacks read the validation forward."""
    callbacks = every_callback(every_n_steps=None)  # every_n_epochs=1: events after each validation
    with_callbacks = fit_and_snapshot(scenes_root, faster_rcnn, callbacks, 1)
    without = fit_and_snapshot(scenes_root, faster_rcnn, [], 1)

    assert [c.num_logging_events for c in callbacks] == [2] * len(callbacks)
    assert with_callbacks["detlens_warnings"] == []
    assert_same_training(with_callbacks, without)


@pytest.mark.slow
def test_logging_to_wandb_leaves_training_bit_identical(scenes_root, tmp_path):
    """Rendering, t-SNE and ``wandb.Image`` run outside the explain guard (rank 0): they must not draw global RNG."""
    callbacks = every_callback(every_n_steps=1)
    try:
        with_callbacks = fit_and_snapshot(
            scenes_root, faster_rcnn, callbacks, 1, logger=WandbLogger(offline=True, save_dir=tmp_path / "with")
        )
    finally:
        wandb.finish()
    try:
        without = fit_and_snapshot(scenes_root, faster_rcnn, [], 1, logger=WandbLogger(offline=True, save_dir=tmp_path / "without"))
    finally:
        wandb.finish()

    assert with_callbacks["detlens_warnings"] == []
    assert len(find_offline_runs(tmp_path / "with")) == 1
    assert_same_training(with_callbacks, without)


DDP_SCRIPT = textwrap.dedent(
    """
    import random
    import sys

    import numpy as np
    import pytorch_lightning as pl
    import torch

    sys.path.insert(0, sys.argv[4])
    from reliability_utils import every_callback, faster_rcnn, quiet_trainer, scenes

    if __name__ == "__main__":
        torch.set_num_threads(1)
        root, out, with_callbacks = sys.argv[1], sys.argv[2], sys.argv[3] == "with"
        pl.seed_everything(0)
        dm = scenes(root, batch_size=2)
        model = faster_rcnn(dm)
        callbacks = every_callback(every_n_steps=1, num_probe_images=3) if with_callbacks else []
        trainer = quiet_trainer(
            devices=2, strategy="ddp", max_epochs=2, deterministic=True, callbacks=callbacks,
            accumulate_grad_batches=2, limit_val_batches=1,
        )
        trainer.fit(model, dm)
        py = random.getstate()
        npy = np.random.get_state()
        torch.save(
            {
                "weights": model.state_dict(),
                "optimizer": trainer.optimizers[0].state_dict(),
                "rng": {
                    "torch": torch.get_rng_state(),
                    "numpy": [npy[0], torch.from_numpy(npy[1].astype(np.int64)), npy[2], npy[3], npy[4]],
                    "python": [py[0], list(py[1]), py[2]],
                },
                "events": [c.num_logging_events for c in callbacks],
                "global_step": trainer.global_step,
            },
            f"{out}/rank{trainer.global_rank}.pt",
        )
    """
)


def run_ddp_fit(tmp_path, root: str, arm: str) -> list[dict]:
    out = tmp_path / arm
    out.mkdir()
    script = tmp_path / "fit_ddp_untouched.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    done = subprocess.run(
        [sys.executable, str(script), root, str(out), arm, os.path.dirname(__file__)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[detlens]" not in done.stderr, done.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.slow
@pytest.mark.ddp
def test_two_rank_ddp_with_every_callback_and_accumulation_is_bit_identical_on_every_rank(scenes_root, tmp_path):
    with_callbacks = run_ddp_fit(tmp_path, scenes_root, "with")
    without = run_ddp_fit(tmp_path, scenes_root, "without")

    # 8 images / 2 ranks / batch 2 = 2 batches per rank, accumulated into 1 step per epoch, 2 epochs.
    assert [r["global_step"] for r in with_callbacks + without] == [2] * 4
    assert with_callbacks[0]["events"] == with_callbacks[1]["events"] == [2] * 5
    for rank, (a, b) in enumerate(zip(with_callbacks, without)):
        differing = [k for k in b["weights"] if not torch.equal(a["weights"][k], b["weights"][k])]
        assert not differing, f"rank {rank}: weights/buffers differ: {differing[:5]}"
        assert not differing_leaves(a["optimizer"], b["optimizer"]), f"rank {rank}: optimizer state differs"
        assert torch.equal(a["rng"]["torch"], b["rng"]["torch"]), f"rank {rank}: torch RNG differs"
        assert not differing_leaves(a["rng"]["numpy"], b["rng"]["numpy"]), f"rank {rank}: numpy RNG differs"
        assert a["rng"]["python"] == b["rng"]["python"], f"rank {rank}: python RNG differs"
