"""Attention blocks on every FPN level and learnable temperatures: built, read by every attention callback."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
import wandb
from pytorch_lightning.loggers import WandbLogger
from wandb_utils import image_events, newest_offline_run

from detlens.callbacks.attention_entropy import AttentionEntropyCallback
from detlens.callbacks.attention_maps import AttentionMapCallback
from detlens.data import SyntheticDataModule
from detlens.focus.compare import compare_records
from detlens.focus.record import read_focus_record
from detlens.lightning_modules import TorchvisionDetector
from detlens.lightning_modules.attention import SpatialSelfAttention

SIZE = 64
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def scenes_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes") / "synthetic"
    SyntheticDataModule(root=str(root), num_train=8, num_val=4, image_size=SIZE, batch_size=4)
    return str(root)


def scenes(root: str) -> SyntheticDataModule:
    """8 training images (2 steps per epoch at batch 4), 4 validation images."""
    return SyntheticDataModule(root=root, num_train=8, num_val=4, image_size=SIZE, batch_size=4, horizontal_flip=False)


def detector(architecture: str = "fasterrcnn_resnet18_fpn", num_classes: int = 3, **overrides) -> TorchvisionDetector:
    kwargs = dict(
        num_classes=num_classes, min_size=SIZE, max_size=SIZE, fpn_channels=16, representation_size=32,
        rpn_proposals_train=50, rpn_proposals_test=20, box_batch_size_per_image=16, score_thresh=0.0,
        warmup_steps=1, attention_heads=2, anchor_sizes=[8, 16, 32, 64, 128],
    )
    kwargs.update(overrides)
    return TorchvisionDetector(architecture, **kwargs)


def blocks_of(model: TorchvisionDetector) -> dict[str, SpatialSelfAttention]:
    return {n: m for n, m in model.model.named_modules() if isinstance(m, SpatialSelfAttention)}


@pytest.mark.parametrize("architecture", ["fasterrcnn_resnet18_fpn", "fcos_resnet18_fpn"])
def test_blocks_on_every_fpn_level_are_identities_at_init(architecture):
    torch.manual_seed(0)
    width = {"fpn_channels": 32} if architecture.startswith("fcos") else {}  # FCOS heads: GroupNorm(32, C)
    plain = detector(architecture, **width)
    attended = detector(architecture, attention_fpn_levels="all", attention_temperature="learnable", **width)
    levels = list(plain.model.backbone(torch.zeros(1, 3, SIZE, SIZE)))
    blocks = blocks_of(attended)
    assert list(blocks) == [f"backbone.fpn_attention.{level}" for level in levels]  # every level, finest first
    assert all(b.detlens_feature_level == level and b.learnable_temperature and float(b.temperature) == 1.0
               for b, level in zip(blocks.values(), levels))
    # The same weights everywhere else: only the blocks' own parameters are missing from plain's state_dict.
    result = attended.load_state_dict(plain.state_dict(), strict=False)
    assert not result.unexpected_keys and all(".fpn_attention." in k for k in result.missing_keys)

    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, SIZE, SIZE, generator=g) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([1])} for _ in images]
    plain.eval(), attended.eval()
    with torch.no_grad():
        a, b = plain(images), attended(images)
    for da, db in zip(a, b):
        assert da.keys() == db.keys() and all(torch.equal(da[k], db[k]) for k in da)
    plain.model.train(), attended.model.train()
    torch.manual_seed(2)
    losses_a = plain.model(images, targets)
    torch.manual_seed(2)
    losses_b = attended.model(images, targets)
    assert all(torch.equal(losses_a[k], losses_b[k]) for k in losses_a)  # the training forward too (sampling included)


def test_a_checkpoint_written_before_the_options_loads_unchanged(tmp_path):
    """A Lightning checkpoint whose hyper-parameters predate the options builds the same model and loads strictly."""
    torch.manual_seed(0)
    old = detector(attention_stage="layer3")
    with torch.no_grad():
        old.model.backbone.body.layer3_attention.gamma.fill_(0.5)
    names = set(old.state_dict())
    assert not any("fpn_attention" in k or "log_temperature" in k for k in names)  # the options off: the old tree
    hparams = {k: v for k, v in old.hparams.items() if k not in ("attention_fpn_levels", "attention_temperature")}
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": old.state_dict(), "hyper_parameters": hparams,
                "pytorch-lightning_version": pl.__version__}, path)

    loaded = TorchvisionDetector.load_from_checkpoint(path, weights_only=False)  # strict by default
    assert set(loaded.state_dict()) == names
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in old.state_dict().items())
    image = [torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))]
    old.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(old(image)[0]["scores"], loaded(image)[0]["scores"])

    # The same weights as a starting point of a model with learnable temperatures: only log_temperature is new.
    torch.save(old.state_dict(), tmp_path / "old.pt")
    with pytest.warns(UserWarning, match="partial checkpoint load"):
        learnable = detector(attention_stage="layer3", attention_temperature="learnable", checkpoint=str(tmp_path / "old.pt"))
    assert float(learnable.model.backbone.body.layer3_attention.gamma) == 0.5


def test_bad_level_names_are_refused_with_the_valid_ones():
    with pytest.raises(ValueError, match=r"valid levels: \['0', '1', '2', '3', 'pool'\]"):
        detector(attention_fpn_levels=["0", "p6"])
    with pytest.raises(ValueError, match="'fixed' or 'learnable'"):
        detector(attention_fpn_levels=["0"], attention_temperature="learned")


def test_per_level_maps_of_a_detection_come_from_the_level_its_roi_was_pooled_from():
    """RoIs of a 64 px image all fall on level 0 at torchvision's canonical 224 px scale; a
    16 px canonical scale spreads an untrained model's 100 detections over levels 0-2, so the choice matters."""
    torch.manual_seed(0)
    model = detector(attention_fpn_levels=["0", "1", "2", "3"], detections_per_image=100, rpn_proposals_test=300).eval()
    model.model.roi_heads.box_roi_pool.canonical_scale = 16
    for block in blocks_of(model).values():  # attention that reaches the output, different on every level
        with torch.no_grad():
            block.gamma.fill_(1.0)
    g = torch.Generator().manual_seed(4)
    images = [torch.rand(3, SIZE, SIZE, generator=g) for _ in range(2)]
    callback = AttentionMapCallback(per_level=True, heads="all", top_k=100, num_probe_images=2)
    results = callback.explain_shard(model, images, [{} for _ in images], [0, 1])

    seen = set()
    for result in results:
        k = len(result.boxes)
        assert k > 0 and len(result.levels) == k
        by_roi = result.detection_maps["spatial/roi_level"]
        assert by_roi.shape[0] == k
        for j, level in enumerate(result.levels):
            seen.add(level)
            own = result.detection_maps[f"spatial/backbone.fpn_attention.{level}"][j]
            assert torch.equal(by_roi[j], own)
            for h in range(2):
                assert torch.equal(result.detection_maps[f"spatial/roi_level/head{h}"][j],
                                   result.detection_maps[f"spatial/backbone.fpn_attention.{level}/head{h}"][j])
            others = [result.detection_maps[f"spatial/backbone.fpn_attention.{o}"][j] for o in "0123" if o != level]
            assert all(not torch.equal(own, other) for other in others)  # reading another level would show
    assert len(seen) >= 2, seen

    # Without per_level only the RoI-level maps are drawn (no map per level block).
    plain = AttentionMapCallback(top_k=100, num_probe_images=2).explain_shard(model, images, [{}, {}], [0, 1])
    assert set(plain[0].detection_maps) == {"spatial/roi_level"}
    assert torch.equal(plain[0].detection_maps["spatial/roi_level"], results[0].detection_maps["spatial/roi_level"])


