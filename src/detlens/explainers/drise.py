"""D-RISE: black-box per-detection saliency from randomly masked images.

Petsiuk et al., "Black-box Explanation of Object Detectors via Saliency Maps", CVPR 2021.
``N`` random smooth masks ``M_i`` are applied to the image; the detector is re-run on
each masked copy; the weight of mask ``i`` for target detection ``t`` is the best
similarity between ``t`` and any detection on the masked image,
``IoU(box_t, box_j) * cos(p_t, p_j)`` with ``p`` the class-probability vectors; the map
is ``sum_i w_it M_i / N``. No gradients, so it works for any detector an adapter runs,
at the price of ``N`` forwards: it is opt-in, ``N`` is bounded by :data:`MAX_MASKS`, and
masked images run in batches. Masks are drawn from a local ``torch.Generator`` (the
global RNG is not consumed); the same seed gives the same maps.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_iou

from detlens.adapters.base import Detections, DetectorAdapter

__all__ = ["MAX_MASKS", "drise", "random_masks"]

#: Upper bound on masks per image: each is one detector forward.
MAX_MASKS = 5000


def random_masks(
    count: int, size: tuple[int, int], grid: int, keep_prob: float, generator: torch.Generator
) -> Tensor:
    """RISE masks: a ``grid x grid`` Bernoulli(``keep_prob``) grid, bilinearly upsampled
    to cells of ``ceil(size / grid)`` pixels, randomly shifted by up to one cell.

    Returns:
        ``FloatTensor[count, H, W]`` in ``[0, 1]`` (CPU).
    """
    H, W = size
    ch, cw = math.ceil(H / grid), math.ceil(W / grid)
    cells = (torch.rand((count, 1, grid, grid), generator=generator) < keep_prob).float()
    up = F.interpolate(cells, size=((grid + 1) * ch, (grid + 1) * cw), mode="bilinear", align_corners=False)
    dy = torch.randint(0, ch, (count,), generator=generator).tolist()
    dx = torch.randint(0, cw, (count,), generator=generator).tolist()
    return torch.stack([up[i, 0, y : y + H, x : x + W] for i, (y, x) in enumerate(zip(dy, dx))])


def _similarity(target: Detections, found: Detections) -> Tensor:
    """``[K_target]``: best ``IoU * cosine(class probs)`` over the found detections."""
    if len(found) == 0 or len(target) == 0:
        return torch.zeros(len(target))
    iou = box_iou(target.boxes.float().cpu(), found.boxes.float().cpu())  # [K, M]
    cos = F.normalize(target.class_probs.float().cpu(), dim=1) @ F.normalize(found.class_probs.float().cpu(), dim=1).T
    return (iou * cos).amax(1)


def drise(
    adapter: DetectorAdapter,
    images: list[Tensor],
    detections: list[Detections],
    num_masks: int = 1000,
    grid: int = 16,
    keep_prob: float = 0.5,
    batch_size: int = 16,
    seed: int = 0,
) -> list[Tensor]:
    """D-RISE maps of the given detections.

    Args:
        adapter: runs the detector (``adapter.run(..., with_grad=False)``).
        images: ``B`` images ``FloatTensor[C, H, W]`` in ``[0, 1]``.
        detections: the detections to explain, one :class:`Detections` per image (e.g.
            from a previous ``adapter.run``); their ``class_probs`` must come from the same
            model.
        num_masks: masks per image, ``1 <= num_masks <=`` :data:`MAX_MASKS`.
        grid: mask cells per side; ``keep_prob``: probability a cell is kept.
        batch_size: masked images per detector forward.
        seed: seed of the masks.

    Returns:
        Per image ``FloatTensor[K, H, W]`` (CPU), non-negative.
    """
    if not 1 <= num_masks <= MAX_MASKS:
        raise ValueError(f"num_masks must be in [1, {MAX_MASKS}] (each mask costs one forward), got {num_masks}")
    if grid < 1 or not 0.0 < keep_prob < 1.0 or batch_size < 1:
        raise ValueError(f"need grid >= 1, 0 < keep_prob < 1, batch_size >= 1; got {grid}, {keep_prob}, {batch_size}")
    if len(images) != len(detections):
        raise ValueError(f"{len(images)} images but {len(detections)} detection sets")
    generator = torch.Generator().manual_seed(int(seed))
    maps = []
    for image, target in zip(images, detections):
        H, W = int(image.shape[-2]), int(image.shape[-1])
        acc = torch.zeros((len(target), H, W), dtype=torch.float64)
        if len(target) == 0:
            maps.append(acc.float())
            continue
        for start in range(0, num_masks, batch_size):
            n = min(batch_size, num_masks - start)
            masks = random_masks(n, (H, W), grid, keep_prob, generator)  # [n, H, W]
            masked = image.detach()[None] * masks[:, None].to(image.device, image.dtype)
            found = adapter.run(list(masked), with_grad=False).detections
            weights = torch.stack([_similarity(target, f) for f in found]).double()  # [n, K]
            acc += torch.einsum("nk,nhw->khw", weights, masks.double())
        maps.append((acc / num_masks).float())
    return maps
