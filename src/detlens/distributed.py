"""Gathering variable-size per-rank results to rank 0, and sharding the probe set.

Rule 3 of docs/DESIGN.md: every rank explains its shard; rank 0 alone renders and logs.
:func:`gather_to_rank_zero` is a collective: **every rank must call it, the same number
of times, in the same order** — never inside ``if trainer.is_global_zero:`` or a
``@rank_zero_only`` function, or the other ranks wait forever.

Why not ``torch.distributed.all_gather_object``: it does the same count/pad/gather
steps, but (a) every rank unpickles every rank's payload, where only rank 0 needs them
(heat maps of a whole probe set, K times over), (b) with NCCL it stages on
``torch.cuda.current_device()`` rather than the device the Lightning strategy owns, and
(c) it only speaks ``torch.distributed``. Going through ``strategy.all_gather`` (a plain
tensor all-gather that Lightning implements for DDP, FSDP, DeepSpeed and XLA) keeps the
tensors on ``strategy.root_device`` and works on gloo (CPU) and NCCL (GPU) alike.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from pytorch_lightning.strategies import Strategy

__all__ = ["RankError", "gather_to_rank_zero", "shard_indices"]

T = TypeVar("T")


@dataclass(frozen=True)
class RankError:
    """Stands in for a rank's result that could not be produced or pickled.

    Sending a marker instead of skipping the collective keeps every rank's collectives
    matched, so one failing rank never leaves the others hanging.
    """

    rank: int
    message: str


def shard_indices(indices: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Round-robin shard of ``indices`` for ``rank`` of ``world_size``; may be empty.

    ``shard_indices([0, 5, 9], rank=1, world_size=2) == [5]``. The union of all shards is
    ``indices``; no element is on two ranks.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    return list(indices[rank::world_size])


def gather_to_rank_zero(obj: Any, strategy: Strategy | None = None) -> list[Any] | None:
    """Collects one picklable object from every rank; rank 0 gets them in rank order.

    Steps: pickle to a ``uint8`` tensor on the strategy's root device, all-gather the
    byte counts, pad every payload to the largest, all-gather, trim, unpickle (rank 0 only).

    Args:
        obj: anything picklable (keep it on the CPU: tensors are pickled with their device).
            If it cannot be pickled, a :class:`RankError` is sent in its place.
        strategy: the Lightning strategy (``trainer.strategy``). ``None`` uses
            ``torch.distributed``'s default group directly when it is initialised
            (staging on the current CUDA device for NCCL, on the CPU otherwise).

    Returns:
        ``[obj_rank0, obj_rank1, ...]`` on rank 0, ``None`` on the other ranks;
        ``[obj]`` when not distributed (world size 1).
    """
    world_size, rank, device = _world(strategy)
    if world_size == 1:
        return [obj]
    try:
        payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as err:  # noqa: BLE001 - any pickling failure must still join the collective
        payload = pickle.dumps(RankError(rank, f"result not picklable: {type(err).__name__}: {err}"))

    data = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device)
    size = torch.tensor([data.numel()], dtype=torch.long, device=device)
    sizes = _all_gather(size, strategy, world_size).view(world_size).tolist()
    padded = torch.zeros(max(sizes), dtype=torch.uint8, device=device)
    padded[: data.numel()] = data
    gathered = _all_gather(padded, strategy, world_size)  # [world_size, max(sizes)]
    if rank != 0:
        return None
    gathered = gathered.cpu()
    return [pickle.loads(gathered[r, : sizes[r]].numpy().tobytes()) for r in range(world_size)]


def _world(strategy: Strategy | None) -> tuple[int, int, torch.device]:
    """``(world_size, global_rank, staging device)`` from a strategy or torch.distributed."""
    if strategy is not None:
        return strategy.world_size, strategy.global_rank, strategy.root_device
    if not (dist.is_available() and dist.is_initialized()):
        return 1, 0, torch.device("cpu")
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    return dist.get_world_size(), dist.get_rank(), device


def _all_gather(tensor: torch.Tensor, strategy: Strategy | None, world_size: int) -> torch.Tensor:
    """Same-shape all-gather -> ``[world_size, *tensor.shape]``."""
    if strategy is not None:
        out = strategy.all_gather(tensor)
        return out.reshape(world_size, *tensor.shape)
    buffers = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(buffers, tensor)
    return torch.stack(buffers)
