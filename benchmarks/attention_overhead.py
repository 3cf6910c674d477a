"""Cost of attention monitoring on detlens' DETR, the FPN-attention Faster R-CNN and transformers' Deformable DETR.

1. Training-step time with and without ``EntropyMonitor`` armed, for the DETR and for the
   Faster R-CNN of ``configs/fasterrcnn_fpn_attention_synthetic.yaml`` (a
   ``SpatialSelfAttention`` with a learnable temperature on every FPN level; entropy is read
   every 10 steps there). Plain and armed steps
   are interleaved (same batch, same weights: optimizer off) and the medians compared,
   which is far less noisy on a shared machine than two separate runs. The overhead at a
   cadence of one armed step every ``n`` is ``(t_armed - t_plain) / (n * t_plain)``.
2. One attention-map pass over a probe set: a forward under ``AttentionCapture`` plus
   per-detection cross-attention maps, rollout maps and encoder point maps, vs a plain
   forward.

Run: ``python benchmarks/attention_overhead.py [--model detr|fpn_attention|all] [--image-size 320 --steps 12 ...]``;
``--quick`` is a smoke run (small images, few steps: proves the script works, its figures mean little).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from detlens.explainers.attention import AttentionCapture, EntropyMonitor
from detlens.explainers.rollout import (
    attention_rollout,
    decoder_rollout,
    point_attention_maps,
    query_attention_maps,
    transformer_attention_names,
)
from detlens.lightning_modules.detr import DETRNet
from detlens.lightning_modules.torchvision_detector import build_torchvision_detector


def _net(args: argparse.Namespace) -> DETRNet:
    torch.manual_seed(0)
    return DETRNet(
        num_classes=5, backbone="resnet18", hidden_dim=args.hidden_dim, num_queries=args.queries,
        enc_layers=args.layers, dec_layers=args.layers, nheads=8, dim_feedforward=4 * args.hidden_dim,
        image_size=args.image_size, score_thresh=0.0,
    )


def _images(n: int, size: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Mixed aspect ratios, as in a real batch: exercises padding masks.
    return [torch.rand(3, size, int(size * (0.6 + 0.4 * (i % 2))), generator=g) for i in range(n)]


def _targets(images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    out = []
    for img in images:
        h, w = img.shape[-2:]
        out.append({"boxes": torch.tensor([[0.1 * w, 0.2 * h, 0.6 * w, 0.7 * h]]), "labels": torch.tensor([1])})
    return out


def _fpn_attention_net(args: argparse.Namespace) -> torch.nn.Module:
    """The detector of ``configs/fasterrcnn_fpn_attention_synthetic.yaml`` (3 classes)."""
    torch.manual_seed(0)
    return build_torchvision_detector(
        "fasterrcnn_resnet18_fpn", 3, min_size=args.fpn_image_size, max_size=args.fpn_image_size,
        returned_layers=[2, 3, 4], fpn_channels=64, anchor_sizes=[16, 32, 64, 128], attention_fpn_levels="all",
        attention_temperature="learnable", attention_heads=2, rpn_proposals_train=300, rpn_proposals_test=150,
        rpn_batch_size_per_image=128, box_batch_size_per_image=128, representation_size=256, detections_per_image=20,
    )


def bench_training(args: argparse.Namespace, model: str = "detr") -> None:
    if model == "detr":
        net, size, every = _net(args).train(), args.image_size, args.every
        images = _images(args.batch, size, 0)
    else:
        net, size, every = _fpn_attention_net(args).train(), args.fpn_image_size, 10
        g = torch.Generator().manual_seed(0)
        images = [torch.rand(3, size, size, generator=g) for _ in range(args.batch)]
    monitor = EntropyMonitor(net)
    targets = _targets(images)

    def step(armed: bool) -> float:
        net.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same proposal sampling in both kinds of step
        start = time.perf_counter()
        if armed:
            monitor.arm()
        loss = sum(net(images, targets).values())
        if armed:
            monitor.disarm()  # as AttentionEntropyCallback does: before backward
        loss.backward()
        if armed:
            monitor.collect()
        return time.perf_counter() - start

    step(False), step(True)  # warm-up
    plain, armed = [], []
    for _ in range(args.steps):
        plain.append(step(False))
        armed.append(step(True))
    t_plain, t_armed = statistics.median(plain), statistics.median(armed)
    extra = (t_armed - t_plain) / t_plain
    print(f"{model} training step, batch {args.batch} x {size}px, {len(monitor.names)} attention modules")
    print(f"  plain step        {t_plain * 1e3:8.1f} ms (median of {args.steps})")
    print(f"  armed every step  {t_armed * 1e3:8.1f} ms  -> overhead {100 * extra:+.2f}%")
    for cadence in dict.fromkeys((every, 10)):
        print(f"  armed every {cadence:<3d}    overhead {100 * extra / cadence:+.3f}% (amortised)")


def bench_hf_deformable_training(args: argparse.Namespace) -> None:
    """The same interleaved measurement on transformers' Deformable DETR trained with its own loss:
    entropy over levels x points of every deformable and dense attention module."""
    from detlens.lightning_modules.hf_detector import build_hf_detector, hf_inputs, hf_labels

    torch.manual_seed(0)
    net = build_hf_detector("deformable_detr", 6, dict(d_model=args.hidden_dim, encoder_layers=args.layers,
                                                        decoder_layers=args.layers, num_queries=args.queries)).train()
    monitor = EntropyMonitor(net)
    images = _images(args.batch, args.image_size, 0)
    pixel_values, pixel_mask = hf_inputs(images)
    labels = hf_labels([{"boxes": t["boxes"], "labels": t["labels"]} for t in _targets(images)], tuple(pixel_values.shape[-2:]))

    def step(armed: bool) -> float:
        net.zero_grad(set_to_none=True)
        start = time.perf_counter()
        if armed:
            monitor.arm()
        net(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=labels).loss.backward()
        if armed:
            monitor.collect()
            monitor.disarm()
        return time.perf_counter() - start

    step(False), step(True)  # warm-up
    plain, armed = [], []
    for _ in range(args.steps):
        plain.append(step(False))
        armed.append(step(True))
    t_plain, t_armed = statistics.median(plain), statistics.median(armed)
    extra = (t_armed - t_plain) / t_plain
    print(f"transformers Deformable DETR training step, batch {args.batch} x {args.image_size}px, "
          f"{len(monitor.names)} attention modules")
    print(f"  plain step        {t_plain * 1e3:8.1f} ms (median of {args.steps})")
    print(f"  armed every step  {t_armed * 1e3:8.1f} ms  -> overhead {100 * extra:+.2f}%")
    for every in (args.every, 10):
        print(f"  armed every {every:<3d}    overhead {100 * extra / every:+.3f}% (amortised)")


def bench_maps(args: argparse.Namespace) -> None:
    net = _net(args).eval()
    names = transformer_attention_names(net)
    images = _images(args.probe_images, args.image_size, 1)
    sizes = [tuple(i.shape[-2:]) for i in images]
    grid: dict[str, tuple[int, int]] = {}
    net.input_proj.register_forward_hook(lambda m, a, o: grid.update(hw=tuple(o.shape[-2:])))

    def plain() -> None:
        with torch.no_grad():
            net(images)

    def explained() -> None:
        with torch.no_grad(), AttentionCapture(net, names["encoder_self"] + names["decoder_cross"], to_cpu=True) as cap:
            detections = net(images)
        hf, wf = grid["hw"]
        last = names["decoder_cross"][-1]
        padding = cap.key_padding_masks[last].view(len(images), hf, wf)
        queries = [torch.arange(min(args.detections, d["boxes"].shape[0])) for d in detections]
        query_attention_maps(cap.weights[last], (hf, wf), sizes, queries, padding, heads="none")
        rollout = attention_rollout([cap.weights[n] for n in names["encoder_self"]])
        query_attention_maps(decoder_rollout(cap.weights[last], rollout), (hf, wf), sizes, queries, padding)
        centres = [((d["boxes"][: args.detections, :2] + d["boxes"][: args.detections, 2:]) / 2) for d in detections]
        point_attention_maps(cap.weights[names["encoder_self"][-1]], centres, (hf, wf), sizes, padding)

    plain(), explained()  # warm-up
    t_plain = statistics.median(_time(plain) for _ in range(args.repeats))
    t_maps = statistics.median(_time(explained) for _ in range(args.repeats))
    print(f"attention-map pass over {args.probe_images} probe images, {args.detections} detections each")
    print(f"  plain forward     {t_plain * 1e3:8.1f} ms")
    print(f"  capture + maps    {t_maps * 1e3:8.1f} ms ({t_maps / t_plain:.2f}x a plain forward)")


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=320)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--hidden-dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--every", type=int, default=50, help="monitor cadence (steps)")
    parser.add_argument("--probe-images", type=int, default=8)
    parser.add_argument("--detections", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", choices=["detr", "fpn_attention", "hf_deformable_detr", "all"], default="all")
    parser.add_argument("--fpn-image-size", type=int, default=160, help="the FPN-attention config's image size")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, 2 steps")
    args = parser.parse_args()
    if args.quick:
        args.image_size, args.fpn_image_size, args.hidden_dim, args.layers = 96, 96, 32, 1
        args.queries, args.steps, args.probe_images, args.repeats = 10, 2, 2, 1
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} CPU threads" + (" (--quick: a smoke run)" if args.quick else ""))
    if args.model in ("detr", "all"):
        bench_training(args, "detr")
        bench_maps(args)
    if args.model in ("fpn_attention", "all"):
        bench_training(args, "fpn_attention")
    if args.model in ("hf_deformable_detr", "all"):
        try:
            import transformers  # noqa: F401 - the hf extra
        except ImportError:
            print("transformers not installed (pip install 'detlens[hf]'): Deformable DETR rows skipped")
        else:
            bench_hf_deformable_training(args)


if __name__ == "__main__":
    main()
