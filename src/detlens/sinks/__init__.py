"""detlens.sinks: hand rendered media and scalars to the Trainer's loggers.

``log_media`` is the one entry point callbacks use (rank 0 only, no collectives);
``flush_media`` logs the W&B media it built off the training thread (callbacks call it).

Names are imported on first use (PEP 562), so that detlens' media process, which imports
``detlens.sinks.wandb_payload``, does not import Lightning (``detlens.sinks.fanout`` does).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from detlens.render.media import Media, MediaImage, MediaTable

if TYPE_CHECKING:
    from detlens.sinks.fanout import flush_media, log_media, log_media_later

__all__ = ["Media", "MediaImage", "MediaTable", "flush_media", "log_media", "log_media_later"]


def __getattr__(name: str) -> Any:
    if name in ("flush_media", "log_media", "log_media_later"):
        return getattr(importlib.import_module("detlens.sinks.fanout"), name)
    raise AttributeError(f"module 'detlens.sinks' has no attribute {name!r}")
