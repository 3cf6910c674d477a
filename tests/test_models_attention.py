"""SpatialSelfAttention: identity at insertion, probe protocol, and where detectors put it."""

from __future__ import annotations

import pytest
import torch

from detlens.lightning_modules import SpatialSelfAttention, TorchvisionDetector


def test_fresh_block_is_identity_so_inserting_it_cannot_hurt_a_detector():
    block = SpatialSelfAttention(channels=32, heads=4)
    x = torch.randn(2, 32, 6, 5)

    assert block.gamma.item() == 0.0
    torch.testing.assert_close(block(x), x, rtol=0, atol=0)


def test_probe_is_off_by_default_and_records_nothing():
    block = SpatialSelfAttention(channels=16, heads=2)
    block.gamma.data.fill_(0.5)

    block(torch.randn(1, 16, 4, 4))

    assert block.detlens_attention_probe is False
    assert block.last_attention is None


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_probe_records_softmax_rows_over_all_positions_without_changing_output(autocast):
    # Bit-identical output and gradients: a training step whose weights are read must be the
    # step it would have been (under bf16 autocast an explicit softmax @ v rounds differently).
    torch.manual_seed(0)
    block = SpatialSelfAttention(channels=16, heads=2)
    block.gamma.data.fill_(0.7)  # trained-like gate, so attention actually contributes
    x = torch.randn(3, 16, 4, 5)

    def step(probe: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        block.zero_grad()
        block.detlens_attention_probe = probe
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = block(x)
        out.float().square().sum().backward()
        return out.detach(), [p.grad.clone() for p in block.parameters()]

    fused, fused_grads = step(False)
    probed, probed_grads = step(True)

    attn = block.last_attention
    assert attn is not None and attn.shape == (3, 2, 20, 20)  # [B, heads, HW, HW]
    tolerance = 1e-2 if autocast else 1e-5  # bf16 keeps 8 bits of mantissa
    torch.testing.assert_close(attn.float().sum(-1), torch.ones(3, 2, 20), rtol=0, atol=tolerance)
    assert (attn >= 0).all()
    assert torch.equal(probed, fused)
    assert all(torch.equal(a, b) for a, b in zip(probed_grads, fused_grads))
    if not autocast:  # the stored weights are the block's softmax(q k^T / sqrt(d))
        q = block.query(x).reshape(3, 2, -1, 20).transpose(2, 3)
        k = block.key(x).reshape(3, 2, -1, 20).transpose(2, 3)
        torch.testing.assert_close(attn, torch.softmax(q @ k.transpose(2, 3) / q.shape[-1] ** 0.5, dim=-1))


def test_gate_learns_from_zero():
    block = SpatialSelfAttention(channels=8)
    x = torch.randn(2, 8, 3, 3)
    (block(x) * torch.randn_like(x)).sum().backward()
    assert block.gamma.grad is not None and block.gamma.grad.abs().item() > 0


def test_bad_block_configuration_is_rejected():
    with pytest.raises(ValueError, match="heads=3 must divide channels=16"):
        SpatialSelfAttention(channels=16, heads=3)
    with pytest.raises(ValueError, match=r"expected \[B, 16, H, W\]"):
        SpatialSelfAttention(channels=16)(torch.randn(1, 8, 4, 4))


def test_detector_places_block_after_the_requested_stage_and_feeds_it_to_the_fpn():
    module = TorchvisionDetector(
        "fasterrcnn_resnet18_fpn", num_classes=2, min_size=64, max_size=64, fpn_channels=32,
        attention_stage="layer3", attention_heads=2,
    )
    body = module.model.backbone.body
    names = [name for name, _ in body.named_children()]

    assert names[names.index("layer3") + 1] == "layer3_attention"
    assert isinstance(body.layer3_attention, SpatialSelfAttention)
    assert body.layer3_attention.heads == 2 and body.layer3_attention.channels == 256
    assert "layer3_attention" in body.return_layers and "layer3" not in body.return_layers

    block = body.layer3_attention
    block.detlens_attention_probe = True
    module.eval()
    with torch.no_grad():
        module([torch.rand(3, 64, 64)])
    assert block.last_attention.shape == (1, 2, 16, 16)  # 64 px / stride 16 = 4x4 positions


def test_mobilenet_detector_accepts_a_feature_block_index_as_stage():
    module = TorchvisionDetector(
        "fasterrcnn_mobilenet_v3_large_fpn", num_classes=2, min_size=64, max_size=64, fpn_channels=32,
        attention_stage="13",
    )
    assert isinstance(module.model.backbone.body["13_attention"], SpatialSelfAttention)


def test_unknown_stage_names_the_valid_ones_and_the_likely_typo():
    with pytest.raises(ValueError) as err:
        TorchvisionDetector("fasterrcnn_resnet18_fpn", num_classes=2, attention_stage="layr3")
    message = str(err.value)
    assert "'layer1', 'layer2', 'layer3', 'layer4'" in message
    assert "Did you mean 'layer3'" in message
