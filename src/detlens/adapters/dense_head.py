"""A generic adapter for anchor-free dense heads (YOLOv8/11-style, DAMO-YOLO's ZeroHead, GFL).

Such a head predicts, on every feature level ``l`` (stride ``s_l``, grid ``h_l x w_l``) and at
every grid cell ("anchor point"), class logits and four box distances ``(left, top, right,
bottom)`` from the cell's centre, either plain or as a distribution over ``R`` bins
(distribution-focal regression: the distance is the expectation ``sum_r r * softmax_r``).
A subclass only says how to run its network up to those per-level outputs
(:meth:`DenseHeadAdapter.dense_forward`, returning :class:`DenseLevels`); this class does
the rest for every such model:

* candidates (each anchor's best class, or every class, above ``candidate_threshold``), class-aware NMS
  (torchvision's ``batched_nms``, on unclipped boxes) and ``max_det`` on **detached** boxes and
  scores; boxes are then clipped to the image, so every detection keeps its origin: the level and the index of its
  anchor point among all anchors of the image (levels concatenated, row-major);
* ``score_graph``: the detection's class score (sigmoid or softmax of its logit row, as the
  model scores), differentiable w.r.t. every captured activation; ``box_graph``: its box,
  decoded again on the graph;
* ``features``: the head's input feature vector at the detection's anchor cell;
* virtual layers ``"neck/P<k>"`` (the head's input on the level of stride ``2**k``),
  ``"neck"`` (per detection, the level its anchor lies on) and ``"neck_fused"`` (a map per
  level at image resolution, then their element-wise maximum).

Gradient maps at any of these or at any backbone/neck module come from the one forward of
:meth:`~detlens.adapters.base.DetectorAdapter.run` and one vectorised backward for all
detections (:mod:`detlens.explainers.gradcam`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import boxes as box_ops

from .base import Detections, DetectorAdapter, ImageGeometry, LayerCapture, RoIScoring

__all__ = ["NECK", "NECK_FUSED", "DenseHeadAdapter", "DenseLevels", "decode_distances", "level_name"]

NECK = "neck"
NECK_FUSED = "neck_fused"


def level_name(stride: float) -> str:
    """``"P3"`` for stride 8: the usual pyramid name of a level (``"S<stride>"`` if not a power of two)."""
    k = math.log2(stride)
    return f"P{int(round(k))}" if abs(k - round(k)) < 1e-6 else f"S{stride:g}"


@dataclass
class DenseLevels:
    """One forward of a dense head over a batch of ``B`` images, per level ``l``.

    Attributes:
        cls_logits: per level ``Tensor[B, C, h_l, w_l]`` class logits (on the graph).
        box_regression: per level ``Tensor[B, 4 * R, h_l, w_l]``: the ``l, t, r, b``
            distances, ``R`` bins each (side-major: channel ``side * R + r``); ``R = 1`` is a
            plain distance.
        head_inputs: per level ``Tensor[B, D_l, h_l, w_l]``, the features the head reads
            (the neck's outputs); they become the ``"neck/P<k>"`` layers.
        strides: per level, input pixels per grid cell.
    """

    cls_logits: list[Tensor]
    box_regression: list[Tensor]
    head_inputs: list[Tensor]
    strides: list[float]


def decode_distances(regression: Tensor, bins: int) -> Tensor:
    """``[N, 4 * R]`` regression -> ``[N, 4]`` distances (expectation over ``R`` bins; ``R = 1``: as is)."""
    if bins == 1:
        return regression
    probs = regression.reshape(-1, 4, bins).softmax(-1)
    return (probs * torch.arange(bins, dtype=probs.dtype, device=probs.device)).sum(-1)


class DenseHeadAdapter(DetectorAdapter):
    """Base class of dense-head adapters; see the module docstring.

    Subclasses set the class attributes to their model's conventions and implement
    :meth:`dense_forward`, :meth:`module_layers` and, if their network does not take
    ``[0, 1]`` RGB padded to a multiple of its largest stride, :meth:`preprocess`.

    Class attributes (instance attributes override them):
        score_activation: ``"sigmoid"`` (independent classes) or ``"softmax"`` over the
            logit row (the last column then being background, never reported).
        grid_offset: anchor point of cell ``(y, x)`` at ``((x + o) * s, (y + o) * s)``.
        distance_scale: ``"stride"`` -- distances are in grid cells (multiplied by the
            stride) -- or ``"pixels"``.
        candidate_threshold: scores at or below it are no candidates.
        multi_label: ``False``: each anchor's best class is its one candidate (YOLOv8);
            ``True``: every (anchor, class) pair above the threshold is one (DAMO-YOLO, mmdet).
        pre_nms_top_n: at most this many candidates per image enter NMS (highest scores).
        nms_iou: IoU of class-aware NMS; max_det: detections kept per image after NMS.
        pad_value: value of the padding :meth:`preprocess` adds (bottom and right).
    """

    family = "dense_head"
    score_activation: Literal["sigmoid", "softmax"] = "sigmoid"
    grid_offset: float = 0.5
    distance_scale: Literal["stride", "pixels"] = "stride"
    candidate_threshold: float = 0.001
    multi_label: bool = False
    pre_nms_top_n: int = 1000
    nms_iou: float = 0.7
    max_det: int = 300
    pad_value: float = 0.0

    # -- to implement -------------------------------------------------------------
    def dense_forward(self, batch: Tensor) -> DenseLevels:
        """Run the network on ``batch`` (``[B, 3, Hp, Wp]``, as :meth:`preprocess` made it)
        up to the head's per-level outputs, without post-processing."""
        raise NotImplementedError

    def module_layers(self) -> list[str]:
        """Backbone and neck module names users usually target, shallow to deep."""
        raise NotImplementedError

    def strides(self) -> list[float]:
        """The strides of the head's levels (known from the model's structure)."""
        raise NotImplementedError

    def label_offset(self) -> int:
        """Added to the class index (the logit column) to give the reported label."""
        return 0

    def size_divisor(self) -> int:
        """The padded batch's height and width are multiples of this (the largest stride)."""
        return int(max(self.strides()))

    def preprocess(self, images: list[Tensor]) -> Tensor:
        """``B`` images ``[3, H_i, W_i]`` in ``[0, 1]`` -> the padded batch ``[B, 3, Hp, Wp]``
        (top-left aligned, no resize). Override for models that normalise their input."""
        div = self.size_divisor()
        hp = max(int(im.shape[-2]) for im in images)
        wp = max(int(im.shape[-1]) for im in images)
        hp, wp = -(-hp // div) * div, -(-wp // div) * div
        return torch.stack([
            F.pad(im, (0, wp - int(im.shape[-1]), 0, hp - int(im.shape[-2])), value=self.pad_value) for im in images
        ])

    # -- layers -------------------------------------------------------------------
    def level_names(self) -> list[str]:
        return [level_name(s) for s in self.strides()]

    def virtual_layers(self) -> list[str]:
        return [NECK, NECK_FUSED] + [f"{NECK}/{n}" for n in self.level_names()]

    def level_layers(self) -> dict[str, str]:
        return {NECK: f"{NECK}/"}

    def fused_layers(self) -> dict[str, list[str]]:
        return {NECK_FUSED: [f"{NECK}/{n}" for n in self.level_names()]}

    def default_layer(self) -> str:
        return NECK

    def layer_names(self) -> list[str]:
        return self.virtual_layers() + self.module_layers()

    # -- the forward --------------------------------------------------------------
    def _scores(self, logits: Tensor) -> Tensor:
        """``[N, C]`` logits -> ``[N, C']`` class scores as the model scores them."""
        if self.score_activation == "sigmoid":
            return logits.sigmoid()
        if self.score_activation == "softmax":
            return logits.softmax(-1)[:, :-1]
        raise ValueError(f"score_activation must be 'sigmoid' or 'softmax', got {self.score_activation!r}")

    def _boxes(self, regression: Tensor, anchors: Tensor, stride: Tensor, bins: int) -> Tensor:
        """``[N, 4R]`` regression at ``[N, 2]`` anchor points (pixels) -> ``[N, 4]`` xyxy pixels."""
        dist = decode_distances(regression, bins)
        if self.distance_scale == "stride":
            dist = dist * stride[:, None]
        return torch.cat([anchors - dist[:, :2], anchors + dist[:, 2:]], 1)

    def _forward(
        self, images: list[Tensor], capture: LayerCapture, top_k: int | None, score_threshold: float
    ) -> tuple[list[Detections], list[ImageGeometry], RoIScoring | None]:
        batch = self.preprocess(images)
        levels = self.dense_forward(batch)
        names = self.level_names()
        if len(levels.cls_logits) != len(names):
            raise ValueError(f"dense_forward gave {len(levels.cls_logits)} levels; strides() names {len(names)}")
        for name, feat in zip(names, levels.head_inputs):
            capture.record(f"{NECK}/{name}", feat)

        bins = int(levels.box_regression[0].shape[1]) // 4
        # all anchors of the image, levels concatenated row-major: [B, A, C], [B, A, 4R]
        logits = torch.cat([x.flatten(2) for x in levels.cls_logits], 2).transpose(1, 2)
        regression = torch.cat([x.flatten(2) for x in levels.box_regression], 2).transpose(1, 2)
        anchors, strides, level_of = [], [], []
        for l, (x, s) in enumerate(zip(levels.cls_logits, levels.strides)):
            h, w = int(x.shape[-2]), int(x.shape[-1])
            ys, xs = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij")
            pts = torch.stack([xs.flatten(), ys.flatten()], 1).float()
            anchors.append((pts + self.grid_offset) * float(s))
            strides.append(torch.full((h * w,), float(s), device=x.device))
            level_of.append(torch.full((h * w,), l, dtype=torch.long, device=x.device))
        anchor_xy, anchor_stride, anchor_level = torch.cat(anchors), torch.cat(strides), torch.cat(level_of)
        starts = torch.tensor([0] + [int(x.shape[-2] * x.shape[-1]) for x in levels.cls_logits], device=batch.device).cumsum(0)

        padded = (int(batch.shape[-2]), int(batch.shape[-1]))
        geometry, dets = [], []
        for i, image in enumerate(images):
            size = (int(image.shape[-2]), int(image.shape[-1]))
            geometry.append(ImageGeometry(original_size=size, input_size=size, batch_size=padded))
            with torch.no_grad():
                probs = self._scores(logits[i].detach().float())  # [A, C']
                if self.multi_label:  # every (anchor, class) pair above the threshold
                    flat = probs.flatten()
                    pairs = torch.nonzero(flat > self.candidate_threshold).flatten()
                    cand, label, best = pairs // probs.shape[1], pairs % probs.shape[1], flat[pairs]
                else:  # each anchor's best class
                    best, label = probs.max(1)
                    cand = torch.nonzero(best > self.candidate_threshold).flatten()
                    best, label = best[cand], label[cand]
                order = torch.argsort(best, descending=True, stable=True)[: self.pre_nms_top_n]
                cand, label, best = cand[order], label[order], best[order]
                boxes = self._boxes(regression[i].detach().float()[cand], anchor_xy[cand], anchor_stride[cand], bins)
                # NMS on the decoded boxes, clipping after it (as YOLOv8 and DAMO-YOLO post-process)
                keep = box_ops.batched_nms(boxes, best, label, self.nms_iou)[: self.max_det]
                keep = keep[best[keep] > score_threshold]
                if top_k is not None:
                    keep = keep[: max(int(top_k), 0)]
                anchor_idx, det_label = cand[keep], label[keep]
            lvl = anchor_level[anchor_idx]
            score_graph = self._scores(logits[i][anchor_idx].float()).gather(1, det_label[:, None])[:, 0] \
                if len(anchor_idx) else logits.new_zeros((0,))
            box_graph = box_ops.clip_boxes_to_image(
                self._boxes(regression[i][anchor_idx].float(), anchor_xy[anchor_idx], anchor_stride[anchor_idx], bins), size
            )
            dets.append(Detections(
                boxes=box_graph.detach(),
                scores=score_graph.detach(),
                labels=det_label + self.label_offset(),
                score_graph=score_graph,
                box_graph=box_graph,
                origin=anchor_idx,
                level=[names[l] for l in lvl.tolist()],
                features=self._anchor_features(levels.head_inputs, i, anchor_idx, lvl, starts),
                class_probs=probs[anchor_idx],  # column c = class index c (label - label_offset)
            ))
        return dets, geometry, None

    @staticmethod
    def _anchor_features(head_inputs: list[Tensor], image: int, anchor_idx: Tensor, lvl: Tensor, starts: Tensor) -> Tensor:
        """``[K, D]``: each detection's head input at its anchor cell, detached; levels narrower
        than the widest are zero-padded so rows stack."""
        width = max(int(f.shape[1]) for f in head_inputs)
        out = head_inputs[0].new_zeros((len(anchor_idx), width)).float()
        for l, feat in enumerate(head_inputs):
            rows = torch.nonzero(lvl == l).flatten()
            if len(rows):
                local = anchor_idx[rows] - starts[l]
                flat = feat[image].detach().flatten(1)  # [D_l, h*w]
                out[rows, : flat.shape[0]] = flat[:, local].T.float()
        return out
