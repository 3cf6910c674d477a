"""Detection transforms that draw their randomness from their own generator.

torchvision's ``v2.RandomHorizontalFlip`` draws from the global torch RNG; in a
``num_workers=0`` loader that runs in the training process and would shift every later
random draw (dropout, sampling), so runs with and without detlens callbacks could no
longer be compared bit for bit. These transforms keep a private ``torch.Generator``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import get_worker_info
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

Target = dict[str, Any]


class RandomHorizontalFlip:
    """Flips the image and its ``target["boxes"]`` (xyxy pixels) left-right with probability ``p``.

    Randomness comes from a private generator: in the main process it is seeded with
    ``seed``; inside a DataLoader worker it is reseeded once per worker from
    ``get_worker_info().seed`` (which the DataLoader derives from its own ``generator``),
    so workers differ from each other and from epoch to epoch, reproducibly.

    Args:
        p: probability of flipping an item.
        seed: seed of the main-process generator.
    """

    def __init__(self, p: float = 0.5, seed: int = 0) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.p = float(p)
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self._worker_key: tuple[int, int] | None = None

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        """``image``: ``FloatTensor[3, H, W]``; ``target["boxes"]``: ``FloatTensor[N, 4]`` xyxy."""
        self._reseed_in_worker()
        if torch.rand((), generator=self.generator).item() >= self.p:
            return image, target
        height, width = image.shape[-2:]
        flipped = dict(target)
        flipped["boxes"] = TF.horizontal_flip_bounding_boxes(
            target["boxes"],
            format=tv_tensors.BoundingBoxFormat.XYXY,
            canvas_size=(int(height), int(width)),
        )
        return image.flip(-1), flipped

    def state_dict(self) -> dict[str, Any]:
        """The main-process generator state (for resuming a run with the same flips)."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])

    def _reseed_in_worker(self) -> None:
        info = get_worker_info()
        if info is None:
            return
        key = (info.id, info.seed)
        if key != self._worker_key:
            self.generator.manual_seed(info.seed)
            self._worker_key = key

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p}, seed={self.seed})"
