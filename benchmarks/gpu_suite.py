"""detlens' figures on an accelerator, in one command; ``--device cpu --quick`` tests the suite itself.

Four measurements, each printed as a ratio against its peer measured in the same run, on
the same device:

1. **callback overhead**: a Faster R-CNN ResNet-50 FPN fit (attention block after
   ``layer3``) at 800 px, bf16-mixed, batch 8, with every detlens callback of the cluster
   config (``configs/fasterrcnn_ddp_multinode.yaml``: once per epoch on the probe set,
   entropy from the training forward every 500 steps, scaled here to the fit's length)
   vs the same fit without them. Fits alternate (without, with, without, with) after a
   warm-up fit; the ratio is of the medians of their wall times.
2. **Grad-CAM per detection** at K = 1, 10, 50 on Faster R-CNN and detlens' DETR
   (ResNet-50): detlens' one-backward paths vs its own per-detection loop vs
   pytorch-grad-cam (one forward and backward per detection), as in
   ``benchmarks/gradcam_throughput.py``.
3. **attention under bf16**: a DETR training step with the entropy monitor armed vs
   plain (interleaved, medians), and one attention-map pass over a probe set vs a plain
   forward, both under ``torch.autocast(bfloat16)``.
4. **t-SNE of 10,000 box features**: detlens' CPU path (PCA-50, openTSNE with detlens'
   gradients) end to end, and its affinity step (neighbours + perplexity calibration)
   next to an exact kNN on the device (``torch.cdist`` + ``topk``): the part a GPU could
   take over without another library. cuML's t-SNE is not tried: it is not installed
   from PyPI alone.

    make bench-gpu                                     # = python benchmarks/gpu_suite.py --device cuda
    python benchmarks/gpu_suite.py --device cpu --quick  # the suite's own test (CI), a few minutes

The full suite is sized to run in at most 8 minutes on one H100-class GPU. Nothing here
is asserted: the figures go to ``docs/benchmarks.md`` with the card that produced them.
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_CONSOLE", "off")
REPO = Path(__file__).resolve().parents[1]
CLUSTER_CONFIG = REPO / "configs" / "fasterrcnn_ddp_multinode.yaml"
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmarks

from embedding_projection import make_box_features  # noqa: E402
from gradcam_throughput import best_of, time_pytorch_grad_cam  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, fn: Callable[[], Any]) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------
# 1. callback overhead
# ---------------------------------------------------------------------------------------


def cluster_callbacks(steps: int, probe_images: int) -> list[Any]:
    """The detlens callbacks of the cluster config, instantiated; the training-forward entropy
    cadence scaled to a fit of ``steps`` steps (four readings), probe sets capped at ``probe_images``."""
    config = yaml.safe_load(CLUSTER_CONFIG.read_text())
    callbacks = []
    for spec in config["trainer"]["callbacks"]:
        module, _, name = spec["class_path"].rpartition(".")
        if not module.startswith("detlens."):
            continue
        args = dict(spec.get("init_args") or {})
        if "num_probe_images" in args:
            args["num_probe_images"] = min(args["num_probe_images"], probe_images)
        if args.get("every_n_train_steps"):
            args["every_n_train_steps"] = max(1, steps // 4)
        callbacks.append(getattr(importlib.import_module(module), name)(**args))
    return callbacks


def bench_overhead(device: torch.device, quick: bool) -> None:
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import WandbLogger

    from detlens.data import SyntheticDataModule
    from detlens.lightning_modules import TorchvisionDetector

    size, batch, steps, probe = (96, 2, 6, 4) if quick else (800, 8, 150, 32)
    architecture = "fasterrcnn_resnet18_fpn" if quick else "fasterrcnn_resnet50_fpn"
    precision = "32-true" if device.type == "cpu" else "bf16-mixed"
    work = Path(tempfile.mkdtemp(prefix="detlens-gpu-suite-"))
    dm_args = dict(root=str(work / "scenes"), num_train=steps * batch, num_val=probe, image_size=size,
                   batch_size=batch, num_workers=0 if quick else 4)
    SyntheticDataModule(**dm_args)  # generated once, outside the timed fits

    def fit(with_callbacks: bool, name: str) -> float:
        pl.seed_everything(0, verbose=False)
        dm = SyntheticDataModule(**dm_args)
        model = TorchvisionDetector(architecture, num_classes=dm.num_classes, class_names=dm.class_names, min_size=size,
                                    max_size=size, attention_stage="layer3", warmup_steps=10)
        trainer = pl.Trainer(
            accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, precision=precision, max_epochs=1,
            logger=WandbLogger(offline=True, save_dir=str(work / name)), enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=10,
            callbacks=cluster_callbacks(steps, probe) if with_callbacks else [],
        )
        start = time.perf_counter()
        trainer.fit(model, dm)
        _sync(device)
        seconds = time.perf_counter() - start
        import wandb

        wandb.finish()
        return seconds

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not quick:
            fit(False, "warmup")  # first-use costs (cuDNN autotuning, allocator growth) out of the timed fits
        rounds = 1 if quick else 2
        without, with_ = [], []
        for i in range(rounds):
            without.append(fit(False, f"without{i}"))
            with_.append(fit(True, f"with{i}"))
    a, b = statistics.median(without), statistics.median(with_)
    print(f"[1] callback overhead: {architecture} at {size} px, {precision}, batch {batch}, {steps} steps + validation "
          f"of {probe} images, every detlens callback of {CLUSTER_CONFIG.name}")
    print(f"    fit without callbacks {a:8.1f} s   with {b:8.1f} s   ratio {b / a:.3f}  (overhead {100 * (b / a - 1):+.1f}%, "
          f"median of {rounds})")


# ---------------------------------------------------------------------------------------
# 2. Grad-CAM per detection
# ---------------------------------------------------------------------------------------


def bench_gradcam(device: torch.device, quick: bool) -> None:
    from detlens.adapters import adapter_for
    from detlens.explainers.gradcam import gradcam
    from detlens.lightning_modules import DETR, TorchvisionDetector

    size, ks, repeats = (128, [1, 3], 1) if quick else (800, [1, 10, 50], 3)
    torch.manual_seed(0)
    models = {
        "fasterrcnn_r50_fpn": (TorchvisionDetector(
            "fasterrcnn_resnet18_fpn" if quick else "fasterrcnn_resnet50_fpn", num_classes=20, min_size=size,
            max_size=size, rpn_proposals_test=300, score_thresh=0.0, detections_per_image=100,
        ).model, "features/0", "backbone.fpn.layer_blocks.0"),
        "detr_r50": (DETR(num_classes=20, backbone="resnet18" if quick else "resnet50", image_size=size,
                          num_queries=100, score_thresh=0.0).model, "backbone.layer4", "backbone.layer4"),
    }
    image = torch.rand(3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    print(f"[2] Grad-CAM per detection at {size} px (ms per detection; best of {repeats})")
    print(f"    {'model':20s} {'K':>3s} {'detlens':>9s} {'loop':>9s} {'pgc':>9s} {'vs loop':>8s} {'vs pgc':>8s}")
    for name, (net, layer, module_name) in models.items():
        net = net.to(device).eval()
        adapter = adapter_for(net)
        for k in ks:
            def ours(fast: bool) -> list[torch.Tensor]:
                return gradcam(adapter.run([image], [layer], top_k=k), layer, fast=fast)

            got = int(ours(True)[0].shape[0])
            t_fast = best_of(repeats, lambda: _timed(device, lambda: ours(True)))
            t_loop = best_of(repeats, lambda: _timed(device, lambda: ours(False)))
            t_pgc = time_pytorch_grad_cam(net, adapter, image, layer, module_name, k, repeats)
            print(f"    {name:20s} {got:3d} {1e3 * t_fast / got:9.2f} {1e3 * t_loop / got:9.2f} {1e3 * t_pgc / got:9.2f} "
                  f"{t_loop / t_fast:7.1f}x {t_pgc / t_fast:7.1f}x", flush=True)
        net.cpu()


# ---------------------------------------------------------------------------------------
# 3. attention under bf16
# ---------------------------------------------------------------------------------------


def bench_attention(device: torch.device, quick: bool) -> None:
    from detlens.explainers.attention import AttentionCapture, EntropyMonitor
    from detlens.explainers.rollout import query_attention_maps, transformer_attention_names
    from detlens.lightning_modules.detr import DETRNet

    size, batch, steps, hidden, layers = (96, 2, 3, 64, 2) if quick else (800, 8, 20, 256, 6)
    torch.manual_seed(0)
    net = DETRNet(num_classes=20, backbone="resnet18" if quick else "resnet50", hidden_dim=hidden, num_queries=100,
                  enc_layers=layers, dec_layers=layers, nheads=8, dim_feedforward=4 * hidden, image_size=size,
                  score_thresh=0.0).to(device)
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, size, size, generator=g).to(device) for _ in range(batch)]
    targets = [{"boxes": torch.tensor([[0.1 * size, 0.2 * size, 0.6 * size, 0.7 * size]], device=device),
                "labels": torch.tensor([1], device=device)} for _ in images]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    monitor = EntropyMonitor(net)
    net.train()

    def step(armed: bool) -> None:
        net.zero_grad(set_to_none=True)
        if armed:
            monitor.arm()
        with autocast:
            loss = sum(net(images, targets).values())
        loss.backward()
        if armed:
            monitor.collect()
            monitor.disarm()

    step(False), step(True)
    plain, armed = [], []
    for _ in range(steps):
        plain.append(_timed(device, lambda: step(False)))
        armed.append(_timed(device, lambda: step(True)))
    t_plain, t_armed = statistics.median(plain), statistics.median(armed)
    print(f"[3] attention under bf16: DETR ({len(monitor.names)} attention modules), batch {batch} x {size} px")
    print(f"    training step plain {1e3 * t_plain:8.1f} ms   entropy armed {1e3 * t_armed:8.1f} ms   ratio "
          f"{t_armed / t_plain:.3f}  (at one armed step in 500: {100 * (t_armed / t_plain - 1) / 500:+.4f}%)")

    net.eval()
    names = transformer_attention_names(net)
    last = names["decoder_cross"][-1]
    grid: dict[str, tuple[int, int]] = {}
    handle = net.input_proj.register_forward_hook(lambda m, a, o: grid.update(hw=tuple(o.shape[-2:])))

    def forward() -> None:
        with torch.no_grad(), autocast:
            net(images)

    def maps() -> None:
        with torch.no_grad(), autocast, AttentionCapture(net, [last], to_cpu=False) as cap:
            detections = net(images)
        hf, wf = grid["hw"]
        queries = [torch.arange(min(10, d["boxes"].shape[0])) for d in detections]
        padding = cap.key_padding_masks[last].view(len(images), hf, wf)
        query_attention_maps(cap.weights[last], (hf, wf), [(size, size)] * len(images), queries, padding, heads="none")

    forward(), maps()
    t_forward = statistics.median(_timed(device, forward) for _ in range(steps))
    t_maps = statistics.median(_timed(device, maps) for _ in range(steps))
    handle.remove()
    print(f"    probe forward {1e3 * t_forward:8.1f} ms   capture + per-detection maps {1e3 * t_maps:8.1f} ms   ratio "
          f"{t_maps / t_forward:.3f}")


# ---------------------------------------------------------------------------------------
# 4. t-SNE of box features
# ---------------------------------------------------------------------------------------


def bench_tsne(device: torch.device, quick: bool) -> None:
    from openTSNE.affinity import PerplexityBasedNN

    from detlens.explainers.embeddings import EXACT_NEIGHBOURS_ROWS, pca, tsne_2d

    points, dims, k = (1_000, 256, 90) if quick else (10_000, 1_024, 90)  # k = 3 x perplexity 30
    features, _ = make_box_features(points, dims, classes=10, seed=0)
    x = torch.from_numpy(features)
    start = time.perf_counter()
    tsne_2d(x, seed=0)
    t_total = time.perf_counter() - start
    reduced = pca(x, 50).numpy().astype(np.float32)

    def affinities() -> None:  # as detlens' t-SNE computes them (exact neighbours at this size)
        method = "exact" if points <= EXACT_NEIGHBOURS_ROWS else "annoy"
        PerplexityBasedNN(reduced, perplexity=30.0, method=method, n_jobs=1, random_state=0)

    on_device = torch.from_numpy(reduced).to(device)

    def exact_knn() -> None:
        for rows in torch.split(on_device, 4096):
            torch.cdist(rows, on_device).topk(k + 1, largest=False)

    t_cpu = best_of(1 if quick else 3, affinities)
    exact_knn()
    t_device = best_of(1 if quick else 3, lambda: _timed(device, exact_knn))
    saved = max(t_cpu - t_device, 0.0)
    print(f"[4] t-SNE of {points:,} box features ({dims}-D): detlens CPU path {t_total:7.2f} s end to end")
    print(f"    its affinity step (kNN + perplexity, CPU) {t_cpu:7.3f} s   exact kNN on {device.type} {t_device:7.3f} s   "
          f"ratio {t_device / t_cpu:.3f}; moving it would save at most {100 * saved / t_total:.1f}% of the t-SNE "
          f"({'pays' if saved > 0.1 * t_total else 'does not pay'}: the gradient iterations stay on the CPU)")


SECTIONS = {"overhead": bench_overhead, "gradcam": bench_gradcam, "attention": bench_attention, "tsne": bench_tsne}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--quick", action="store_true", help="small models and sizes: a test of the suite, not figures")
    parser.add_argument("--only", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_suite: no CUDA device here; run it where one is, or use --device cpu --quick", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"detlens GPU suite on {name}; torch {torch.__version__}{' (quick)' if args.quick else ''}", flush=True)
    start = time.perf_counter()
    for section in args.only:
        t0 = time.perf_counter()
        SECTIONS[section](device, args.quick)
        print(f"    ({section}: {time.perf_counter() - t0:.0f} s)", flush=True)
    print(f"suite done in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
