"""A compact DETR built from torchvision and torch.nn parts."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import resnet
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import MLP, box_convert

from detlens.lightning_modules.backbones import NormName, norm_layer
from detlens.lightning_modules.base import DetectionModule
from detlens.lightning_modules.detr_loss import HungarianMatcher, SetCriterion

__all__ = ["DETR", "DETRDecoder", "DETRNet", "PositionEmbeddingSine"]

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class PositionEmbeddingSine(nn.Module):
    """DETR's fixed 2-D sine position encoding, normalised to the unpadded extent.

    Hand-written because neither torch nor torchvision ships one.
    ``mask [B, H, W]`` (True on padding) -> ``[B, 2 * num_pos_feats, H, W]``.
    """

    def __init__(self, num_pos_feats: int, temperature: float = 10000.0) -> None:
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature

    def forward(self, mask: Tensor) -> Tensor:
        not_mask = (~mask).float()
        y = not_mask.cumsum(1)
        x = not_mask.cumsum(2)
        eps, scale = 1e-6, 2 * math.pi
        y = y / (y[:, -1:, :] + eps) * scale
        x = x / (x[:, :, -1:] + eps) * scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)
        px = x[..., None] / dim_t  # [B, H, W, F]
        py = y[..., None] / dim_t
        px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=4).flatten(3)
        py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((py, px), dim=3).permute(0, 3, 1, 2)


class DETRDecoder(nn.Module):
    """A stack of standard ``nn.TransformerDecoderLayer`` returning every layer's output.

    ``nn.TransformerDecoder`` returns only the last layer; DETR's auxiliary losses need all
    of them, hence this loop. Each output goes through the shared final ``norm``.
    """

    def __init__(self, layer_factory: Any, num_layers: int, hidden_dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([layer_factory() for _ in range(num_layers)])
        self.norm = nn.LayerNorm(hidden_dim)

    def forward(self, tgt: Tensor, memory: Tensor, memory_key_padding_mask: Tensor | None = None) -> Tensor:
        """``tgt [B, Q, D]``, ``memory [B, S, D]``, mask ``[B, S]`` (True = padding) -> ``[L, B, Q, D]``."""
        outputs = []
        for layer in self.layers:
            tgt = layer(tgt, memory, memory_key_padding_mask=memory_key_padding_mask)
            outputs.append(self.norm(tgt))
        return torch.stack(outputs)


class DETRNet(nn.Module):
    """DETR network with torchvision's calling convention.

    ``forward(images, targets)`` returns the loss dict in training mode and, in eval
    mode, ``list[dict(boxes[K,4] xyxy input pixels, scores[K], labels[K] in 1..C)]``.

    Submodules (stable names; explainers and adapters rely on them):
        ``backbone``: ``IntermediateLayerGetter`` over a torchvision ResNet, returning
            ``{"0": [B, C_b, H/s, W/s]}`` from ``backbone_stage`` (``s`` = 16 or 32);
            Grad-CAM target e.g. ``backbone.layer4``.
        ``input_proj``: ``Conv2d(C_b, D, 1)``.
        ``position_encoding``: :class:`PositionEmbeddingSine` (no parameters).
        ``encoder``: ``nn.TransformerEncoder``; ``encoder.layers[i].self_attn`` is an
            ``nn.MultiheadAttention`` over the ``S = h*w`` feature positions (row-major).
        ``decoder``: :class:`DETRDecoder`; ``decoder.layers[i].self_attn`` (queries x
            queries) and ``decoder.layers[i].multihead_attn`` (queries x ``S`` positions).
        ``query_embed``: ``nn.Embedding(Q, D)``, the learned object queries.
        ``class_embed``: ``Linear(D, C + 1)`` (index ``C`` = no object).
        ``bbox_embed``: 3-layer MLP ``D -> 4`` (sigmoid: normalised ``cx, cy, w, h``).
        ``criterion``: :class:`SetCriterion` (no parameters).

    The sine position encoding is added to the encoder input and to the memory the
    decoder reads (standard layers take no separate positional argument); the decoder
    input is the query embedding itself, as in DETR's minimal reference implementation.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: Literal["resnet18", "resnet34", "resnet50"] = "resnet50",
        backbone_stage: Literal["layer3", "layer4"] = "layer4",
        norm: NormName = "batch",
        hidden_dim: int = 256,
        num_queries: int = 100,
        enc_layers: int = 6,
        dec_layers: int = 6,
        nheads: int = 8,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        pre_norm: bool = False,
        image_size: int = 800,
        score_thresh: float = 0.05,
        eos_coef: float = 0.1,
        class_weight: float = 1.0,
        bbox_weight: float = 5.0,
        giou_weight: float = 2.0,
        aux_loss: bool = True,
    ) -> None:
        super().__init__()
        if backbone not in ("resnet18", "resnet34", "resnet50"):
            raise ValueError(f"backbone must be resnet18, resnet34 or resnet50, got {backbone!r}")
        if backbone_stage not in ("layer3", "layer4"):
            raise ValueError(f"backbone_stage must be 'layer3' or 'layer4', got {backbone_stage!r}")
        if hidden_dim % nheads or hidden_dim % 2:
            raise ValueError(f"hidden_dim={hidden_dim} must be even and divisible by nheads={nheads}")
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.image_size = image_size
        self.score_thresh = score_thresh
        trunk = getattr(resnet, backbone)(weights=None, norm_layer=norm_layer(norm))
        channels = (trunk.inplanes // 8) * (4 if backbone_stage == "layer3" else 8)
        self.backbone = IntermediateLayerGetter(trunk, return_layers={backbone_stage: "0"})
        self.input_proj = nn.Conv2d(channels, hidden_dim, kernel_size=1)
        self.position_encoding = PositionEmbeddingSine(hidden_dim // 2)

        def layer_kwargs() -> dict[str, Any]:
            return dict(
                d_model=hidden_dim,
                nhead=nheads,
                dim_feedforward=dim_feedforward,
                dropout=dropout,
                batch_first=True,
                norm_first=pre_norm,
            )

        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(**layer_kwargs()),
            num_layers=enc_layers,
            norm=nn.LayerNorm(hidden_dim) if pre_norm else None,
            enable_nested_tensor=False,
        )
        self.decoder = DETRDecoder(lambda: nn.TransformerDecoderLayer(**layer_kwargs()), dec_layers, hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, [hidden_dim, hidden_dim, 4], activation_layer=nn.ReLU, inplace=None)
        self.criterion = SetCriterion(
            num_classes,
            HungarianMatcher(class_weight, bbox_weight, giou_weight),
            eos_coef=eos_coef,
            class_weight=class_weight,
            bbox_weight=bbox_weight,
            giou_weight=giou_weight,
            aux_loss=aux_loss,
        )
        self.register_buffer("pixel_mean", torch.tensor(_IMAGENET_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(_IMAGENET_STD).view(3, 1, 1), persistent=False)

    # ------------------------------------------------------------------ stages
    def prepare(self, images: list[Tensor]) -> tuple[Tensor, Tensor, list[tuple[int, int]]]:
        """Normalise, resize (longer side to ``image_size``) and pad a list of images.

        Returns ``batch [B, 3, H, W]``, ``mask [B, H, W]`` (True on padding) and the
        input sizes ``(h, w)`` in pixels, which predictions are scaled back to.
        """
        if not images:
            raise ValueError("DETRNet needs at least one image")
        sizes: list[tuple[int, int]] = []
        resized = []
        for img in images:
            if img.dim() != 3 or img.shape[0] != 3:
                raise ValueError(f"expected images of shape [3, H, W], got {tuple(img.shape)}")
            h, w = img.shape[-2:]
            sizes.append((int(h), int(w)))
            img = (img - self.pixel_mean) / self.pixel_std
            scale = self.image_size / max(h, w)
            if scale != 1.0:
                new = (max(1, round(h * scale)), max(1, round(w * scale)))
                img = F.interpolate(img[None], size=new, mode="bilinear", align_corners=False, antialias=scale < 1)[0]
            resized.append(img)
        height = max(i.shape[-2] for i in resized)
        width = max(i.shape[-1] for i in resized)
        batch = resized[0].new_zeros(len(resized), 3, height, width)
        mask = torch.ones(len(resized), height, width, dtype=torch.bool, device=batch.device)
        for i, img in enumerate(resized):
            batch[i, :, : img.shape[-2], : img.shape[-1]] = img
            mask[i, : img.shape[-2], : img.shape[-1]] = False
        return batch, mask, sizes

    def predict(self, batch: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """``batch [B,3,H,W]``, ``mask [B,H,W]`` -> ``logits [L,B,Q,C+1]``, ``boxes [L,B,Q,4]`` (per decoder layer)."""
        features = self.backbone(batch)["0"]  # [B, C_b, h, w]
        feat_mask = F.interpolate(mask[None].float(), size=features.shape[-2:])[0].bool()  # [B, h, w]
        src = self.input_proj(features)  # [B, D, h, w]
        pos = self.position_encoding(feat_mask).to(src.dtype)
        src = src.flatten(2).transpose(1, 2)  # [B, S, D]
        pos = pos.flatten(2).transpose(1, 2)
        key_padding = feat_mask.flatten(1)  # [B, S]
        memory = self.encoder(src + pos, src_key_padding_mask=key_padding)
        queries = self.query_embed.weight.unsqueeze(0).expand(len(batch), -1, -1)  # [B, Q, D]
        hidden = self.decoder(queries, memory + pos, memory_key_padding_mask=key_padding)  # [L, B, Q, D]
        return self.class_embed(hidden), self.bbox_embed(hidden).sigmoid()

    def postprocess(
        self, logits: Tensor, boxes: Tensor, sizes: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        """Last-layer ``logits [B,Q,C+1]``, ``boxes [B,Q,4]`` -> detections in input pixels.

        Score of a query = its highest object-class probability; queries under
        ``score_thresh`` are dropped; detections are sorted by score.
        """
        prob = logits.float().softmax(-1)[..., :-1]  # [B, Q, C]
        scores, classes = prob.max(-1)
        xyxy = box_convert(boxes.float(), "cxcywh", "xyxy")
        results = []
        for i, (h, w) in enumerate(sizes):
            keep = scores[i] > self.score_thresh
            order = scores[i][keep].argsort(descending=True)
            scale = xyxy.new_tensor([w, h, w, h])
            results.append(
                {
                    "boxes": (xyxy[i][keep][order] * scale).clamp_(min=0).minimum(scale),
                    "scores": scores[i][keep][order],
                    "labels": classes[i][keep][order] + 1,
                }
            )
        return results

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        batch, mask, sizes = self.prepare(images)
        logits, boxes = self.predict(batch, mask)
        if not self.training:
            return self.postprocess(logits[-1], boxes[-1], sizes)
        if targets is None:
            raise ValueError("targets are required in training mode")
        normalised = []
        for (h, w), t in zip(sizes, targets):
            scale = t["boxes"].new_tensor([w, h, w, h])
            normalised.append(
                {
                    "labels": t["labels"].long() - 1,  # 1..C -> 0..C-1
                    "boxes": box_convert(t["boxes"].float() / scale, "xyxy", "cxcywh"),
                }
            )
        return self.criterion(logits, boxes, normalised)


class DETR(DetectionModule):
    """A compact DETR (Carion et al., 2020) trained with Lightning; ``self.model`` is a :class:`DETRNet`.

    See :class:`DETRNet` for the submodule names (``model.backbone``, ``model.input_proj``,
    ``model.encoder.layers[i].self_attn``, ``model.decoder.layers[i].multihead_attn``, ...).
    Logged loss terms: ``train/loss_ce``, ``train/loss_bbox``, ``train/loss_giou`` and the
    auxiliary sums ``train/loss_*_aux`` (already weighted; they add up to ``train/loss``).

    Args:
        num_classes: ``C``, categories without background.
        class_names: optional ``{label: name}``.
        backbone: ResNet trunk (``resnet18``, ``resnet34``, ``resnet50``), never pretrained here.
        backbone_stage: ``"layer4"`` (stride 32, as DETR) or ``"layer3"`` (stride 16: more
            tokens, better for small images/objects).
        norm: trunk normalisation (``"batch"`` from scratch; ``"frozen"`` with loaded weights).
        hidden_dim, nheads, dim_feedforward, dropout, enc_layers, dec_layers, pre_norm:
            transformer shape (``pre_norm`` puts LayerNorm first, steadier from scratch).
        num_queries: object queries = maximum detections per image.
        image_size: longer image side after resizing, pixels; batches are padded.
        score_thresh: minimum class probability of a returned detection.
        eos_coef: CE weight of the "no object" class.
        class_weight, bbox_weight, giou_weight: matching costs and loss weights (1, 5, 2).
        aux_loss: add the losses of every intermediate decoder layer.
        lr: learning rate of the transformer and heads; ``lr_backbone``: of the trunk
            (``None``: same as ``lr``, right from scratch; DETR uses ``lr / 10`` with a
            pretrained trunk). DETR clips gradients at norm 0.1: set
            ``Trainer(gradient_clip_val=0.1)``.
        checkpoint: optional local state_dict / Lightning checkpoint to start from.
        optimizer, weight_decay, momentum, warmup_steps: see :class:`DetectionModule`.
    """

    def __init__(
        self,
        num_classes: int = 1,
        class_names: dict[int, str] | None = None,
        backbone: Literal["resnet18", "resnet34", "resnet50"] = "resnet50",
        backbone_stage: Literal["layer3", "layer4"] = "layer4",
        norm: NormName = "batch",
        hidden_dim: int = 256,
        num_queries: int = 100,
        enc_layers: int = 6,
        dec_layers: int = 6,
        nheads: int = 8,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        pre_norm: bool = False,
        image_size: int = 800,
        score_thresh: float = 0.05,
        eos_coef: float = 0.1,
        class_weight: float = 1.0,
        bbox_weight: float = 5.0,
        giou_weight: float = 2.0,
        aux_loss: bool = True,
        checkpoint: str | None = None,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        lr: float = 1e-4,
        lr_backbone: float | None = None,
        weight_decay: float = 1e-4,
        momentum: float = 0.9,
        warmup_steps: int = 100,
    ) -> None:
        super().__init__(
            num_classes=num_classes,
            class_names=class_names,
            optimizer=optimizer,
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            warmup_steps=warmup_steps,
        )
        self.model = DETRNet(
            num_classes,
            backbone=backbone,
            backbone_stage=backbone_stage,
            norm=norm,
            hidden_dim=hidden_dim,
            num_queries=num_queries,
            enc_layers=enc_layers,
            dec_layers=dec_layers,
            nheads=nheads,
            dim_feedforward=dim_feedforward,
            dropout=dropout,
            pre_norm=pre_norm,
            image_size=image_size,
            score_thresh=score_thresh,
            eos_coef=eos_coef,
            class_weight=class_weight,
            bbox_weight=bbox_weight,
            giou_weight=giou_weight,
            aux_loss=aux_loss,
        )
        if checkpoint is not None:
            self.load_weights(checkpoint)

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Base groups (decay / no decay), each split again into trunk and the rest."""
        lr_backbone = self.hparams.lr_backbone if self.hparams.lr_backbone is not None else self.hparams.lr
        trunk = {id(p) for p in self.model.backbone.parameters()}
        groups = []
        for group in super().parameter_groups():
            rest = [p for p in group["params"] if id(p) not in trunk]
            mine = [p for p in group["params"] if id(p) in trunk]
            groups.append({**group, "params": rest})
            groups.append({**group, "params": mine, "lr": lr_backbone})
        return groups
