"""ProbeCallback as a subclass author uses it: gradients inside validate, results on rank 0, the probe set."""

from __future__ import annotations

import gc
from collections import Counter
from dataclasses import dataclass

import pytest
import torch
from test_callbacks_prediction_overlay import SIZE, detector, scenes, scenes_root, trainer  # noqa: F401 (fixture)

from detlens.adapters.observe import ForwardObserver
from detlens.callbacks import ProbeCallback
from detlens.callbacks import probe_set
from detlens.callbacks.probe_set import ProbeItemCache, evenly_spaced_indices
from detlens.data import SyntheticDataModule


@dataclass(frozen=True)
class FeatureSaliency:
    """What a Grad-CAM-like explainer returns per image: a map that came out of autograd."""

    saliency: torch.Tensor  # [C] mean |d score / d feature| per channel
    num_detections: int


class FeatureSaliencyProbe(ProbeCallback):
    def __init__(self, log_key="saliency", **kwargs):
        super().__init__(log_key=log_key, **kwargs)
        self.logged: list = []
        self.grad_state_inside: list[tuple[bool, bool]] = []

    def explain_shard(self, pl_module, images, targets, indices):
        self.grad_state_inside.append((torch.is_grad_enabled(), torch.is_inference_mode_enabled()))
        backbone = pl_module.model.backbone.body
        results = []
        for image in images:
            x = pl_module.model.transform([image])[0].tensors
            features = backbone.conv1(x)
            features.retain_grad()
            score = backbone.layer1(backbone.maxpool(backbone.relu(backbone.bn1(features)))).square().mean()
            (grad,) = torch.autograd.grad(score, features)
            results.append(FeatureSaliency(grad.abs().mean(dim=(0, 2, 3)).requires_grad_(), len(targets[0]["boxes"])))
        return results

    def log_results(self, trainer, pl_module, results):
        self.logged.append(results)


def test_subclass_gets_gradients_inside_validate_and_cpu_results_sorted_by_index(scenes_root):
    dm = scenes(scenes_root)
    probe = FeatureSaliencyProbe(probe_indices=[3, 1])
    model = detector(dm)
    trainer(callbacks=[probe]).validate(model, dm)

    assert probe.grad_state_inside == [(True, False)], "autograd on and inference mode off inside the guard"
    (results,) = probe.logged
    assert [r.index for r in results] == [1, 3]
    for r in results:
        assert isinstance(r.value, FeatureSaliency) and r.value.saliency.shape == (model.model.backbone.body.conv1.out_channels,)
        assert r.value.saliency.device.type == "cpu" and not r.value.saliency.requires_grad
        assert r.value.num_detections > 0
    assert all(p.grad is None for p in model.parameters())


def test_probe_sets_are_evenly_spaced_and_deterministic():
    assert evenly_spaced_indices(10, 3) == [0, 4, 9]  # round(4.5) == 4 (banker's rounding)
    assert evenly_spaced_indices(4, 3) == [0, 2, 3]
    assert evenly_spaced_indices(2, 8) == [0, 1]
    assert evenly_spaced_indices(5, 1) == [0]
    with pytest.raises(ValueError, match="empty"):
        evenly_spaced_indices(0, 3)


def test_state_keys_tell_instances_apart_and_state_round_trips():
    a, b = FeatureSaliencyProbe(every_n_steps=5), FeatureSaliencyProbe(every_n_steps=10)
    assert a.state_key != b.state_key
    b.load_state_dict({"probe_indices": [4, 2], "num_logging_events": 7, "last_epoch": 1, "last_step": 50})
    assert b.state_dict() == {"probe_indices": [4, 2], "num_logging_events": 7, "last_epoch": 1, "last_step": 50}
    assert b.num_logging_events == 7


class CountingDataset(torch.utils.data.Dataset):
    """A dataset that counts which items are read."""

    def __init__(self, inner):
        self.inner, self.reads = inner, Counter()

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, index):
        self.reads[index] += 1
        return self.inner[index]


class CountingScenes(SyntheticDataModule):
    """The scenes of ``scenes()``; the probe callbacks' ``val_dataset`` counts reads (the validation
    loader reads the split's dataset directly, uncounted)."""

    def __init__(self, root):
        super().__init__(root=root, num_train=8, num_val=4, image_size=SIZE, batch_size=4, horizontal_flip=False)
        self._counting = None

    @property
    def val_dataset(self):
        if self._counting is None:
            self._counting = CountingDataset(super().val_dataset)
        return self._counting


def test_probe_items_are_read_once_for_every_callback_and_event_and_handed_out_as_copies(scenes_root):
    dm = CountingScenes(scenes_root)
    model = detector(dm)
    first, second = FeatureSaliencyProbe(probe_indices=[0, 2]), FeatureSaliencyProbe(log_key="other", probe_indices=[2, 3])
    for _ in range(2):
        trainer(callbacks=[first, second]).validate(model, dm)

    assert dm.val_dataset.reads == {0: 1, 2: 1, 3: 1}, "each probe image read once: two callbacks, two events"
    for probe in (first, second):
        assert len(probe.logged) == 2
        for a, b in zip(*probe.logged):
            assert a.index == b.index and torch.equal(a.value.saliency, b.value.saliency)

    image, target = first.probe_item(0)
    original = dm.val_dataset.inner[0]
    image.zero_()
    target["boxes"].zero_()
    again, again_target = second.probe_item(0)
    assert torch.equal(again, original[0]) and torch.equal(again_target["boxes"], original[1]["boxes"])
    assert dm.val_dataset.reads[0] == 1


