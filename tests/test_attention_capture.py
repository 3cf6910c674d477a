"""Reading attention weights out of a model: exact, side-effect free, loud when it can't."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from detlens.explainers.attention import (
    PROBE_FLAG,
    AttentionCapture,
    AttentionUnavailable,
    AttentionUnavailableWarning,
    find_attention_modules,
    mha_attention_weights,
)
from detlens.lightning_modules import SpatialSelfAttention

D, HEADS = 16, 4


class TinyTransformer(nn.Module):
    """DETR's attention layout: encoder over feature tokens, decoder with learned queries."""

    def __init__(self, batch_first: bool = True, dropout: float = 0.0, nested: bool = True) -> None:
        super().__init__()
        self.batch_first = batch_first
        layer = dict(d_model=D, nhead=HEADS, dim_feedforward=32, dropout=dropout, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(**layer), 2, enable_nested_tensor=nested and batch_first)
        self.decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(**layer), 2)
        self.queries = nn.Parameter(torch.randn(5, D))

    def forward(self, tokens: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        b = tokens.shape[0]
        tgt = self.queries.unsqueeze(0).expand(b, -1, -1)
        if not self.batch_first:
            tokens, tgt = tokens.transpose(0, 1), tgt.transpose(0, 1)
        memory = self.encoder(tokens, src_key_padding_mask=padding)
        return self.decoder(tgt, memory, memory_key_padding_mask=padding)


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randn(2, 12, D)
    padding = torch.zeros(2, 12, dtype=torch.bool)
    padding[1, 8:] = True  # the second image is smaller
    return tokens, padding


def _by_hand(mha: nn.MultiheadAttention, q_in: torch.Tensor, k_in: torch.Tensor, padding=None) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) per head from the module's in_proj weights; [B, L, E] inputs."""
    w_q, w_k, _ = mha.in_proj_weight.chunk(3)
    b_q, b_k, _ = mha.in_proj_bias.chunk(3)
    b, d = q_in.shape[0], D // HEADS
    q = (q_in @ w_q.T + b_q).view(b, -1, HEADS, d).transpose(1, 2)
    k = (k_in @ w_k.T + b_k).view(b, -1, HEADS, d).transpose(1, 2)
    logits = q @ k.transpose(-1, -2) / math.sqrt(d)
    if padding is not None:
        logits = logits.masked_fill(padding[:, None, None, :], float("-inf"))
    return logits.softmax(-1)


@pytest.mark.parametrize("batch_first", [True, False])
def test_captured_weights_are_softmax_qk_of_each_head(batch_first):
    torch.manual_seed(0)
    model = TinyTransformer(batch_first=batch_first).eval()
    tokens, padding = _inputs()
    first = model.encoder.layers[0].self_attn
    cross = model.decoder.layers[0].multihead_attn
    seen = {}
    first.register_forward_hook(lambda m, a, o: seen.update(enc_in=a[0].detach()))
    cross.register_forward_hook(lambda m, a, o: seen.update(dec_q=a[0].detach(), dec_k=a[1].detach()))

    with AttentionCapture(model) as cap:
        model(tokens, padding)

    as_bf = (lambda t: t) if batch_first else (lambda t: t.transpose(0, 1))
    enc_in = as_bf(seen["enc_in"])
    expected = _by_hand(first, enc_in, enc_in, padding)
    got = cap.weights["encoder.layers.0.self_attn"]
    assert got.shape == (2, HEADS, 12, 12)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    expected_cross = _by_hand(cross, as_bf(seen["dec_q"]), as_bf(seen["dec_k"]), padding)
    torch.testing.assert_close(cap.weights["decoder.layers.0.multihead_attn"], expected_cross, atol=1e-6, rtol=1e-5)
    assert cap.weights["decoder.layers.1.self_attn"].shape == (2, HEADS, 5, 5)
    assert torch.equal(cap.key_padding_masks["decoder.layers.1.multihead_attn"], padding)


def test_recomputed_weights_match_what_the_module_returns_when_asked():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(D, HEADS, batch_first=True, add_bias_kv=True, add_zero_attn=True, kdim=8, vdim=8)
    q, kv = torch.randn(2, 3, D), torch.randn(2, 7, 8)
    attn_mask = torch.rand(3, 7) > 0.7
    kpm = torch.zeros(2, 7, dtype=torch.bool)
    kpm[0, 5:] = True
    _, own = mha(q, kv, kv, key_padding_mask=kpm, attn_mask=attn_mask, average_attn_weights=False)
    torch.testing.assert_close(mha_attention_weights(mha, q, kv, kpm, attn_mask), own, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "mode", ["eval_no_grad_fast_path", "eval_with_grad", "train_dropout"]
)
def test_capturing_does_not_change_outputs(mode):
    torch.manual_seed(0)
    model = TinyTransformer(dropout=0.1).train(mode == "train_dropout")
    tokens, padding = _inputs()
    with torch.set_grad_enabled(mode != "eval_no_grad_fast_path"):
        torch.manual_seed(1)
        plain = model(tokens, padding)
        torch.manual_seed(1)
        with AttentionCapture(model) as cap:
            captured = model(tokens, padding)
    assert len(cap.weights) == 6
    assert torch.equal(plain, captured)


