"""TorchvisionDetector: every family learns, answers in the contract's format, and reloads weights."""

from __future__ import annotations

import warnings

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from detlens.lightning_modules import DetectionModule, TorchvisionDetector

pytestmark = pytest.mark.numerics  # trains or checks trained-model numbers: `make test` runs it twice

SIZE = 96
COLOURS = {1: (0.9, 0.1, 0.1), 2: (0.1, 0.2, 0.9)}


def tiny_scene_batch(seed: int = 0, n_images: int = 2):
    """Fixed images: coloured rectangles on grey noise, with their boxes/labels as the data contract."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for i in range(n_images):
        img = 0.4 + 0.1 * torch.rand(3, SIZE, SIZE, generator=g)
        boxes, labels = [], []
        for label, (x1, y1, w, h) in zip((1, 2), ((8 + 10 * i, 10, 30, 24), (50, 44 - 8 * i, 28, 36))):
            img[:, y1 : y1 + h, x1 : x1 + w] = torch.tensor(COLOURS[label]).view(3, 1, 1)
            boxes.append([x1, y1, x1 + w, y1 + h])
            labels.append(label)
        images.append(img)
        targets.append(
            {
                "boxes": torch.tensor(boxes, dtype=torch.float32),
                "labels": torch.tensor(labels, dtype=torch.int64),
                "image_id": i,
                "file_name": f"scene_{i}.png",
            }
        )
    return images, targets


def small_detector(architecture: str, **overrides) -> TorchvisionDetector:
    kwargs = dict(
        num_classes=2,
        min_size=SIZE,
        max_size=SIZE,
        fpn_channels=32,
        representation_size=64,
        rpn_proposals_train=200,
        rpn_proposals_test=100,
        box_batch_size_per_image=64,
        anchor_sizes=None,
    )
    if architecture.startswith("fasterrcnn_resnet"):  # five levels: P2-P5 + pool
        kwargs["anchor_sizes"] = [8, 16, 32, 64, 128]
    if architecture.startswith("retinanet"):  # five levels: P3-P7, three scales each
        kwargs["anchor_sizes"] = [16, 32, 64, 128, 256]
    kwargs.update(overrides)
    return TorchvisionDetector(architecture, **kwargs)


def overfit(module: DetectionModule, images, targets, steps: int, lr: float) -> list[float]:
    optimizer = torch.optim.AdamW(module.parameters(), lr=lr)
    module.train()
    losses = []
    for _ in range(steps):
        loss = sum(module.model(images, [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def assert_detection_contract(detections, n_images: int, num_classes: int, image_size: int) -> None:
    assert isinstance(detections, list) and len(detections) == n_images
    for det in detections:
        assert {"boxes", "scores", "labels"} <= set(det)
        k = len(det["scores"])
        assert det["boxes"].shape == (k, 4) and det["labels"].shape == (k,)
        assert det["boxes"].dtype.is_floating_point and det["labels"].dtype == torch.int64
        if k:
            assert det["labels"].min() >= 1 and det["labels"].max() <= num_classes
            assert (det["boxes"][:, 2:] >= det["boxes"][:, :2]).all()
            assert det["boxes"].min() >= 0 and det["boxes"].max() <= image_size


@pytest.mark.parametrize(
    ("architecture", "extra", "lr"),
    [
        ("fasterrcnn_resnet18_fpn", {}, 2e-3),
        ("fasterrcnn_resnet18_fpn", {"attention_stage": "layer3", "attention_heads": 2}, 2e-3),
        ("fasterrcnn_mobilenet_v3_large_fpn", {}, 1e-3),
        ("retinanet_resnet18_fpn", {}, 5e-4),  # focal loss on 2 images: larger steps spike
        ("fcos_resnet18_fpn", {}, 1e-3),
    ],
    ids=["fasterrcnn_r18", "fasterrcnn_r18_attention", "fasterrcnn_mobilenet", "retinanet_r18", "fcos_r18"],
)
def test_each_family_overfits_a_fixed_batch_and_returns_contract_detections(architecture, extra, lr):
    torch.manual_seed(0)
    images, targets = tiny_scene_batch()
    module = small_detector(architecture, **extra)

    losses = overfit(module, images, targets, steps=15, lr=lr)

    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses
    module.eval()
    with torch.no_grad():
        detections = module(images)
    assert_detection_contract(detections, len(images), num_classes=2, image_size=SIZE)


def test_forward_in_training_mode_says_to_call_eval():
    module = small_detector("fcos_resnet18_fpn")
    with pytest.raises(RuntimeError, match=r"call \.eval\(\)"):
        module.train()(tiny_scene_batch()[0])


def test_unknown_architecture_and_wrong_anchor_count_are_explained():
    with pytest.raises(ValueError, match="did you mean.*fasterrcnn_resnet18_fpn"):
        TorchvisionDetector("fasterrcnn_resnet81_fpn", num_classes=2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one base size per FPN level: 5 levels"):
        TorchvisionDetector("fasterrcnn_resnet18_fpn", num_classes=2, anchor_sizes=[16, 32])


def test_from_scratch_default_trains_every_backbone_parameter_with_batchnorm():
    module = small_detector("fasterrcnn_resnet18_fpn")
    assert all(p.requires_grad for p in module.model.backbone.parameters())
    assert isinstance(module.model.backbone.body.bn1, torch.nn.BatchNorm2d)
    frozen = small_detector("fasterrcnn_resnet18_fpn", norm="frozen", trainable_backbone_layers=2)
    assert not frozen.model.backbone.body.layer2[0].conv1.weight.requires_grad
    assert frozen.model.backbone.body.layer3[0].conv1.weight.requires_grad


@pytest.mark.parametrize("form", ["model_state_dict", "lightning_checkpoint"])
def test_checkpoint_round_trip_gives_identical_detections(tmp_path, form):
    torch.manual_seed(0)
    images, targets = tiny_scene_batch()
    source = small_detector("fasterrcnn_resnet18_fpn", attention_stage="layer3", score_thresh=0.0)
    overfit(source, images, targets, steps=2, lr=1e-3)  # weights (and BN statistics) differ from init
    source.model.backbone.body.layer3_attention.gamma.data.fill_(0.3)
    path = tmp_path / "weights.pt"
    if form == "model_state_dict":
        torch.save(source.model.state_dict(), path)
    else:
        torch.save({"state_dict": source.state_dict(), "epoch": 3}, path)

    torch.manual_seed(123)  # a different initialisation that the checkpoint must overwrite
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a complete checkpoint loads without a partial-load warning
        restored = small_detector(
            "fasterrcnn_resnet18_fpn", attention_stage="layer3", score_thresh=0.0, checkpoint=str(path)
        )

    source.eval()
    restored.eval()
    with torch.no_grad():
        expected, got = source(images), restored(images)
    for e, g in zip(expected, got):
        assert len(e["scores"]) > 0
        for key in ("boxes", "scores", "labels"):
            torch.testing.assert_close(g[key], e[key])


def test_checkpoint_for_another_class_count_loads_the_rest_and_reports_the_skipped_heads(tmp_path):
    path = tmp_path / "other_classes.pt"
    torch.save(small_detector("fasterrcnn_resnet18_fpn", num_classes=5).model.state_dict(), path)

    with pytest.warns(UserWarning, match=r"loaded \d+ tensors[^\n]*\n  shape differs, skipped \(4\): roi_heads\.box_predictor\.cls_score\.weight \(6, 64\) -> \(3, 64\)"):
        small_detector("fasterrcnn_resnet18_fpn", checkpoint=str(path))
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        small_detector("fasterrcnn_resnet18_fpn", checkpoint=str(tmp_path / "missing.pt"))


class _Scenes(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.items = [tuple(zip(*tiny_scene_batch(seed=i, n_images=1)))[0] for i in range(n)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _collate(batch):
    images, targets = zip(*batch)
    return list(images), list(targets)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_fit_logs_train_loss_terms_and_validation_map(tmp_path, precision):
    torch.manual_seed(0)
    module = small_detector("fasterrcnn_resnet18_fpn", attention_stage="layer3", warmup_steps=2, lr=1e-3)
    module.hparams.optimizer = "adamw"
    loader = DataLoader(_Scenes(4), batch_size=2, collate_fn=_collate)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        precision=precision,
        max_epochs=1,
        logger=pl.loggers.CSVLogger(tmp_path),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
    )

    trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)

    logged = trainer.logged_metrics
    for key in ("train/loss", "train/loss_classifier", "train/loss_objectness", "val/mAP", "val/mAP_50"):
        assert key in logged, sorted(logged)
    assert 0.0 <= float(logged["val/mAP_50"]) <= 1.0
    total = sum(float(logged[f"train/{k}"]) for k in ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"))
    assert float(logged["train/loss"]) == pytest.approx(total, rel=1e-4)
    assert module.hparams.architecture == "fasterrcnn_resnet18_fpn"  # save_hyperparameters saw the subclass args


def test_test_stage_logs_test_map(tmp_path):
    module = small_detector("fcos_resnet18_fpn")
    trainer = pl.Trainer(
        accelerator="cpu", logger=pl.loggers.CSVLogger(tmp_path), enable_progress_bar=False, enable_model_summary=False
    )
    trainer.test(module, DataLoader(_Scenes(2), batch_size=2, collate_fn=_collate))
    assert {"test/mAP", "test/mAP_50"} <= set(trainer.logged_metrics)
