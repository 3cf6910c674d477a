"""``BoundaryCallback``: how far each probe detection is from being lost (its margin), over training."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, get_args

import numpy as np
import pytorch_lightning as pl
from torch import Tensor

from detlens.adapters import DetectorAdapter
from detlens.callbacks.base import ProbeCallback, ProbeResult, class_names_of
from detlens.callbacks.focus import FocusRecorder, record_boundary
from detlens.explainers.boundary import DEFAULT_EPSILON, Norm, boundary, default_step_size, per_class_summary
from detlens.render.media_jobs import gradcam_media
from detlens.sinks import log_media_later

__all__ = ["BoundaryCallback", "ProbeBoundary"]


@dataclass(frozen=True)
class ProbeBoundary:
    """One probe image's attacked detections (CPU).

    Attributes:
        boxes ``FloatTensor[K, 4]``, scores ``FloatTensor[K]``, labels ``Int64Tensor[K]``: the detections.
        margin: ``FloatTensor[K]`` (NaN: not lost within the budget); flipped_to: ``Int64Tensor[K]`` (-1: none).
        delta_map: ``FloatTensor[K, H, W]``: ``|delta|`` of each detection's perturbation.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    margin: Tensor
    flipped_to: Tensor
    delta_map: Tensor


class BoundaryCallback(ProbeCallback):
    """Logs each probe detection's **margin**: the size of the smallest perturbation a bounded
    attack found that makes the detector lose it (:mod:`detlens.explainers.boundary`).

    Per logging event (keys under ``log_key``, default ``"boundary"``):

    * ``<log_key>/margin_median`` and ``<log_key>/margin_median/<class>``: median margin of
      the detections lost within the budget (``norm`` units: RMS or max ``|delta|``,
      intensities in ``[0, 1]``); ``<log_key>/not_lost_share`` (and per class): the share
      not lost within the budget (their margin is at least ``epsilon``);
      ``<log_key>/detections_per_image``.
    * ``<log_key>/probe``: per probe image, the ``|delta|`` maps of its detections
      (element-wise maximum) over the image, with the detections' boxes; the caption lists
      each detection's margin.
    * the margins go into the focus record (entry kind ``"boundary"``): ``detlens report``
      charts them over training and ``detlens compare --max-margin-drop`` gates on them.

    Cost: the detections of all probe images are attacked together, one perturbed copy per
    detection: ``steps + 1`` forwards and ``steps`` backwards of ``num_probe_images x top_k``
    copies (fewer once detections are lost) plus one forward per lost detection (its
    verification). With the defaults (4 images x 3 detections x 10 steps) that is about
    the compute of 370 image forwards, which is why the default cadence is every 5
    epochs (``benchmarks/boundary_cost.py``).

    Args:
        norm: ``"l2"`` (margin = RMS of the perturbation) or ``"linf"`` (max ``|delta|``).
        epsilon: the budget (default 0.05 for l2, 0.1 for linf); step_size: default ``epsilon / 10``
            (with the default ``steps`` the perturbation can grow to ``epsilon`` by the last step).
        steps: gradient steps per detection (the step budget).
        top_k: detections attacked per probe image (highest scores above ``score_threshold``).
        score_threshold: detections above it are attacked; below it a detection is lost.
        alpha, colormap: the overlay's blend weight and matplotlib colormap.
        every_n_epochs, every_n_steps, num_probe_images, probe_indices, probe_dir, log_key, adapter,
            model_attr: see :class:`~detlens.callbacks.base.ProbeCallback`.
    """

    def __init__(
        self,
        norm: str = "l2",
        epsilon: float | None = None,
        step_size: float | None = None,
        steps: int = 10,
        top_k: int = 3,
        score_threshold: float = 0.5,
        alpha: float = 0.5,
        colormap: str = "magma",
        every_n_epochs: int | None = 5,
        every_n_steps: int | None = None,
        num_probe_images: int = 4,
        probe_indices: list[int] | None = None,
        probe_dir: str | None = None,
        log_key: str = "boundary",
        adapter: dict[str, Any] | DetectorAdapter | None = None,
        model_attr: str | None = None,
    ) -> None:
        super().__init__(
            every_n_epochs=every_n_epochs, every_n_steps=every_n_steps, num_probe_images=num_probe_images,
            probe_indices=probe_indices, probe_dir=probe_dir, log_key=log_key, adapter=adapter, model_attr=model_attr,
        )
        name = type(self).__name__
        if norm not in get_args(Norm):
            raise ValueError(f"{name}: norm must be one of {list(get_args(Norm))}, got {norm!r}")
        epsilon = DEFAULT_EPSILON[norm] if epsilon is None else epsilon
        step_size = default_step_size(epsilon) if step_size is None else step_size
        for arg, value in (("epsilon", epsilon), ("step_size", step_size)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name}: {arg} must be a finite number > 0, got {value!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"{name}: steps must be an int >= 0, got {steps!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"{name}: top_k must be a positive int, got {top_k!r}")
        if not 0.0 < score_threshold < 1.0:
            raise ValueError(f"{name}: score_threshold must be in (0, 1) (below it a detection is lost), got {score_threshold}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"{name}: alpha must be in [0, 1], got {alpha}")
        from matplotlib import colormaps

        if colormap not in colormaps:
            raise ValueError(f"{name}: unknown matplotlib colormap {colormap!r}")
        self.norm = norm
        self.focus_recorder = FocusRecorder()  # the run's focus record, if this is its first recording callback
        self.epsilon = float(epsilon)
        self.step_size = float(step_size)
        self.steps = steps
        self.top_k = top_k
        self.score_threshold = float(score_threshold)
        self.alpha = float(alpha)
        self.colormap = colormap

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.detector_adapter(pl_module)  # TypeError for a model detlens has no adapter for
        super().setup(trainer, pl_module, stage)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            log_key=self.log_key, every_n_epochs=self.every_n_epochs, every_n_steps=self.every_n_steps, norm=self.norm,
        )

    # ------------------------------------------------------------------ ProbeCallback API
    def explain_shard(
        self, pl_module: pl.LightningModule, images: list[Tensor], targets: list[dict[str, Any]], indices: list[int]
    ) -> list[ProbeBoundary]:
        adapter = self.detector_adapter(pl_module)
        found = adapter.run(images, top_k=self.top_k, score_threshold=self.score_threshold, with_grad=False).detections
        results = boundary(
            adapter, images, found, norm=self.norm, epsilon=self.epsilon, step_size=self.step_size, steps=self.steps,
            score_threshold=self.score_threshold,
        )
        return [ProbeBoundary(r.boxes, r.scores, r.labels, r.margin, r.flipped_to, r.delta_map) for r in results]

    def log_results(self, trainer: pl.Trainer, pl_module: pl.LightningModule, results: list[ProbeResult]) -> None:
        class_names = class_names_of(trainer, pl_module)
        step = self.model_step(trainer)
        values: list[ProbeBoundary] = [r.value for r in results]
        summary = per_class_summary(values, class_names)  # type: ignore[arg-type]
        summary["detections_per_image"] = summary.pop("detections") / max(len(values), 1)
        scalars = {self.key(k): float(v) for k, v in summary.items() if np.isfinite(v)}
        probes = []
        for result in results:
            image, target = self.probe_item(result.index)
            v: ProbeBoundary = result.value
            probes.append({
                "image": image, "raw": v.delta_map, "boxes": v.boxes, "labels": v.labels, "scores": v.scores,
                "gt_boxes": target.get("boxes"), "gt_labels": target.get("labels"),
                "caption": self.caption(trainer, result.index, target) + self._margins_caption(v, class_names),
            })
        build = functools.partial(
            gradcam_media, probes, key=self.key("probe"), alpha=self.alpha, colormap=self.colormap,
            class_names=class_names, scalars=scalars,
        )
        log_media_later(trainer, build, step=step)
        record_boundary(self, trainer, results, norm=self.norm, epsilon=self.epsilon, steps=self.steps,
                        score_threshold=self.score_threshold, class_names=class_names)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self.focus_recorder.publish(trainer)  # online runs: the focus record as a W&B artifact

    def _margins_caption(self, v: ProbeBoundary, class_names: dict[int, str] | None) -> str:
        if len(v.margin) == 0:
            return f" · no detection above {self.score_threshold:g}"
        parts = []
        for m, label, flip in zip(v.margin.tolist(), v.labels.tolist(), v.flipped_to.tolist()):
            cls = (class_names or {}).get(int(label), str(label))
            if math.isnan(m):
                parts.append(f"{cls} >{self.epsilon:g}")
            else:
                to = f"->{(class_names or {}).get(int(flip), str(flip))}" if flip >= 0 else ""
                parts.append(f"{cls} {m:.3g}{to}")
        return f" · {self.norm} margins: " + ", ".join(parts)
