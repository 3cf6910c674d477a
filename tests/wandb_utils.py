"""Helpers for tests that read back what an offline W&B run logged (``wandb_offline``).

Typical use::

    run = newest_offline_run(tmp_path)          # after wandb.finish()
    events = image_events(run, "predictions/probe")
    assert events[0].captions[0].endswith("step 3")
    boxes = events[0].boxes(run, "predictions")  # the box JSON W&B wrote for each image
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wandb_offline import OfflineRun, find_offline_runs, read_offline_run


def finished_run(run_dir: str | Path, timeout_s: float = 30.0) -> OfflineRun:
    """Reads ``run_dir`` once its ``exit`` record is on disk.

    ``wandb.finish()`` can return while W&B's writer process is still flushing the log.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        run = read_offline_run(run_dir)
        if run.exit_code is not None or time.monotonic() > deadline:
            assert run.exit_code is not None, f"{run_dir} has no exit record after {timeout_s} s"
            return run
        time.sleep(0.2)


def newest_offline_run(root: str | Path) -> OfflineRun:
    """The most recent finished ``offline-run-*`` under ``root`` (any depth), parsed."""
    runs = find_offline_runs(root)
    assert runs, f"no offline W&B run under {root}"
    return finished_run(runs[-1])


@dataclass
class ImageEvent:
    """One history row's image list under one key (``wandb.log({key: [Image, ...]})``)."""

    step: int
    global_step: int | None
    captions: list[str]
    filenames: list[str]
    all_boxes: list[dict[str, Any]]
    width: int | None
    height: int | None

    def image_files(self, run: OfflineRun) -> list[Path]:
        """The image files on disk, one per image (W&B may store identical images once)."""
        return [run.run_dir / "files" / name for name in self.filenames]

    def boxes(self, run: OfflineRun, group: str) -> list[dict[str, Any]]:
        """The parsed ``boxes2D`` JSON of ``group`` (``"predictions"`` / ``"ground_truth"``) per image."""
        out = []
        for per_image in self.all_boxes:
            meta = per_image[group]
            out.append(json.loads((run.run_dir / "files" / meta["path"]).read_text()))
        return out


def image_events(run: OfflineRun, key: str) -> list[ImageEvent]:
    """Every logging of an image list under ``key``, in history order."""
    events = []
    for row in run.history:
        value = row.get(key)
        if not isinstance(value, dict) or value.get("_type") != "images/separated":
            continue
        events.append(
            ImageEvent(
                step=row.get("_step", -1),
                global_step=row.get("trainer/global_step"),
                captions=list(value.get("captions", [])),
                filenames=list(value.get("filenames", [])),
                all_boxes=list(value.get("all_boxes", [])),
                width=value.get("width"),
                height=value.get("height"),
            )
        )
    return events


def scalar_history(run: OfflineRun, key: str) -> list[float]:
    """The values logged under a scalar ``key``, in history order."""
    return [float(value) for _, value in run.history_of(key)]
