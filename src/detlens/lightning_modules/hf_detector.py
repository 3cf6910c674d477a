"""``HFDetector``: a Hugging Face ``transformers`` DETR-family detector as a detlens LightningModule.

The network is the ``transformers`` model itself (``self.model``), trained with its own
loss (Hungarian matching and the losses of its paper, computed by ``transformers`` when
``labels`` are given), built from a small config with random weights, or loaded with
``from_pretrained`` from a local folder (nothing is downloaded). Batches are detlens'
``(images, targets)``; they become ``pixel_values``, ``pixel_mask`` and ``labels``
(``class_labels``, normalised ``cx, cy, w, h`` against the padded batch, the convention of
the image processors when they pad) in :func:`hf_inputs` / :func:`hf_labels`.

Class ids: the model gets ``num_labels = C + 1`` and id ``0`` is never a target, so its
class ids are detlens' labels ``1..C`` (as torchvision's detectors count them) and
``HFDetrAdapter`` needs no ``label_offset``. A model fine-tuned elsewhere on ``0..C-1``
is explained with ``HFDetrAdapter(model, label_offset=1)``.

Requires the ``hf`` extra (``pip install 'detlens[hf]'``).
"""

from __future__ import annotations

import functools
import inspect
import os
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from detlens.lightning_modules.base import Batch, DetectionModule

__all__ = [
    "ARCHITECTURES", "HFDetector", "build_hf_detector", "call_hf", "decode_hf", "hf_inputs", "hf_labels", "pad_multiple",
]

Architecture = Literal["detr", "conditional_detr", "yolos", "deformable_detr", "rt_detr", "rt_detr_v2", "d_fine",
                       "rf_detr"]
ARCHITECTURES: tuple[str, ...] = ("detr", "conditional_detr", "yolos", "deformable_detr", "rt_detr", "rt_detr_v2", "d_fine",
                                  "rf_detr")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def pad_multiple(model: Any) -> int:
    """The multiple the padded input size must be: 32 for the hybrid-encoder models (RT-DETR,
    D-FINE, LW/RF-DETR: their FPN concatenates levels of strides 8-32), else 1."""
    names = {cls.__name__ for cls in type(model).__mro__}
    return 32 if names & {"RTDetrForObjectDetection", "RTDetrV2ForObjectDetection", "DFineForObjectDetection",
                          "LwDetrForObjectDetection", "RfDetrForObjectDetection"} else 1


def hf_inputs(images: list[Tensor], mean: tuple[float, ...] = IMAGENET_MEAN,
              std: tuple[float, ...] = IMAGENET_STD, multiple: int = 1) -> tuple[Tensor, Tensor]:
    """``(pixel_values [B, 3, Hp, Wp], pixel_mask [B, Hp, Wp])`` from ``[0, 1]`` images.

    Normalised per channel, padded bottom-right with zeros to the largest height and
    width (rounded up to ``multiple``), ``pixel_mask`` 1 on image pixels (the image
    processors' ``pad`` convention).
    """
    hp = -(-max(int(i.shape[-2]) for i in images) // multiple) * multiple
    wp = -(-max(int(i.shape[-1]) for i in images) // multiple) * multiple
    device = images[0].device
    m = torch.tensor(mean, device=device, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, device=device, dtype=torch.float32).view(3, 1, 1)
    values, masks = [], []
    for image in images:
        if image.shape[0] == 1:
            image = image.expand(3, -1, -1)
        h, w = image.shape[-2:]
        values.append(F.pad((image.float() - m) / s, (0, wp - w, 0, hp - h)))
        mask = torch.zeros(hp, wp, dtype=torch.long, device=device)
        mask[:h, :w] = 1
        masks.append(mask)
    return torch.stack(values), torch.stack(masks)


@functools.lru_cache(maxsize=None)
def _takes_pixel_mask(model_class: type) -> bool:
    return "pixel_mask" in inspect.signature(model_class.forward).parameters


def call_hf(model: Any, pixel_values: Tensor, pixel_mask: Tensor, **kwargs: Any) -> Any:
    """``model(pixel_values=..., pixel_mask=..., **kwargs)``, leaving ``pixel_mask`` out for the
    models that take none (YOLOS)."""
    if _takes_pixel_mask(type(model)):
        return model(pixel_values=pixel_values, pixel_mask=pixel_mask, **kwargs)
    return model(pixel_values=pixel_values, **kwargs)


def decode_hf(out: Any, num_labels: int, padded: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
    """The class probabilities and boxes of a ``transformers`` detector's output.

    Returns:
        ``(probs_all [B, Q, C'], probs [B, Q, C], boxes [B, Q, 4])``: softmax with the "no
        object" class last when the classifier has ``num_labels + 1`` outputs (``probs``
        drops it), sigmoid otherwise (``probs`` is ``probs_all``); boxes ``x1, y1, x2, y2`` in
        pixels of the padded ``(Hp, Wp)`` input, still attached to the graph.
    """
    logits = out.logits.float()
    softmax = logits.shape[-1] == num_labels + 1
    probs_all = logits.softmax(-1) if softmax else logits.sigmoid()
    probs = probs_all[..., :-1] if softmax else probs_all
    cx, cy, w, h = out.pred_boxes.float().unbind(-1)
    hp, wp = padded
    boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1) * logits.new_tensor([wp, hp, wp, hp])
    return probs_all, probs, boxes


def hf_labels(targets: list[dict[str, Any]], padded: tuple[int, int]) -> list[dict[str, Tensor]]:
    """``transformers`` detection labels: ``class_labels`` and boxes ``cx, cy, w, h`` in ``[0, 1]``
    of the padded ``(Hp, Wp)`` input, from detlens targets (``boxes`` xyxy pixels)."""
    hp, wp = padded
    out = []
    for t in targets:
        b = t["boxes"].float()
        scale = b.new_tensor([wp, hp, wp, hp])
        cxcywh = torch.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], -1)
        out.append({"class_labels": t["labels"].long(), "boxes": cxcywh / scale})
    return out


