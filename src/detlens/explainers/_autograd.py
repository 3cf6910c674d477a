"""Per-output gradients from one graph: vectorised backward with a looped fallback."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor

log = logging.getLogger(__name__)

_fallback_logged: set[str] = set()

#: Upper bound on the bytes one vectorised backward may hold in input-sized gradients.
GRAD_MEMORY_BUDGET = 1 << 28


def per_output_grads(outputs: Tensor, inputs: Sequence[Tensor], budget_bytes: int = GRAD_MEMORY_BUDGET) -> list[Tensor]:
    """Gradient of every element of ``outputs`` w.r.t. each input, from one graph.

    Args:
        outputs: ``Tensor[R]``, scalars on one autograd graph.
        inputs: tensors on that graph (activations or leaves).
        budget_bytes: rows are processed in chunks whose gradients fit this budget.

    Returns:
        One ``Tensor[R, *input.shape]`` per input (zeros where an output does not
        depend on it). The graph is retained.

    Uses ``torch.autograd.grad(..., is_grads_batched=True)`` (vmap over the backward);
    when vmap cannot batch some op of the graph, falls back to one retained-graph
    backward per row, logging once per op message.
    """
    rows = int(outputs.numel())
    outputs = outputs.reshape(-1)
    if rows == 0:
        return [x.new_zeros((0, *x.shape)) for x in inputs]
    per_row = sum(x.numel() * x.element_size() for x in inputs)
    chunk = max(1, min(rows, budget_bytes // max(per_row, 1)))
    eye = torch.eye(rows, dtype=outputs.dtype, device=outputs.device)
    pieces: list[list[Tensor]] = [[] for _ in inputs]
    for start in range(0, rows, chunk):
        basis = eye[start : start + chunk]
        grads = _batched(outputs, inputs, basis)
        for store, g in zip(pieces, grads):
            store.append(g)
    return [torch.cat(p) for p in pieces]


def _zeros_if_none(grads: Sequence[Tensor | None], inputs: Sequence[Tensor], rows: int | None) -> list[Tensor]:
    out = []
    for g, x in zip(grads, inputs):
        if g is None:
            g = x.new_zeros(x.shape if rows is None else (rows, *x.shape))
        out.append(g)
    return out


def _batched(outputs: Tensor, inputs: Sequence[Tensor], basis: Tensor) -> list[Tensor]:
    try:
        grads = torch.autograd.grad(
            outputs, list(inputs), grad_outputs=basis, retain_graph=True, allow_unused=True, is_grads_batched=True
        )
        return _zeros_if_none(grads, inputs, basis.shape[0])
    except RuntimeError as err:  # vmap has no batching rule for some op of this graph
        key = str(err).split("\n")[0][:200]
        if key not in _fallback_logged:
            _fallback_logged.add(key)
            log.warning("detlens: vectorised backward unavailable (%s); looping with a retained graph", key)
    rows = []
    for b in basis:
        grads = torch.autograd.grad(outputs, list(inputs), grad_outputs=b, retain_graph=True, allow_unused=True)
        rows.append(_zeros_if_none(grads, inputs, None))
    return [torch.stack(r) for r in zip(*rows)]


def looped_grads(outputs: Tensor, inputs: Sequence[Tensor]) -> list[Tensor]:
    """Reference: one backward per element of ``outputs`` (retained graph)."""
    outputs = outputs.reshape(-1)
    if outputs.numel() == 0:
        return [x.new_zeros((0, *x.shape)) for x in inputs]
    rows = []
    for value in outputs:
        grads = torch.autograd.grad(value, list(inputs), retain_graph=True, allow_unused=True)
        rows.append(_zeros_if_none(grads, inputs, None))
    return [torch.stack(r) for r in zip(*rows)]
