"""detlens.distributed: rank 0 receives every rank's (unequal-sized) results; shards cover the probe set."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from detlens.distributed import RankError, gather_to_rank_zero, shard_indices


def test_shards_are_round_robin_disjoint_and_may_be_empty():
    probe = [3, 8, 13, 21, 34]
    shards = [shard_indices(probe, rank, 4) for rank in range(4)]
    assert shards == [[3, 34], [8], [13], [21]]
    assert shard_indices([7], rank=1, world_size=2) == []
    with pytest.raises(ValueError, match="rank must be in"):
        shard_indices(probe, rank=2, world_size=2)


def test_single_process_gather_is_a_one_element_list():
    assert not dist.is_initialized()
    assert gather_to_rank_zero({"maps": [1, 2]}, None) == [{"maps": [1, 2]}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        # Rank 0 holds 3 items (with a big tensor), rank 1 none, rank 2 something unpicklable.
        local = {0: [torch.arange(5000), "a", {"k": 1.5}], 1: [], 2: [lambda: None]}[rank]
        first = gather_to_rank_zero(local, None)
        second = gather_to_rank_zero(f"again from {rank}", None)  # the collectives stay matched
        torch.save({"first": first, "second": second}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.ddp
def test_three_gloo_ranks_with_unequal_and_empty_results(tmp_path):
    mp.spawn(_worker, args=(3, _free_port(), str(tmp_path)), nprocs=3, join=True)

    on_rank0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    first = on_rank0["first"]
    assert torch.equal(first[0][0], torch.arange(5000)) and first[0][1:] == ["a", {"k": 1.5}]
    assert first[1] == []
    assert isinstance(first[2], RankError) and first[2].rank == 2 and "not picklable" in first[2].message
    assert on_rank0["second"] == ["again from 0", "again from 1", "again from 2"]
    for rank in (1, 2):
        assert torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) == {"first": None, "second": None}
