"""AttentionMapCallback and AttentionEntropyCallback in real fits: what lands in W&B, and that training is untouched."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import wandb
from PIL import Image
from pytorch_lightning.loggers import WandbLogger
from wandb_utils import image_events, newest_offline_run

from detlens.callbacks.attention_entropy import AttentionEntropyCallback
from detlens.callbacks.attention_maps import AttentionMapCallback
from detlens.data import SyntheticDataModule
from detlens.lightning_modules import DETR, TorchvisionDetector

SIZE = 64


@pytest.fixture(scope="module")
def scenes_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes") / "synthetic"
    SyntheticDataModule(root=str(root), num_train=8, num_val=4, image_size=SIZE, batch_size=4)
    return str(root)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def scenes(root: str) -> SyntheticDataModule:
    """8 training images (2 steps per epoch at batch 4), 4 validation images."""
    return SyntheticDataModule(root=root, num_train=8, num_val=4, image_size=SIZE, batch_size=4, horizontal_flip=False)


def tiny_detr(dm: SyntheticDataModule, **overrides) -> DETR:
    kwargs = dict(
        num_classes=dm.num_classes, class_names=dm.class_names, backbone="resnet18", backbone_stage="layer3",
        hidden_dim=32, nheads=4, enc_layers=1, dec_layers=2, dim_feedforward=64, dropout=0.0, num_queries=8,
        image_size=SIZE, score_thresh=0.0, warmup_steps=1,
    )
    kwargs.update(overrides)
    return DETR(**kwargs)


def faster_rcnn(dm: SyntheticDataModule, attention_stage: str | None = "layer3") -> TorchvisionDetector:
    return TorchvisionDetector(
        "fasterrcnn_resnet18_fpn", num_classes=dm.num_classes, class_names=dm.class_names, min_size=SIZE,
        max_size=SIZE, fpn_channels=16, representation_size=32, rpn_proposals_train=50, rpn_proposals_test=20,
        box_batch_size_per_image=16, anchor_sizes=[8, 16, 32, 64, 128], score_thresh=0.0, warmup_steps=1,
        attention_stage=attention_stage, attention_heads=2,
    )


def trainer(**overrides) -> pl.Trainer:
    kwargs = dict(
        accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, log_every_n_steps=1, num_sanity_val_steps=1,
    )
    kwargs.update(overrides)
    return pl.Trainer(**kwargs)


def steps_of(run, key: str) -> list[int]:
    """``trainer/global_step`` of every history row holding ``key``."""
    return [row["trainer/global_step"] for row in run.history if key in row]


def no_hooks_left(model: torch.nn.Module) -> bool:
    return all(
        not m._forward_hooks and not m._forward_pre_hooks and not getattr(m, "detlens_attention_probe", False)
        and getattr(m, "last_attention", None) is None
        for m in model.modules()
    )


def test_detr_fit_logs_attention_overlays_and_entropy_curves_under_stable_keys(scenes_root, tmp_path, finish_wandb):
    dm = scenes(scenes_root)
    maps = AttentionMapCallback(layers=[0, -1], heads="all", top_k=2, num_probe_images=2)
    entropy = AttentionEntropyCallback(every_n_train_steps=1, num_probe_images=2)
    model = tiny_detr(dm)
    pl.seed_everything(0)
    trainer(logger=WandbLogger(offline=True, save_dir=tmp_path), callbacks=[maps, entropy]).fit(model, dm)
    wandb.finish()
    run = newest_offline_run(tmp_path)

    # Overlays: one panel per map kind (and per head), after each epoch's validation.
    map_keys = {k for row in run.history for k in row if k.startswith("attention_maps/")}
    kinds = ["decoder/layer0", "decoder/layer1", "encoder/layer0"]
    assert map_keys == {"attention_maps/rollout"} | {
        f"attention_maps/{kind}{head}" for kind in kinds for head in ["", "/head0", "/head1", "/head2", "/head3"]
    }
    for key in map_keys:
        events = image_events(run, key)
        assert [e.global_step for e in events] == [2, 4]
        for event in events:
            # 2 probe images x top 2 detections, image by image, in score order.
            assert [c.split(" (id")[0] for c in event.captions] == [f"img {i}" for i in maps.probe_indices for _ in "ab"]
            assert (event.width, event.height) == (SIZE, SIZE)
            assert all(c.endswith(f"· step {event.global_step}") for c in event.captions)
            assert [c.split(" · ")[1].split()[:2] for c in event.captions] == [["det", "0"], ["det", "1"]] * 2
            assert all(f.is_file() for f in event.image_files(run))
    overlay = Image.open(image_events(run, "attention_maps/decoder/layer1")[-1].image_files(run)[0])
    assert overlay.size == (SIZE, SIZE)

    # Training entropy: every step, every layer and head, under attention/entropy/<layer>/head<i>.
    layers = ["encoder.layers.0.self_attn"] + [
        f"decoder.layers.{i}.{kind}" for i in range(2) for kind in ("self_attn", "multihead_attn")
    ]
    assert entropy.watched_layers == ["encoder.layers.0.self_attn", "decoder.layers.0.self_attn",
                                      "decoder.layers.0.multihead_attn", "decoder.layers.1.self_attn",
                                      "decoder.layers.1.multihead_attn"]
    for layer in layers:
        for head in range(4):
            key = f"attention/entropy/{layer}/head{head}"
            assert steps_of(run, key) == [0, 1, 2, 3], key
            assert all(0.0 < v <= 1.0 for _, v in run.history_of(key))
            assert steps_of(run, f"attention/entropy_probe/{layer}/head{head}") == [2, 4]
    assert steps_of(run, "attention/collapse") == [0, 1, 2, 3]
    assert [v for _, v in run.history_of("attention/collapse")] == [0.0] * 4
    heatmaps = image_events(run, "attention/entropy_heatmap")
    assert [e.global_step for e in heatmaps] == [2, 4]
    assert heatmaps[0].captions == ["probe set, 2 images · step 2"]
    assert no_hooks_left(model)


def test_faster_rcnn_attention_block_is_mapped_from_a_point_grid_and_its_entropy_logged(
    scenes_root, tmp_path, finish_wandb
):
    dm = scenes(scenes_root)
    maps = AttentionMapCallback(reference_points="grid", grid_size=2, heads="all", num_probe_images=2)
    entropy = AttentionEntropyCallback(every_n_train_steps=1, num_probe_images=2)
    model = faster_rcnn(dm)
    pl.seed_everything(0)
    trainer(max_epochs=1, logger=WandbLogger(offline=True, save_dir=tmp_path), callbacks=[maps, entropy]).fit(model, dm)
    wandb.finish()
    run = newest_offline_run(tmp_path)

    block = "backbone.body.layer3_attention"
    mosaic = 2 * SIZE + 2  # 2 x 2 panels, 2 white pixels between them
    for key in [f"attention_maps/spatial/{block}", f"attention_maps/spatial/{block}/head0",
                f"attention_maps/spatial/{block}/head1"]:
        (event,) = image_events(run, key)  # one mosaic per probe image: its 4 grid points' maps
        assert event.global_step == 2 and (event.width, event.height) == (mosaic, mosaic)
        assert [c.split(" (id")[0] for c in event.captions] == [f"img {i}" for i in maps.probe_indices]
        assert [c.split(" · ")[1] for c in event.captions] == ["from 2x2 reference points (marked), row by row"] * 2
        for file in event.image_files(run):
            pixels = torch.from_numpy(np.asarray(Image.open(file).convert("RGB")))
            assert pixels.shape == (mosaic, mosaic, 3)
            assert file.suffix == ".jpg"  # an overlay on a photograph: JPEG, so the white gaps are near-white
            for gap in (pixels[SIZE : SIZE + 2], pixels[:, SIZE : SIZE + 2]):  # the white gaps between panels
                assert gap.float().mean() > 245, gap.float().mean()
            panels = [pixels[r : r + SIZE, c : c + SIZE].float() for r in (0, SIZE + 2) for c in (0, SIZE + 2)]
            assert all(p.std() > 0 for p in panels)  # each panel is an overlay, not blank
    assert entropy.watched_layers == [block]
    for head in range(2):
        assert steps_of(run, f"attention/entropy/{block}/head{head}") == [0, 1]
        assert steps_of(run, f"attention/entropy_probe/{block}/head{head}") == [2]
    assert no_hooks_left(model)


def fit_weights(dm: SyntheticDataModule, make_model, callbacks: list[pl.Callback]) -> dict[str, torch.Tensor]:
    pl.seed_everything(0)
    model = make_model(dm)
    trainer(max_epochs=2, deterministic=True, callbacks=callbacks, limit_val_batches=0).fit(model, dm)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("make_model", [lambda dm: tiny_detr(dm, dropout=0.1), faster_rcnn], ids=["detr", "faster_rcnn"])
def test_watching_attention_every_step_leaves_training_bit_identical(scenes_root, make_model):
    entropy = AttentionEntropyCallback(every_n_train_steps=1, every_n_epochs=None, every_n_steps=1, num_probe_images=2)
    maps = AttentionMapCallback(every_n_epochs=None, every_n_steps=1, num_probe_images=2)
    watched = fit_weights(scenes(scenes_root), make_model, [entropy, maps])
    plain = fit_weights(scenes(scenes_root), make_model, [])

    assert entropy.num_logging_events == 4 and maps.num_logging_events == 4  # after steps 1, 2, 3, 4
    assert watched.keys() == plain.keys()
    differing = [k for k in plain if not torch.equal(watched[k], plain[k])]
    assert not differing, f"weights/buffers differ: {differing[:5]}"


class SharpenEncoderAttention(pl.Callback):
    """Scales the encoder's query projection at one step, so its attention turns nearly one-hot."""

    def __init__(self, at_step: int, factor: float = 100.0) -> None:
        self.at_step, self.factor = at_step, factor

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at_step:
            attn = pl_module.model.encoder.layers[0].self_attn
            with torch.no_grad():
                attn.in_proj_weight[: attn.embed_dim] *= self.factor


