"""detlens.sinks: hand rendered media and scalars to the Trainer's loggers; read offline W&B runs.

``log_media`` is the one entry point callbacks use (rank 0 only, no collectives);
``flush_media`` logs the W&B media it built off the training thread (callbacks call it).
``wandb_offline.read_offline_run`` reads a run back from disk.

Names are imported on first use (PEP 562), so that detlens' media process, which imports
``detlens.render.media`` and ``detlens.sinks.wandb_payload``, does not import Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from detlens.sinks.fanout import flush_media, log_media, log_media_later
    from detlens.render.media import Media, MediaImage, MediaTable
    from detlens.sinks.wandb_offline import OfflineRun, OfflineRunError, find_offline_runs, read_offline_run

_HOMES = {
    "Media": "detlens.render.media",
    "MediaImage": "detlens.render.media",
    "MediaTable": "detlens.render.media",
    "flush_media": "detlens.sinks.fanout",
    "log_media": "detlens.sinks.fanout",
    "log_media_later": "detlens.sinks.fanout",
    "OfflineRun": "detlens.sinks.wandb_offline",
    "OfflineRunError": "detlens.sinks.wandb_offline",
    "find_offline_runs": "detlens.sinks.wandb_offline",
    "read_offline_run": "detlens.sinks.wandb_offline",
}

__all__ = [
    "Media",
    "MediaImage",
    "MediaTable",
    "OfflineRun",
    "OfflineRunError",
    "find_offline_runs",
    "flush_media",
    "log_media",
    "log_media_later",
    "read_offline_run",
]


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'detlens.sinks' has no attribute {name!r}")
