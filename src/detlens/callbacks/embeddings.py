"""``BoxEmbeddingCallback``: the feature vector behind every probe detection, as a W&B
embedding table, a 2-D scatter plot and class-separation scalars."""

from __future__ import annotations

import difflib
import functools
from typing import Any, Literal

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor

from detlens.callbacks.base import ProbeCallback, ProbeResult, class_names_of
from detlens.callbacks.focus import FocusRecorder, record_embedding
from detlens.adapters import DetectorAdapter
from detlens.adapters.observe import ForwardObserver, ObservedForward
from detlens.explainers.box_features import (
    ImageBoxFeatures, concat_box_features, extract_box_features, image_box_features,
)
from detlens.explainers.embeddings import METHODS, EmbeddingSummary
from detlens.render.media_jobs import embedding_media
from detlens.sinks import Media, log_media, log_media_later

__all__ = ["BoxEmbeddingCallback", "TABLE_COLUMNS", "WANDB_MAX_TABLE_ROWS"]

WANDB_MAX_TABLE_ROWS = 10_000
"""W&B logs at most this many rows of a ``wandb.Table``."""

TABLE_COLUMNS: tuple[str, ...] = (
    "thumbnail", "class", "label", "score", "status", "fp_kind", "image_id", "probe_index",
    "box", "x", "y", "embedding",
)
"""Columns of the logged table, one row per detection (see :class:`BoxEmbeddingCallback`)."""


