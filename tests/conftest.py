"""Shared test setup: W&B offline and quiet, every run written under pytest's tmp dirs."""

from __future__ import annotations

import os

# Set before anything imports wandb: tests never reach the network and never write into the repo.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_CONSOLE", "off")
os.environ.setdefault("WANDB_DISABLE_GIT", "true")
os.environ.setdefault("WANDB_DISABLE_CODE", "true")
os.environ.setdefault("WANDB_DIR", os.path.join(os.environ.get("TMPDIR", "/tmp"), "detlens-tests-wandb"))
