"""Any detector in any LightningModule: the open adapter registry and the search for the network."""

from __future__ import annotations

import sys
import textwrap
from importlib.metadata import EntryPoint

import pytest
import pytorch_lightning as pl
import torch
import wandb
from pytorch_lightning.loggers import WandbLogger
from torch import nn
from wandb_utils import image_events, newest_offline_run

import detlens
from detlens.adapters import AdapterRegistry, TwoStageAdapter, adapter_for, find_network
from detlens.adapters import registry as registry_module
from detlens.callbacks import BoxEmbeddingCallback, GradCAMCallback, PredictionOverlayCallback
from detlens.data import SyntheticDataModule
from detlens.lightning_modules import TorchvisionDetector

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = 64


def faster_rcnn() -> nn.Module:
    return TorchvisionDetector("fasterrcnn_resnet18_fpn", num_classes=4, min_size=SIZE, max_size=SIZE, fpn_channels=16,
                               representation_size=32, rpn_proposals_train=50, rpn_proposals_test=20,
                               box_batch_size_per_image=16, score_thresh=0.0).model


class MyModule(pl.LightningModule):
    """A user's LightningModule: the network under a name of its choosing, its own steps."""

    def __init__(self, **networks: nn.Module) -> None:
        super().__init__()
        for name, net in networks.items():
            setattr(self, name, net)
        self.first = next(iter(networks))

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        images, targets = batch
        return sum(getattr(self, self.first)(images, targets).values())

    def validation_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        getattr(self, self.first)(batch[0])

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.SGD(self.parameters(), lr=1e-3)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> SyntheticDataModule:
    root = tmp_path_factory.mktemp("scenes") / "s"
    return SyntheticDataModule(root=str(root), num_train=4, num_val=2, image_size=SIZE, batch_size=2)


def fit(module: pl.LightningModule, dm: SyntheticDataModule, callbacks: list, save_dir=None) -> pl.Trainer:
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=WandbLogger(offline=True, save_dir=save_dir) if save_dir else False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, callbacks=callbacks)
    trainer.fit(module, dm)
    return trainer


def test_a_network_under_any_attribute_name_is_found_without_adapter(scenes, tmp_path, finish_wandb):
    module = MyModule(detector=faster_rcnn())
    path, net, family = find_network(module)
    assert path == "detector" and net is module.detector and family.adapter_class is TwoStageAdapter
    assert isinstance(adapter_for(module), TwoStageAdapter)
    (ex,) = detlens.explain(module, [scenes.val_dataset[0][0]], top_k=2, score_threshold=0.0)
    assert len(ex) == 2

    callbacks = [GradCAMCallback(top_k=2, score_threshold=0.0, num_probe_images=2),
                 PredictionOverlayCallback(score_threshold=0.0, max_detections=3, num_probe_images=2),
                 BoxEmbeddingCallback(method="pca", score_threshold=0.0, max_detections=3, num_probe_images=2)]
    fit(module, scenes, callbacks, save_dir=tmp_path)
    wandb.finish()
    run = newest_offline_run(tmp_path)
    (event,) = image_events(run, "gradcam/probe")
    assert len(event.captions) == 2
    (predictions,) = image_events(run, "predictions/probe")
    assert [len(p["box_data"]) for p in predictions.boxes(run, "predictions")] == [3, 3]
    assert image_events(run, "embeddings/scatter")


def test_a_compiled_or_ddp_wrapped_network_is_found_through_its_wrapper():
    class Wrapper(nn.Module):  # what DistributedDataParallel and torch.compile look like from outside
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.module = inner

    net = faster_rcnn()
    path, found, _ = find_network(MyModule(net=Wrapper(net)))
    assert path == "net" and found is net


def test_two_detectors_fail_before_the_first_step_naming_both(scenes):
    module = MyModule(student=faster_rcnn(), teacher=faster_rcnn())
    callback = BoxEmbeddingCallback(method="pca", num_probe_images=2)
    steps = []
    module.on_train_batch_start = lambda *a: steps.append(1)  # type: ignore[method-assign]
    with pytest.raises(ValueError, match=r"2 detectors .*student .*teacher.*model_attr='student'"):
        fit(module, scenes, [callback])
    assert steps == []
    chosen = GradCAMCallback(top_k=1, num_probe_images=1, model_attr="teacher")
    assert chosen.detector_adapter(module).model is module.teacher


def test_an_adapter_given_in_yaml_form_is_built_on_the_network_found():
    module = MyModule(detector=faster_rcnn())
    callback = GradCAMCallback(adapter={"class_path": "detlens.adapters.TwoStageAdapter"})
    adapter = callback.detector_adapter(module)
    assert isinstance(adapter, TwoStageAdapter) and adapter.model is module.detector
    with pytest.raises(ValueError, match="cannot be imported"):
        GradCAMCallback(adapter={"class_path": "nowhere.Adapter"}).detector_adapter(module)


def test_a_network_nothing_recognises_is_an_error_that_says_how_to_add_an_adapter():
    with pytest.raises(TypeError, match=r"no adapter for MyModule .*looked at body \(Sequential\).*register"):
        adapter_for(MyModule(body=nn.Sequential(nn.Conv2d(3, 4, 3))))


def test_a_third_party_adapter_is_found_through_the_entry_point_group(tmp_path, monkeypatch):
    """A package adds a detector family without detlens importing it: an entry point in the
    ``detlens.adapters`` group whose function calls ``register``."""
    (tmp_path / "my_detlens_plugin.py").write_text(textwrap.dedent('''
        from torch import nn
        from detlens.adapters import DetectorAdapter, register


        class TinyNet(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(3, 4, 3)


        class TinyAdapter(DetectorAdapter):
            family = "tiny"

            def layer_names(self):
                return ["conv"]


        def register_adapters():
            register(lambda net: isinstance(net, TinyNet), TinyAdapter, "tiny nets")
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    point = EntryPoint(name="tiny", value="my_detlens_plugin:register_adapters", group="detlens.adapters")
    monkeypatch.setattr(registry_module, "entry_points", lambda group: [point] if group == "detlens.adapters" else [])
    fresh = AdapterRegistry()
    monkeypatch.setattr(registry_module, "registry", fresh)

    plugin = sys.modules.get("my_detlens_plugin") or __import__("my_detlens_plugin")
    path, net, family = find_network(MyModule(head=plugin.TinyNet()))
    assert path == "head" and family.name == "tiny nets" and type(adapter_for(net)).__name__ == "TinyAdapter"


def test_an_adapter_class_given_for_a_module_with_two_detectors_needs_model_attr():
    module = MyModule(student=faster_rcnn(), teacher=faster_rcnn())
    with pytest.raises(ValueError, match="2 detectors"):
        GradCAMCallback(adapter={"class_path": "detlens.adapters.TwoStageAdapter"}).detector_adapter(module)
    chosen = GradCAMCallback(adapter={"class_path": "detlens.adapters.TwoStageAdapter"}, model_attr="teacher")
    assert chosen.detector_adapter(module).model is module.teacher