class BoxEmbeddingCallback(ProbeCallback):
    """Logs the box features of the probe set's detections: table, scatter plot, scalars.

    Per logging event, for the detections on the probe images (each image's top
    ``max_detections`` scoring above ``score_threshold``), matched to the ground truth
    at ``iou_threshold`` (COCO greedy matching; :mod:`detlens.explainers.matching`):

    * ``<log_key>/table``: a ``wandb.Table`` with one row per detection — columns
      :data:`TABLE_COLUMNS`: a ``thumbnail`` crop of the box (``thumbnail_size`` px),
      ``class`` name, ``label``, ``score``, ``status`` (``"TP"``/``"FP"``; ``"n/a"``
      without ground truth), ``fp_kind`` (``duplicate``, ``wrong_class``,
      ``localization``, ``class_and_localization``, ``background``; empty for TPs),
      ``image_id``, ``probe_index``, ``box`` (xyxy pixels), ``x``/``y`` (detlens' 2-D
      projection) and ``embedding`` (the raw feature vector, so W&B's projector can run
      PCA/t-SNE/UMAP in the browser; left out with ``log_embedding=False``);
    * ``<log_key>/scatter``: the 2-D projection as an image, colour = class, marker =
      TP / FP kind, trustworthiness and silhouette in the title, step in the caption;
    * scalars ``<log_key>/trustworthiness`` (of the 2-D picture), ``<log_key>/silhouette``
      (class separation of the 2-D coordinates), ``<log_key>/silhouette_features`` (of
      the raw features), ``<log_key>/projection_seconds``, ``<log_key>/points``,
      ``<log_key>/detections``, ``<log_key>/tp``, ``<log_key>/fp``, ``<log_key>/fn`` and
      ``<log_key>/fp/<kind>``.

    Bounded rows: when the probe set yields more than ``max_rows`` detections (at most
    10,000, W&B's table limit) a seeded sample of ``max_rows`` is projected and logged,
    stratified by (class, TP/FP kind): every stratum keeps a share proportional to its
    size and at least one row, so rare classes and rare error kinds stay visible. The
    sample is described in the scatter plot's subtitle; counts and silhouettes of the
    raw features refer to the sample, the TP/FP/FN counts to all detections.

    Features per detector family: see :mod:`detlens.explainers.box_features`. On
    two-stage detectors, the probe images the validation loop runs in the epoch of an
    event are read from its own forward (:mod:`detlens.adapters.observe`: the box-head
    features behind the detections it made), and only the others get a forward of the
    callback's own. Under DDP
    each rank extracts its shard; the variable-length per-image sets are gathered to
    rank 0 by the base class (count, pad, gather, trim); rank 0 projects, renders and logs.
    The projection runs on rank 0, off the training thread, in detlens' media worker
    (:mod:`detlens.render.media_jobs`; t-SNE of a few hundred points takes about a second
    with ``n_jobs=1``, 10,000 points 15-20 s on a 2-core machine).

    Args:
        method: ``"tsne"`` (openTSNE after PCA-50) or ``"pca"``.
        score_threshold: keep detections scoring above this.
        max_detections: at most this many detections per image (highest scores).
        iou_threshold: IoU a detection needs with a same-class GT box to be a TP.
        max_rows: most detections projected and logged per event (``<= 10,000``).
        thumbnail_size: side of the thumbnail crops in pixels; ``0`` logs no thumbnails.
        log_embedding: include the raw feature vector column.
        perplexity: t-SNE perplexity (clipped for small sets).
        n_jobs: threads t-SNE may use on rank 0.
        seed: seeds the row sample and the projection (the global RNG is never used).
        every_n_epochs, every_n_steps, num_probe_images, probe_indices, probe_dir, log_key, adapter,
            model_attr:
            see :class:`~detlens.callbacks.base.ProbeCallback`.
    """

    def __init__(
        self,
        method: Literal["tsne", "pca"] = "tsne",
        score_threshold: float = 0.3,
        max_detections: int = 50,
        iou_threshold: float = 0.5,
        max_rows: int = WANDB_MAX_TABLE_ROWS,
        thumbnail_size: int = 64,
        log_embedding: bool = True,
        perplexity: float = 30.0,
        n_jobs: int = 1,
        seed: int = 0,
        every_n_epochs: int | None = 1,
        every_n_steps: int | None = None,
        num_probe_images: int = 32,
        probe_indices: list[int] | None = None,
        probe_dir: str | None = None,
        log_key: str = "embeddings",
        adapter: dict[str, Any] | DetectorAdapter | None = None,
        model_attr: str | None = None,
    ) -> None:
        super().__init__(
            every_n_epochs=every_n_epochs,
            every_n_steps=every_n_steps,
            num_probe_images=num_probe_images,
            probe_indices=probe_indices,
            probe_dir=probe_dir,
            log_key=log_key,
            adapter=adapter,
            model_attr=model_attr,
        )
        self.focus_recorder = FocusRecorder()  # the run's focus record, if this is its first recording callback
        name = type(self).__name__
        if method not in METHODS:
            close = difflib.get_close_matches(str(method), METHODS, n=1, cutoff=0.3)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"{name}: method must be one of {list(METHODS)}, got {method!r}.{hint}")
        if not 0.0 <= score_threshold <= 1.0:
            raise ValueError(f"{name}: score_threshold must be in [0, 1], got {score_threshold}")
        if not isinstance(max_detections, int) or max_detections < 1:
            raise ValueError(f"{name}: max_detections must be a positive int, got {max_detections!r}")
        if not 0.0 < iou_threshold <= 1.0:
            raise ValueError(f"{name}: iou_threshold must be in (0, 1], got {iou_threshold}")
        if not isinstance(max_rows, int) or not 1 <= max_rows <= WANDB_MAX_TABLE_ROWS:
            raise ValueError(
                f"{name}: max_rows must be an int in [1, {WANDB_MAX_TABLE_ROWS:,}] (W&B's table limit), got {max_rows!r}"
            )
        if not isinstance(thumbnail_size, int) or (thumbnail_size != 0 and not 4 <= thumbnail_size <= 512):
            raise ValueError(f"{name}: thumbnail_size must be 0 (no thumbnails) or in [4, 512] pixels, got {thumbnail_size!r}")
        if perplexity <= 0:
            raise ValueError(f"{name}: perplexity must be > 0, got {perplexity}")
        if not isinstance(n_jobs, int) or n_jobs == 0 or n_jobs < -1:
            raise ValueError(f"{name}: n_jobs must be a positive int or -1 (all cores), got {n_jobs!r}")
        self.method = method
        self.score_threshold = float(score_threshold)
        self.max_detections = max_detections
        self.iou_threshold = float(iou_threshold)
        self.max_rows = max_rows
        self.thumbnail_size = thumbnail_size
        self.log_embedding = bool(log_embedding)
        self.perplexity = float(perplexity)
        self.n_jobs = n_jobs
        self.seed = int(seed)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.detector_adapter(pl_module)  # no adapter, or several detectors: an error before the first step

    # ------------------------------------------------------------------ every rank
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)  # logs the last projection, which records it
        self.focus_recorder.publish(trainer)  # online runs: the focus record as a W&B artifact

    def explain_shard(
        self, pl_module: pl.LightningModule, images: list[Tensor], targets: list[dict[str, Any]], indices: list[int]
    ) -> list[ImageBoxFeatures]:
        has_truth = all("boxes" in t and "labels" in t for t in targets)
        return extract_box_features(
            self.detector_adapter(pl_module),
            images,
            targets if has_truth else None,
            score_threshold=self.score_threshold,
            max_detections=self.max_detections,
            iou_threshold=self.iou_threshold,
        )

    reads_validation_forward = True

    def validation_observer(self, pl_module: pl.LightningModule) -> ForwardObserver | None:
        # Two-stage detectors: the box-head features behind the validation forward's own
        # detections (detlens.adapters.observe); other families run the probe forward.
        adapter = self.detector_adapter(pl_module)
        observer = ForwardObserver(adapter.model, adapter=adapter)
        return observer if observer.records_features else None

    def from_validation(self, call: ObservedForward, position: int, target: dict[str, Any]) -> ImageBoxFeatures:
        assert call.detections is not None
        has_truth = "boxes" in target and "labels" in target
        return image_box_features(
            call.detections[position], target if has_truth else None, call.family,
            score_threshold=self.score_threshold, max_detections=self.max_detections, iou_threshold=self.iou_threshold,
        )

    # ------------------------------------------------------------------ rank 0
    def log_results(self, trainer: pl.Trainer, pl_module: pl.LightningModule, results: list[ProbeResult]) -> None:
        step, epoch = self.model_step(trainer), trainer.current_epoch
        detections = concat_box_features([r.value for r in results], sources=[r.index for r in results])
        counts = detections.counts()
        scalars = {self.key(k): float(v) for k, v in counts.items()}
        if not len(detections):
            log_media(trainer, scalars=scalars, step=step)
            rank_zero_info(
                f"[detlens] {type(self).__name__} at step {step}: no detection scored above score_threshold "
                f"{self.score_threshold:g} on the {len(results)} probe images, so there is nothing to project "
                f"this time ({self.key('detections')} is 0; lower score_threshold to see an early model's boxes)"
            )
            return
        class_names = class_names_of(trainer, pl_module)
        # Probe images for the thumbnails are read here; the projection, the plot and the
        # table are built by detlens' media worker (detlens.render.media_jobs; t-SNE:
        # ~0.5 s for 100 points).
        images = (
            {s: self.probe_item(s)[0] for s in sorted({int(v) for v in detections.source.tolist()})}
            if self.thumbnail_size else {}
        )

        columns = [c for c in TABLE_COLUMNS if (c != "thumbnail" or self.thumbnail_size) and (c != "embedding" or self.log_embedding)]
        build = functools.partial(
            embedding_media, detections, images=images, class_names=class_names, log_key=self.log_key,
            columns=columns, method=self.method, seed=self.seed, max_rows=self.max_rows, perplexity=self.perplexity,
            n_jobs=self.n_jobs, thumbnail_size=self.thumbnail_size, num_images=len(results), step=step,
            scalars=scalars,
        )

        def then(media: Media) -> None:
            # detlens focus record (detlens.callbacks.focus): the projection, for `detlens report|compare`.
            summary: EmbeddingSummary = media.extra
            rows = summary.indices.tolist()
            record_embedding(
                self, trainer, coords=summary.projection.coords, labels=detections.labels[rows],
                outcomes=[detections.outcome[r] for r in rows], probe_index=detections.source[rows],
                method=summary.projection.method, trustworthiness=summary.projection.trustworthiness,
                silhouette=summary.silhouette_2d, class_names=class_names, step=step, epoch=epoch,
            )

        log_media_later(trainer, build, step=step, then=then)
