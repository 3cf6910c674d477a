"""Whether a W&B run talks to the server now (alerts and artifacts need that; offline runs wait for ``wandb sync``)."""

from __future__ import annotations

from typing import Any

__all__ = ["ONLINE_MODES", "is_online"]

ONLINE_MODES = ("online", "run", "shared")
"""``run.settings.mode`` values of a run connected to the W&B server (wandb's own names)."""


def is_online(run: Any) -> bool:
    """``True`` for a live, online W&B run; ``False`` for ``None``, offline, disabled or dummy runs."""
    if run is None:
        return False
    return getattr(getattr(run, "settings", None), "mode", "offline") in ONLINE_MODES
