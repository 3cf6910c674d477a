"""Adapter for torchvision two-stage detectors (Faster R-CNN, Mask R-CNN, Keypoint R-CNN)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import boxes as box_ops

from ._torchvision import FEATURES, TorchvisionAdapterMixin
from .base import AdapterOutput, Detections, ImageGeometry, LayerCapture, RoIScoring, filter_detections
from .observe import FeatureRecorder

__all__ = ["TwoStageAdapter"]


class TwoStageAdapter(TorchvisionAdapterMixin):
    """A torchvision ``GeneralizedRCNN`` with ``RoIHeads`` (Faster/Mask/Keypoint R-CNN).

    Runs transform -> backbone -> RPN -> RoIAlign -> box head -> predictor itself and
    re-implements ``RoIHeads.postprocess_detections`` keeping the proposal index of
    each detection; detections equal the model's own eval forward (masks/keypoints
    are not computed). ``origin`` is the proposal index within the image; ``level``
    the feature-dict key the RoI was pooled from; ``features`` the box-head
    representation (``FloatTensor[K, representation_size]``); ``class_probs`` the
    softmax over ``num_classes`` (background column 0 included).
    """

    family = "two_stage"

    def __init__(self, model: nn.Module):
        if not hasattr(model, "roi_heads") or not hasattr(model, "rpn"):
            raise TypeError(f"{type(model).__name__} is not a torchvision two-stage detector (no rpn/roi_heads)")
        super().__init__(model)

    def feature_recorder(self) -> FeatureRecorder:
        return _RoIHeadsRecorder(self.model)

    def _forward(
        self, images: list[Tensor], capture: LayerCapture, top_k: int | None, score_threshold: float
    ) -> tuple[list[Detections], list[ImageGeometry], RoIScoring | None]:
        model = self.model
        rh = model.roi_heads
        image_list, features, geometry = self._transform_and_features(images, capture)
        proposals, _ = model.rpn(image_list, features)
        proposals = [p.detach() for p in proposals]
        image_shapes = image_list.image_sizes
        pooler = rh.box_roi_pool
        pooled = pooler(features, proposals, image_shapes)  # [N, C, P, P]
        representation = rh.box_head(pooled)  # [N, D]
        class_logits, box_regression = rh.box_predictor(representation)  # [N, C+1], [N, (C+1)*4]

        pooled_names, levels = _roi_levels(pooler, features, proposals)
        scales = _level_scales(pooler, features, pooled_names, int(image_list.tensors.shape[-1]))

        pred_boxes = _decode_per_class(rh.box_coder, box_regression, proposals)  # [N, C+1, 4], input pixels
        pred_scores = F.softmax(class_logits, -1)
        offsets = [0]
        for p in proposals:
            offsets.append(offsets[-1] + len(p))

        dets: list[Detections] = []
        roi_pooled, roi_boxes, roi_levels = [], [], []
        for i, (shape, geom) in enumerate(zip(image_shapes, geometry)):
            lo, hi = offsets[i], offsets[i + 1]
            boxes, scores, labels, prop = _postprocess_tracked(rh, pred_boxes[lo:hi], pred_scores[lo:hi], shape)
            gidx = prop + lo
            score_graph = pred_scores[gidx, labels]
            box_graph = box_ops.clip_boxes_to_image(pred_boxes[gidx, labels], shape)
            box_graph = resize_boxes(box_graph, list(shape), list(geom.original_size))
            det = Detections(
                boxes=resize_boxes(boxes, list(shape), list(geom.original_size)),
                scores=scores,
                labels=labels,
                score_graph=score_graph,
                box_graph=box_graph,
                origin=prop,
                level=[pooled_names[int(l)] for l in levels[gidx].tolist()],
                features=representation[gidx].detach(),
                class_probs=pred_scores[gidx].detach(),
            )
            # batched_nms returned candidates by decreasing score: threshold, then top_k.
            kept = torch.nonzero(det.scores > score_threshold).flatten()
            if top_k is not None:
                kept = kept[: max(int(top_k), 0)]
            dets.append(det.select(kept))
            g = gidx[kept]
            roi_pooled.append(pooled[g].detach())
            roi_boxes.append(torch.cat(proposals)[g])
            roi_levels.append(levels[g])

        roi = RoIScoring(
            pooled=roi_pooled,
            rois=roi_boxes,
            level_index=roi_levels,
            featmap_names=pooled_names,
            scales=scales,
            sampling_ratio=int(pooler.sampling_ratio),
            output_size=tuple(int(s) for s in pooler.output_size),
            score_fn=_score_fn(rh, list(image_shapes), geometry),
        )
        return dets, geometry, roi


def _score_fn(
    rh: nn.Module, image_shapes: list[tuple[int, int]], geometry: list[ImageGeometry]
) -> Callable[[Tensor, Tensor, Tensor, int], tuple[Tensor, Tensor]]:
    """:attr:`RoIScoring.score_fn` of a batch: box head + predictor on pooled RoIs."""

    def score_fn(pooled_k: Tensor, labels_k: Tensor, rois_k: Tensor, image_index: int) -> tuple[Tensor, Tensor]:
        """Box head + predictor on ``pooled_k [K, C, P, P]`` -> (probs [K], boxes [K, 4])."""
        rep = rh.box_head(pooled_k)
        logits, reg = rh.box_predictor(rep)
        ar = torch.arange(len(labels_k), device=labels_k.device)
        probs = F.softmax(logits, -1)[ar, labels_k]
        shape = image_shapes[image_index]
        bx = _decode_per_class(rh.box_coder, reg, [rois_k])[ar, labels_k]
        bx = box_ops.clip_boxes_to_image(bx, shape)
        return probs, resize_boxes(bx, list(shape), list(geometry[image_index].original_size))

    return score_fn


class _RoIHeadsRecorder(FeatureRecorder):
    """Rebuilds :meth:`TwoStageAdapter.run`'s detections from the model's own eval forward.

    Records what ``RoIHeads.forward`` computes anyway — its inputs (feature dict,
    proposals, image sizes), the box head's representation of every proposal and the
    predictor's logits and regression — and replays ``postprocess_detections`` on them
    with the proposal index tracked (:func:`_postprocess_tracked`, the same code as the
    adapter's own forward). With the padded batch size the backbone saw, it also replays
    the gradient explainers' RoI fast path (:class:`RoIReplay`).
    """

    replays_roi = True

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._seen: dict[str, Any] = {}

    def install(self) -> list[Any]:
        rh = self.model.roi_heads
        seen = self._seen

        def inputs(module: nn.Module, args: tuple[Any, ...]) -> None:
            if len(args) >= 3:
                seen["features"], seen["proposals"], seen["image_shapes"] = args[0], args[1], args[2]

        def batch(module: nn.Module, args: tuple[Any, ...]) -> None:
            if args and isinstance(args[0], Tensor) and args[0].dim() == 4:
                seen["batch_hw"] = (int(args[0].shape[-2]), int(args[0].shape[-1]))

        return [
            self.model.backbone.register_forward_pre_hook(batch),
            rh.register_forward_pre_hook(inputs),
            rh.box_head.register_forward_hook(lambda m, a, out: seen.__setitem__("representation", out)),
            rh.box_predictor.register_forward_hook(lambda m, a, out: seen.__setitem__("predicted", out)),
        ]

    def reset(self) -> None:
        self._seen.clear()

    def detections(self, original_sizes: list[tuple[int, int]]) -> list[Detections] | None:
        seen, rh = self._seen, self.model.roi_heads
        if not {"features", "proposals", "image_shapes", "representation", "predicted"} <= seen.keys():
            return None
        proposals, shapes, representation = seen["proposals"], seen["image_shapes"], seen["representation"]
        class_logits, box_regression = seen["predicted"]
        if len(proposals) != len(original_sizes) or representation.shape[0] != sum(len(p) for p in proposals):
            return None
        pooled_names, levels = _roi_levels(rh.box_roi_pool, seen["features"], proposals)
        pred_boxes = _decode_per_class(rh.box_coder, box_regression, proposals)
        pred_scores = F.softmax(class_logits, -1)
        dets, lo = [], 0
        for props, shape, size in zip(proposals, shapes, original_sizes):
            hi = lo + len(props)
            boxes, scores, labels, prop = _postprocess_tracked(rh, pred_boxes[lo:hi], pred_scores[lo:hi], shape)
            gidx = prop + lo
            dets.append(Detections(
                boxes=resize_boxes(boxes, list(shape), list(size)), scores=scores, labels=labels,
                score_graph=scores, box_graph=None, origin=prop,
                level=[pooled_names[int(v)] for v in levels[gidx].tolist()],
                features=representation[gidx], class_probs=pred_scores[gidx],
            ))
            lo = hi
        return dets

    def roi_replay(self, original_sizes: list[tuple[int, int]]) -> RoIReplay | None:
        seen = self._seen
        if not {"features", "proposals", "image_shapes", "batch_hw"} <= seen.keys():
            return None
        return RoIReplay(self.model, seen["features"], list(seen["proposals"]), [tuple(s) for s in seen["image_shapes"]],
                         seen["batch_hw"], original_sizes)


@dataclass(frozen=True)
class RoIReplay:
    """The :class:`AdapterOutput` of one image of an observed eval forward, as the RoI fast path needs it.

    What :meth:`TwoStageAdapter.run` with target layer ``"features"`` returns for the
    image, built from the tensors the model's own forward computed (its feature dict,
    proposals and image sizes): the detections kept by ``top_k`` / ``score_threshold``,
    each one's RoIAlign output re-pooled from the batch's feature maps (the same values:
    RoIAlign reads each box on its own), the box head and predictor as ``score_fn``, and
    every level as ``features/<level>``. Gradient explainers then run their one-backward
    RoI path (``detlens.explainers.gradcam``) without a forward of their own. Call it
    outside inference mode (``torch.inference_mode(False)``): the tensors it takes from the
    forward are copied into ordinary ones there.
    """

    model: nn.Module
    features: dict[str, Tensor]  # level -> [B, C, h, w], the padded batch
    proposals: list[Tensor]  # per image [N_i, 4], input pixels
    image_shapes: list[tuple[int, int]]  # per image, after the model's resize
    batch_hw: tuple[int, int]  # the padded batch the backbone saw
    original_sizes: list[tuple[int, int]]  # per image, as given to the model

    def geometry(self, position: int) -> ImageGeometry:
        """How image ``position`` relates to the batch tensor the backbone saw."""
        return ImageGeometry(
            original_size=self.original_sizes[position], input_size=self.image_shapes[position], batch_size=self.batch_hw
        )

    def output(self, position: int, detections: Detections, top_k: int | None, score_threshold: float) -> AdapterOutput:
        """Image ``position``'s output; ``detections`` are its detections from the observed forward
        (:attr:`ObservedForward.detections`, highest score first), filtered as ``run`` filters them."""
        rh = self.model.roi_heads
        pooler = rh.box_roi_pool
        det = filter_detections(detections, top_k, score_threshold)
        rois = self.proposals[position][det.origin].detach().clone().float()
        # [1, C, h, w] per level: float32 as RoIAlign reads them (its autocast rule under mixed
        # precision), copied (the forward's may be inference tensors, unusable in a backward)
        features = {k: v[position : position + 1].detach().to(torch.float32, copy=True) for k, v in self.features.items()}
        dtype = next(rh.box_head.parameters()).dtype
        # Every image size given, as in the forward (RoIAlign infers its level scales from the largest).
        pooled = pooler(features, [rois], self.image_shapes).detach().to(dtype)  # [K, C, P, P]
        shape = self.image_shapes[position]
        geometry = [self.geometry(position)]
        score_fn = _score_fn(rh, [shape], geometry)
        low = next(iter(self.features.values())).dtype
        if low in (torch.bfloat16, torch.float16) and low != dtype:  # the forward ran under autocast: so does the box head
            score_fn = torch.autocast(device_type=rois.device.type, dtype=low)(score_fn)
        pooled_names, levels = _roi_levels(pooler, features, [rois])
        scales = _level_scales(pooler, features, pooled_names, self.batch_hw[1])
        roi = RoIScoring(
            pooled=[pooled], rois=[rois], level_index=[levels], featmap_names=pooled_names, scales=scales,
            sampling_ratio=int(pooler.sampling_ratio), output_size=tuple(int(s) for s in pooler.output_size),
            score_fn=score_fn,
        )
        return AdapterOutput(
            detections=[det],
            activations={f"{FEATURES}/{k}": v for k, v in features.items()},
            geometry=geometry,
            inputs=[],
            family=TwoStageAdapter.family,
            level_layers={FEATURES: f"{FEATURES}/"},
            roi=roi,
        )


def _level_scales(pooler: nn.Module, features: dict[str, Tensor], pooled_names: list[str], batch_width: int) -> list[float]:
    """RoIAlign's spatial scale per pooled level: the pooler's own, or (a single level it has
    not set up) inferred the way ``MultiScaleRoIAlign`` does, from the padded batch width."""
    scales = [float(s) for s in (pooler.scales or [])]
    return scales or [features[pooled_names[0]].shape[-1] / batch_width]


def _roi_levels(pooler: nn.Module, features: dict[str, Tensor], proposals: list[Tensor]) -> tuple[list[str], Tensor]:
    """The feature levels RoIAlign pools from, and each proposal's index into them (``[N]``)."""
    pooled_names = [k for k in features if k in pooler.featmap_names]
    if len(pooled_names) > 1:
        return pooled_names, pooler.map_levels(proposals)
    device = proposals[0].device if proposals else None
    return pooled_names, torch.zeros(sum(len(p) for p in proposals), dtype=torch.int64, device=device)


