"""ProbeCallback as a subclass author uses it: gradients inside validate, results on rank 0, the probe set."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from test_callbacks_prediction_overlay import detector, scenes, scenes_root, trainer  # noqa: F401 (fixture)

from detlens.callbacks import ProbeCallback
from detlens.callbacks.probe_set import evenly_spaced_indices


@dataclass(frozen=True)
class FeatureSaliency:
    """What a Grad-CAM-like explainer returns per image: a map that came out of autograd."""

    saliency: torch.Tensor  # [C] mean |d score / d feature| per channel
    num_detections: int


class FeatureSaliencyProbe(ProbeCallback):
    def __init__(self, **kwargs):
        super().__init__(log_key="saliency", **kwargs)
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