@pytest.mark.numerics
def test_learnable_temperatures_change_in_a_short_fit_and_are_read_back_from_wandb_and_the_focus_record(
    scenes_root, tmp_path, finish_wandb
):
    dm = scenes(scenes_root)
    pl.seed_everything(0)
    # GroupNorm: after a few steps on 4 images, BatchNorm's running statistics leave this tiny model no detection to map.
    model = detector(num_classes=dm.num_classes, attention_fpn_levels="all", attention_temperature="learnable",
                     norm="group", optimizer="adamw", lr=0.002)
    model.class_names = dm.class_names
    entropy = AttentionEntropyCallback(every_n_train_steps=1, num_probe_images=2)
    maps = AttentionMapCallback(num_probe_images=2, top_k=2)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, logger=WandbLogger(offline=True, save_dir=tmp_path),
                         callbacks=[entropy, maps], enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, log_every_n_steps=1, num_sanity_val_steps=0)
    trainer.fit(model, dm)
    wandb.finish()
    run = newest_offline_run(tmp_path)

    blocks = {name.removeprefix("model."): b for name, b in blocks_of(model).items()}
    assert entropy.temperature_blocks == list(blocks) == [
        f"backbone.fpn_attention.{level}" for level in ("0", "1", "2", "3", "pool")]
    for name, block in blocks.items():
        key = f"attention/temperature/{name}"
        assert [row["trainer/global_step"] for row in run.history if key in row] == [0, 1, 2, 3]  # every training step
        values = [v for _, v in run.history_of(key)]
        assert all(v > 0 for v in values)
        # T trains, except on the 1 x 1 "pool" level of a 64 px image: one key, softmax 1 whatever T.
        assert (len(set(values)) > 1) == (not name.endswith(".pool")), (name, values)
        assert values[-1] == pytest.approx(float(block.temperature), rel=1e-6)  # read after the last step's update
        for head in range(2):  # entropy per level and head from the training forward
            assert len(run.history_of(f"attention/entropy/{name}/head{head}")) == 4
    assert run.history_of("attention/collapsed_temperatures")  # the alarm watches them

    record = read_focus_record(run.run_dir)
    train = record.entropy_points("train")
    assert [p.step for p in train] == [0, 1, 2, 3]
    logged_last = {name: run.history_of(f"attention/temperature/{name}")[-1][1] for name in blocks}
    assert train[-1].temperatures == pytest.approx(logged_last)
    probe = record.entropy_points("probe")
    assert probe and set(probe[-1].temperatures) == set(blocks)
    comparison = compare_records(record, record, max_drift=None)
    assert comparison.temperatures == {k: (v, v) for k, v in probe[-1].temperatures.items()}

    (event,) = [e for e in image_events(run, "attention_maps/spatial/roi_level") if e.global_step == 4]
    assert event.captions and all(" · level " in c for c in event.captions)