def test_a_collapsing_head_is_flagged_warned_and_logged_and_the_watch_survives_a_resume(
    scenes_root, tmp_path, finish_wandb
):
    dm = scenes(scenes_root)
    entropy = AttentionEntropyCallback(every_n_train_steps=1, drop_fraction=0.3, window=3, min_history=2,
                                       num_probe_images=1)
    # The sharpening callback runs first, so step 3's forward already sees the sharp attention.
    fit = trainer(logger=WandbLogger(offline=True, save_dir=tmp_path), limit_val_batches=1,
                  callbacks=[SharpenEncoderAttention(at_step=3), entropy])
    with pytest.warns(UserWarning, match=r"attention entropy collapse at step 3: encoder\.layers\.0\.self_attn/head"):
        fit.fit(tiny_detr(dm), dm)
    wandb.finish()
    run = newest_offline_run(tmp_path)

    assert [v for _, v in run.history_of("attention/collapse")] == [0.0, 0.0, 0.0, 1.0]
    assert run.history_of("attention/collapsed_heads")[-1][1] >= 1
    events = entropy.state_dict()["collapse"]["events"]
    assert events and all(e["step"] == 3 and e["key"].startswith("encoder.layers.0.self_attn/") for e in events)

    resumed = AttentionEntropyCallback(every_n_train_steps=1, drop_fraction=0.3, window=3, min_history=2)
    resumed.load_state_dict(entropy.state_dict())
    assert resumed.collapse.flagged == entropy.collapse.flagged and resumed.collapse.events == events
    assert resumed.state_dict()["last_train_step"] == 3


