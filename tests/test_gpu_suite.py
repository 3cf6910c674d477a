"""The GPU benchmark suite runs (``--device cpu --quick``), so it cannot rot before a GPU run."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.py"


@pytest.mark.slow
def test_the_gpu_suite_runs_on_cpu_and_prints_a_ratio_per_measurement(tmp_path):
    env = {**os.environ, "WANDB_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(SUITE), "--device", "cpu", "--quick"], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path, env=env)

    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for section in ("[1] callback overhead", "[2] Grad-CAM per detection", "[3] attention under bf16", "[4] t-SNE"):
        assert section in out, out
    ratios = [float(r) for r in re.findall(r"ratio (\d+\.\d+)", out)]
    assert len(ratios) == 4 and all(math.isfinite(r) and r > 0 for r in ratios), out
    rows = re.findall(r"^\s+(fasterrcnn_r50_fpn|detr_r50)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s", out, re.M)
    assert {m for m, *_ in rows} == {"fasterrcnn_r50_fpn", "detr_r50"} and len(rows) == 4, out
    assert "does not pay" in out or "pays" in out


def test_the_gpu_suite_says_when_there_is_no_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    done = subprocess.run([sys.executable, str(SUITE)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2 and "no CUDA device here" in done.stderr
