"""Focus records during training, and ``FocusRegressionCallback``: focus drift as tracked numbers and a gate.

Two parts:

* **Record hooks** (:func:`record_map_point`, :func:`record_entropy`,
  :func:`record_embedding`): the explaining callbacks (``GradCAMCallback``,
  ``AttentionEntropyCallback``, ``BoxEmbeddingCallback``) call them on rank 0 after
  logging, so every logging point is also appended to the run's focus record
  (:mod:`detlens.focus.record`): ``<W&B run dir>/files/detlens_focus/focus.jsonl``
  (uploaded by ``wandb sync`` with an offline run; an online run also gets it as a
  ``detlens-focus`` artifact at the end of each stage), or ``<log_dir>/detlens_focus/``
  with another logger. Without any logger nothing is written, but a
  ``FocusRegressionCallback`` still sees every point.
* :class:`FocusRegressionCallback` watches those points as they are recorded.

Who owns what: each explaining callback carries a :class:`FocusRecorder`
(``callback.focus_recorder``), and the first of them in ``trainer.callbacks`` writes the
run's record for all (:func:`focus_recorder`), so one writer appends to the file and one
artifact is published. The watchers are the ``FocusRegressionCallback`` instances in
``trainer.callbacks`` that are set up for this trainer.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor

from detlens.focus.compare import gate_checks
from detlens.focus.drift import entropy_drift, focus_metrics, point_drift
from detlens.focus.evidence import MIN_CLASS_COUNT, MIN_MATCHED, Check, require_min_count
from detlens.focus.record import (
    DIRNAME,
    BoundaryImage,
    BoundaryPoint,
    EmbeddingPoint,
    EntropyPoint,
    FocusImage,
    FocusRecord,
    FocusRecordError,
    FocusRecordWriter,
    MapPoint,
    read_focus_record,
)
from detlens.render.attention import to_uint8_image
from detlens.sinks import flush_media, log_media
from detlens.sinks.online import is_online

__all__ = [
    "FocusRegressionCallback",
    "FocusRegressionError",
    "FocusRecorder",
    "focus_record_dir",
    "focus_recorder",
    "record_boundary",
    "record_embedding",
    "record_entropy",
    "record_map_point",
]

Entry = MapPoint | EntropyPoint | EmbeddingPoint | BoundaryPoint



# ---------------------------------------------------------------------------------------
# Where the record lives, and the hooks the explaining callbacks call (rank 0 only)
# ---------------------------------------------------------------------------------------


def _wandb_run(trainer: pl.Trainer) -> Any | None:
    if not trainer.is_global_zero:  # other ranks hold Lightning's DummyExperiment (every attribute a no-op)
        return None
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            run = logger.experiment
            if isinstance(getattr(run, "dir", None), str) and run.dir:
                return run
    return None


def focus_record_dir(trainer: pl.Trainer) -> Path | None:
    """``<W&B run>/files/detlens_focus`` (the first W&B logger), else ``<log_dir>/detlens_focus`` of
    the first logger with a ``log_dir``; ``None`` without loggers."""
    run = _wandb_run(trainer)
    if run is not None:
        return Path(run.dir) / DIRNAME
    for logger in trainer.loggers:
        if getattr(logger, "log_dir", None):
            return Path(logger.log_dir) / DIRNAME
    return None


class FocusRecorder:
    """Writes one run's focus record and publishes it; held by an explaining callback.

    The writer follows the run: a trainer whose record folder differs from the last one
    (a new W&B run, another logger) gets a writer of its own.
    """

    def __init__(self) -> None:
        self._writer: FocusRecordWriter | None = None
        self._published_size: int | None = None  # the record's size when last logged as an artifact

    def writer(self, trainer: pl.Trainer) -> FocusRecordWriter | None:
        """The writer of ``trainer``'s record folder (created, and saved with the W&B run, on first use)."""
        directory = focus_record_dir(trainer)
        if directory is None:
            return None
        directory = directory.resolve()
        if self._writer is not None and self._writer.directory == directory:
            return self._writer
        run = _wandb_run(trainer)
        self._writer, self._published_size = FocusRecordWriter(directory, run_id=getattr(run, "id", None)), None
        if run is not None:
            try:  # uploaded at the end of an online run; an offline one has it in files/ for `wandb sync`
                run.save(str(self._writer.path), base_path=run.dir, policy="end")
            except Exception as err:  # noqa: BLE001 - the file is on disk either way
                rank_zero_warn(f"[detlens] could not register the focus record with W&B: {type(err).__name__}: {err}")
        return self._writer

    def emit(self, trainer: pl.Trainer, entry: Entry, probe_images: Mapping[int, Any] | None = None) -> None:
        """Appends ``entry`` to the run's record and hands it to the watching callbacks; never raises."""
        try:
            writer = self.writer(trainer)
            if writer is not None:
                for index, image in (probe_images or {}).items():
                    if not writer.has_probe_image(entry.log_key, index):
                        writer.write_probe_image(entry.log_key, index, to_uint8_image(image))
                writer.write(entry)
        except Exception as err:  # noqa: BLE001 - a record failure must never stop training
            rank_zero_warn(f"[detlens] could not write the focus record at step {entry.step}: {type(err).__name__}: {err}")
        for callback in trainer.callbacks:
            if isinstance(callback, FocusRegressionCallback):
                callback._receive(trainer, entry)

    def publish(self, trainer: pl.Trainer) -> None:
        """Logs the record as a ``detlens-focus`` W&B artifact if the run is online and the record grew
        since the last time (offline runs keep the plain file, which ``wandb sync`` uploads)."""
        run = _wandb_run(trainer)  # None off rank 0
        writer = self._writer
        if run is None or writer is None or writer.directory != focus_record_dir(trainer).resolve():
            return
        if not writer.path.exists() or not is_online(run):
            return
        size = writer.path.stat().st_size
        if self._published_size == size:
            return
        try:
            import wandb

            artifact = wandb.Artifact(f"detlens-focus-{run.id}", type="detlens-focus",
                                      description="detlens focus record (detlens.focus.record, format version 1)")
            artifact.add_file(str(writer.path), name=writer.path.name)
            run.log_artifact(artifact, aliases=["latest", f"step-{trainer.global_step}"])
            self._published_size = size
        except Exception as err:  # noqa: BLE001 - the file is saved with the run either way
            rank_zero_warn(f"[detlens] could not log the focus record artifact: {type(err).__name__}: {err}")


