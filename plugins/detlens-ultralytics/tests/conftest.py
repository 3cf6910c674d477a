"""Fixtures of the plugin's tests; the repository's test helpers (tests/reliability_utils.py) are reused."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("YOLO_OFFLINE", "1")
# Ultralytics writes its settings file at import: into a scratch folder, not the user's home
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="detlens-yolo-settings-"))
os.environ.setdefault("WANDB_MODE", "offline")

# Importing Ultralytics patches PIL.Image.open for the whole process (ultralytics.utils.patches).
# These modules are collected with the repository's tests, before any of them runs: keep PIL's
# own function outside this folder's tests, and Ultralytics' inside them.
import PIL.Image  # noqa: E402
import ultralytics.utils.patches  # noqa: E402, F401 - applies the patch now, once

_ULTRALYTICS_OPEN = PIL.Image.open
PIL.Image.open = ultralytics.utils.patches._image_open  # PIL's own, which the patch wraps


@pytest.fixture(autouse=True)
def ultralytics_image_open():
    PIL.Image.open = _ULTRALYTICS_OPEN
    yield
    PIL.Image.open = ultralytics.utils.patches._image_open


REPO_TESTS = Path(__file__).resolve().parents[3] / "tests"
if str(REPO_TESTS) not in sys.path:
    sys.path.insert(0, str(REPO_TESTS))


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def scenes_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("scenes") / "synthetic")
