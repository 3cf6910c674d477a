"""Adapter for Hugging Face ``transformers`` object detectors: the DETR family, dense and deformable.

Recognised by class (never by downloading anything), through the model's class hierarchy:

* dense attention: ``DetrForObjectDetection``, ``ConditionalDetrForObjectDetection``,
  ``YolosForObjectDetection``;
* deformable attention: ``DeformableDetrForObjectDetection``, ``RTDetrForObjectDetection``,
  ``RTDetrV2ForObjectDetection``, ``DFineForObjectDetection``, ``LwDetrForObjectDetection``,
  ``RfDetrForObjectDetection`` (transformers' port of RF-DETR).

What detlens reads, per model
-----------------------------
* **Detections**: one per object query (YOLOS: per detection token), its score the highest
  class probability: softmax with the "no object" class last when the classifier has
  ``num_labels + 1`` outputs (DETR, YOLOS), sigmoid otherwise (Conditional/Deformable DETR,
  RT-DETR, D-FINE, LW/RF-DETR). ``labels`` are the model's class indices plus
  ``label_offset`` (``0``: the model's own ids; ``1`` when the model was trained on
  ``0..C-1`` and detlens' datasets count ``1..C``). Boxes are the model's normalised
  ``cx, cy, w, h`` read against the padded ``pixel_values`` the network saw (the image
  processors' convention when they pad), in pixels of the image given.
* **Pixels**: images in ``[0, 1]`` are normalised with ``image_mean``/``image_std``
  (ImageNet's by default, as every one of these processors), not resized, padded
  bottom-right to a common size with a ``pixel_mask`` (YOLOS, which takes no mask, runs
  images of different sizes one by one).
* **Target layers**: every module that outputs one feature map ``[B, C, h, w]`` per forward
  (backbone stages first, then input projections and the hybrid encoders' FPN/PAN blocks),
  and the transformer encoder layers whose tokens form the single feature grid (DETR,
  Conditional DETR: ``model.encoder.layers.<i>``; YOLOS: ``vit.encoder.layer.<i>``, the
  patch tokens), reshaped to ``[B, D, h, w]``.
* **Box features**: the last decoder layer's hidden state of each detection's query.
* **Attention** (:meth:`HFDetrAdapter.query_attention`): decoder cross-attention per layer
  and head (dense: ``[B, heads, Q, h*w]``; deformable: the softmaxed weights
  ``[B, Q, heads, levels, points]`` *and* each point's sampling location, captured from the
  attention module's own computation), and dense encoder self-attention. Dense weights need
  the eager attention implementation: detlens switches the model's config to ``"eager"``
  for its own explaining forward and back afterwards (training is never switched).
"""

from __future__ import annotations

import contextlib
import inspect
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import (
    AdapterOutput,
    Detections,
    DetectorAdapter,
    ImageGeometry,
    LayerCapture,
    RoIScoring,
    _eval_with_grad,
    prepare_images,
)

__all__ = [
    "DEFORMABLE_CLASSES",
    "DENSE_CLASSES",
    "DeformableQueryAttention",
    "DenseQueryAttention",
    "HFDetrAdapter",
    "QueryAttention",
    "hf_attention_kind",
    "hf_attention_weights",
    "hf_detector_kind",
]

DENSE_CLASSES = ("DetrForObjectDetection", "ConditionalDetrForObjectDetection", "YolosForObjectDetection")
DEFORMABLE_CLASSES = (
    "DeformableDetrForObjectDetection",
    "RTDetrForObjectDetection",
    "RTDetrV2ForObjectDetection",
    "DFineForObjectDetection",
    "LwDetrForObjectDetection",
    "RfDetrForObjectDetection",
)
_STAGE = re.compile(r"(\.stages\.\d+|\.layer\d+|\.stage\d+|\.res\d+)$")