def focus_recorder(trainer: pl.Trainer, callback: Any) -> FocusRecorder:
    """The recorder of ``trainer``'s run: that of the first callback in ``trainer.callbacks`` holding
    one (``callback.focus_recorder``), else ``callback``'s own (a callback used outside a trainer's list)."""
    for candidate in trainer.callbacks:
        recorder = getattr(candidate, "focus_recorder", None)
        if isinstance(recorder, FocusRecorder):
            return recorder
    return callback.focus_recorder


def record_map_point(
    callback: Any,
    trainer: pl.Trainer,
    results: Sequence[Any],
    *,
    method: str,
    layer: str | None,
    class_names: Mapping[int, str] | None,
) -> MapPoint:
    """Records one logging point of per-detection maps (``GradCAMCallback.log_results``).

    Args:
        callback: a :class:`~detlens.callbacks.base.ProbeCallback` (``log_key``, ``probe_item``).
        results: its ``ProbeResult`` list; each ``value`` has ``boxes``, ``labels``,
            ``scores``, ``raw`` (``[K, H, W]``) and ``focus`` (``box_focus`` dict or ``None``).
    """
    images, pixels = [], {}
    for result in results:
        value = result.value
        image, target = callback.probe_item(result.index)
        pixels[result.index] = image
        images.append(FocusImage.from_tensors(result.index, value.boxes, value.labels, value.scores, value.raw, value.focus, target,
                                              below_threshold=getattr(value, "below_threshold", None)))
    point = MapPoint(callback.log_key, int(callback.model_step(trainer)), int(trainer.current_epoch), method, layer, images,
                     dict(class_names or {}))
    focus_recorder(trainer, callback).emit(trainer, point, pixels)
    return point