def _small_backbone() -> Any:
    from transformers import ResNetConfig

    return ResNetConfig(embedding_size=32, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1],
                        layer_type="basic", out_features=["stage2", "stage3", "stage4"])


def build_hf_detector(architecture: str, num_labels: int, overrides: dict[str, Any] | None = None,
                      attn_implementation: str = "eager") -> Any:
    """A ``transformers`` detector with random weights from a small config (ResNet-style
    4-stage backbone, 128-wide transformer); ``overrides`` set any config field."""
    import transformers as tf

    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
    common = dict(d_model=128, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                  encoder_ffn_dim=256, decoder_ffn_dim=256, num_queries=30, num_labels=num_labels, dropout=0.0)
    detr_backbone = dict(use_timm_backbone=False, use_pretrained_backbone=False)
    if architecture in ("detr", "conditional_detr"):
        backbone = _small_backbone()
        backbone.out_features = ["stage4"]
        kw: dict[str, Any] = dict(common, backbone_config=backbone, **detr_backbone)
        cls, model_cls = ((tf.DetrConfig, tf.DetrForObjectDetection) if architecture == "detr"
                          else (tf.ConditionalDetrConfig, tf.ConditionalDetrForObjectDetection))
    elif architecture == "yolos":
        kw = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256, image_size=[160, 160],
                  patch_size=16, num_detection_tokens=30, num_labels=num_labels, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0)
        cls, model_cls = tf.YolosConfig, tf.YolosForObjectDetection
    elif architecture == "deformable_detr":
        kw = dict(common, backbone_config=_small_backbone(), num_feature_levels=3, encoder_n_points=4, decoder_n_points=4,
                  **detr_backbone)
        cls, model_cls = tf.DeformableDetrConfig, tf.DeformableDetrForObjectDetection
    elif architecture == "rf_detr":
        # RF-DETR (transformers' port): a DINOv2-style ViT trunk with windowed attention, a C2f
        # projector and an LW-DETR deformable decoder; one group of queries (group_detr=1).
        trunk = tf.RfDetrDinov2Config(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256,
                                      image_size=160, patch_size=16, out_features=["stage2", "stage4"], num_windows=1)
        kw = dict(backbone_config=trunk, d_model=128, decoder_layers=2, num_queries=30, decoder_ffn_dim=256,
                  num_labels=num_labels, group_detr=1, decoder_self_attention_heads=4, decoder_cross_attention_heads=4,
                  dropout=0.0)
        cls, model_cls = tf.RfDetrConfig, tf.RfDetrForObjectDetection
    else:
        kw = dict(num_labels=num_labels, d_model=128, encoder_hidden_dim=128, encoder_in_channels=[64, 128, 256],
                  decoder_in_channels=[128, 128, 128], decoder_layers=2, num_queries=30, encoder_ffn_dim=256,
                  decoder_ffn_dim=256, encoder_attention_heads=4, decoder_attention_heads=4, num_denoising=0,
                  backbone_config=_small_backbone(), dropout=0.0)
        cls, model_cls = {"rt_detr": (tf.RTDetrConfig, tf.RTDetrForObjectDetection),
                          "rt_detr_v2": (tf.RTDetrV2Config, tf.RTDetrV2ForObjectDetection),
                          "d_fine": (tf.DFineConfig, tf.DFineForObjectDetection)}[architecture]
    kw.update(overrides or {})
    config = cls(**kw)
    if attn_implementation == "eager":  # otherwise transformers picks (sdpa where the model supports it)
        config._attn_implementation = "eager"
    return model_cls(config)


