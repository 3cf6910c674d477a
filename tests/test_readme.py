"""The README's code runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def section_code(heading: str) -> str:
    text = README.read_text()
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    (code,) = re.findall(r"```python\n(.*?)```", text[start:end], re.S)
    return code


@pytest.mark.usefixtures("one_thread")
def test_the_own_detector_example_runs_and_its_maps_are_exact(capsys):
    namespace: dict = {}
    exec(compile(section_code("Your own detector"), "README.md", "exec"), namespace)  # noqa: S102 - our own README

    assert capsys.readouterr().out.strip() == "[(3, 64, 64), (3, 64, 64)]"
    explanations = namespace["explanations"]
    assert all(torch.isfinite(e.raw).all() and (e.maps >= 0).all() and (e.maps <= 1).all() for e in explanations)
    # the registered adapter is found by detlens' own search, and its vectorised backward is exact
    from detlens.adapters import adapter_for
    from detlens.explainers.gradcam import gradcam

    model = namespace["TinyDetector"]().eval()
    adapter = adapter_for(model)
    assert type(adapter).__name__ == "TinyAdapter"
    out = adapter.run(namespace["images"], ["backbone.4"], top_k=3)
    fast, slow = gradcam(out, "backbone.4", target="both"), gradcam(out, "backbone.4", target="both", fast=False)
    for f, s in zip(fast, slow):
        torch.testing.assert_close(f, s, rtol=0, atol=1e-6 * float(s.abs().max().clamp_min(1e-12)) + 1e-12)