def hf_detector_kind(network: nn.Module) -> str | None:
    """``"dense"``, ``"deformable"``, ``"yolos"`` for a supported ``transformers`` detector, else ``None``.

    Decided from the class hierarchy (a subclass of a supported class is supported), without
    importing ``transformers``.
    """
    for cls in type(network).__mro__:
        if not cls.__module__.startswith("transformers."):
            continue
        if cls.__name__ == "YolosForObjectDetection":
            return "yolos"
        if cls.__name__ in DENSE_CLASSES:
            return "dense"
        if cls.__name__ in DEFORMABLE_CLASSES:
            return "deformable"
    return None


def hf_attention_kind(module: nn.Module) -> str | None:
    """``"dense"`` or ``"deformable"`` for a ``transformers`` attention module whose forward
    returns ``(output, weights)`` (the modules of the supported detectors), else ``None``.

    Dense modules return their weights only under the eager attention implementation;
    deformable ones always return them (softmaxed over levels x points).
    """
    cls = type(module)
    if not cls.__module__.startswith("transformers.models."):
        return None
    name = cls.__name__
    if name.endswith("MultiscaleDeformableAttention"):
        return "deformable"
    if name.endswith(("SelfAttention", "CrossAttention")) and hasattr(module, "config"):
        return "dense"
    return None


def hf_attention_weights(module: nn.Module, output: Any) -> Tensor | None:
    """The weights a ``transformers`` attention module returned, as ``[B, heads, Q, K]``
    (deformable: ``K = levels * points``), or ``None`` (dense modules outside eager mode)."""
    weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
    if not isinstance(weights, Tensor):
        return None
    if hf_attention_kind(module) == "deformable":  # [B, Q, heads, (L, P) | L*P]
        b, q, h = weights.shape[:3]
        return weights.reshape(b, q, h, -1).transpose(1, 2)
    return weights if weights.dim() == 4 else None


@dataclass
class DenseQueryAttention:
    """One dense attention layer of a forward over ``B`` images.

    Attributes:
        weights: ``FloatTensor[B, heads, Q, S]``: softmaxed weights of each query over the
            ``S = h * w`` tokens of the feature grid (row-major), detached, float32.
        grid: ``(h, w)`` of that grid, which covers the padded batch.
        key_padding: ``BoolTensor[B, S]`` (True on tokens past the image) or ``None``.
    """

    weights: Tensor
    grid: tuple[int, int]
    key_padding: Tensor | None = None


@dataclass
class DeformableQueryAttention:
    """One multi-scale deformable attention layer of a forward over ``B`` images.

    Attributes:
        weights: ``FloatTensor[B, Q, heads, L, P]``, softmaxed over ``L * P`` per head.
        locations: ``FloatTensor[B, Q, heads, L, P, 2]``: each point's ``(x, y)`` sampling
            location in ``[0, 1]`` of level ``l``'s grid (``grid_sample`` coordinates with
            ``align_corners=False``: cell ``j`` spans ``[j / w, (j + 1) / w)``).
        shapes: ``L`` grid sizes ``(h_l, w_l)``, each covering the padded batch.
    """

    weights: Tensor
    locations: Tensor
    shapes: list[tuple[int, int]]


@dataclass
class QueryAttention:
    """:meth:`HFDetrAdapter.query_attention`'s result.

    ``output``: the adapter output of the same forward (detections with ``origin`` the
    query index, geometry); ``decoder``: decoder layer index -> its cross-attention;
    ``encoder``: encoder layer index -> dense self-attention over the grid (``weights``
    ``[B, heads, S, S]``: DETR and Conditional DETR's encoder, RT-DETR and D-FINE's AIFI);
    empty for deformable encoders and YOLOS.
    """

    output: AdapterOutput
    decoder: dict[int, DenseQueryAttention | DeformableQueryAttention] = field(default_factory=dict)
    encoder: dict[int, DenseQueryAttention] = field(default_factory=dict)


