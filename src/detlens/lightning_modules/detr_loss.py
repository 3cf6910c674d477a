"""DETR's set prediction loss: Hungarian matching, then CE + L1 + GIoU on matched pairs.

Follows Carion et al., "End-to-End Object Detection with Transformers" (2020).
Boxes are ``cx, cy, w, h`` normalised by the (unpadded) image size; class indices are
``0..C-1`` for objects and ``C`` for "no object".
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou

__all__ = ["HungarianMatcher", "SetCriterion"]


class HungarianMatcher(nn.Module):
    """One-to-one assignment of predictions to ground-truth boxes per image.

    Cost of pairing prediction ``q`` with target ``t``:
    ``-class_weight * p_q(c_t) + bbox_weight * |b_q - b_t|_1 - giou_weight * GIoU(b_q, b_t)``,
    minimised with ``scipy.optimize.linear_sum_assignment``.
    """

    def __init__(self, class_weight: float = 1.0, bbox_weight: float = 5.0, giou_weight: float = 2.0) -> None:
        super().__init__()
        if class_weight == bbox_weight == giou_weight == 0:
            raise ValueError("all matching cost weights are 0")
        self.class_weight = class_weight
        self.bbox_weight = bbox_weight
        self.giou_weight = giou_weight

    @torch.no_grad()
    def forward(
        self, pred_logits: Tensor, pred_boxes: Tensor, targets: list[dict[str, Tensor]]
    ) -> list[tuple[Tensor, Tensor]]:
        """Match predictions to targets.

        Args:
            pred_logits: ``[B, Q, C + 1]`` class logits.
            pred_boxes: ``[B, Q, 4]`` normalised ``cx, cy, w, h``.
            targets: per image ``labels[N_i]`` (``0..C-1``) and ``boxes[N_i, 4]`` (normalised cxcywh).

        Returns:
            Per image ``(pred_index[M_i], target_index[M_i])`` int64 CPU tensors,
            ``M_i = min(Q, N_i)``.
        """
        b, q = pred_logits.shape[:2]
        sizes = [len(t["boxes"]) for t in targets]
        if sum(sizes) == 0:
            empty = torch.empty(0, dtype=torch.int64)
            return [(empty, empty) for _ in range(b)]
        prob = pred_logits.flatten(0, 1).float().softmax(-1)  # [B*Q, C+1]
        out_boxes = pred_boxes.flatten(0, 1).float()  # [B*Q, 4]
        tgt_labels = torch.cat([t["labels"] for t in targets])
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).float()
        cost = (
            -self.class_weight * prob[:, tgt_labels]
            + self.bbox_weight * torch.cdist(out_boxes, tgt_boxes, p=1)
            - self.giou_weight
            * generalized_box_iou(box_convert(out_boxes, "cxcywh", "xyxy"), box_convert(tgt_boxes, "cxcywh", "xyxy"))
        )
        cost = cost.view(b, q, -1).cpu()
        matches = []
        for i, c in enumerate(cost.split(sizes, dim=-1)):
            rows, cols = linear_sum_assignment(c[i].numpy())
            matches.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return matches


class SetCriterion(nn.Module):
    """DETR losses for every decoder layer; the last layer's are the main terms.

    Returns weighted terms whose sum is the training loss: ``loss_ce``, ``loss_bbox``,
    ``loss_giou`` for the last decoder layer and, with auxiliary losses on,
    ``loss_ce_aux``, ``loss_bbox_aux``, ``loss_giou_aux`` summed over the other layers.
    """

    empty_weight: Tensor

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        eos_coef: float = 0.1,
        class_weight: float = 1.0,
        bbox_weight: float = 5.0,
        giou_weight: float = 2.0,
        aux_loss: bool = True,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.class_weight = class_weight
        self.bbox_weight = bbox_weight
        self.giou_weight = giou_weight
        self.aux_loss = aux_loss
        weight = torch.ones(num_classes + 1)
        weight[-1] = eos_coef  # down-weights the many "no object" queries
        self.register_buffer("empty_weight", weight, persistent=False)

    def _num_boxes(self, targets: list[dict[str, Tensor]], device: torch.device) -> float:
        # Average box count over ranks, as DETR does, so every rank normalises alike.
        n = torch.tensor(float(sum(len(t["labels"]) for t in targets)), device=device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(n)
            n = n / dist.get_world_size()
        return max(n.item(), 1.0)

    def _layer_losses(
        self, logits: Tensor, boxes: Tensor, targets: list[dict[str, Tensor]], num_boxes: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        matches = self.matcher(logits, boxes, targets)
        batch_idx = torch.cat([torch.full_like(p, i) for i, (p, _) in enumerate(matches)]).to(logits.device)
        pred_idx = torch.cat([p for p, _ in matches]).to(logits.device)
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        target_classes[batch_idx, pred_idx] = torch.cat(
            [t["labels"][j.to(t["labels"].device)] for t, (_, j) in zip(targets, matches)]
        ).to(logits.device)
        loss_ce = F.cross_entropy(logits.float().transpose(1, 2), target_classes, weight=self.empty_weight)
        matched = boxes[batch_idx, pred_idx].float()  # [M, 4]
        target_boxes = torch.cat([t["boxes"][j.to(t["boxes"].device)] for t, (_, j) in zip(targets, matches)]).to(
            matched
        )
        loss_bbox = F.l1_loss(matched, target_boxes, reduction="sum") / num_boxes
        giou = torch.diag(
            generalized_box_iou(box_convert(matched, "cxcywh", "xyxy"), box_convert(target_boxes, "cxcywh", "xyxy"))
        )
        loss_giou = (1 - giou).sum() / num_boxes
        return self.class_weight * loss_ce, self.bbox_weight * loss_bbox, self.giou_weight * loss_giou

    def forward(self, pred_logits: Tensor, pred_boxes: Tensor, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """``pred_logits [L, B, Q, C+1]``, ``pred_boxes [L, B, Q, 4]`` (one entry per decoder layer)."""
        num_boxes = self._num_boxes(targets, pred_logits.device)
        ce, l1, giou = self._layer_losses(pred_logits[-1], pred_boxes[-1], targets, num_boxes)
        losses = {"loss_ce": ce, "loss_bbox": l1, "loss_giou": giou}
        if self.aux_loss and pred_logits.shape[0] > 1:
            aux = [self._layer_losses(pred_logits[i], pred_boxes[i], targets, num_boxes) for i in range(len(pred_logits) - 1)]
            losses["loss_ce_aux"] = torch.stack([a[0] for a in aux]).sum()
            losses["loss_bbox_aux"] = torch.stack([a[1] for a in aux]).sum()
            losses["loss_giou_aux"] = torch.stack([a[2] for a in aux]).sum()
        return losses

