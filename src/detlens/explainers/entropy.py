"""Attention entropy per head, and detection of entropy collapse during training.

Normalised entropy of one attention row ``p`` over ``n`` valid keys is
``-sum_j p_j log p_j / log n``: 1 for uniform attention, 0 for attention on one key.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import torch
from torch import Tensor

__all__ = ["CollapseDetector", "attention_entropy", "entropy_metrics", "entropy_sums"]


def entropy_sums(
    weights: Tensor,
    key_padding_mask: Tensor | None = None,
    query_padding_mask: Tensor | None = None,
    *,
    per_image: bool = False,
) -> tuple[Tensor, Tensor]:
    """Per-head sum of normalised row entropies and the number of rows summed.

    The additive form lets callers accumulate over calls, chunks and ranks before
    dividing. See :func:`attention_entropy` for the arguments.

    Returns:
        ``(sums FloatTensor[heads], count FloatTensor[])``; with ``per_image``, one of each
        per batch element: ``(FloatTensor[B, heads], FloatTensor[B])``.
    """
    if weights.dim() != 4:
        raise ValueError(f"weights must be [B, heads, Q, K], got shape {tuple(weights.shape)}")
    b, _, n_q, n_k = weights.shape
    p = weights.float()
    if key_padding_mask is not None:
        if key_padding_mask.shape != (b, n_k):
            raise ValueError(f"key_padding_mask must be [B={b}, K={n_k}], got {tuple(key_padding_mask.shape)}")
        valid_keys = (~key_padding_mask.bool()).to(p.device)
        p = p * valid_keys[:, None, None, :]
        n_valid = valid_keys.sum(-1).float()  # [B]
    else:
        n_valid = torch.full((b,), float(n_k), device=p.device)
    # xlogy gives 0 * log 0 = 0 without NaNs.
    row_entropy = -torch.special.xlogy(p, p).sum(-1)  # [B, h, Q]
    norm = torch.log(n_valid).clamp(min=math.log(2.0))  # n <= 1 key: entropy is 0 anyway
    row_entropy = row_entropy / norm[:, None, None]
    row_valid = p.sum(-1) > 0  # [B, h, Q]; zero rows: padded (NestedTensor) or fully masked
    if query_padding_mask is not None:
        if query_padding_mask.shape != (b, n_q):
            raise ValueError(
                f"query_padding_mask must be [B={b}, Q={n_q}], got {tuple(query_padding_mask.shape)}"
            )
        row_valid = row_valid & ~query_padding_mask.bool().to(p.device)[:, None, :]
    row_valid_f = row_valid.float()
    sums = (row_entropy * row_valid_f).sum(2)  # [B, h]
    count = row_valid_f[:, 0].sum(-1)  # [B]; rows are valid or not for every head alike
    return (sums, count) if per_image else (sums.sum(0), count.sum())


def attention_entropy(
    weights: Tensor,
    key_padding_mask: Tensor | None = None,
    query_padding_mask: Tensor | None = None,
) -> Tensor:
    """Mean normalised entropy of the attention rows of each head.

    Args:
        weights: ``FloatTensor[B, heads, Q, K]``, softmax rows (each sums to 1, or 0 for
            rows that do not exist, e.g. padded queries read from a NestedTensor call).
        key_padding_mask: ``BoolTensor[B, K]``, True = padding key; the normaliser is
            ``log`` of the number of valid keys of each image.
        query_padding_mask: ``BoolTensor[B, Q]``, True = padding query (excluded from the
            mean; for self-attention pass the same mask as ``key_padding_mask``).

    Returns:
        ``FloatTensor[heads]`` in ``[0, 1]``: 1 = uniform over the valid keys, 0 = one-hot.
        NaN for a head without any valid row.
    """
    sums, count = entropy_sums(weights, key_padding_mask, query_padding_mask)
    return sums / count if count > 0 else torch.full_like(sums, float("nan"))


def entropy_metrics(entropies: dict[str, Tensor], prefix: str = "attention/entropy") -> dict[str, float]:
    """``{layer: FloatTensor[heads]}`` -> ``{"<prefix>/<layer>/head<i>": float}`` (stable metric keys)."""
    return {
        f"{prefix}/{layer}/head{i}": float(v)
        for layer, values in entropies.items()
        for i, v in enumerate(values.reshape(-1).tolist())
    }


class CollapseDetector:
    """Flags layer/heads whose attention entropy collapsed.

    A key (e.g. ``"encoder.layers.0.self_attn/head3"``) is flagged when its newest value
    is below ``(1 - drop_fraction)`` times the maximum of the values within the last
    ``window`` updates (the newest included). A flag is raised once; it is lowered when
    the condition no longer holds (e.g. the window moved past the old maximum), so a
    later second collapse is reported again.

    Args:
        drop_fraction: relative drop from the window maximum that counts as collapse, in (0, 1).
        window: number of most recent updates compared (>= 2).
        min_history: updates a key needs before it can be flagged (2..window).

    ```python
    detector = CollapseDetector(drop_fraction=0.5, window=5)
    new = detector.update(step, {"enc0/head0": 0.81, ...})  # -> list of newly flagged keys
    ```
    """

    def __init__(self, drop_fraction: float = 0.5, window: int = 5, min_history: int = 3) -> None:
        if not 0.0 < drop_fraction < 1.0:
            raise ValueError(f"drop_fraction must be in (0, 1), got {drop_fraction}")
        if window < 2:
            raise ValueError(f"window must be >= 2, got {window}")
        if not 2 <= min_history <= window:
            raise ValueError(f"min_history must be in [2, window={window}], got {min_history}")
        self.drop_fraction = drop_fraction
        self.window = window
        self.min_history = min_history
        self._history: dict[str, deque[tuple[int, float]]] = {}
        self.flagged: set[str] = set()
        self.events: list[dict[str, Any]] = []  # every flag raised: step, key, value, window max

    def update(self, step: int, entropies: dict[str, float | Tensor]) -> list[str]:
        """Feed the entropies of one step; returns the keys flagged at this step (sorted).

        Non-finite values are ignored (a head that did not run)."""
        newly: list[str] = []
        for key, value in entropies.items():
            value = float(value)
            if not math.isfinite(value):
                continue
            hist = self._history.setdefault(key, deque(maxlen=self.window))
            hist.append((int(step), value))
            if len(hist) < self.min_history:
                continue
            peak = max(v for _, v in hist)
            collapsed = peak > 0 and value < (1.0 - self.drop_fraction) * peak
            if collapsed and key not in self.flagged:
                self.flagged.add(key)
                newly.append(key)
                self.events.append({"step": int(step), "key": key, "value": value, "window_max": peak})
            elif not collapsed:
                self.flagged.discard(key)
        return sorted(newly)

    def state_dict(self) -> dict[str, Any]:
        return {
            "drop_fraction": self.drop_fraction,
            "window": self.window,
            "min_history": self.min_history,
            "history": {k: [list(e) for e in h] for k, h in self._history.items()},
            "flagged": sorted(self.flagged),
            "events": [dict(e) for e in self.events],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore history and flags; the constructor's thresholds are kept (a resumed run
        may change them from its config), histories are trimmed to the current window."""
        self._history = {
            k: deque(((int(s), float(v)) for s, v in h), maxlen=self.window) for k, h in state["history"].items()
        }
        self.flagged = set(state["flagged"])
        self.events = [dict(e) for e in state.get("events", [])]
