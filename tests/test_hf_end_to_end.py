"""transformers detectors trained in LightningModules the way users write them, every detlens callback on.

1. A module written like the widely copied "fine-tune DETR with Lightning" tutorials: the
   network under ``self.model``, batches of ``pixel_values``/``pixel_mask``/``labels``
   made by the image processor's own collate, ``0``-based class ids, no ``forward`` of
   detlens' kind; detlens is told ``adapter=HFDetrAdapter(label_offset=1)`` from YAML-style
   arguments.
2. detlens' ``HFDetector`` (deformable attention) holding the network, found without configuration.

Each fits on the synthetic scenes with a W&B offline run, which is read back.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import wandb
from pytorch_lightning.loggers import WandbLogger
from reliability_utils import every_callback, hf_detector, quiet_trainer, scenes
from wandb_utils import image_events, newest_offline_run, scalar_history

from detlens.focus.record import read_focus_record

pytestmark = [pytest.mark.slow, pytest.mark.numerics]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TutorialDetr(pl.LightningModule):
    """As the tutorials write it (random weights instead of ``from_pretrained("facebook/detr-resnet-50")``)."""

    def __init__(self, num_labels: int, lr: float = 1e-4) -> None:
        super().__init__()
        from transformers import DetrConfig, DetrForObjectDetection, ResNetConfig

        backbone = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                                layer_type="basic", out_features=["stage4"])
        config = DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=backbone,
                            d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                            num_queries=8, num_labels=num_labels, attn_implementation="eager")
        self.model = DetrForObjectDetection(config)
        self.lr = lr

    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor) -> Any:
        return self.model(pixel_values=pixel_values, pixel_mask=pixel_mask)

    def common_step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        outputs = self.model(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"], labels=batch["labels"])
        return outputs.loss, outputs.loss_dict

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss, loss_dict = self.common_step(batch)
        self.log("training_loss", loss, batch_size=len(batch["labels"]))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss, _ = self.common_step(batch)
        self.log("validation_loss", loss, batch_size=len(batch["labels"]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


class ProcessorDataModule(pl.LightningDataModule):
    """The tutorials' data path: COCO-style annotations through the image processor's own collate.

    ``val_dataset`` is detlens' synthetic validation set (images in ``[0, 1]`` and targets), from
    which detlens reads its probe images; the loaders hand the model processor batches."""

    def __init__(self, synthetic: Any) -> None:
        super().__init__()
        from transformers import DetrImageProcessor

        self.synthetic = synthetic
        self.processor = DetrImageProcessor(do_resize=False)

    def setup(self, stage: str) -> None:
        self.synthetic.setup(stage)
        self.train_dataset = self.synthetic.train_dataset
        self.val_dataset = self.synthetic.val_dataset

    def collate(self, items: list[tuple[torch.Tensor, dict[str, Any]]]) -> dict[str, Any]:
        images, annotations = [], []
        for image, target in items:
            images.append((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
            boxes = target["boxes"].tolist()
            annotations.append({"image_id": int(target["image_id"]), "annotations": [
                {"bbox": [x1, y1, x2 - x1, y2 - y1], "category_id": int(label) - 1, "area": (x2 - x1) * (y2 - y1),
                 "iscrowd": 0}
                for (x1, y1, x2, y2), label in zip(boxes, target["labels"].tolist())]})
        encoding = self.processor(images=images, annotations=annotations, return_tensors="pt")
        return {"pixel_values": encoding["pixel_values"], "pixel_mask": encoding["pixel_mask"],
                "labels": encoding["labels"]}

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(self.train_dataset, batch_size=2, collate_fn=self.collate)

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(self.val_dataset, batch_size=2, collate_fn=self.collate)


def fit_with_every_callback(module: pl.LightningModule, datamodule: Any, save_dir: Any, **callback_args: Any) -> list:
    callbacks = every_callback(every_n_steps=None, num_probe_images=2, **callback_args)  # after each validation
    logger = WandbLogger(project="detlens-tests", save_dir=str(save_dir), offline=True)
    trainer = quiet_trainer(max_epochs=2, callbacks=callbacks, logger=logger, limit_val_batches=1)
    pl.seed_everything(0)
    trainer.fit(module, datamodule)
    wandb.finish()
    return callbacks


def assert_everything_logged(save_dir: Any, callbacks: list) -> None:
    run = newest_offline_run(save_dir)
    assert [c.num_logging_events for c in callbacks] == [2] * len(callbacks)
    assert len(image_events(run, "predictions/probe")) == 2
    assert len(image_events(run, "gradcam/probe")) == 2
    assert image_events(run, "attention_maps/decoder/layer1"), sorted(k for row in run.history for k in row)[:40]
    entropy = [k for row in run.history for k in row if k.startswith("attention/") and "entropy" in k]
    assert entropy, "attention entropy keys"
    assert all(0.0 <= v <= 1.0 + 1e-6 for v in scalar_history(run, sorted(set(entropy))[0]) if v == v)
    assert image_events(run, "embeddings/scatter")
    record = read_focus_record(run.run_dir)
    assert record.maps and record.entropy and record.embeddings


def test_a_tutorial_style_detr_module_is_explained_with_every_callback(tmp_path):
    synthetic = scenes(str(tmp_path / "scenes"), batch_size=2)
    module = TutorialDetr(num_labels=synthetic.num_classes)
    adapter = {"class_path": "detlens.adapters.HFDetrAdapter", "init_args": {"label_offset": 1}}
    callbacks = fit_with_every_callback(module, ProcessorDataModule(synthetic), tmp_path / "wandb", adapter=adapter)
    assert_everything_logged(tmp_path / "wandb", callbacks)
    explained = callbacks[1].detector_adapter(module).run([synthetic.val_dataset[0][0]], [], top_k=3)
    assert explained.detections[0].labels.min() >= 1  # the offset maps 0-based ids to detlens labels


def test_a_deformable_detector_held_as_a_detector_attribute_needs_no_configuration(tmp_path):
    synthetic = scenes(str(tmp_path / "scenes"), batch_size=2)
    module = hf_detector("deformable_detr")(synthetic)
    callbacks = fit_with_every_callback(module, synthetic, tmp_path / "wandb")
    assert_everything_logged(tmp_path / "wandb", callbacks)
    run = newest_offline_run(tmp_path / "wandb")
    levels = {k for row in run.history for k in row if k.startswith("attention_maps/decoder/layer1/level")}
    assert levels == {f"attention_maps/decoder/layer1/level{n}" for n in range(3)}


def test_validate_under_inference_mode_and_bf16_fit_explain_a_deformable_detector(tmp_path):
    synthetic = scenes(str(tmp_path / "scenes"), batch_size=2)
    module = hf_detector("deformable_detr")(synthetic)
    callbacks = every_callback(every_n_steps=None, num_probe_images=2)
    trainer = quiet_trainer(max_epochs=1, callbacks=callbacks, precision="bf16-mixed", limit_val_batches=1)
    trainer.fit(module, synthetic)
    assert [c.num_logging_events for c in callbacks] == [1] * len(callbacks)
    validator = quiet_trainer(callbacks=every_callback(every_n_steps=None, num_probe_images=2), inference_mode=True,
                              limit_val_batches=1)
    validator.validate(module, synthetic)
    assert all(c.num_logging_events == 1 for c in validator.callbacks if hasattr(c, "num_logging_events"))
