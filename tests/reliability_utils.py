"""Shared pieces of the reliability suite (``tests/test_reliability_*.py``).

Tiny detectors (a Faster R-CNN with a spatial attention block, a DETR), a tiny synthetic
data module, a quiet CPU trainer, every detlens callback at its most frequent cadence,
and the snapshots the suite compares (weights, optimiser state, global RNG streams,
hooks left on modules).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn

from detlens.callbacks.attention_entropy import AttentionEntropyCallback
from detlens.callbacks.attention_maps import AttentionMapCallback
from detlens.callbacks.base import ProbeCallback
from detlens.callbacks.embeddings import BoxEmbeddingCallback
from detlens.callbacks.gradcam import GradCAMCallback
from detlens.callbacks.prediction_overlay import PredictionOverlayCallback
from detlens.data import SyntheticDataModule
from detlens.lightning_modules import DETR, TorchvisionDetector

SIZE = 64
NUM_TRAIN, NUM_VAL = 8, 4

# The media keys each callback logs at every event (W&B history keys).
MEDIA_KEYS = {
    "predictions": "predictions/probe",
    "gradcam": "gradcam/probe",
    "attention_maps": None,  # one panel per map kind; any key under attention_maps/
    "attention": "attention/entropy_heatmap",
    "embeddings": "embeddings/scatter",
}


def scenes(root: str, batch_size: int = 4, num_train: int = NUM_TRAIN, num_val: int = NUM_VAL) -> SyntheticDataModule:
    """8 training images (2 steps per epoch at batch 4), 4 validation images, no random flips."""
    return SyntheticDataModule(
        root=root, num_train=num_train, num_val=num_val, image_size=SIZE, batch_size=batch_size, horizontal_flip=False
    )


def faster_rcnn(dm: SyntheticDataModule, attention_stage: str | None = "layer3", **overrides: Any) -> TorchvisionDetector:
    """A ~seconds-per-step Faster R-CNN (ResNet-18 FPN, 16 FPN channels) with a 2-head attention block."""
    kwargs: dict[str, Any] = dict(
        num_classes=dm.num_classes, class_names=dm.class_names, min_size=SIZE, max_size=SIZE, fpn_channels=16,
        representation_size=32, rpn_proposals_train=50, rpn_proposals_test=20, box_batch_size_per_image=16,
        anchor_sizes=[8, 16, 32, 64, 128], score_thresh=0.0, warmup_steps=1, attention_stage=attention_stage,
        attention_heads=2,
    )
    kwargs.update(overrides)
    return TorchvisionDetector("fasterrcnn_resnet18_fpn", **kwargs)


def faster_rcnn_fpn_attention(dm: SyntheticDataModule, **overrides: Any) -> TorchvisionDetector:
    """:func:`faster_rcnn` with an attention block on every FPN level instead of after ``layer3``,
    each with a learnable softmax temperature."""
    kwargs: dict[str, Any] = dict(attention_fpn_levels="all", attention_temperature="learnable")
    kwargs.update(overrides)
    return faster_rcnn(dm, attention_stage=None, **kwargs)


def tiny_detr(dm: SyntheticDataModule, **overrides: Any) -> DETR:
    """DETR with a ResNet-18 stage-3 backbone, 1 encoder and 2 decoder layers of width 32.

    ``dropout`` stays on (0.1) by default: dropout draws from the global RNG, so a callback
    that consumed it would change the training run.
    """
    kwargs: dict[str, Any] = dict(
        num_classes=dm.num_classes, class_names=dm.class_names, backbone="resnet18", backbone_stage="layer3",
        hidden_dim=32, nheads=4, enc_layers=1, dec_layers=2, dim_feedforward=64, dropout=0.1, num_queries=8,
        image_size=SIZE, score_thresh=0.0, warmup_steps=1,
    )
    kwargs.update(overrides)
    return DETR(**kwargs)


def hf_detector(architecture: str):
    """A small ``transformers`` detector (width 32, 1 encoder + 2 decoder layers, 8 queries,
    dropout on) trained by ``HFDetector``; eager attention so every attention callback reads it."""

    def make(dm: SyntheticDataModule, **overrides: Any) -> Any:
        from detlens.lightning_modules import HFDetector

        config: dict[str, Any] = dict(d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64,
                                      decoder_ffn_dim=64, num_queries=8, dropout=0.1)
        if architecture in ("rt_detr", "rt_detr_v2", "d_fine"):
            config = dict(d_model=32, encoder_hidden_dim=32, decoder_in_channels=[32, 32, 32], decoder_layers=2,
                          num_queries=8, encoder_ffn_dim=64, decoder_ffn_dim=64, dropout=0.1)
        kwargs: dict[str, Any] = dict(architecture=architecture, num_classes=dm.num_classes, class_names=dm.class_names,
                                      config=config, score_thresh=0.0, warmup_steps=1)
        kwargs.update(overrides)
        return HFDetector(**kwargs)

    make.__name__ = f"hf_{architecture}"
    return make


def every_callback(every_n_steps: int | None = 1, num_probe_images: int = 2, **common: Any) -> list[ProbeCallback]:
    """Every detlens callback, each at its most frequent cadence (every optimiser step) by default.

    Thresholds are 0 so an untrained detector still yields detections to explain.
    """
    cadence: dict[str, Any] = dict(every_n_steps=every_n_steps, num_probe_images=num_probe_images, **common)
    if every_n_steps is not None:
        cadence.setdefault("every_n_epochs", None)
    return [
        PredictionOverlayCallback(score_threshold=0.0, max_detections=5, **cadence),
        GradCAMCallback(score_threshold=0.0, top_k=2, **cadence),
        AttentionMapCallback(top_k=2, **cadence),
        AttentionEntropyCallback(every_n_train_steps=1, **cadence),
        BoxEmbeddingCallback(method="tsne", score_threshold=0.0, max_detections=5, thumbnail_size=16, **cadence),
    ]


def quiet_trainer(**overrides: Any) -> pl.Trainer:
    """A CPU trainer without progress bar, summary, checkpoints or logger (override any)."""
    kwargs: dict[str, Any] = dict(
        accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, log_every_n_steps=1, num_sanity_val_steps=0,
    )
    kwargs.update(overrides)
    return pl.Trainer(**kwargs)


def rng_state() -> dict[str, Any]:
    """The global random streams a training run draws from: torch CPU, numpy, ``random``."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def same_rng_state(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Names of the streams in which ``a`` and ``b`` differ (empty: identical)."""
    differ = []
    if not torch.equal(a["torch"], b["torch"]):
        differ.append("torch")
    na, nb = a["numpy"], b["numpy"]
    if na[0] != nb[0] or not np.array_equal(na[1], nb[1]) or tuple(na[2:]) != tuple(nb[2:]):
        differ.append("numpy")
    if a["python"] != b["python"]:
        differ.append("python")
    return differ


def flat_tensors(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(path, leaf)`` for every leaf of a nested dict/list (an optimiser state dict)."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from flat_tensors(v, f"{prefix}/{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from flat_tensors(v, f"{prefix}/{i}")
    else:
        yield prefix, value


def differing_leaves(a: Any, b: Any) -> list[str]:
    """Paths where two nested states differ bit for bit (tensors by ``torch.equal``)."""
    left, right = dict(flat_tensors(a)), dict(flat_tensors(b))
    if left.keys() != right.keys():
        return sorted(set(left) ^ set(right))
    out = []
    for key, x in left.items():
        y = right[key]
        same = torch.equal(x, y) if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) else x == y
        if not same:
            out.append(key)
    return out


def hooks_on(model: nn.Module) -> dict[str, list[str]]:
    """Every module (by name) that holds a forward, forward-pre, backward or state-dict hook."""
    found: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        kinds = [
            kind
            for kind in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
            if getattr(module, kind, None)
        ]
        if kinds:
            found[name or "<root>"] = kinds
    return found