class HFDetector(DetectionModule):
    """A ``transformers`` DETR-family detector trained with its own loss (see the module docstring).

    Args:
        architecture: which model (``detr``, ``conditional_detr``, ``yolos``,
            ``deformable_detr``, ``rt_detr``, ``rt_detr_v2``, ``d_fine``, ``rf_detr``).
        num_classes: ``C``; labels ``1..C``.
        config: overrides of the small config's fields (e.g. ``{"num_queries": 50}``).
        pretrained_path: a local folder written by ``save_pretrained``: the model is loaded
            from it (``architecture`` and ``config`` are then ignored; nothing is downloaded),
            its trunk frozen where ``transformers`` freezes it. Built from a config (random
            weights) every parameter trains.
        attn_implementation: ``"eager"`` (default: attention weights readable by
            detlens' attention callbacks) or ``"sdpa"``.
        score_thresh: minimum class probability of an eval-mode detection.
        image_mean, image_std: the pixel normalisation.
        class_names, optimizer, lr, weight_decay, momentum, warmup_steps: see ``DetectionModule``.
    """

    def __init__(
        self,
        architecture: Architecture = "deformable_detr",
        num_classes: int = 3,
        config: dict[str, Any] | None = None,
        pretrained_path: str | None = None,
        attn_implementation: Literal["eager", "sdpa"] = "eager",
        score_thresh: float = 0.05,
        image_mean: tuple[float, float, float] = IMAGENET_MEAN,
        image_std: tuple[float, float, float] = IMAGENET_STD,
        class_names: dict[int, str] | None = None,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        lr: float = 2e-4,
        weight_decay: float = 1e-4,
        momentum: float = 0.9,
        warmup_steps: int = 50,
    ) -> None:
        super().__init__(num_classes, class_names, optimizer, lr, weight_decay, momentum, warmup_steps)
        if not 0.0 <= score_thresh <= 1.0:
            raise ValueError(f"score_thresh must be in [0, 1], got {score_thresh}")
        if pretrained_path is not None:
            from transformers import AutoModelForObjectDetection

            if not os.path.isdir(pretrained_path):
                raise ValueError(f"pretrained_path {pretrained_path!r} is not a folder written by save_pretrained")
            self.model = AutoModelForObjectDetection.from_pretrained(
                pretrained_path, num_labels=num_classes + 1, ignore_mismatched_sizes=True, local_files_only=True,
                **({"attn_implementation": "eager"} if attn_implementation == "eager" else {}),
            )
        else:
            self.model = build_hf_detector(architecture, num_classes + 1, config, attn_implementation)
            # DETR / Deformable DETR freeze their trunk's early stages, assuming pretrained weights;
            # a trunk with random weights must learn.
            for parameter in self.model.parameters():
                parameter.requires_grad_(True)
        self.score_thresh = float(score_thresh)
        self.image_mean = tuple(image_mean)
        self.image_std = tuple(image_std)

    def forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """Eval-mode detections, one per query above ``score_thresh``: ``boxes [K, 4]`` xyxy
        pixels, ``scores [K]``, ``labels [K]`` in ``1..C``."""
        pixel_values, pixel_mask = hf_inputs(images, self.image_mean, self.image_std, pad_multiple(self.model))
        out = call_hf(self.model, pixel_values, pixel_mask)
        _, probs, boxes = decode_hf(out, self.model.config.num_labels, tuple(pixel_values.shape[-2:]))
        scores, labels = probs.max(-1)
        results = []
        for b, image in enumerate(images):
            keep = scores[b] > self.score_thresh
            limit = boxes.new_tensor([image.shape[-1], image.shape[-2]] * 2)
            results.append({"boxes": boxes[b, keep].clamp(min=0).minimum(limit), "scores": scores[b, keep],
                            "labels": labels[b, keep]})
        return results

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        images, targets = batch
        pixel_values, pixel_mask = hf_inputs(images, self.image_mean, self.image_std, pad_multiple(self.model))
        out = call_hf(self.model, pixel_values, pixel_mask, labels=hf_labels(targets, tuple(pixel_values.shape[-2:])))
        loss = out.loss
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=len(images))
        terms = {f"train/{k}": v.detach().float() for k, v in (out.loss_dict or {}).items() if torch.is_tensor(v)}
        if terms:
            self.log_dict(terms, on_step=True, on_epoch=False, batch_size=len(images))
        return loss