def test_a_temperature_running_towards_zero_raises_the_collapse_alarm():
    callback = AttentionEntropyCallback(every_n_train_steps=1, drop_fraction=0.5, window=3, min_history=2)
    model = detector(attention_fpn_levels=["3"], attention_temperature="learnable")
    callback._attach(model)
    (name,) = callback.temperature_blocks
    block = model.model.backbone.fpn_attention["3"]
    entropies = {name: torch.tensor([0.9, 0.9])}

    class Trainer:  # what _watch_collapse reads of a trainer: no W&B logger
        loggers = ()

    flags = []
    for step, t in enumerate([1.0, 0.9, 0.3]):
        with torch.no_grad():
            block.log_temperature.fill_(math.log(t))
        if step < 2:
            flags.append(callback._watch_collapse(Trainer(), step, entropies, callback.temperatures()))
        else:
            with pytest.warns(UserWarning, match=rf"attention temperature collapse at step 2: {name} fell to 0.300"):
                flags.append(callback._watch_collapse(Trainer(), step, entropies, callback.temperatures()))
    assert [f["attention/collapse"] for f in flags] == [0.0, 0.0, 1.0]
    assert [f["attention/collapsed_temperatures"] for f in flags] == [0.0, 0.0, 1.0]
    assert flags[-1]["attention/collapsed_heads"] == 0.0