class HFDetrAdapter(DetectorAdapter):
    """A ``transformers`` DETR-family detector (see the module docstring).

    Args:
        model: the ``...ForObjectDetection`` network.
        image_mean, image_std: per-channel normalisation of ``[0, 1]`` pixels (the
            model's image processor's ``image_mean``/``image_std``; default ImageNet's).
        label_offset: added to the model's class indices to give detlens labels.
    """

    family = "hf_detr"

    def __init__(
        self,
        model: nn.Module,
        image_mean: tuple[float, float, float] | list[float] | None = None,
        image_std: tuple[float, float, float] | list[float] | None = None,
        label_offset: int = 0,
    ) -> None:
        # Imported here, not at module level: importing detlens.lightning_modules imports Lightning,
        # whose first import draws from Python's global `random` (adapters must stay light).
        from detlens.lightning_modules.hf_detector import IMAGENET_MEAN, IMAGENET_STD

        image_mean = IMAGENET_MEAN if image_mean is None else image_mean
        image_std = IMAGENET_STD if image_std is None else image_std
        kind = hf_detector_kind(model)
        if kind is None:
            raise TypeError(
                f"{type(model).__name__} is not a supported transformers detector "
                f"({', '.join(DENSE_CLASSES + DEFORMABLE_CLASSES)})"
            )
        super().__init__(model)
        self.kind = kind
        self.image_mean = tuple(float(v) for v in image_mean)
        self.image_std = tuple(float(v) for v in image_std)
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            raise ValueError(f"image_mean/image_std must be 3 values (std > 0), got {image_mean}, {image_std}")
        self.label_offset = int(label_offset)
        self._layers: list[str] | None = None
        self._token_layers: list[str] = self._find_token_layers()  # by name: known before any forward
        self._grid_hw: tuple[int, int] | None = None
        self._takes_mask = "pixel_mask" in inspect.signature(type(model).forward).parameters

    # ------------------------------------------------------------------ layers
    def layer_names(self) -> list[str]:
        if self._layers is None:
            self._layers = self._discover_layers()
        return list(self._layers)

    def default_layer(self) -> str:
        names = self.layer_names()
        stages = [n for n in names if "backbone" in n and _STAGE.search(n)]
        if stages:
            return stages[-1]
        return names[0]

    def _discover_layers(self) -> list[str]:
        """Modules that output one ``[B, C, h, w]`` map per forward (found in one dry forward of a
        320 x 320 image: large enough for encoders that keep their top-k tokens as queries,
        RT-DETR's 300, and a multiple of every stride), most useful first, then the encoder
        layers whose tokens form the grid."""
        outputs: dict[str, list[Any]] = {}
        modules = [(n, m) for n, m in self.model.named_modules() if n]
        handles = [m.register_forward_hook(_record_into(outputs, n)) for n, m in modules]
        param = next(self.model.parameters())
        try:
            with _eval_with_grad(self.model), torch.no_grad():
                batch = torch.zeros(1, 3, 320, 320, device=param.device, dtype=param.dtype)
                self.model(pixel_values=batch)
        finally:
            for h in handles:
                h.remove()
        maps = [n for n, outs in outputs.items() if len(outs) == 1 and isinstance(outs[0], Tensor) and outs[0].dim() == 4]
        stages = [n for n in maps if "backbone" in n and _STAGE.search(n)]
        projections = [n for n in maps if "input_proj" in n and n not in stages]
        neck = [n for n in maps if re.search(r"(fpn_blocks|pan_blocks|lateral_convs|downsample_convs)\.\d+$", n)]
        first = stages + projections + neck
        return first + self._token_layers + [n for n in maps if n not in first]

    def _find_token_layers(self) -> list[str]:
        names = dict(self.model.named_modules())
        if self.kind == "yolos":
            return [n for n in names if re.fullmatch(r"vit\.encoder\.layer\.\d+", n)]
        if self.kind == "dense":
            return [n for n in names if re.fullmatch(r"model\.encoder\.layers\.\d+", n)]
        return []

    # ------------------------------------------------------------------ token layers -> grids
    def _capture_output(self, name: str, value: Any) -> tuple[Any, Any]:
        tokens = value[0] if isinstance(value, tuple) else value
        if name not in self._token_layers or not isinstance(tokens, Tensor) or tokens.dim() != 3 or self._grid_hw is None:
            return value, None
        h, w = self._grid_hw
        b, s, d = tokens.shape
        start = 1 if self.kind == "yolos" else 0  # YOLOS: [CLS, patches..., detection tokens...]
        if s < start + h * w:
            return value, None
        grid = tokens[:, start : start + h * w].transpose(1, 2).reshape(b, d, h, w)
        rebuilt = torch.cat([tokens[:, :start], grid.flatten(2).transpose(1, 2), tokens[:, start + h * w :]], 1)
        return grid, ((rebuilt, *value[1:]) if isinstance(value, tuple) else rebuilt)

    def _grid_module(self) -> nn.Module | None:
        """The module whose 4D output is the encoder's token grid (dense DETRs, YOLOS)."""
        names = dict(self.model.named_modules())
        if self.kind == "yolos":
            return names.get("vit.embeddings.patch_embeddings.projection")
        if self.kind == "dense":
            return names.get("model.input_projection") or names.get("model.input_proj")
        levels = getattr(self.model.config, "encode_proj_layers", None)  # RT-DETR / D-FINE: AIFI's level
        if levels:
            return names.get(f"model.encoder_input_proj.{levels[-1]}")
        return None

    @contextlib.contextmanager
    def _grid_watch(self) -> Iterator[None]:
        module = self._grid_module()
        handle = None
        if module is not None:
            def on_grid(mod: nn.Module, args: Any, out: Any) -> None:
                if isinstance(out, Tensor) and out.dim() == 4:
                    self._grid_hw = (int(out.shape[-2]), int(out.shape[-1]))
            handle = module.register_forward_hook(on_grid)
        self._grid_hw = None
        try:
            yield
        finally:
            if handle is not None:
                handle.remove()

    # ------------------------------------------------------------------ forward
    def _pixels(self, images: list[Tensor]) -> tuple[Tensor, Tensor, tuple[int, int]]:
        """``(pixel_values [B, 3, Hp, Wp], pixel_mask [B, Hp, Wp] (1 = image), (Hp, Wp))``."""
        from detlens.lightning_modules.hf_detector import hf_inputs, pad_multiple  # see __init__

        param = next(self.model.parameters())
        pixel_values, pixel_mask = hf_inputs(
            [i.to(param.device) for i in images], self.image_mean, self.image_std, pad_multiple(self.model)
        )
        return pixel_values, pixel_mask, (int(pixel_values.shape[-2]), int(pixel_values.shape[-1]))

    def _call(self, pixel_values: Tensor, pixel_mask: Tensor, **kwargs: Any) -> Any:
        from detlens.lightning_modules.hf_detector import call_hf  # see __init__

        return call_hf(self.model, pixel_values, pixel_mask, **kwargs)

    def _forward(
        self, images: list[Tensor], capture: LayerCapture, top_k: int | None, score_threshold: float
    ) -> tuple[list[Detections], list[ImageGeometry], RoIScoring | None]:
        groups = self._batches(images)
        dets: list[Detections | None] = [None] * len(images)
        geometry: list[ImageGeometry | None] = [None] * len(images)
        if len(groups) > 1 and capture._module_names:
            raise ValueError(
                f"{type(self.model).__name__} takes no pixel_mask, so images of different sizes run one by one; "
                "explain them in separate calls (one size per call) to capture target layers"
            )
        for group in groups:
            part = [images[i] for i in group]
            with self._grid_watch():
                pixel_values, pixel_mask, padded = self._pixels(part)
                out = self._call(pixel_values, pixel_mask)
            for j, (d, g) in enumerate(zip(*self._detections(out, part, padded, top_k, score_threshold))):
                dets[group[j]], geometry[group[j]] = d, g
        return list(dets), list(geometry), None  # type: ignore[arg-type]

    def _batches(self, images: list[Tensor]) -> list[list[int]]:
        """Index groups run as one batch: all images, or (no ``pixel_mask``) images of one size."""
        if self._takes_mask:
            return [list(range(len(images)))]
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            by_size.setdefault((int(image.shape[-2]), int(image.shape[-1])), []).append(i)
        return list(by_size.values())

    def _detections(
        self, out: Any, images: list[Tensor], padded: tuple[int, int], top_k: int | None, score_threshold: float
    ) -> tuple[list[Detections], list[ImageGeometry]]:
        from detlens.lightning_modules.hf_detector import decode_hf  # see __init__

        probs_all, probs, xyxy = decode_hf(out, int(self.model.config.num_labels), padded)  # [B, Q, C(+1)], [B, Q, 4]
        hidden = out.last_hidden_state
        if self.kind == "yolos":
            hidden = hidden[:, -probs.shape[1] :]
        dets, geometry = [], []
        for b, image in enumerate(images):
            h, w = int(image.shape[-2]), int(image.shape[-1])
            geometry.append(ImageGeometry(original_size=(h, w), input_size=(h, w), batch_size=padded))
            with torch.no_grad():
                scores, classes = probs[b].max(-1)
                keep = torch.nonzero(scores > score_threshold).flatten()
                keep = keep[scores[keep].argsort(descending=True, stable=True)]
                if top_k is not None:
                    keep = keep[: max(int(top_k), 0)]
            limit = xyxy.new_tensor([w, h, w, h])
            box_graph = xyxy[b, keep].clamp(min=0).minimum(limit)
            dets.append(
                Detections(
                    boxes=box_graph.detach(),
                    scores=scores[keep],
                    labels=classes[keep] + self.label_offset,
                    score_graph=probs[b, keep, classes[keep]],
                    box_graph=box_graph,
                    origin=keep,
                    level=[""] * len(keep),
                    features=hidden[b, keep].detach().float(),
                    class_probs=probs_all[b, keep].detach(),
                )
            )
        return dets, geometry

    # ------------------------------------------------------------------ attention
    def decoder_layer_count(self) -> int:
        """How many decoder layers have cross-attention (YOLOS: encoder layers)."""
        return len(self._cross_attention_modules())

    def encoder_layer_count(self) -> int:
        """How many dense encoder self-attention layers can be read (DETR, Conditional DETR; 0 otherwise)."""
        return len(self._encoder_attention_modules())

    def _encoder_attention_modules(self) -> list[tuple[str, nn.Module]]:
        """Dense encoder self-attention over one feature grid: DETR's and Conditional DETR's
        encoder layers; RT-DETR's and D-FINE's AIFI (the stride-32 level)."""
        pattern = {"dense": r"model\.encoder\.layers\.\d+\.self_attn",
                   "deformable": r"model\.encoder\.aifi\.\d+\.layers\.\d+\.self_attn"}.get(self.kind)
        if pattern is None:
            return []
        return [(n, m) for n, m in self.model.named_modules() if re.fullmatch(pattern, n)]

    def _cross_attention_modules(self) -> list[tuple[str, nn.Module]]:
        named = list(self.model.named_modules())
        if self.kind == "yolos":
            return [(n, m) for n, m in named if re.fullmatch(r"vit\.encoder\.layer\.\d+\.attention\.attention", n)]
        return [(n, m) for n, m in named if re.fullmatch(r"model\.decoder\.layers\.\d+\.(encoder_attn|cross_attn)", n)]

    def query_attention(
        self, images: list[Tensor] | Tensor, *, top_k: int | None = None, score_threshold: float = 0.0,
        layers: list[int] | None = None, encoder: bool = False,
    ) -> QueryAttention:
        """One explaining forward (eval, no gradients) that also reads attention.

        Args:
            layers: decoder layers whose cross-attention is read (``None``: the last).
            encoder: also read the dense encoders' self-attention (DETR, Conditional DETR; RT-DETR's
                and D-FINE's AIFI over the stride-32 level).

        Dense models run with the eager attention implementation for this forward (its
        weights are the model's own softmax); deformable attention is read from the
        attention modules' own inputs and weights.
        """
        cross = self._cross_attention_modules()
        if not cross:
            raise ValueError(f"{type(self.model).__name__}: no decoder cross-attention modules found")
        wanted = sorted({(i % len(cross)) for i in (layers if layers is not None else [-1])})
        readers: dict[int, _AttentionRead] = {i: _AttentionRead(cross[i][1], self.kind) for i in wanted}
        enc_readers: dict[int, _AttentionRead] = {}
        if encoder:
            enc = self._encoder_attention_modules()
            enc_readers = {i: _AttentionRead(m, "dense") for i, (_, m) in enumerate(enc)}
        inputs = prepare_images(images)
        with _eval_with_grad(self.model), torch.no_grad(), _eager(self.model, self.kind != "deformable" or bool(enc_readers)):
            with self._grid_watch(), contextlib.ExitStack() as stack:
                for reader in [*readers.values(), *enc_readers.values()]:
                    stack.enter_context(reader)
                if len(self._batches(inputs)) > 1:
                    raise ValueError(
                        f"{type(self.model).__name__} takes no pixel_mask: read attention of images of one size per call"
                    )
                pixel_values, pixel_mask, padded = self._pixels(inputs)
                out = self._call(pixel_values, pixel_mask)
                grid = self._grid_hw
            dets, geometry = self._detections(out, inputs, padded, top_k, score_threshold)
        output = AdapterOutput(detections=dets, activations={}, geometry=geometry, inputs=inputs, family=self.family)
        key_padding = None
        if grid is not None and self._takes_mask:
            small = F.interpolate(pixel_mask[None].float(), size=grid)[0].bool()  # the models' own rule
            key_padding = (~small).flatten(1)
        result = QueryAttention(output=output)
        for i, reader in readers.items():
            result.decoder[i] = reader.result(grid, key_padding, self.kind, num_detection_tokens=out.logits.shape[1])
        for i, reader in enc_readers.items():
            value = reader.result(grid, key_padding, "dense")
            if isinstance(value, DenseQueryAttention):
                result.encoder[i] = value
        return result