def record_entropy(
    callback: Any,
    trainer: pl.Trainer,
    entropies: Mapping[str, Tensor],
    *,
    origin: str,
    step: int,
    temperatures: Mapping[str, float] | None = None,
) -> EntropyPoint:
    """Records an attention-entropy reading ``{layer: FloatTensor[heads]}`` and the learnable
    temperatures ``{block: T}`` read with it (``AttentionEntropyCallback``)."""
    point = EntropyPoint(callback.log_key, int(step), int(trainer.current_epoch), origin,
                         {k: np.asarray(v.detach().float().cpu() if isinstance(v, Tensor) else v, np.float32).reshape(-1) for k, v in entropies.items()},
                         {str(k): float(v) for k, v in (temperatures or {}).items()})
    focus_recorder(trainer, callback).emit(trainer, point)
    return point


def record_embedding(
    callback: Any,
    trainer: pl.Trainer,
    *,
    coords: Any,
    labels: Any,
    outcomes: Sequence[str],
    probe_index: Any,
    method: str,
    trustworthiness: float | None = None,
    silhouette: float | None = None,
    class_names: Mapping[int, str] | None = None,
    step: int | None = None,
    epoch: int | None = None,
) -> EmbeddingPoint:
    """Records a 2-D projection of the probe detections (``BoxEmbeddingCallback``): ``coords [N, 2]``,
    ``labels [N]``, ``outcomes`` (``"tp"`` or FP kind), ``probe_index [N]``; ``step`` and
    ``epoch`` default to the trainer's current ones (give them when recording later)."""

    def arr(x: Any, dtype: Any) -> np.ndarray:
        return np.asarray(x.detach().cpu() if isinstance(x, Tensor) else x, dtype)

    step = int(trainer.global_step if step is None else step)
    epoch = int(trainer.current_epoch if epoch is None else epoch)
    point = EmbeddingPoint(callback.log_key, step, epoch, method,
                           arr(coords, np.float32).reshape(-1, 2), arr(labels, np.int64).reshape(-1), [str(o) for o in outcomes],
                           arr(probe_index, np.int64).reshape(-1), trustworthiness, silhouette, dict(class_names or {}))
    focus_recorder(trainer, callback).emit(trainer, point)
    return point


def record_boundary(
    callback: Any,
    trainer: pl.Trainer,
    results: Sequence[Any],
    *,
    norm: str,
    epsilon: float,
    steps: int,
    score_threshold: float,
    class_names: Mapping[int, str] | None,
) -> BoundaryPoint:
    """Records one logging point of per-detection margins (``BoundaryCallback.log_results``).

    ``results``: ``ProbeResult`` list whose ``value`` has ``boxes``, ``labels``, ``scores``,
    ``margin`` (NaN: not lost) and ``flipped_to``.
    """
    images, pixels = [], {}
    for result in results:
        v = result.value
        image, _ = callback.probe_item(result.index)
        pixels[result.index] = image

        def arr(x: Any, dtype: Any) -> np.ndarray:
            return np.asarray(x.detach().cpu() if isinstance(x, Tensor) else x, dtype)

        images.append(BoundaryImage(int(result.index), arr(v.boxes, np.float32).reshape(-1, 4), arr(v.labels, np.int64).reshape(-1),
                                    arr(v.scores, np.float32).reshape(-1), arr(v.margin, np.float32).reshape(-1),
                                    arr(v.flipped_to, np.int64).reshape(-1)))
    point = BoundaryPoint(callback.log_key, int(callback.model_step(trainer)), int(trainer.current_epoch), norm, float(epsilon),
                          int(steps), float(score_threshold), images, dict(class_names or {}))
    focus_recorder(trainer, callback).emit(trainer, point, pixels)
    return point


# ---------------------------------------------------------------------------------------
# FocusRegressionCallback
# ---------------------------------------------------------------------------------------


class FocusRegressionError(RuntimeError):
    """Raised by ``FocusRegressionCallback(action="fail")`` to stop training at a focus regression."""


Action = Literal["warn", "alert", "fail"]


