"""detlens.sinks: hand rendered media and scalars to the Trainer's loggers; read offline W&B runs.

``log_media`` is the one entry point callbacks use (rank 0 only, no collectives);
``flush_media`` logs the W&B media it built off the training thread (callbacks call it).
``wandb_offline.read_offline_run`` reads a run back from disk.
"""

from detlens.sinks.fanout import Media, flush_media, log_media, log_media_later
from detlens.sinks.media import MediaImage, MediaTable
from detlens.sinks.wandb_offline import OfflineRun, OfflineRunError, find_offline_runs, read_offline_run

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
