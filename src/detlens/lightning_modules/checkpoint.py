"""Loading user-supplied weights (a state_dict or a Lightning checkpoint) into a detector."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = ["CheckpointReport", "load_weights"]

_MAX_LISTED = 12


@dataclass
class CheckpointReport:
    """What :func:`load_weights` did: keys loaded, missing, unexpected and skipped."""

    path: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatch: list[str] = field(default_factory=list)

    def summary(self) -> str:
        def listing(title: str, keys: list[str]) -> str:
            shown = ", ".join(keys[:_MAX_LISTED])
            more = f", ... (+{len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
            return f"\n  {title} ({len(keys)}): {shown}{more}"

        text = f"loaded {len(self.loaded)} tensors from {self.path}"
        if self.missing:
            text += listing("missing in checkpoint, left as initialised", self.missing)
        if self.unexpected:
            text += listing("in checkpoint but not in model, ignored", self.unexpected)
        if self.shape_mismatch:
            text += listing("shape differs, skipped", self.shape_mismatch)
        return text


def _extract_state_dict(obj: object, path: str) -> dict[str, Tensor]:
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # Lightning checkpoint
    elif isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]  # torchvision reference scripts / DETR releases
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{path} holds no state_dict (expected a dict of tensors or a Lightning checkpoint)")
    return obj


def load_weights(model: nn.Module, path: str | os.PathLike[str]) -> CheckpointReport:
    """Load matching tensors from ``path`` into ``model`` (non-strict) and report the rest.

    ``path`` may hold ``model.state_dict()``, the LightningModule's state_dict (keys
    prefixed ``model.``) or a Lightning checkpoint. Tensors whose shape differs (e.g. a
    classifier trained for another number of classes) are skipped and reported.
    Loading uses ``torch.load(..., weights_only=True, map_location="cpu")``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file holds no state_dict, or none of its keys matches ``model``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    state = _extract_state_dict(torch.load(path, weights_only=True, map_location="cpu"), path)
    if state and all(k.startswith("model.") for k in state):
        state = {k[len("model.") :]: v for k, v in state.items()}
    own = model.state_dict()
    report = CheckpointReport(path=path)
    compatible: dict[str, Tensor] = {}
    for key, value in state.items():
        if key not in own:
            report.unexpected.append(key)
        elif own[key].shape != value.shape:
            report.shape_mismatch.append(f"{key} {tuple(value.shape)} -> {tuple(own[key].shape)}")
        else:
            compatible[key] = value
    if not compatible:
        raise ValueError(
            f"no tensor in {path} matches the model; first checkpoint keys: {list(state)[:5]}, "
            f"first model keys: {list(own)[:5]}"
        )
    model.load_state_dict(compatible, strict=False)
    report.loaded = sorted(compatible)
    report.missing = [k for k in own if k not in state]
    return report
