"""Adapter for torchvision one-stage detectors (RetinaNet, FCOS, SSD / SSDlite)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.fcos import FCOS
from torchvision.models.detection.retinanet import RetinaNet
from torchvision.models.detection.ssd import SSD
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import boxes as box_ops

from ._torchvision import TorchvisionAdapterMixin
from .base import Detections, ImageGeometry, LayerCapture, RoIScoring

__all__ = ["OneStageAdapter"]


class OneStageAdapter(TorchvisionAdapterMixin):
    """A torchvision RetinaNet, FCOS or SSD.

    torchvision's ``postprocess_detections`` does not say which anchor a detection came
    from, so it is re-implemented here keeping that index (same score threshold,
    ``topk_candidates``, batched NMS and ``detections_per_img``): detections equal the
    model's own eval forward. ``origin`` is the index into all anchors of the image
    (levels concatenated), ``level`` the feature-dict key of the anchor's level,
    ``features`` the head's input feature vector at the anchor's location
    (``FloatTensor[K, C]``), ``class_probs`` sigmoid (RetinaNet), sqrt(sigmoid x
    centerness) (FCOS) or softmax incl. background (SSD) over classes.
    """

    family = "one_stage"

    def __init__(self, model: nn.Module):
        if isinstance(model, FCOS):
            self.kind = "fcos"
        elif isinstance(model, RetinaNet):
            self.kind = "retinanet"
        elif isinstance(model, SSD):
            self.kind = "ssd"
        else:
            raise TypeError(f"{type(model).__name__} is not a torchvision RetinaNet, FCOS or SSD")
        super().__init__(model)

    def _anchors_per_level(self, features: list[Tensor], head_outputs: dict[str, Tensor]) -> list[int]:
        if self.kind == "ssd":
            per_loc = self.model.anchor_generator.num_anchors_per_location()
            return [int(f.shape[-2] * f.shape[-1] * a) for f, a in zip(features, per_loc)]
        hw = [int(f.shape[-2] * f.shape[-1]) for f in features]
        a = int(head_outputs["cls_logits"].shape[1]) // sum(hw)
        return [n * a for n in hw]

    def _score_vectors(self, head_outputs: dict[str, Tensor]) -> Tensor:
        """Per-anchor class scores ``[B, A_total, C]`` the way the model's postprocess scores."""
        logits = head_outputs["cls_logits"]
        if self.kind == "retinanet":
            return torch.sigmoid(logits)
        if self.kind == "fcos":
            return torch.sqrt(torch.sigmoid(logits) * torch.sigmoid(head_outputs["bbox_ctrness"]))
        return F.softmax(logits, dim=-1)

    def _decode(self, regression: Tensor, anchors: Tensor) -> Tensor:
        coder = self.model.box_coder
        if self.kind == "fcos":
            return coder.decode(regression, anchors)
        return coder.decode_single(regression, anchors)

    def _select(self, scores: Tensor, regression: Tensor, anchors: Tensor, counts: list[int], shape: tuple[int, int]) -> tuple:
        """torchvision's candidate selection for one image, on detached values.

        Returns ``(boxes [M, 4], scores [M], labels [M], anchor_index [M])`` before NMS.
        """
        m = self.model
        boxes_l, scores_l, labels_l, anchors_l = [], [], [], []
        if self.kind == "ssd":
            all_boxes = box_ops.clip_boxes_to_image(self._decode(regression, anchors), shape)
            for label in range(1, scores.shape[-1]):
                score = scores[:, label]
                idx = torch.where(score > m.score_thresh)[0]
                score = score[idx]
                num_topk = det_utils._topk_min(score, m.topk_candidates, 0)
                score, order = score.topk(num_topk)
                idx = idx[order]
                boxes_l.append(all_boxes[idx])
                scores_l.append(score)
                labels_l.append(torch.full_like(idx, label))
                anchors_l.append(idx)
        else:
            start = 0
            for count in counts:
                lvl_scores = scores[start : start + count]
                num_classes = lvl_scores.shape[-1]
                flat = lvl_scores.flatten()
                keep_idxs = flat > m.score_thresh
                flat = flat[keep_idxs]
                topk_idxs = torch.where(keep_idxs)[0]
                num_topk = det_utils._topk_min(topk_idxs, m.topk_candidates, 0)
                flat, order = flat.topk(num_topk)
                topk_idxs = topk_idxs[order]
                anchor_idxs = torch.div(topk_idxs, num_classes, rounding_mode="floor")
                labels = topk_idxs % num_classes
                boxes = self._decode(regression[start : start + count][anchor_idxs], anchors[start : start + count][anchor_idxs])
                boxes_l.append(box_ops.clip_boxes_to_image(boxes, shape))
                scores_l.append(flat)
                labels_l.append(labels)
                anchors_l.append(anchor_idxs + start)
                start += count
        return torch.cat(boxes_l), torch.cat(scores_l), torch.cat(labels_l), torch.cat(anchors_l)

    def _forward(
        self, images: list[Tensor], capture: LayerCapture, top_k: int | None, score_threshold: float
    ) -> tuple[list[Detections], list[ImageGeometry], RoIScoring | None]:
        m = self.model
        image_list, feature_dict, geometry = self._transform_and_features(images, capture)
        keys = list(feature_dict.keys())
        features = list(feature_dict.values())
        head_outputs = m.head(features)
        anchors = m.anchor_generator(image_list, features)
        counts = self._anchors_per_level(features, head_outputs)
        score_vectors = self._score_vectors(head_outputs)  # [B, A_total, C]
        regression = head_outputs["bbox_regression"]  # [B, A_total, 4]
        per_loc = [c // int(f.shape[-2] * f.shape[-1]) for c, f in zip(counts, features)]
        bounds = torch.tensor(counts, device=regression.device).cumsum(0)

        dets: list[Detections] = []
        for i, (shape, geom) in enumerate(zip(image_list.image_sizes, geometry)):
            with torch.no_grad():
                boxes, scores, labels, anchor_idx = self._select(
                    score_vectors[i].detach(), regression[i].detach(), anchors[i], counts, shape
                )
                keep = box_ops.batched_nms(boxes, scores, labels, m.nms_thresh)[: m.detections_per_img]
                boxes, scores, labels, anchor_idx = boxes[keep], scores[keep], labels[keep], anchor_idx[keep]
                # torchvision returns candidates by decreasing score: threshold, then top_k.
                kept = torch.nonzero(scores > score_threshold).flatten()
                if top_k is not None:
                    kept = kept[: max(int(top_k), 0)]
                boxes, scores, labels, anchor_idx = boxes[kept], scores[kept], labels[kept], anchor_idx[kept]
            level = torch.bucketize(anchor_idx, bounds, right=True)
            score_graph = score_vectors[i][anchor_idx, labels]
            box_graph = box_ops.clip_boxes_to_image(
                self._decode(regression[i][anchor_idx], anchors[i][anchor_idx]), shape
            )
            # head input feature at each anchor's location on its level
            feats = []
            for a, l in zip(anchor_idx.tolist(), level.tolist()):
                local = a - (int(bounds[l - 1]) if l > 0 else 0)
                loc = local // per_loc[l]
                w = int(features[l].shape[-1])
                feats.append(features[l][i, :, loc // w, loc % w])
            # SSD levels differ in width: zero-pad to the widest level so rows stack.
            width = max(int(f.shape[1]) for f in features)
            feat = regression.new_zeros((len(feats), width))
            for row, f in enumerate(feats):
                feat[row, : f.shape[0]] = f.detach()
            size = list(geom.original_size)
            dets.append(
                Detections(
                    boxes=resize_boxes(boxes, list(shape), size),
                    scores=scores,
                    labels=labels,
                    score_graph=score_graph,
                    box_graph=resize_boxes(box_graph, list(shape), size),
                    origin=anchor_idx,
                    level=[keys[l] for l in level.tolist()],
                    features=feat,
                    class_probs=score_vectors[i][anchor_idx].detach(),
                )
            )
        return dets, geometry, None