def test_nested_tensor_fast_path_is_read_and_padded_back_to_the_sequence():
    # eval + no_grad + padding mask: nn.TransformerEncoder hands the layers a NestedTensor.
    torch.manual_seed(0)
    model = TinyTransformer(nested=True).eval()
    tokens, padding = _inputs()
    padding[0, 11:] = True  # no image fills the whole sequence
    with torch.no_grad(), AttentionCapture(model) as fast:
        model(tokens, padding)
    with AttentionCapture(model) as slow:  # grad enabled: the ordinary path
        model(tokens, padding)
    name = "encoder.layers.1.self_attn"
    assert fast.weights[name].shape == (2, HEADS, 12, 12)
    valid = ~padding
    for b in range(2):
        rows = valid[b].nonzero().squeeze(1)
        torch.testing.assert_close(
            fast.weights[name][b][:, rows][:, :, rows], slow.weights[name][b][:, rows][:, :, rows], atol=1e-5, rtol=1e-4
        )
        assert fast.weights[name][b][:, ~valid[b]].abs().sum() == 0  # padded queries do not exist
    assert torch.equal(fast.key_padding_masks[name], padding)


def test_probe_protocol_module_is_read_and_its_flag_restored():
    torch.manual_seed(0)
    block = SpatialSelfAttention(channels=16, heads=2)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), block)
    with torch.no_grad(), AttentionCapture(model) as cap:
        model(torch.randn(2, 3, 5, 6))
    assert cap.weights["1"].shape == (2, 2, 30, 30)
    torch.testing.assert_close(cap.weights["1"].sum(-1), torch.ones(2, 2, 30))
    assert getattr(block, PROBE_FLAG) is False
    assert block.last_attention is None  # the reader does not keep [B, h, HW, HW] alive


class Boom(nn.Module):
    def forward(self, x):
        raise RuntimeError("boom")


def test_hooks_are_removed_and_flags_restored_even_when_the_forward_raises():
    block = SpatialSelfAttention(channels=16, heads=2)
    model = TinyTransformer()
    model.block = block
    model.boom = Boom()
    attn_modules = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    encoders = [model.encoder]

    with pytest.raises(RuntimeError, match="boom"):
        with AttentionCapture(model):
            assert getattr(block, PROBE_FLAG) is True
            assert all(m._forward_hooks for m in attn_modules)
            model.boom(model(*_inputs()))

    assert getattr(block, PROBE_FLAG) is False
    for m in attn_modules + encoders + [block]:
        assert not m._forward_hooks and not m._forward_pre_hooks


def test_wrong_module_name_lists_close_matches():
    model = TinyTransformer()
    with pytest.raises(ValueError, match=r"encoder\.layers\.0\.self_attn"):
        AttentionCapture(model, modules=["encoder.layer.0.self_atn"])


def test_a_container_name_selects_the_attention_modules_inside_it():
    readable, _ = find_attention_modules(TinyTransformer(), ["decoder.layers.1"])
    assert list(readable) == ["decoder.layers.1.self_attn", "decoder.layers.1.multihead_attn"]


class FusedAttention(nn.Module):
    """A custom block attending with the fused kernel: no weights exist to read."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        return F.scaled_dot_product_attention(q, k, v)


class SilentMHA(nn.MultiheadAttention):
    """An MHA subclass whose forward ignores need_weights."""

    def forward(self, query, key, value, **kwargs):
        return super().forward(query, key, value, need_weights=False)[0], None


def test_fused_attention_is_reported_by_name_not_skipped():
    model = nn.Sequential(TinyTransformer().encoder, FusedAttention())
    with pytest.warns(AttentionUnavailableWarning, match=r"1: FusedAttention.*scaled_dot_product_attention"):
        with AttentionCapture(model) as cap:
            model(torch.randn(2, 12, D))
    assert "1" in cap.unavailable and "0.layers.0.self_attn" in cap.weights

    with pytest.raises(AttentionUnavailable, match="1: FusedAttention"):
        AttentionCapture(model, modules=["1"])


def test_mha_subclass_returning_no_weights_is_reported_by_name():
    model = nn.ModuleDict({"attn": SilentMHA(D, HEADS, batch_first=True)})
    x = torch.randn(2, 4, D)
    with pytest.raises(AttentionUnavailable, match="attn: SilentMHA returned no attention weights"):
        with AttentionCapture(model, on_unavailable="raise"):
            model["attn"](x, x, x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with AttentionCapture(model) as cap:
            model["attn"](x, x, x)
    assert any(issubclass(w.category, AttentionUnavailableWarning) for w in caught)
    assert "attn" not in cap.weights and "attn" in cap.unavailable


def test_need_weights_strategy_gives_the_same_weights_as_recompute():
    torch.manual_seed(0)
    model = TinyTransformer().eval()
    tokens, padding = _inputs()
    with torch.no_grad(), AttentionCapture(model, strategy="need_weights") as forced:
        model(tokens, padding)
    with torch.no_grad(), AttentionCapture(model) as recomputed:
        model(tokens, padding)
    for name, w in recomputed.weights.items():
        torch.testing.assert_close(forced.weights[name], w, atol=1e-5, rtol=1e-4)


def test_undetached_weights_carry_gradients_to_the_inputs():
    model = TinyTransformer().eval()
    tokens = torch.randn(1, 12, D, requires_grad=True)
    with AttentionCapture(model, detach=False, to_cpu=True) as cap:
        model(tokens)
    w = cap.weights["encoder.layers.0.self_attn"]
    (grad,) = torch.autograd.grad(w[0, 0, 0, 0], tokens)
    assert grad.abs().sum() > 0