def test_probe_item_cache_keeps_to_its_budget_and_goes_with_the_dataset():
    image = torch.zeros(3, 8, 8)  # 768 bytes
    cache = ProbeItemCache(max_bytes=2 * image.nbytes)
    dataset = CountingDataset([(image, {}) for _ in range(3)])
    assert cache.put(dataset, 0, dataset[0], image.nbytes) and cache.put(dataset, 1, dataset[1], image.nbytes)
    assert not cache.put(dataset, 2, dataset[2], image.nbytes), "over budget: read each time instead"
    assert cache.get(dataset, 1)[0] is image and cache.get(dataset, 2) is None
    assert cache.nbytes() == 2 * image.nbytes

    del dataset
    gc.collect()
    assert cache.nbytes() == 0, "the items go when their dataset does"

    unhashable = type("Unhashable", (CountingDataset,), {"__eq__": lambda self, other: False, "__hash__": None})(
        [(image, {})]
    )
    assert not cache.put(unhashable, 0, unhashable[0], image.nbytes) and cache.get(unhashable, 0) is None


def test_without_a_cache_budget_probe_items_are_read_at_every_use(scenes_root, monkeypatch):
    monkeypatch.setattr(probe_set.probe_cache, "max_bytes", 0)
    dm = CountingScenes(scenes_root)
    probe = FeatureSaliencyProbe(probe_indices=[1])
    for _ in range(2):
        trainer(callbacks=[probe]).validate(detector(dm), dm)
    assert dm.val_dataset.reads[1] == 2


class ForwardReadingProbe(ProbeCallback):
    """Reads each probe image's detection scores from the validation forward (its own forward
    only for probe images the validation loop did not run)."""

    reads_validation_forward = True

    def __init__(self, log_key="scores", **kwargs):
        super().__init__(log_key=log_key, **kwargs)
        self.logged: list = []
        self.own_forward: list[list[int]] = []

    def validation_observer(self, pl_module):
        return ForwardObserver(pl_module)

    def from_validation(self, call, position, target):
        return call.outputs[position]["scores"].detach()

    def explain_shard(self, pl_module, images, targets, indices):
        self.own_forward.append(list(indices))
        with torch.no_grad():
            return [d["scores"] for d in pl_module(images)]

    def log_results(self, trainer, pl_module, results):
        self.logged.append({r.index: r.value for r in results})


def test_pixel_digests_are_computed_once_for_every_callback_reading_the_validation_forward(scenes_root, monkeypatch):
    calls = []

    def counting_digest(image):
        calls.append(tuple(image.shape))
        return digest(image)

    digest = probe_set.pixel_digest
    monkeypatch.setattr(probe_set, "pixel_digest", counting_digest)
    dm = CountingScenes(scenes_root)
    model = detector(dm)
    first, second = ForwardReadingProbe(probe_indices=[0, 1, 2, 3]), ForwardReadingProbe(log_key="again", probe_indices=[0, 1, 2, 3])
    for _ in range(2):
        trainer(callbacks=[first, second]).validate(model, dm)

    # 4 probe images hashed once from the dataset, and once in each of the two validations'
    # batches: 12, where each callback hashing its own was 24
    assert len(calls) == 4 + 2 * 4
    assert first.own_forward == [] and second.own_forward == [], "every probe image read from the validation forward"
    assert [sorted(event) for event in first.logged] == [[0, 1, 2, 3]] * 2
    for a, b in zip(first.logged, second.logged):
        assert all(torch.equal(a[i], b[i]) for i in a)


def test_batch_digests_are_reused_only_for_the_same_unchanged_images_of_the_same_batch():
    digests = probe_set.BatchDigests()
    image, stacked = torch.rand(3, 8, 8), torch.rand(2, 3, 8, 8)
    first = digests.get("batch 1", image)
    assert digests.get("batch 1", image) is first, "the same image of the same batch: hashed once"
    assert digests.get("batch 1", image.clone()) == first, "another tensor with the same pixels: hashed, equal"
    image.add_(1.0)  # changed in place: its version counter moved
    assert digests.get("batch 1", image) != first and digests.get("batch 1", image) == probe_set.pixel_digest(image)
    assert digests.get("batch 2", image) is not digests.get("batch 1", image), "another batch: hashed again"
    assert [digests.get("batch 2", stacked, i) for i in range(2)] == [probe_set.pixel_digest(stacked[i]) for i in range(2)]
    with torch.inference_mode():  # inference tensors have no version counter: identity and storage only
        frozen = torch.rand(3, 8, 8)
        assert digests.get("batch 3", frozen) is digests.get("batch 3", frozen)
