"""The training-time entropy monitor: rides on the training forward, leaves training bit-identical."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from detlens.explainers.attention import AttentionCapture, EntropyMonitor, PerImageAttention, PerImageEntropy
from detlens.explainers.entropy import attention_entropy
from detlens.lightning_modules.attention import SpatialSelfAttention

D, HEADS = 16, 4


class TinyDETRLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layer = dict(d_model=D, nhead=HEADS, dim_feedforward=32, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(**layer), 2, enable_nested_tensor=False)
        self.decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(**layer), 2)
        self.queries = nn.Embedding(5, D)
        self.head = nn.Linear(D, 3)

    def forward(self, tokens, padding=None):
        memory = self.encoder(tokens, src_key_padding_mask=padding)
        tgt = self.queries.weight.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        return self.head(self.decoder(tgt, memory, memory_key_padding_mask=padding))


def _batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(2, 12, D, generator=g)
    padding = torch.zeros(2, 12, dtype=torch.bool)
    padding[1, 9:] = True
    return tokens, padding


def _train(steps: int, monitor_every: int | None) -> tuple[dict, list, dict]:
    """A few AdamW steps with dropout on; returns final weights, last grads, collected entropies."""
    torch.manual_seed(0)
    model = TinyDETRLike().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    monitor = EntropyMonitor(model) if monitor_every else None
    collected = {}
    for step in range(steps):
        opt.zero_grad()
        if monitor and step % monitor_every == 0:
            monitor.arm()  # on_train_batch_start
        loss = model(*_batch(step)).square().mean()
        loss.backward()
        if monitor and monitor.armed:  # on_train_batch_end
            collected[step] = monitor.collect()
            monitor.disarm()
        opt.step()
    grads = [p.grad.clone() for p in model.parameters()]
    return {k: v.clone() for k, v in model.state_dict().items()}, grads, collected


def test_monitored_training_is_bit_identical_to_unmonitored_training():
    plain_w, plain_g, _ = _train(steps=3, monitor_every=None)
    watched_w, watched_g, collected = _train(steps=3, monitor_every=1)

    assert sorted(collected) == [0, 1, 2]
    assert all(torch.equal(a, b) for a, b in zip(plain_g, watched_g))
    assert all(torch.equal(plain_w[k], watched_w[k]) for k in plain_w)


def test_monitor_reports_the_entropy_of_the_weights_the_layers_used():
    torch.manual_seed(0)
    model = TinyDETRLike().eval()
    tokens, padding = _batch(0)
    with AttentionCapture(model) as cap:
        model(tokens, padding)
    monitor = EntropyMonitor(model, chunk_elements=50)  # forces many query chunks
    with monitor.armed_for():
        model(tokens, padding)
    entropies = monitor.collect()

    assert list(entropies) == list(cap.weights)
    for name, weights in cap.weights.items():
        expected = attention_entropy(weights, cap.key_padding_masks[name], cap.query_padding_masks[name])
        assert entropies[name].shape == (HEADS,)
        torch.testing.assert_close(entropies[name], expected, atol=1e-5, rtol=1e-5)
    assert monitor.collect() == {}  # collect resets


def test_monitor_averages_every_call_between_collects():
    model = TinyDETRLike().eval()
    monitor = EntropyMonitor(model, modules=["encoder.layers.0.self_attn"])
    monitor.arm()
    monitor.arm()  # idempotent
    model(*_batch(0))
    model(*_batch(1))
    sums = monitor.collect_sums()
    monitor.disarm()
    monitor.disarm()
    total, rows = sums["encoder.layers.0.self_attn"]
    assert rows.item() == 2 * (12 + 9)  # valid query rows of two batches of (12, 9) tokens
    assert ((total / rows) <= 1).all()
    assert not model.encoder.layers[0].self_attn._forward_hooks


def test_disarmed_monitor_costs_nothing_and_sees_nothing():
    model = TinyDETRLike()
    monitor = EntropyMonitor(model)
    model(*_batch(0))
    assert monitor.collect() == {}
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_per_image_sums_are_what_a_forward_of_each_image_alone_gives():
    torch.manual_seed(0)
    model = TinyDETRLike().eval()
    tokens, padding = _batch(0)  # image 1 has 9 valid tokens of 12
    monitor = EntropyMonitor(model, chunk_elements=50)
    with torch.no_grad():
        with monitor.armed_for():
            model(tokens, padding)
        per_image = monitor.collect_per_image(2)
        alone = []
        for b, valid in enumerate((12, 9)):
            with monitor.armed_for():
                model(tokens[b : b + 1, :valid])
            alone.append(monitor.collect_sums())

    assert per_image is not None and len(per_image) == 2
    for read, ref in zip(per_image, alone):
        assert list(read) == list(ref) == monitor.names
        for name in ref:
            torch.testing.assert_close(read[name][0], ref[name][0], atol=1e-5, rtol=1e-5)  # [heads]
            assert read[name][1].item() == ref[name][1].item()  # rows
    assert monitor.collect_sums() == {}  # collect_per_image resets


def test_per_image_sums_are_refused_when_a_batch_dimension_is_not_the_images():
    model = TinyDETRLike().eval()
    monitor = EntropyMonitor(model)
    tokens, padding = _batch(0)
    with torch.no_grad(), monitor.armed_for():
        model(tokens, padding)
    assert monitor.collect_per_image(3) is None  # the calls had 2 rows, not 3 images
    with torch.no_grad(), monitor.armed_for():
        model(tokens, padding)
        model(tokens[:1])  # a second call with another batch size: pooled, not per image
    assert monitor.collect_per_image(2) is None
    with torch.no_grad(), monitor.armed_for():
        model(tokens, padding)
        model(tokens[:1])
    pooled = monitor.collect_sums()  # still the plain sums over every row of both calls
    assert pooled["encoder.layers.0.self_attn"][1].item() == 12 + 9 + 12


def test_the_per_image_reader_arms_only_while_installed_and_refuses_images_of_several_sizes():
    model = TinyDETRLike().eval()
    monitor = EntropyMonitor(model)
    reader = PerImageEntropy(monitor)
    handles = reader.install()
    assert monitor.armed
    tokens, padding = _batch(0)
    with torch.no_grad():
        model(tokens, padding)
    same = [torch.zeros(3, 8, 8), torch.zeros(3, 8, 8)]
    per_image = reader.read(same)
    assert per_image is not None and len(per_image) == 2
    reader.reset()
    with torch.no_grad():
        model(tokens, padding)
    assert reader.read([torch.zeros(3, 8, 8), torch.zeros(3, 8, 10)]) is None  # padding would differ
    for handle in handles:
        handle.remove()
    assert not monitor.armed
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_arming_says_when_it_would_change_an_inference_forward():
    torch.manual_seed(0)
    model = TinyDETRLike().eval()
    encoder = [f"encoder.layers.{i}.self_attn" for i in range(2)]
    decoder = [n for n in EntropyMonitor(model).names if n.startswith("decoder.")]
    assert EntropyMonitor(model).changes_inference_forward  # the encoder layers' fused inference kernel
    assert EntropyMonitor(model, modules=encoder).changes_inference_forward
    watch_decoder = EntropyMonitor(model, modules=decoder)
    assert not watch_decoder.changes_inference_forward
    tokens, padding = _batch(0)
    with torch.inference_mode():
        plain = model(tokens, padding)
        with watch_decoder.armed_for():
            read = model(tokens, padding)
    assert torch.equal(plain, read)


@pytest.mark.parametrize("first_off", ["first", "second"])
@pytest.mark.parametrize("flag_before", [False, True])
def test_overlapping_readers_of_a_probe_module_all_read_it_and_leave_its_flag_as_it_was(first_off, flag_before):
    # e.g. two AttentionEntropyCallbacks armed on the same training step, or a capture
    # inside a monitored step: each gets the weights, in whatever order they are removed.
    torch.manual_seed(0)
    block = SpatialSelfAttention(16, heads=2).eval()
    block.detlens_attention_probe = flag_before
    model = nn.Sequential(block)
    x = torch.rand(2, 16, 5, 5)
    a, b = EntropyMonitor(model), EntropyMonitor(model)
    with AttentionCapture(model) as alone:
        model(x)
    expected = attention_entropy(alone.weights["0"])

    a.arm()
    b.arm()
    with AttentionCapture(model) as capture:
        model(x)
    (a if first_off == "first" else b).disarm()
    model(x)  # only the other monitor is still armed
    (b if first_off == "first" else a).disarm()

    torch.testing.assert_close(capture.weights["0"], alone.weights["0"])
    readings = {"a": a.collect_sums()["0"], "b": b.collect_sums()["0"]}
    still_armed = "b" if first_off == "first" else "a"
    for name, (total, rows) in readings.items():
        calls = 2 if name == still_armed else 1
        assert rows.item() == calls * 2 * 25
        torch.testing.assert_close(total / rows, expected, atol=1e-5, rtol=1e-5)
    assert a.unavailable == {} and b.unavailable == {}
    assert block.detlens_attention_probe is flag_before
    assert (block.last_attention is not None) is flag_before  # kept only for a user who had asked for it
    assert not block._forward_hooks


def test_bad_chunk_size_is_refused():
    with pytest.raises(ValueError, match="chunk_elements"):
        EntropyMonitor(TinyDETRLike(), chunk_elements=0)


def test_per_image_attention_of_a_batch_equals_each_images_own_capture_and_refuses_mixed_sizes():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), SpatialSelfAttention(16, heads=2)).eval()
    images = [torch.rand(3, 6, 5) for _ in range(3)]
    reader = PerImageAttention(net, ["1"])
    handles = reader.install()
    with torch.no_grad():
        batch_out = net(torch.stack(images))
    per_image = reader.read(images)
    assert per_image is not None and len(per_image) == 3
    for handle in handles:
        handle.remove()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())
    with torch.no_grad():
        assert torch.equal(net(torch.stack(images)), batch_out)  # reading did not change the forward

    for image, read in zip(images, per_image):
        with AttentionCapture(net, ["1"]) as alone, torch.no_grad():
            net(image[None])
        weights, grid = read["1"]
        assert grid == (6, 5) and weights.shape == (2, 30, 30)
        torch.testing.assert_close(weights, alone.weights["1"][0], rtol=1e-5, atol=1e-6)

    handles = reader.install()
    with torch.no_grad():
        net(torch.stack(images))
    assert reader.read([images[0], torch.rand(3, 6, 4)]) is None  # padding would differ
    reader.reset()
    with torch.no_grad():
        net(torch.stack(images))
        net(torch.stack(images))
    assert reader.read(images) is None  # the block ran twice: which call is whose is unknown
    for handle in handles:
        handle.remove()
