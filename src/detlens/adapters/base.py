"""The adapter protocol: what detlens asks of a detector, and what it gets back.

An adapter runs a detector once (eval mode, gradients on) and returns an
:class:`AdapterOutput`: per image the detections, the differentiable score of each
detection, where each came from, the captured activations of the requested target
layers and one feature vector per detection. Explainers only ever see this object.

Plugging in your own detector
-----------------------------
Subclass :class:`DetectorAdapter` and implement ``layer_names`` and ``_forward``.
``_forward`` receives the images (already cloned, ``requires_grad`` set, grayscale
replicated to RGB) and a :class:`LayerCapture` that records the outputs of hooked
modules. It must return one :class:`Detections` per image plus one
:class:`ImageGeometry` per image telling how the captured activation grids map
onto the image::

    import torch
    from detlens.adapters import (
        AdapterOutput, Detections, DetectorAdapter, ImageGeometry,
    )

    class MyAdapter(DetectorAdapter):
        family = "custom"

        def layer_names(self) -> list[str]:
            return ["backbone.stage3", "backbone.stage4"]

        def _forward(self, images, capture, top_k, score_threshold):
            batch = torch.stack(images)                 # [B, 3, H, W], no resizing
            logits, boxes = self.model(batch)           # [B, N, C], [B, N, 4] pixels
            probs = logits.softmax(-1)
            dets, geoms = [], []
            for b in range(len(images)):
                score, label = probs[b].max(-1)         # differentiable score [N]
                keep = (score > score_threshold).nonzero()[:, 0][:top_k]
                dets.append(Detections(
                    boxes=boxes[b, keep].detach(), scores=score[keep].detach(),
                    labels=label[keep], score_graph=score[keep],
                    box_graph=boxes[b, keep], origin=keep,
                    level=[""] * len(keep), features=logits[b, keep].detach(),
                    class_probs=probs[b, keep].detach(),
                ))
                h, w = images[b].shape[-2:]
                geoms.append(ImageGeometry(original_size=(h, w), input_size=(h, w),
                                           batch_size=(h, w)))
            return dets, geoms, None

    detlens.explain(my_model, images, adapter=MyAdapter(my_model))

Activations of any module named in ``target_layers`` are captured by the base class
(forward hooks, removed in ``finally``); an adapter may add *virtual* layers (such as
``"features/0"``, a level of a multi-scale feature dict) with ``capture.record``.
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from detlens.adapters.modules import named_modules

__all__ = [
    "AdapterOutput",
    "Detections",
    "DetectorAdapter",
    "ImageGeometry",
    "LayerCapture",
    "RoIScoring",
    "unknown_layer_error",
]


@dataclass
class Detections:
    """The detections of one image, ``K`` of them, sorted by decreasing score.

    Attributes:
        boxes: ``FloatTensor[K, 4]``, ``x1, y1, x2, y2`` in original-image pixels, detached.
        scores: ``FloatTensor[K]``, the model's reported score, detached.
        labels: ``Int64Tensor[K]``, class labels as the model reports them.
        score_graph: ``FloatTensor[K]``, the same scores, still attached to the forward
            graph (differentiable w.r.t. every captured activation and the input images).
        box_graph: ``FloatTensor[K, 4]`` differentiable box coordinates (original-image
            pixels), or ``None`` when the model has no box output to differentiate.
        origin: ``Int64Tensor[K]``: the proposal (two-stage), anchor (one-stage, index into
            all anchors of the image) or query (DETR) index each detection came from.
        level: ``K`` names of the feature level the detection was read from (a key of the
            backbone's feature dict, e.g. ``"0"`` or ``"pool"``), ``""`` when not applicable.
        features: ``FloatTensor[K, D]`` per-detection feature vector, detached (two-stage:
            box-head representation; one-stage: head input feature at the anchor's
            location; DETR: decoder output embedding).
        class_probs: ``FloatTensor[K, C']`` the per-class probability vector of each
            detection (softmax or sigmoid, as the model scores), detached; used by D-RISE.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    score_graph: Tensor
    box_graph: Tensor | None
    origin: Tensor
    level: list[str]
    features: Tensor
    class_probs: Tensor

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def select(self, keep: Tensor) -> Detections:
        """The detections at indices ``keep`` (``Int64Tensor[K']``)."""
        idx = keep.tolist()
        return Detections(
            boxes=self.boxes[keep],
            scores=self.scores[keep],
            labels=self.labels[keep],
            score_graph=self.score_graph[keep],
            box_graph=None if self.box_graph is None else self.box_graph[keep],
            origin=self.origin[keep],
            level=[self.level[i] for i in idx],
            features=self.features[keep],
            class_probs=self.class_probs[keep],
        )


@dataclass(frozen=True)
class ImageGeometry:
    """How one image relates to the tensor the network saw.

    ``original_size``: ``(H, W)`` of the image given to the adapter, pixels.
    ``input_size``: ``(h, w)`` of the image after the detector's resize.
    ``batch_size``: ``(Hp, Wp)`` of the padded batch tensor fed to the backbone; every
    captured activation grid covers this whole padded extent, the image occupying
    its top-left ``input_size`` corner.
    """

    original_size: tuple[int, int]
    input_size: tuple[int, int]
    batch_size: tuple[int, int]


@dataclass
class RoIScoring:
    """What the two-stage fast path needs (see ``detlens.explainers.gradcam``).

    Per image, for its ``K`` detections: ``pooled[i]`` ``FloatTensor[K, C, P, P]`` the
    RoIAlign output each detection's score was computed from (rows repeat when
    detections share a proposal, detached); ``rois[i]`` ``FloatTensor[K, 4]`` the
    proposal boxes in input (resized) pixels; ``level_index[i]`` ``Int64Tensor[K]`` the
    index into ``featmap_names`` of the level each RoI was pooled from.
    ``score_fn(pooled, labels, rois, image_index) -> (probs [K], boxes [K, 4] | None)``
    re-runs the box head and predictor only; it is differentiable w.r.t. ``pooled``.
    """

    pooled: list[Tensor]
    rois: list[Tensor]
    level_index: list[Tensor]
    featmap_names: list[str]
    scales: list[float]
    sampling_ratio: int
    output_size: tuple[int, int]
    score_fn: Callable[[Tensor, Tensor, Tensor, int], tuple[Tensor, Tensor | None]]


@dataclass
class AdapterOutput:
    """One forward pass of a detector over a batch of ``B`` images.

    ``activations[name]`` is the captured output of target layer ``name``,
    ``Tensor[B, C, h, w]`` (sequence layers are reshaped to a grid by the adapter),
    still attached to the graph. ``inputs`` are the leaf image tensors
    (``FloatTensor[3, H, W]`` each, ``requires_grad=True``) the graph starts from.
    """

    detections: list[Detections]
    activations: dict[str, Tensor]
    geometry: list[ImageGeometry]
    inputs: list[Tensor]
    family: str
    level_layers: dict[str, str] = field(default_factory=dict)
    roi: RoIScoring | None = None
    fused_layers: dict[str, list[str]] = field(default_factory=dict)

    def to_image(self, grid: Tensor, image_index: int) -> Tensor:
        """Resample maps on an activation grid to original-image pixels.

        Args:
            grid: ``FloatTensor[K, h, w]`` on the grid of any captured activation.
            image_index: which image of the batch the maps belong to.

        Returns:
            ``FloatTensor[K, H, W]``: bilinear samples of the part of the grid that
            covers the image (padding cropped away), at the original image size.
        """
        from torchvision.ops import roi_align  # local: keeps the import cheap

        geom = self.geometry[image_index]
        H, W = geom.original_size
        k, h, w = grid.shape
        if k == 0:
            return grid.new_zeros((0, H, W), dtype=torch.float32)
        # The grid spans the padded batch; the image covers its top-left input_size.
        # roi_align with aligned=True and one sample per bin is exactly bilinear
        # resampling of that sub-rectangle onto an (H, W) pixel-centre lattice.
        scale_y = h / geom.batch_size[0]
        scale_x = w / geom.batch_size[1]
        ih, iw = geom.input_size
        roi = grid.new_tensor([[0.0, 0.0, 0.0, iw * scale_x, ih * scale_y]], dtype=torch.float32)
        out = roi_align(
            grid.float().unsqueeze(0), roi, output_size=(H, W), spatial_scale=1.0,
            sampling_ratio=1, aligned=True,
        )
        return out[0]


def unknown_layer_error(
    name: str, valid: Sequence[str], what: str = "target layer", *, also: Sequence[str] = (), where: str = ""
) -> ValueError:
    """A ``ValueError`` listing ``valid`` and naming the closest of ``valid`` and ``also``
    (difflib); ``also`` are other accepted names too many to list (every module name)."""
    close = difflib.get_close_matches(name, list(valid) + list(also), n=5, cutoff=0.4)
    hint = f" Closest: {', '.join(repr(c) for c in close)}." if close else ""
    listing = ", ".join(repr(v) for v in list(valid)[:40])
    more = f" (and {len(valid) - 40} more)" if len(valid) > 40 else ""
    others = " (or any module name from model.named_modules())" if also else ""
    return ValueError(f"Unknown {what} {name!r}{where}.{hint} Valid {what}s: {listing}{more}{others}.")


class LayerCapture:
    """Records activations: forward hooks on named modules plus virtual layers.

    Use as a context manager; every hook is removed on exit, also when the forward
    raised.
    """

    def __init__(
        self,
        model: nn.Module,
        module_names: Sequence[str],
        virtual: Sequence[str],
        on_output: Callable[[str, Any], tuple[Any, Any]] | None = None,
    ):
        self._on_output = on_output
        self._modules = dict(named_modules(model))
        self._module_names = list(module_names)
        self._virtual = set(virtual)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.activations: dict[str, Tensor] = {}
        self._calls: dict[str, int] = {}

    def __enter__(self) -> LayerCapture:
        try:
            for name in self._module_names:
                self._handles.append(self._modules[name].register_forward_hook(self._hook(name)))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str) -> Callable[..., Any]:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            self._calls[name] = self._calls.get(name, 0) + 1
            if self._on_output is None:
                self.activations[name] = output
                return None
            # The adapter may store a reshaped view (e.g. tokens -> grid) and hand the
            # forward a tensor computed from it, so the stored tensor is on the graph
            # upstream of every score (equal values: only views/permutes in between).
            stored, replacement = self._on_output(name, output)
            self.activations[name] = stored
            return replacement

        return hook

    def wants(self, name: str) -> bool:
        """Whether the virtual layer ``name`` was requested."""
        return name in self._virtual

    def record(self, name: str, value: Tensor) -> None:
        """Store a virtual layer's activation (``Tensor[B, C, h, w]``)."""
        if name in self._virtual:
            self.activations[name] = value

    def finish(self, to_grid: Callable[[str, Any], Tensor] | None = None) -> dict[str, Tensor]:
        """The captured activations, checked: every module ran once and gave a tensor."""
        out: dict[str, Tensor] = {}
        for name in self._module_names:
            if name not in self.activations:
                raise ValueError(f"Target layer {name!r} did not run during the forward pass.")
            if self._calls.get(name, 0) > 1:
                raise ValueError(
                    f"Target layer {name!r} ran {self._calls[name]} times in one forward pass "
                    "(a module shared across levels or queries); pick a module that runs once."
                )
            value = self.activations[name]
            if to_grid is not None:
                value = to_grid(name, value)
            if not isinstance(value, Tensor) or value.dim() != 4:
                kind = type(value).__name__ if not isinstance(value, Tensor) else f"Tensor{list(value.shape)}"
                raise ValueError(
                    f"Target layer {name!r} outputs {kind}; detlens needs a feature map "
                    "Tensor[B, C, h, w]. Pick a convolutional stage or a 'features/<level>' layer."
                )
            out[name] = value
        for name in self._virtual:
            if name not in self.activations:
                raise ValueError(f"Virtual layer {name!r} was not produced by this model's forward.")
            out[name] = self.activations[name]
        return out


@contextlib.contextmanager
def _eval_with_grad(model: nn.Module) -> Iterator[None]:
    """Eval mode (BatchNorm statistics frozen) and gradients on; flags restored after."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        for module, mode in modes.items():
            module.training = mode


def prepare_images(images: Sequence[Tensor] | Tensor) -> list[Tensor]:
    """Clone images into fresh leaves with ``requires_grad``; 1-channel -> RGB.

    Accepts a list of ``FloatTensor[C, H, W]`` (``C`` in ``{1, 3}``, values in
    ``[0, 1]``) or a batch ``FloatTensor[B, C, H, W]``.
    """
    if isinstance(images, Tensor):
        if images.dim() == 3:
            images = [images]
        elif images.dim() == 4:
            images = list(images.unbind(0))
        else:
            raise ValueError(f"images must be [B, C, H, W] or a list of [C, H, W]; got {list(images.shape)}")
    out: list[Tensor] = []
    for i, image in enumerate(images):
        if not isinstance(image, Tensor) or image.dim() != 3:
            raise ValueError(f"image {i} must be a Tensor[C, H, W]; got {getattr(image, 'shape', type(image))}")
        if image.shape[0] == 1:
            image = image.expand(3, -1, -1)
        elif image.shape[0] != 3:
            raise ValueError(f"image {i} has {image.shape[0]} channels; detlens expects 1 (gray) or 3 (RGB)")
        if not image.is_floating_point():
            raise ValueError(f"image {i} has dtype {image.dtype}; expected float values in [0, 1]")
        out.append(image.detach().clone().float().requires_grad_(True))
    if not out:
        raise ValueError("images is empty")
    return out


class DetectorAdapter:
    """Base class: see the module docstring for the protocol.

    Subclasses set ``family`` and implement :meth:`layer_names`, :meth:`default_layer`
    and :meth:`_forward`.
    """

    family: str = "custom"

    def __init__(self, model: nn.Module):
        self.model = model

    # -- to implement -------------------------------------------------------------
    def layer_names(self) -> list[str]:
        """Valid target-layer names, most useful first."""
        raise NotImplementedError

    def default_layer(self) -> str:
        """The layer explainers use when none is given."""
        return self.layer_names()[0]

    def virtual_layers(self) -> list[str]:
        """Layer names that are not modules (recorded by ``_forward`` itself)."""
        return []

    def _forward(
        self,
        images: list[Tensor],
        capture: LayerCapture,
        top_k: int | None,
        score_threshold: float,
    ) -> tuple[list[Detections], list[ImageGeometry], RoIScoring | None]:
        raise NotImplementedError

    def _capture_output(self, name: str, value: Any) -> tuple[Any, Any]:
        """Called in the forward hook of target layer ``name`` with its output.

        Returns ``(stored, replacement)``: ``stored`` becomes ``activations[name]``
        (must be ``Tensor[B, C, h, w]``); ``replacement`` (or ``None`` to keep the output)
        replaces the module's output. An adapter whose layer emits tokens ``[B, S, D]``
        stores the grid view and returns tokens computed back from it, so the stored
        grid lies on the path to every score (override for such layers).
        """
        return value, None

    def level_layers(self) -> dict[str, str]:
        """Per-detection-level virtual layer -> prefix of its per-level layers."""
        return {}

    def fused_layers(self) -> dict[str, list[str]]:
        """Fused virtual layer -> the layers whose maps it fuses (at image resolution, element-wise
        maximum; every detection is explained on each of them)."""
        return {}

    def feature_recorder(self) -> Any:
        """A :class:`detlens.adapters.observe.FeatureRecorder` that rebuilds this adapter's
        :class:`Detections` (with ``features``) from the model's own eval forward, or
        ``None`` when the family cannot (the default; then detlens runs its own forward)."""
        return None

    # -- provided -----------------------------------------------------------------
    def resolve_layers(self, target_layers: Sequence[str]) -> tuple[list[str], list[str]]:
        """Split requested names into (module names, virtual names); raise on unknown."""
        modules = {n for n, _ in named_modules(self.model) if n}
        virtual = set(self.virtual_layers())
        mod, virt = [], []
        for name in target_layers:
            if name in virtual:
                virt.append(name)
            elif name in modules:
                mod.append(name)
            else:
                listed = self.layer_names()
                raise unknown_layer_error(name, listed, also=sorted(modules - set(listed)),
                                          where=f" for {type(self.model).__name__}")
        return mod, virt

    def run(
        self,
        images: Sequence[Tensor] | Tensor,
        target_layers: Sequence[str] = (),
        top_k: int | None = None,
        score_threshold: float = 0.0,
        with_grad: bool = True,
    ) -> AdapterOutput:
        """Run the detector once and collect everything explainers need.

        Args:
            images: ``B`` images ``FloatTensor[C, H, W]`` in ``[0, 1]`` (``C`` = 1 or 3).
            target_layers: layers whose activations to capture (see :meth:`layer_names`).
            top_k: keep at most this many detections per image (highest scores).
            score_threshold: drop detections scoring at or below this.
            with_grad: build the autograd graph (off for black-box methods).
        """
        inputs = prepare_images(images)
        mod, virt = self.resolve_layers(target_layers)
        for layer, prefix in self.level_layers().items():
            if layer in virt:  # the per-detection-level layer needs every level
                virt.remove(layer)
                virt.extend(n for n in self.virtual_layers() if n.startswith(prefix) and n not in virt)
        for layer, members in self.fused_layers().items():
            if layer in virt:  # a fused layer is its members' maps, each captured
                virt.remove(layer)
                virt.extend(n for n in members if n not in virt)
        grad_ctx = contextlib.nullcontext() if with_grad else torch.no_grad()
        capture = LayerCapture(self.model, mod, virt, on_output=self._capture_output)
        with _eval_with_grad(self.model), grad_ctx, capture:
            dets, geometry, roi = self._forward(inputs, capture, top_k, score_threshold)
            activations = capture.finish()
        return AdapterOutput(
            detections=dets,
            activations=activations,
            geometry=geometry,
            inputs=inputs,
            family=self.family,
            level_layers=self.level_layers(),
            roi=roi,
            fused_layers=self.fused_layers(),
        )


def filter_detections(dets: Detections, top_k: int | None, score_threshold: float) -> Detections:
    """Keep detections scoring above ``score_threshold``, at most ``top_k`` (by score)."""
    keep = torch.nonzero(dets.scores > score_threshold).flatten()
    keep = keep[torch.argsort(dets.scores[keep], descending=True, stable=True)]
    if top_k is not None:
        keep = keep[: max(int(top_k), 0)]
    return dets.select(keep)