class _AttentionRead:
    """Reads one attention module during a forward: its weights (output ``[1]``) and, for
    deformable attention, the sampling locations it computed (from its inner sampler's
    inputs, or recomputed from its own ``sampling_offsets`` for the v2 formula)."""

    def __init__(self, module: nn.Module, kind: str) -> None:
        self.module = module
        self.kind = kind
        self.weights: Tensor | None = None
        self.locations: Tensor | None = None
        self.shapes: list[tuple[int, int]] | None = None
        self._handles: list[Any] = []

    def __enter__(self) -> _AttentionRead:
        self._handles.append(self.module.register_forward_hook(self._on_output, with_kwargs=True))
        inner = getattr(self.module, "attn", None)
        if self.kind == "deformable" and isinstance(inner, nn.Module):
            self._handles.append(inner.register_forward_pre_hook(self._on_sampler))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _on_sampler(self, module: nn.Module, args: tuple) -> None:
        # MultiScaleDeformableAttention(value, spatial_shapes, spatial_shapes_list, level_start_index,
        #                               sampling_locations, attention_weights, im2col_step)
        self.shapes = [(int(h), int(w)) for h, w in args[2]]
        self.locations = args[4].detach().float()
        self.weights = args[5].detach().float()

    def _on_output(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self.kind != "deformable":
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            self.weights = None if weights is None else weights.detach().float()
            return
        if self.locations is not None:
            return  # read exactly from the sampler's inputs
        self.shapes = [(int(h), int(w)) for h, w in kwargs["spatial_shapes_list"]]
        self.locations = _v2_sampling_locations(module, kwargs)
        weights = output[1].detach().float()
        self.weights = weights.reshape(*self.locations.shape[:-1])

    def result(
        self, grid: tuple[int, int] | None, key_padding: Tensor | None, kind: str, num_detection_tokens: int = 0
    ) -> DenseQueryAttention | DeformableQueryAttention:
        if self.weights is None:
            raise RuntimeError(
                f"{type(self.module).__name__} returned no attention weights; detlens reads them with the model's "
                "eager attention implementation"
            )
        if kind == "deformable":
            assert self.locations is not None and self.shapes is not None
            weights = self.weights.reshape(*self.locations.shape[:-1])
            return DeformableQueryAttention(weights=weights, locations=self.locations, shapes=self.shapes)
        if grid is None:
            raise RuntimeError("the feature grid of the attention's keys was not seen during the forward")
        weights = self.weights
        if kind == "yolos":  # [B, h, T, T], T = 1 + h*w + D: detection tokens' rows over the patches
            s = grid[0] * grid[1]
            weights = weights[:, :, -num_detection_tokens:, 1 : 1 + s]
        return DenseQueryAttention(weights=weights, grid=grid, key_padding=key_padding)


def _v2_sampling_locations(module: nn.Module, kwargs: dict) -> Tensor:
    """Sampling locations ``[B, Q, heads, L, P, 2]`` of RT-DETR v2 / D-FINE deformable attention,
    recomputed with the module's own ``sampling_offsets`` from its call's inputs (their
    sampler is a plain function, so there is no module to hook); the formula is theirs."""
    hidden = kwargs["hidden_states"]
    pos = kwargs.get("position_embeddings")
    if pos is not None:
        hidden = hidden + pos
    ref = kwargs["reference_points"].float()
    b, q = hidden.shape[:2]
    heads = int(module.n_heads)
    levels = len(kwargs["spatial_shapes_list"])
    offsets = module.sampling_offsets(hidden).float().reshape(b, q, heads, -1, 2)
    points = offsets.shape[3] // levels
    if ref.shape[-1] == 2:
        shapes = ref.new_tensor([[w, h] for h, w in kwargs["spatial_shapes_list"]])
        offsets = offsets.reshape(b, q, heads, levels, points, 2)
        return ref[:, :, None, :, None, :] + offsets / shapes[None, None, None, :, None, :]
    per_level = list(getattr(module, "n_points_list", None) or getattr(module, "num_points_list", None) or [points] * levels)
    if len(set(per_level)) != 1:
        raise ValueError(f"{type(module).__name__} samples {per_level} points per level; detlens reads equal counts only")
    scale = getattr(module, "n_points_scale", None)
    scale = module.num_points_scale if scale is None else scale
    offset_scale = module.offset_scale
    offset_scale = offset_scale.float() if isinstance(offset_scale, Tensor) else float(offset_scale)
    loc = ref[:, :, None, :, :2] + offsets * scale.float().unsqueeze(-1) * ref[:, :, None, :, 2:] * offset_scale
    return loc.reshape(b, q, heads, levels, points, 2)


@contextlib.contextmanager
def _eager(model: nn.Module, switch: bool) -> Iterator[None]:
    """The eager attention implementation for one forward (dense weights are only returned
    by it), restored after."""
    config = getattr(model, "config", None)
    before = getattr(config, "_attn_implementation", None)
    if not switch or config is None or before in (None, "eager"):
        yield
        return
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}
    saved = {k: c._attn_implementation for k, c in configs.items()}
    try:
        for c in configs.values():
            c._attn_implementation = "eager"
        yield
    finally:
        for k, c in configs.items():
            c._attn_implementation = saved[k]


def _record_into(store: dict[str, list[Any]], name: str) -> Any:
    def hook(module: nn.Module, args: Any, output: Any) -> None:
        store.setdefault(name, []).append(output)

    return hook