@torch.no_grad()
def _postprocess_tracked(
    rh: nn.Module, pred_boxes: Tensor, pred_scores: Tensor, shape: tuple[int, int]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``RoIHeads.postprocess_detections`` for one image, tracking the proposal behind each box.

    Args:
        pred_boxes: ``[n, C+1, 4]`` per-class boxes of the image's ``n`` proposals (input pixels).
        pred_scores: ``[n, C+1]`` softmax scores (background column 0).
        shape: the image's ``(h, w)`` after the model's resize.

    Returns:
        ``boxes [K, 4]`` (input pixels), ``scores [K]``, ``labels [K]``, ``proposal [K]``,
        by decreasing score, detached: exactly the boxes torchvision keeps.
    """
    boxes = box_ops.clip_boxes_to_image(pred_boxes.detach(), shape)
    scores = pred_scores.detach()
    labels = torch.arange(scores.shape[-1], device=scores.device).view(1, -1).expand_as(scores)
    prop = torch.arange(scores.shape[0], device=scores.device).view(-1, 1).expand_as(scores)
    boxes, scores = boxes[:, 1:].reshape(-1, 4), scores[:, 1:].reshape(-1)
    labels, prop = labels[:, 1:].reshape(-1), prop[:, 1:].reshape(-1)
    inds = torch.where(scores > rh.score_thresh)[0]
    boxes, scores, labels, prop = boxes[inds], scores[inds], labels[inds], prop[inds]
    keep = box_ops.remove_small_boxes(boxes, min_size=1e-2)
    boxes, scores, labels, prop = boxes[keep], scores[keep], labels[keep], prop[keep]
    keep = box_ops.batched_nms(boxes, scores, labels, rh.nms_thresh)[: rh.detections_per_img]
    return boxes[keep], scores[keep], labels[keep], prop[keep]


def _decode_per_class(box_coder: det_utils.BoxCoder, regression: Tensor, proposals: list[Tensor]) -> Tensor:
    """``box_coder.decode`` of ``regression [N, (C+1)*4]`` shaped ``[N, C+1, 4]`` for every
    ``N``: torchvision skips its own reshape when ``N == 0`` (an untrained RPN can keep no
    proposal for a whole batch)."""
    return box_coder.decode(regression, proposals).reshape(len(regression), regression.shape[-1] // 4, 4)
