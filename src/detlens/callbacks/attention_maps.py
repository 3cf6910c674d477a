"""``AttentionMapCallback``: where a detector's attention goes, overlaid on the probe images.

For a DETR (``detlens.lightning_modules.DETR`` or any network the DETR adapter accepts):

* ``decoder/layer<l>``: each top detection's decoder cross-attention over the image
  (head mean; with ``heads="all"`` also ``decoder/layer<l>/head<h>``), for the chosen
  decoder layers (default: the last);
* ``encoder/layer<l>``: the encoder self-attention read at reference points (the
  detections' box centres, or a fixed grid), for the chosen encoder layer;
* ``rollout``: the last decoder layer's cross-attention composed with the attention
  rollout of the encoder (Abnar & Zuidema, 2020).

For a CNN detector with attention blocks that implement the attention probe protocol
(``SpatialSelfAttention`` of ``TorchvisionDetector(attention_stage=...)``):

* ``spatial/<block>``: the block's self-attention read at reference points;
* ``spatial/roi_level``: with blocks on feature-pyramid levels
  (``TorchvisionDetector(attention_fpn_levels=...)``), each detection's map read from the
  block of the level its RoI was pooled from (one-stage: its anchor's level) at its box
  centre; ``spatial/<block>`` of those blocks (every detection on every level) with
  ``per_level=True`` or grid reference points.

Every overlay carries the detection's box and is logged under ``<log_key>/<map>``
(default ``attention_maps/...``) as one list of images per key and event, probe image by
probe image, detection by detection. With ``reference_points="grid"`` each probe image
gets one mosaic per key instead: a ``grid_size x grid_size`` tiling of its overlays, each
the attention read at one grid point (marked by a small square), row by row.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from detlens.adapters import Detections, DetectorAdapter, DetrAdapter, HFDetrAdapter, ImageGeometry
from detlens.adapters.base import filter_detections
from detlens.adapters.observe import ForwardObserver, ObservedForward
from detlens.callbacks.base import ProbeCallback, ProbeResult, class_names_of
from detlens.explainers.attention import PROBE_FLAG, AttentionCapture, PerImageAttention, find_attention_modules
from detlens.explainers.query_attention import detection_attention_maps
from detlens.explainers.rollout import (
    attention_rollout,
    decoder_rollout,
    point_attention_maps,
    query_attention_maps,
    transformer_attention_names,
)
from detlens.adapters.modules import named_modules
from detlens.render.media_jobs import attention_map_media
from detlens.sinks import log_media_later

__all__ = ["AttentionMapCallback", "AttentionMapResult", "MapKind", "no_attention_error"]

MapKind = Literal["decoder", "encoder", "rollout", "spatial"]
_MAX_MAP_SIDE = 256  # maps travel to rank 0 at most this large; the renderer upsamples them


def no_attention_error(who: str, pl_module: nn.Module, unavailable: dict[str, str] | None = None) -> ValueError:
    """The error of a callback given a model with no attention it can read."""
    inner = getattr(pl_module, "model", None)
    model = type(pl_module).__name__ + (f" (network {type(inner).__name__})" if isinstance(inner, nn.Module) else "")
    fused = ""
    if unavailable:
        fused = " Found attention it cannot read: " + "; ".join(f"{n}: {why}" for n, why in unavailable.items()) + "."
    return ValueError(
        f"{who}: {model} has no attention module detlens can read. It looks for nn.MultiheadAttention "
        f"modules (e.g. the encoder/decoder layers of detlens.lightning_modules.DETR) and modules that "
        f"implement the attention probe protocol ({PROBE_FLAG} / last_attention, e.g. the "
        f"SpatialSelfAttention of TorchvisionDetector(attention_stage='layer3')).{fused}"
    )


@dataclass(frozen=True)
class AttentionMapResult:
    """Attention maps of one probe image (CPU tensors, gathered to rank 0).

    Attributes:
        boxes: ``float32[K, 4]`` xyxy image pixels of the explained detections (score order).
        scores: ``float32[K]``; labels: ``int64[K]`` in ``1..C``.
        points: ``float32[P, 2]`` ``(x, y)`` image pixels of the grid reference points
            (``P = 0`` when reference points are the detections' box centres).
        detection_maps: map key -> ``float32[K, h, w]`` in ``[0, 1]``; row ``j`` belongs to
            detection ``j``. ``(h, w)`` is the image size scaled to a longer side of at
            most 256 px (the renderer resizes it onto the image).
        point_maps: map key -> ``float32[P, h, w]``; row ``j`` belongs to ``points[j]``.
        levels: ``K`` feature levels the detections were read from (``detection.level``;
            the block of ``spatial/roi_level`` row ``j`` is the one on ``levels[j]``), or empty.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    points: Tensor
    detection_maps: dict[str, Tensor] = field(default_factory=dict)
    point_maps: dict[str, Tensor] = field(default_factory=dict)
    levels: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Plan:
    """Which attention modules feed which maps (names relative to the adapter's network)."""

    decoder: dict[int, str]  # decoder layer index -> cross-attention module
    encoder: tuple[int, str] | None  # encoder layer index, self-attention module
    rollout: list[str]  # encoder self-attention modules, first layer first ([] = no rollout)
    last_decoder: str | None  # cross-attention the rollout starts from
    spatial: list[str]  # probe-protocol modules
    grid_layer: str | None  # DETR: module whose output is the [B, D, Hf, Wf] token grid
    query_attention: bool = False  # read through the adapter's query_attention (transformers DETRs)
    levels: dict[str, str] = field(default_factory=dict)  # feature level -> the spatial block on it


class AttentionMapCallback(ProbeCallback):
    """Logs attention maps of the probe images' top detections as W&B image overlays.

    Keys (``<log_key>`` defaults to ``attention_maps``), each one list of images per event
    with captions ``"img 3 (id 12) · det 0 car 0.91 · step 400"`` (with grid reference
    points: one mosaic per probe image, ``"img 3 (id 12) · from 3x3 reference points
    (marked), row by row · step 400"``):

    * ``<log_key>/decoder/layer<l>`` (and ``.../head<h>`` with ``heads="all"``), DETR;
    * ``<log_key>/encoder/layer<l>`` (and per head), DETR encoder at the reference points;
    * ``<log_key>/rollout``, DETR decoder cross-attention through the encoder rollout;
    * ``<log_key>/spatial/<block>`` (and per head), attention-probe blocks at the
      reference points (``<block>`` is the module name in the network, e.g.
      ``backbone.body.layer3_attention``);
    * ``<log_key>/spatial/roi_level`` (and per head), blocks on feature-pyramid levels
      (``backbone.fpn_attention.<level>``): each detection's map from the block of the
      level its RoI was pooled from, at its box centre (caption ``· level <l>``; a
      detection whose level has no block gets an empty map). The per-level maps of those
      blocks, ``spatial/backbone.fpn_attention.<level>``, come with ``per_level=True`` and
      with grid reference points (which belong to no RoI).

    Maps are min-max scaled per overlay (they show where attention goes, not how much:
    compare heads and steps through the entropy callback's numbers).

    Args:
        layers: decoder layers whose cross-attention is drawn (negative counts from the
            last); ``None`` = the last layer.
        encoder_layer: the encoder layer whose self-attention is read at reference points.
        heads: ``"mean"`` (head-averaged maps) or ``"all"`` (also one panel per head).
        maps: which kinds to draw among ``"decoder"``, ``"encoder"``, ``"rollout"``,
            ``"spatial"``; ``None`` = every kind the model has. Asking for a kind the model
            does not have is an error at setup.
        reference_points: ``"detections"`` (each detection's box centre) or ``"grid"``
            (a fixed ``grid_size x grid_size`` grid of points over each image), for the
            encoder and spatial maps.
        grid_size: points per side of the reference grid.
        per_level: also draw every detection on every feature-pyramid level's block
            (``spatial/<block>``), besides ``spatial/roi_level``.
        top_k: explain at most this many detections per image (highest scores).
        score_threshold: explain detections scoring above this.
        every_n_epochs, every_n_steps, num_probe_images, probe_indices, probe_dir, log_key, adapter,
            model_attr:
            see :class:`~detlens.callbacks.base.ProbeCallback`.

    Raises:
        ValueError: bad arguments; at ``setup``: a model without readable attention (the
            message names the model class and what is looked for), a requested map kind
            the model lacks, a layer index out of range.
    """

    def __init__(
        self,
        layers: list[int] | None = None,
        encoder_layer: int = -1,
        heads: Literal["mean", "all"] = "mean",
        maps: list[MapKind] | None = None,
        reference_points: Literal["detections", "grid"] = "detections",
        grid_size: int = 3,
        per_level: bool = False,
        top_k: int = 3,
        score_threshold: float = 0.0,
        every_n_epochs: int | None = 1,
        every_n_steps: int | None = None,
        num_probe_images: int = 4,
        probe_indices: list[int] | None = None,
        probe_dir: str | None = None,
        log_key: str = "attention_maps",
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
        name = type(self).__name__
        if layers is not None:
            layers = [int(i) for i in layers]
            if not layers:
                raise ValueError(f"{name}: layers is empty; give decoder layer indices or None (the last)")
            if len(set(layers)) != len(layers):
                raise ValueError(f"{name}: layers has duplicates: {layers}")
        if heads not in ("mean", "all"):
            raise ValueError(f"{name}: heads must be 'mean' or 'all', got {heads!r}")
        valid_kinds = get_args(MapKind)
        if maps is not None:
            maps = list(maps)
            bad = [m for m in maps if m not in valid_kinds]
            if bad or not maps:
                raise ValueError(f"{name}: maps must be a non-empty list of {list(valid_kinds)}, got {maps!r}")
        if reference_points not in ("detections", "grid"):
            raise ValueError(f"{name}: reference_points must be 'detections' or 'grid', got {reference_points!r}")
        if not isinstance(grid_size, int) or grid_size < 1:
            raise ValueError(f"{name}: grid_size must be a positive int, got {grid_size!r}")
        if not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"{name}: top_k must be a positive int, got {top_k!r}")
        if not 0.0 <= score_threshold <= 1.0:
            raise ValueError(f"{name}: score_threshold must be in [0, 1], got {score_threshold}")
        self.layers = layers
        self.encoder_layer = int(encoder_layer)
        self.heads = heads
        self.maps = maps
        self.reference_points = reference_points
        self.grid_size = grid_size
        self.per_level = bool(per_level)
        self.top_k = top_k
        self.score_threshold = float(score_threshold)
        self._plan: _Plan | None = None

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._plan = self._make_plan(pl_module)  # model errors first: they are the likelier mistake
        super().setup(trainer, pl_module, stage)

    def _plan_for(self, pl_module: nn.Module) -> _Plan:
        """The plan made at setup, or made now (a callback used without ``setup``)."""
        if self._plan is None:
            self._plan = self._make_plan(pl_module)
        return self._plan

    def _make_plan(self, pl_module: nn.Module) -> _Plan:
        who = type(self).__name__
        try:
            hf = self.detector_adapter(pl_module)
        except (TypeError, ValueError):
            hf = None
        if isinstance(hf, HFDetrAdapter):
            return self._query_attention_plan(hf, who)
        readable, unavailable = find_attention_modules(pl_module)
        if not readable:
            raise no_attention_error(who, pl_module, unavailable)
        try:
            adapter = self.detector_adapter(pl_module)
        except TypeError as err:
            raise ValueError(f"{who}: {err}") from err
        net = adapter.model
        names = transformer_attention_names(net)
        is_detr = isinstance(adapter, DetrAdapter)
        spatial = [n for n, m in named_modules(net) if hasattr(m, PROBE_FLAG)]
        levels = {
            str(level): n for n, m in named_modules(net)
            if hasattr(m, PROBE_FLAG) and (level := getattr(m, "detlens_feature_level", None)) is not None
        }
        available = {
            "decoder": bool(is_detr and names["decoder_cross"]),
            "encoder": bool(is_detr and names["encoder_self"]),
            "rollout": bool(is_detr and names["decoder_cross"] and names["encoder_self"]),
            "spatial": bool(spatial),
        }
        wanted = self.maps if self.maps is not None else [k for k, ok in available.items() if ok]
        missing = [k for k in wanted if not available[k]]
        if missing:
            have = [k for k, ok in available.items() if ok]
            raise ValueError(
                f"{who}: {type(pl_module).__name__} has no attention for maps {missing} "
                f"(it has: {have or 'none'}; decoder/encoder/rollout need a DETR, spatial an attention-probe block)"
            )
        if not wanted:
            raise no_attention_error(who, pl_module, unavailable)
        decoder: dict[int, str] = {}
        if "decoder" in wanted:
            for layer in self.layers if self.layers is not None else [-1]:
                index = _layer_index(layer, len(names["decoder_cross"]), "decoder layer", who)
                decoder[index] = names["decoder_cross"][index]
            decoder = dict(sorted(decoder.items()))
        encoder = None
        if "encoder" in wanted:
            index = _layer_index(self.encoder_layer, len(names["encoder_self"]), "encoder_layer", who)
            encoder = (index, names["encoder_self"][index])
        rollout = list(names["encoder_self"]) if "rollout" in wanted else []
        return _Plan(
            decoder=decoder,
            encoder=encoder,
            rollout=rollout,
            last_decoder=names["decoder_cross"][-1] if "rollout" in wanted else None,
            spatial=spatial if "spatial" in wanted else [],
            levels=levels if "spatial" in wanted else {},
            grid_layer="input_proj" if is_detr and (decoder or encoder or rollout) else None,
        )

    def _query_attention_plan(self, adapter: HFDetrAdapter, who: str) -> _Plan:
        """transformers DETRs: decoder cross-attention (dense or deformable) per layer; the dense
        encoder's self-attention at reference points and the rollout (DETR, Conditional DETR)."""
        count = adapter.decoder_layer_count()
        encoder_layers = adapter.encoder_layer_count()
        dense = adapter.kind == "dense"  # a rollout composes dense cross-attention with the encoder's
        available = {"decoder": count > 0, "encoder": encoder_layers > 0,
                     "rollout": dense and count > 0 and encoder_layers > 0, "spatial": False}
        wanted = self.maps if self.maps is not None else [k for k, ok in available.items() if ok]
        missing = [k for k in wanted if not available[k]]
        if missing:
            have = [k for k, ok in available.items() if ok]
            raise ValueError(f"{who}: {type(adapter.model).__name__} has no attention for maps {missing} (it has: {have})")
        decoder = {}
        if "decoder" in wanted:
            for layer in self.layers if self.layers is not None else [-1]:
                index = _layer_index(layer, count, "decoder layer", who)
                decoder[index] = str(index)
        encoder = None
        if "encoder" in wanted:
            encoder = (_layer_index(self.encoder_layer, encoder_layers, "encoder_layer", who), "")
        return _Plan(decoder=dict(sorted(decoder.items())), encoder=encoder,
                     rollout=["encoder"] if "rollout" in wanted else [], last_decoder=None, spatial=[],
                     grid_layer=None, query_attention=True)

    def _explain_query_attention(self, plan: _Plan, adapter: HFDetrAdapter, images: list[Tensor]) -> list[AttentionMapResult]:
        layers = list(plan.decoder) or [-1]
        if plan.rollout and adapter.decoder_layer_count() - 1 not in layers:
            layers.append(-1)
        attention = adapter.query_attention(
            images, top_k=self.top_k, score_threshold=self.score_threshold, layers=layers,
            encoder=plan.encoder is not None or bool(plan.rollout),
        )
        geometry, detections = attention.output.geometry, attention.output.detections
        scales = [min(1.0, _MAX_MAP_SIDE / max(g.original_size)) for g in geometry]
        sizes = [(max(1, round(g.original_size[0] * s)), max(1, round(g.original_size[1] * s))) for g, s in zip(geometry, scales)]
        grid_points = [_grid_points(g.original_size, self.grid_size) for g in geometry]
        use_grid = self.reference_points == "grid"
        refs = [(p if use_grid else _box_centres(d.boxes)) * s for p, d, s in zip(grid_points, detections, scales)]
        maps = detection_attention_maps(
            attention, sizes, heads="none" if self.heads == "all" else "mean", reference_points=refs,
            encoder_layer=plan.encoder[0] if plan.encoder else None, rollout=bool(plan.rollout),
        )
        results = []
        for b, d in enumerate(detections):
            decoder_maps = {k: v for k, v in maps[b].items() if not k.startswith("encoder/")
                            and (k == "rollout" or int(k.split("/")[1][5:]) in plan.decoder)}
            encoder_maps = {k: v for k, v in maps[b].items() if k.startswith("encoder/")}
            results.append(AttentionMapResult(
                boxes=d.boxes.detach().float().cpu(), scores=d.scores.detach().float().cpu(),
                labels=d.labels.detach().long().cpu(), points=grid_points[b] if use_grid else torch.zeros(0, 2),
                detection_maps={**decoder_maps, **({} if use_grid else encoder_maps)},
                point_maps=encoder_maps if use_grid else {},
            ))
        return results

    # ------------------------------------------------------------------ explain (every rank)
    def explain_shard(
        self, pl_module: pl.LightningModule, images: list[Tensor], targets: list[dict[str, Any]], indices: list[int]
    ) -> list[AttentionMapResult]:
        plan = self._plan_for(pl_module)
        adapter = self.detector_adapter(pl_module)
        if plan.query_attention:
            assert isinstance(adapter, HFDetrAdapter)
            return self._explain_query_attention(plan, adapter, images)
        modules = sorted({*plan.decoder.values(), *plan.rollout, *plan.spatial}
                         | ({plan.encoder[1]} if plan.encoder else set())
                         | ({plan.last_decoder} if plan.last_decoder else set()))
        grid_layers = [plan.grid_layer] if plan.grid_layer else []
        grid_layers += [n for n in plan.spatial if n not in grid_layers]
        with AttentionCapture(adapter.model, modules, on_unavailable="raise") as capture:
            out = adapter.run(
                images, grid_layers, top_k=self.top_k, score_threshold=self.score_threshold, with_grad=False
            )
        grids = {name: (int(a.shape[-2]), int(a.shape[-1])) for name, a in out.activations.items()}
        return self._results(plan, capture.weights, capture.key_padding_masks, grids, out.geometry, out.detections)

    # ------------------------------------------------------------------ or read from the validation forward
    reads_validation_forward = True

    def validation_observer(self, pl_module: pl.LightningModule) -> ForwardObserver | None:
        # Attention-probe blocks of two-stage detectors (the image geometry comes from the
        # observed forward's RoI replay). DETR's maps keep the probe forward: a hook inside an
        # nn.TransformerEncoderLayer turns off its fused inference kernel and moves its outputs.
        plan = self._plan_for(pl_module)
        if plan.query_attention or plan.grid_layer is not None or not plan.spatial:
            return None
        adapter = self.detector_adapter(pl_module)
        observer = ForwardObserver(
            adapter.model, adapter=adapter, readers={"attention": PerImageAttention(adapter.model, plan.spatial)}
        )
        return observer if observer.replays_roi else None

    def from_validation(self, call: ObservedForward, position: int, target: dict[str, Any]) -> AttentionMapResult:
        per_image = call.read.get("attention")
        if per_image is None or call.replay is None or call.detections is None or self._plan is None:
            raise RuntimeError("the validation batch cannot be read per image")  # the probe forward explains it
        read = per_image[position]
        return self._results(
            self._plan,
            {name: weights[None] for name, (weights, _) in read.items()},
            {},
            {name: grid for name, (_, grid) in read.items()},
            [call.replay.geometry(position)],
            [filter_detections(call.detections[position], self.top_k, self.score_threshold)],
        )[0]

    def _results(
        self,
        plan: _Plan,
        weights: dict[str, Tensor],
        key_padding_masks: dict[str, Tensor | None],
        grids: dict[str, tuple[int, int]],
        geometry: list[ImageGeometry],
        detections: list[Detections],
    ) -> list[AttentionMapResult]:
        """The maps of ``B`` images from their attention (``weights``: module -> ``[B, heads, Q, K]``),
        the token grid of each module (``grids``), their geometry and kept detections."""
        # Maps are computed at a reduced size (the image's aspect, longer side <= 256 px).
        scales = [min(1.0, _MAX_MAP_SIDE / max(g.original_size)) for g in geometry]
        map_sizes = [(max(1, round(g.original_size[0] * s)), max(1, round(g.original_size[1] * s)))
                     for g, s in zip(geometry, scales)]
        centres = [_box_centres(d.boxes) * s for d, s in zip(detections, scales)]
        grid_points = [_grid_points(g.original_size, self.grid_size) for g in geometry]
        use_grid = self.reference_points == "grid"
        refs = [p * s for p, s in zip(grid_points, scales)] if use_grid else centres
        per_image: list[tuple[dict[str, Tensor], dict[str, Tensor]]] = [({}, {}) for _ in detections]

        def put(key: str, maps: list[Any], at_points: bool) -> None:
            for b, m in enumerate(maps):
                per_image[b][1 if at_points else 0][key] = m.display.float().cpu()

        if plan.grid_layer is not None:  # DETR: one token grid for every transformer map
            feature_size = grids[plan.grid_layer]
            any_name = next(iter([*plan.decoder.values(), *plan.rollout, *([plan.encoder[1]] if plan.encoder else [])]))
            padding = key_padding_masks.get(any_name)
            padding = None if padding is None else padding.reshape(len(detections), *feature_size)
            queries = [d.origin for d in detections]
            for layer, name in plan.decoder.items():
                self._query_maps(put, f"decoder/layer{layer}", weights[name], feature_size, map_sizes, queries, padding)
            if plan.rollout:
                rolled = decoder_rollout(weights[plan.last_decoder], attention_rollout([weights[n] for n in plan.rollout]))
                put("rollout", query_attention_maps(rolled, feature_size, map_sizes, queries, padding), False)
            if plan.encoder is not None:
                layer, name = plan.encoder
                self._point_maps(put, f"encoder/layer{layer}", weights[name], refs, feature_size, map_sizes, padding, use_grid)
        level_blocks = set(plan.levels.values())
        by_roi_level = bool(level_blocks) and not use_grid
        level_maps: dict[str, list[dict[str, Tensor]]] = {}  # block -> per image {map key suffix: [K, ...]}
        for name in plan.spatial:
            feature_size = grids[name]
            padding = _feature_padding_mask(geometry, feature_size)
            if name not in level_blocks or (use_grid or self.per_level):
                self._point_maps(put, f"spatial/{name}", weights[name], refs, feature_size, map_sizes, padding, use_grid)
            if name in level_blocks and by_roi_level:
                level_maps[name] = [{} for _ in detections]

                def keep(key: str, maps: list[Any], at_points: bool, block: str = name) -> None:
                    for b, m in enumerate(maps):
                        level_maps[block][b][key] = m.display.float().cpu()

                self._point_maps(keep, "", weights[name], refs, feature_size, map_sizes, padding, False)
        if by_roi_level:
            for b, d in enumerate(detections):
                for suffix, stitched in _stitch_levels(d.level, plan.levels, level_maps, b).items():
                    per_image[b][0][f"spatial/roi_level{suffix}"] = stitched

        return [
            AttentionMapResult(
                boxes=d.boxes.detach().float().cpu(),
                scores=d.scores.detach().float().cpu(),
                labels=d.labels.detach().long().cpu(),
                points=grid_points[b] if use_grid else torch.zeros(0, 2),
                detection_maps=per_image[b][0],
                point_maps=per_image[b][1],
                levels=[str(level) for level in d.level] if by_roi_level else [],
            )
            for b, d in enumerate(detections)
        ]

    def _query_maps(self, put: Any, key: str, weights: Tensor, feature_size: tuple[int, int],
                    sizes: list[tuple[int, int]], queries: list[Tensor], padding: Tensor | None) -> None:
        put(key, query_attention_maps(weights, feature_size, sizes, queries, padding, heads="mean"), False)
        if self.heads == "all":
            self._put_heads(put, key, query_attention_maps(weights, feature_size, sizes, queries, padding, heads="none"), False)

    def _point_maps(self, put: Any, key: str, weights: Tensor, points: list[Tensor], feature_size: tuple[int, int],
                    sizes: list[tuple[int, int]], padding: Tensor | None, at_points: bool) -> None:
        put(key, point_attention_maps(weights, points, feature_size, sizes, padding, heads="mean"), at_points)
        if self.heads == "all":
            self._put_heads(put, key, point_attention_maps(weights, points, feature_size, sizes, padding, heads="none"), at_points)

    @staticmethod
    def _put_heads(put: Any, key: str, maps: list[Any], at_points: bool) -> None:
        heads = maps[0].display.shape[1] if maps else 0
        for h in range(heads):
            put(f"{key}/head{h}", [_Head(m.display[:, h]) for m in maps], at_points)

    # ------------------------------------------------------------------ log (rank 0)
    def log_results(self, trainer: pl.Trainer, pl_module: pl.LightningModule, results: list[ProbeResult]) -> None:
        class_names = class_names_of(trainer, pl_module)
        values: list[AttentionMapResult] = [r.value for r in results]
        names = {k for value in values for k in (*value.detection_maps, *value.point_maps)}
        if not names:
            return
        probes = []
        for result, value in zip(results, values):
            image, target = self.probe_item(result.index)
            head, _, step_text = self.caption(trainer, result.index, target).rpartition(" · ")
            probes.append({
                "image": image, "head": head, "step_text": step_text, "boxes": value.boxes, "scores": value.scores,
                "labels": value.labels, "points": value.points, "detection_maps": value.detection_maps,
                "point_maps": value.point_maps, "grid_size": self.grid_size, "levels": value.levels,
            })
        # One overlay per map, drawn by detlens' media worker (detlens.render.media_jobs).
        build = functools.partial(
            attention_map_media, probes, keys={k: self.key(k) for k in names}, class_names=class_names
        )
        log_media_later(trainer, build, step=self.model_step(trainer))


@dataclass
class _Head:
    """Quacks like ``AttentionMaps`` for ``put``: one head's display maps ``[N, h, w]``."""

    display: Tensor


def _stitch_levels(
    det_levels: list[str],
    level_blocks: dict[str, str],
    level_maps: dict[str, list[dict[str, Tensor]]],
    image: int,
) -> dict[str, Tensor]:
    """Each detection's maps from the block on its own level: map key suffix (``""``, ``"/head<h>"``)
    -> ``[K, (heads,) h, w]``, row ``j`` from the block on ``det_levels[j]`` (zeros without one)."""
    suffixes = list(dict.fromkeys(k for maps in level_maps.values() for k in maps[image]))
    out: dict[str, Tensor] = {}
    for suffix in suffixes:
        any_maps = next(maps[image][suffix] for maps in level_maps.values() if suffix in maps[image])
        rows = []
        for j, level in enumerate(det_levels):
            block = level_blocks.get(str(level))
            maps = level_maps.get(block, [{}] * (image + 1))[image].get(suffix) if block is not None else None
            rows.append(maps[j] if maps is not None else any_maps.new_zeros(any_maps.shape[1:]))
        out[suffix] = torch.stack(rows) if rows else any_maps.new_zeros((0, *any_maps.shape[1:]))
    return out


def _layer_index(layer: int, count: int, what: str, who: str) -> int:
    if not -count <= layer < count:
        raise ValueError(f"{who}: {what} {layer} is out of range: the model has {count} (valid {-count}..{count - 1})")
    return layer % count


def _box_centres(boxes: Tensor) -> Tensor:
    """``[K, 4]`` xyxy -> ``[K, 2]`` ``(x, y)`` centres."""
    return (boxes[:, :2] + boxes[:, 2:]).float() / 2


def _grid_points(size: tuple[int, int], n: int) -> Tensor:
    """``n x n`` points at the centres of an even ``n x n`` tiling of an ``(H, W)`` image, ``[n*n, 2]`` ``(x, y)``,
    row by row."""
    h, w = size
    ys = (torch.arange(n, dtype=torch.float32) + 0.5) * (h / n)
    xs = (torch.arange(n, dtype=torch.float32) + 0.5) * (w / n)
    return torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(-1, 2)


def _feature_padding_mask(geometry: list[ImageGeometry], feature_size: tuple[int, int]) -> Tensor:
    """``BoolTensor[B, Hf, Wf]``, True on cells of the padded batch grid that lie past the image.

    A cell ``i`` covers the image when its top-left pixel ``i * Hp / Hf`` is inside the
    resized image (the rule DETR's nearest-neighbour mask interpolation follows).
    """
    hf, wf = feature_size
    masks = []
    for g in geometry:
        (ih, iw), (hp, wp) = g.input_size, g.batch_size
        rows = min(hf, math.ceil(ih * hf / hp))
        cols = min(wf, math.ceil(iw * wf / wp))
        mask = torch.ones(hf, wf, dtype=torch.bool)
        mask[:rows, :cols] = False
        masks.append(mask)
    return torch.stack(masks)