class FocusRegressionCallback(pl.Callback):
    """Tracks focus drift and localisation at every recorded logging point, and acts on thresholds.

    It explains nothing itself: it watches the map points recorded by the explaining
    callback whose ``log_key`` is ``maps_key`` (a ``GradCAMCallback``, default
    ``"gradcam"``) and the probe-set entropy readings of an ``AttentionEntropyCallback``,
    so it must be used together with them (a ``ValueError`` at ``setup`` otherwise).

    Logged at each map point (keys under ``log_key``, default ``"focus"``):

    * ``focus/drift_prev``, ``focus/similarity_prev``, ``focus/match_rate_prev``: map drift
      (mean ``1 - Spearman rho`` of matched detections' maps; 0 = unchanged, 1 =
      unrelated), mean cosine similarity and share of matched detections, against the
      previous point (from the second point on; kept in ``state_dict`` across resumes);
    * ``focus/drift_baseline``, ``focus/similarity_baseline``, ``focus/match_rate_baseline``:
      the same against the baseline record's point at the same global step, or its last
      point when it has none at that step;
    * ``focus/energy_in_box``, ``focus/energy_in_box_chance``, ``focus/pointing_game`` and
      per class ``focus/energy_in_box/<class>``, ``focus/pointing_game/<class>`` (true
      positives);
    * ``focus/violations``: how many thresholds this point crossed (a 95% bootstrap
      interval over detections wholly beyond the threshold, :mod:`detlens.focus.evidence`);
    * ``focus/insufficient_evidence``: how many gated metrics had too little evidence for a
      verdict (fewer than ``min_matched`` matched detections, fewer than
      ``min_class_count`` true positives of a class, or a crossing its interval does not
      confirm); each such point also gives one warning saying why;
    * at each entropy reading: ``focus/entropy_drift_prev``, ``focus/entropy_drift_baseline``
      (mean |change| of the normalised entropy over layers/heads) and ``..._max_...``.

    W&B run summaries (``define_metric``): drifts and violations keep their ``max``,
    similarities, match rates, energy-in-box and pointing game their ``min``, so a
    dashboard's run table shows the worst point of each run.

    Thresholds (``None`` disables one): ``max_drift`` (drift from the baseline),
    ``max_drift_prev`` (drift between consecutive points), ``min_energy_in_box`` (every
    class's energy-in-box), ``max_entropy_drift`` (mean entropy drift from the baseline).
    A threshold counts as crossed only when the evidence shows it; too few detections is
    "not enough evidence" (logged and warned about, never acted on). ``action``: ``"warn"`` (a warning), ``"alert"`` (a warning and a ``wandb.alert`` when the
    run is online) or ``"fail"`` (a warning, then :class:`FocusRegressionError` from the
    next hook outside the explaining callback; Lightning stops the fit and calls
    ``on_exception``; under DDP the decision is broadcast at epoch ends, so every rank stops).

    Args:
        baseline: the baseline focus record: a W&B run folder (online or offline), its
            ``files/detlens_focus`` folder, a ``focus.jsonl``, or a W&B artifact reference
            (``entity/project/detlens-focus-<id>:latest``, downloaded through the online run;
            offline, download it first with ``wandb artifact get`` and pass the folder).
        max_drift, max_drift_prev, min_energy_in_box, max_entropy_drift: thresholds.
        action: what to do when one is crossed.
        maps_key: ``log_key`` of the map callback to watch.
        iou_threshold: IoU (same class) that matches detections between points.
        log_key: prefix of the logged keys; part of ``state_key``.
        min_matched: matched detections needed for a drift verdict (``>= 1``).
        min_class_count: true positives of a class needed for its energy-in-box verdict (``>= 1``).
    """

    def __init__(
        self,
        baseline: str | None = None,
        max_drift: float | None = 0.5,
        min_energy_in_box: float | None = None,
        action: Action = "warn",
        max_drift_prev: float | None = None,
        max_entropy_drift: float | None = None,
        maps_key: str = "gradcam",
        iou_threshold: float = 0.5,
        log_key: str = "focus",
        min_matched: int = MIN_MATCHED,
        min_class_count: int = MIN_CLASS_COUNT,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        for arg, value in (("min_matched", min_matched), ("min_class_count", min_class_count)):
            try:
                require_min_count(arg, value)
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from err
        if action not in ("warn", "alert", "fail"):
            raise ValueError(f"{name}: action must be 'warn', 'alert' or 'fail', got {action!r}")
        for arg, value, upper in (("max_drift", max_drift, 2.0), ("max_drift_prev", max_drift_prev, 2.0),
                                  ("min_energy_in_box", min_energy_in_box, 1.0), ("max_entropy_drift", max_entropy_drift, 1.0)):
            if value is not None and not (isinstance(value, (int, float)) and 0.0 <= float(value) <= upper):
                raise ValueError(f"{name}: {arg} must be a number in [0, {upper:g}] or None, got {value!r}")
        if not 0.0 < iou_threshold <= 1.0:
            raise ValueError(f"{name}: iou_threshold must be in (0, 1], got {iou_threshold}")
        for arg, value in (("maps_key", maps_key), ("log_key", log_key)):
            if not value or value.strip("/") != value:
                raise ValueError(f"{name}: {arg} must be a non-empty key without leading/trailing '/', got {value!r}")
        self.baseline = baseline
        self.max_drift = None if max_drift is None else float(max_drift)
        self.max_drift_prev = None if max_drift_prev is None else float(max_drift_prev)
        self.min_energy_in_box = None if min_energy_in_box is None else float(min_energy_in_box)
        self.max_entropy_drift = None if max_entropy_drift is None else float(max_entropy_drift)
        self.action: Action = action
        self.maps_key = maps_key
        self.iou_threshold = float(iou_threshold)
        self.log_key = log_key
        self.min_matched = int(min_matched)
        self.min_class_count = int(min_class_count)
        self._baseline_record: FocusRecord | None = None
        self._previous: MapPoint | None = None
        self._previous_entropy: EntropyPoint | None = None
        self._pending: list[Entry] = []
        self._failure: str | None = None
        self._num_points = 0
        self._num_violations = 0
        self._last: dict[str, float] = {}
        self._defined: set[str] = set()
        self._listening_to: int | None = None  # id of the trainer set up with, until its teardown

    # ------------------------------------------------------------------ state
    @property
    def state_key(self) -> str:
        return self._generate_state_key(log_key=self.log_key, maps_key=self.maps_key)

    @property
    def num_points(self) -> int:
        """Map points compared so far (restored on resume)."""
        return self._num_points

    @property
    def num_violations(self) -> int:
        """Threshold crossings so far (restored on resume)."""
        return self._num_violations

    @property
    def last_metrics(self) -> dict[str, float]:
        """The scalars logged at the most recent point (keys without the ``log_key`` prefix)."""
        return dict(self._last)

    def state_dict(self) -> dict[str, Any]:
        return {
            "baseline": self.baseline,
            "num_points": self._num_points,
            "num_violations": self._num_violations,
            # The previous points as record lines: a resumed run measures drift from where it stopped.
            "previous": None if self._previous is None else json.dumps(self._previous.to_json()),
            "previous_entropy": None if self._previous_entropy is None else json.dumps(self._previous_entropy.to_json()),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._num_points = int(state_dict.get("num_points", 0))
        self._num_violations = int(state_dict.get("num_violations", 0))
        if self.baseline is None and state_dict.get("baseline"):
            self.baseline = state_dict["baseline"]  # the run keeps comparing with the baseline it started with
            self._baseline_record = None
        prev, prev_ent = state_dict.get("previous"), state_dict.get("previous_entropy")
        self._previous = MapPoint.from_json(json.loads(prev)) if prev else None
        self._previous_entropy = EntropyPoint.from_json(json.loads(prev_ent)) if prev_ent else None

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        keys = {getattr(cb, "log_key", None) for cb in trainer.callbacks if cb is not self}
        if self.maps_key not in keys:
            raise ValueError(
                f"{type(self).__name__}: no callback with log_key {self.maps_key!r} among trainer.callbacks; add a "
                f"GradCAMCallback (log_key {self.maps_key!r}) or set maps_key to its log_key"
            )
        self._ensure_baseline()  # errors at setup, not at the first logging point
        self._defined = set()  # a new run (W&B logger) needs its own define_metric calls
        self._listening_to = id(trainer)  # points recorded by this trainer's callbacks come to _receive

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        flush_media(wait=True)  # the focus/* rows built by detlens' media worker
        self._listening_to = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        flush_media(wait=True)

    def _ensure_baseline(self) -> None:
        # Also called after load_state_dict restored a baseline (checkpoints load after setup).
        if self.baseline is not None and self._baseline_record is None:
            self._baseline_record = self._load_baseline(self.baseline)
            if not self._baseline_record.map_points(self.maps_key):
                raise ValueError(
                    f"{type(self).__name__}: baseline {self.baseline} has no map entries of {self.maps_key!r} "
                    f"(it has {self._baseline_record.map_keys() or 'none'})"
                )

    def _load_baseline(self, ref: str) -> FocusRecord:
        name = type(self).__name__
        try:
            return read_focus_record(ref)
        except FocusRecordError as err:
            if Path(ref).exists() or ":" not in ref:
                raise ValueError(f"{name}: baseline {ref!r}: {err}") from err
        import wandb

        run = wandb.run
        if not is_online(run):
            raise ValueError(
                f"{name}: baseline {ref!r} is not a local focus record and looks like a W&B artifact, which cannot be "
                f"downloaded offline; run `wandb artifact get {ref}` where there is network and pass the folder"
            )
        folder = run.use_artifact(ref).download()
        return read_focus_record(folder)

    def _define_summaries(self, trainer: pl.Trainer, keys: Sequence[str]) -> None:
        """``define_metric`` for every key seen for the first time (W&B's glob patterns did not
        reliably apply to keys logged later, measured with wandb 0.31, so each key is named)."""
        new = [k for k in keys if k not in self._defined]
        run = _wandb_run(trainer) if new else None
        if run is None:
            return
        try:
            for key in new:
                name = key.removeprefix(self.log_key + "/")
                worst_is_max = name.startswith(("drift_", "entropy_drift_", "violations", "insufficient_evidence"))
                run.define_metric(key, summary="max" if worst_is_max else "min")
                self._defined.add(key)
        except Exception as err:  # noqa: BLE001 - summaries are a convenience
            rank_zero_warn(f"[detlens] {type(self).__name__}: define_metric failed: {type(err).__name__}: {err}")

    # ------------------------------------------------------------------ receiving and processing points
    def _receive(self, trainer: pl.Trainer, entry: Entry) -> None:
        """Called (rank 0) while an explaining callback of ``trainer`` records, between this callback's
        ``setup`` and ``teardown``; the work happens in this callback's hooks."""
        if id(trainer) != self._listening_to:
            return
        if (isinstance(entry, MapPoint) and entry.log_key == self.maps_key) or (
            isinstance(entry, EntropyPoint) and entry.origin == "probe"
        ):
            self._pending.append(entry)

    def _baseline_points(self, step: int) -> tuple[MapPoint | None, EntropyPoint | None]:
        self._ensure_baseline()
        if self._baseline_record is None:
            return None, None
        points = self._baseline_record.map_points(self.maps_key)
        point = next((p for p in points if p.step == step), points[-1] if points else None)
        entropy = self._baseline_record.entropy_points("probe")
        ent = next((p for p in entropy if p.step == step), entropy[-1] if entropy else None)
        return point, ent

    def _process(self, trainer: pl.Trainer) -> None:
        while self._pending:
            entry = self._pending.pop(0)
            insufficient: list[str] = []
            if isinstance(entry, MapPoint):
                scalars, violations, insufficient = self._map_point(entry)
                scalars[f"{self.log_key}/insufficient_evidence"] = float(len(insufficient))
            else:
                scalars, violations = self._entropy_point(entry)
            scalars[f"{self.log_key}/violations"] = float(len(violations))
            if insufficient:
                rank_zero_warn(f"[detlens] {type(self).__name__}: not enough evidence for a verdict at step {entry.step}: "
                               + "; ".join(insufficient))
            self._last = {k.removeprefix(self.log_key + "/"): v for k, v in scalars.items()}
            self._define_summaries(trainer, list(scalars))
            log_media(trainer, scalars=scalars, step=entry.step)
            if violations:
                self._num_violations += len(violations)
                self._act(trainer, entry.step, violations)

    def _map_point(self, point: MapPoint) -> tuple[dict[str, float], list[str], list[str]]:
        """Scalars, the thresholds crossed and the reasons some metric had no verdict."""
        names = point.class_names
        metrics = focus_metrics(point, names)
        values: dict[str, float] = {k: v for k, v in metrics.items() if k.startswith(("energy_in_box", "pointing_game"))}
        gate = {"min_matched": self.min_matched, "min_class_count": self.min_class_count}
        checks: list[Check] = []
        if self._previous is not None:
            prev = point_drift(self._previous, point, self.iou_threshold)
            values.update(prev.scalars("prev"))
            checks += gate_checks(prev, None, max_drift=self.max_drift_prev, min_energy_in_box=None,
                                  what=f"previous point (step {self._previous.step})", **gate)
        base_point, _ = self._baseline_points(point.step)
        if base_point is not None:
            base = point_drift(base_point, point, self.iou_threshold)
            values.update(base.scalars("baseline"))
            checks += gate_checks(base, None, max_drift=self.max_drift, min_energy_in_box=None,
                                  what=f"baseline (step {base_point.step})", **gate)
        checks += gate_checks(None, point, names, max_drift=None, min_energy_in_box=self.min_energy_in_box, **gate)
        self._previous = point
        self._num_points += 1
        scalars = {f"{self.log_key}/{k}": float(v) for k, v in values.items() if math.isfinite(v)}
        return (scalars, [c.reason for c in checks if c.verdict == "fail"],
                [c.reason for c in checks if c.verdict == "insufficient"])

    def _entropy_point(self, point: EntropyPoint) -> tuple[dict[str, float], list[str]]:
        values: dict[str, float] = {}
        violations: list[str] = []
        if self._previous_entropy is not None:
            values.update(entropy_drift(self._previous_entropy, point).scalars("prev"))
        _, base = self._baseline_points(point.step)
        if base is not None:
            drift = entropy_drift(base, point)
            values.update(drift.scalars("baseline"))
            if self.max_entropy_drift is not None and math.isfinite(drift.mean) and drift.mean > self.max_entropy_drift:
                violations.append(f"attention-entropy drift from the baseline is {drift.mean:.3f} > max_entropy_drift {self.max_entropy_drift:g}")
        self._previous_entropy = point
        return {f"{self.log_key}/{k}": float(v) for k, v in values.items()}, violations

    def _act(self, trainer: pl.Trainer, step: int, violations: list[str]) -> None:
        message = f"focus regression at step {step}: " + "; ".join(violations)
        rank_zero_warn(f"[detlens] {type(self).__name__}: {message}")
        if self.action == "alert":
            run = _wandb_run(trainer)
            if is_online(run):
                try:
                    run.alert(title=f"focus regression at step {step}"[:63], text=message, level="WARN")
                except Exception as err:  # noqa: BLE001 - an alert must never stop training
                    rank_zero_warn(f"[detlens] W&B alert failed: {type(err).__name__}: {err}")
        elif self.action == "fail" and self._failure is None:
            self._failure = message

    def _check(self, trainer: pl.Trainer, *, collective: bool) -> None:
        """Processes pending points; with ``action="fail"`` raises once a threshold was crossed.

        ``collective``: the hook runs on every rank at the same time, so rank 0's decision is
        broadcast (DDP); other hooks only raise in single-process runs.
        """
        if trainer.sanity_checking:
            return
        self._process(trainer)
        if self.action != "fail":
            return
        failure = self._failure
        if trainer.world_size > 1:
            if not collective:
                return
            failure = trainer.strategy.broadcast(failure, src=0)
        if failure:
            self._failure = None
            raise FocusRegressionError(
                f"{failure}. Training stopped by {type(self).__name__}(action='fail'); set action='warn' "
                f"or relax the thresholds to continue."
            )

    # ------------------------------------------------------------------ Lightning hooks
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any) -> None:
        self._check(trainer, collective=False)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check(trainer, collective=False)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check(trainer, collective=True)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check(trainer, collective=True)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check(trainer, collective=True)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check(trainer, collective=True)
