"""detlens.guard: an explanation leaves the training run exactly as it found it."""

from __future__ import annotations

import random

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from detlens.guard import GuardViolation, clone_for_autograd, explaining


def small_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.ReLU(), nn.Conv2d(4, 2, 1))


def test_model_is_in_eval_inside_and_every_flag_is_restored_after_an_error():
    net = small_net().train()
    net[4].eval()  # a mixed state, as with frozen sub-modules
    before = [m.training for m in net.modules()]
    running_mean = net[1].running_mean.clone()

    with pytest.raises(ZeroDivisionError), explaining(net):
        assert not any(m.training for m in net.modules())
        net(torch.rand(2, 3, 8, 8))
        1 / 0

    assert [m.training for m in net.modules()] == before
    assert torch.equal(net[1].running_mean, running_mean), "BatchNorm statistics were updated"


def test_global_random_streams_continue_as_if_nothing_ran_even_when_the_body_raises():
    net = small_net()
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    expected = (torch.rand(3), random.random(), np.random.rand())

    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    with pytest.raises(RuntimeError), explaining(net):
        torch.rand(100), random.random(), np.random.rand(5)
        raise RuntimeError("explainer bug")
    after = (torch.rand(3), random.random(), np.random.rand())

    assert torch.equal(expected[0], after[0]) and expected[1:] == after[1:]


def test_tracked_hooks_are_removed_even_when_the_body_raises():
    net = small_net()
    seen = []
    with pytest.raises(KeyError), explaining(net) as guard:
        guard.track(net[0].register_forward_hook(lambda m, i, o: seen.append(o.shape)))
        net(torch.rand(1, 3, 8, 8))
        raise KeyError("boom")
    net(torch.rand(1, 3, 8, 8))

    assert len(seen) == 1
    assert not net[0]._forward_hooks


def test_gradients_flow_inside_inference_mode_and_never_reach_parameters():
    net = small_net()
    net(torch.rand(1, 3, 8, 8)).sum().backward()  # a training step left gradients behind
    grads = [p.grad for p in net.parameters()]
    with torch.inference_mode():
        image = torch.rand(1, 3, 8, 8)  # an inference tensor, as in a validation loop
        with explaining(net):
            x = clone_for_autograd(image).requires_grad_(True)
            activation = net[:2](x)
            (grad,) = torch.autograd.grad(net[2:](activation).sum(), activation)
    assert grad.shape == activation.shape and grad.abs().sum() > 0
    assert all(p.grad is g for p, g in zip(net.parameters(), grads))


def test_backward_into_parameters_is_undone_and_reported():
    net = small_net()
    requires = [p.requires_grad for p in net.parameters()]
    with pytest.raises(GuardViolation, match="changed .grad of 5 parameter"), explaining(net):
        net[0].weight.requires_grad_(False)
        net(torch.rand(1, 3, 8, 8)).sum().backward()
    assert all(p.grad is None for p in net.parameters())
    assert [p.requires_grad for p in net.parameters()] == requires


def test_the_body_runs_under_the_trainers_precision_like_training():
    trainer = pl.Trainer(accelerator="cpu", precision="bf16-mixed", logger=False, enable_progress_bar=False)
    net = nn.Linear(4, 4)
    with explaining(net, trainer):
        assert net(torch.rand(2, 4)).dtype == torch.bfloat16
    assert net(torch.rand(2, 4)).dtype == torch.float32


def test_clone_for_autograd_clones_nested_inference_tensors():
    with torch.inference_mode():
        batch = {"images": [torch.rand(3, 4, 4)], "meta": ("id", torch.ones(2))}
    cloned = clone_for_autograd(batch)
    assert not cloned["images"][0].is_inference() and not cloned["meta"][1].is_inference()
    assert cloned["meta"][0] == "id" and torch.equal(cloned["images"][0], batch["images"][0])