def test_hooks_are_removed_when_training_crashes_while_armed(scenes_root):
    dm = scenes(scenes_root)
    model = tiny_detr(dm)

    def crash(*args):
        raise RuntimeError("boom")

    class ArmedThenCrash(pl.Callback):  # runs after the entropy callback armed: crash inside the armed forward
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 1:
                pl_module.model.decoder.register_forward_hook(crash)

    fit = trainer(max_epochs=1, limit_val_batches=0,
                  callbacks=[AttentionEntropyCallback(every_n_train_steps=1, num_probe_images=1), ArmedThenCrash()])
    with pytest.raises(RuntimeError, match="boom"):
        fit.fit(model, dm)
    model.model.decoder._forward_hooks.clear()  # the test's own crashing hook
    assert no_hooks_left(model)


@pytest.mark.parametrize("callback", [AttentionMapCallback, AttentionEntropyCallback])
def test_a_model_without_attention_is_refused_at_setup_by_name(scenes_root, callback):
    dm = scenes(scenes_root)
    with pytest.raises(ValueError, match=(
        rf"{callback.__name__}: TorchvisionDetector \(network FasterRCNN\) has no attention module detlens can read\. "
        r"It looks for nn\.MultiheadAttention .*\(detlens_attention_probe / last_attention"
    )):
        trainer(callbacks=[callback()]).fit(faster_rcnn(dm, attention_stage=None), dm)


def test_misconfigurations_are_explained_before_training(scenes_root):
    with pytest.raises(ValueError, match="heads must be 'mean' or 'all'"):
        AttentionMapCallback(heads="max")
    with pytest.raises(ValueError, match="top_k must be a positive int"):
        AttentionMapCallback(top_k=0)
    with pytest.raises(ValueError, match="maps must be a non-empty list of"):
        AttentionMapCallback(maps=["cross"])
    with pytest.raises(ValueError, match="every_n_train_steps must be a positive int or None"):
        AttentionEntropyCallback(every_n_train_steps=0)
    with pytest.raises(ValueError, match=r"AttentionEntropyCallback: drop_fraction must be in \(0, 1\)"):
        AttentionEntropyCallback(drop_fraction=1.5)

    dm = scenes(scenes_root)
    with pytest.raises(ValueError, match=r"decoder layer 5 is out of range: the model has 2 \(valid -2\.\.1\)"):
        trainer(callbacks=[AttentionMapCallback(layers=[5])]).fit(tiny_detr(dm), dm)
    with pytest.raises(ValueError, match=r"DETR has no attention for maps \['spatial'\]"):
        trainer(callbacks=[AttentionMapCallback(maps=["spatial"])]).fit(tiny_detr(dm), dm)
    with pytest.raises(ValueError, match=r"module 'encoder\.layers\.7' not found .* Did you mean"):
        trainer(callbacks=[AttentionEntropyCallback(modules=["encoder.layers.7"])]).fit(tiny_detr(dm), dm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        only_decoder = AttentionEntropyCallback(modules=["decoder.layers.1"], every_n_train_steps=1, every_n_epochs=None,
                                                every_n_steps=100)
        trainer(max_epochs=1, limit_val_batches=0, callbacks=[only_decoder]).fit(tiny_detr(dm), dm)
    assert only_decoder.watched_layers == ["decoder.layers.1.self_attn", "decoder.layers.1.multihead_attn"]
