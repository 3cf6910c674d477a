"""Shared test setup: W&B offline and quiet, every run written under pytest's tmp dirs."""

from __future__ import annotations

import os
import sys

# Set before anything imports wandb: tests never reach the network and never write into the repo.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_CONSOLE", "off")
os.environ.setdefault("WANDB_DISABLE_GIT", "true")
os.environ.setdefault("WANDB_DISABLE_CODE", "true")
os.environ.setdefault("WANDB_DIR", os.path.join(os.environ.get("TMPDIR", "/tmp"), "detlens-tests-wandb"))
# W&B stages a copy of every table image for the run's artifact in its data folder (in the
# home directory by default) and keeps it until `wandb sync`; a suite run left ~280 MB there.
if "WANDB_DATA_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["WANDB_DATA_DIR"] = tempfile.mkdtemp(prefix="detlens-tests-wandb-data-")
    os.environ.setdefault("WANDB_CACHE_DIR", os.path.join(os.environ["WANDB_DATA_DIR"], "cache"))
    atexit.register(shutil.rmtree, os.environ["WANDB_DATA_DIR"], ignore_errors=True)

import pytest  # noqa: E402 - after the environment above, before anything imports wandb
import torch  # noqa: E402

# detlens[hf] (transformers 5) needs Python >= 3.11: on 3.10 its tests are not collected.
collect_ignore = ["test_models_hf.py", "test_hf_end_to_end.py"] if sys.version_info < (3, 11) else []


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (tiny tensors: threads cost more than they give on a
    shared 2-core machine), the previous count restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def finish_wandb():
    """Closes the W&B run a test started, pass or fail."""
    yield
    import wandb

    wandb.finish()


@pytest.fixture(scope="module")
def scenes_root(tmp_path_factory):
    """The reliability suite's tiny synthetic scenes (``reliability_utils.scenes``), once per
    module. Modules that train on other scene sizes define their own ``scenes_root``."""
    from reliability_utils import scenes

    root = tmp_path_factory.mktemp("scenes") / "synthetic"
    scenes(str(root))
    return str(root)


@pytest.fixture(autouse=True)
def no_media_left_queued():
    """Every test leaves detlens's media queue empty: a W&B payload or a focus-record
    follow-up still queued after a fit ended would be logged into the next run."""
    yield
    import sys

    fanout = sys.modules.get("detlens.sinks.fanout")
    if fanout is not None and fanout._pending:
        left = len(fanout._pending)
        fanout._pending.clear()
        pytest.fail(f"{left} media payload(s) left queued in detlens.sinks.fanout after the test")
