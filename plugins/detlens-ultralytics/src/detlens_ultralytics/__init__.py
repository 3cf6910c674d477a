"""detlens for Ultralytics YOLO (AGPL-3.0, a separate package: detlens itself never imports Ultralytics).

Installing this package makes detlens recognise Ultralytics ``DetectionModel`` networks (YOLOv8,
YOLO11) anywhere in a LightningModule or given directly to ``detlens.explain``, through the
``detlens.adapters`` entry point (:func:`register_adapters`); :class:`UltralyticsDetector` trains
one in Lightning with Ultralytics' own detection loss.
"""

from __future__ import annotations

import os

# No network at import or build time: Ultralytics checks for updates and fonts otherwise.
os.environ.setdefault("YOLO_OFFLINE", "1")

from typing import Any  # noqa: E402

from .adapter import UltralyticsAdapter, is_ultralytics_detector  # noqa: E402

__all__ = [
    "UltralyticsAdapter", "UltralyticsDetector", "build_detection_model", "is_ultralytics_detector",
    "load_ultralytics_checkpoint", "register_adapters",
]


def __getattr__(name: str) -> Any:
    # The LightningModule and checkpoint loader import Ultralytics (which patches PIL.Image.open
    # globally): only when asked for, never when detlens loads the entry point.
    if name in ("UltralyticsDetector", "build_detection_model", "load_ultralytics_checkpoint"):
        from . import module

        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register_adapters() -> None:
    """The ``detlens.adapters`` entry point: registers the Ultralytics family with detlens."""
    from detlens.adapters import register

    register(is_ultralytics_detector, UltralyticsAdapter, "Ultralytics YOLO (v8/11 DetectionModel)")
