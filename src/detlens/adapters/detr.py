"""Adapter for the project's DETR (``detlens.lightning_modules.detr.DETRNet``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert

from detlens.adapters.modules import named_modules
from .base import Detections, DetectorAdapter, ImageGeometry, LayerCapture, RoIScoring

__all__ = ["DetrAdapter", "is_detr"]


def is_detr(model: nn.Module) -> bool:
    """Duck-typed: a DETR network exposes these stages and submodules (see ``DETRNet``)."""
    return all(hasattr(model, a) for a in ("prepare", "predict", "backbone", "input_proj", "encoder", "decoder"))


class DetrAdapter(DetectorAdapter):
    """A DETR network with ``prepare``/``predict`` stages (``DETRNet``'s contract).

    Scores follow ``DETRNet.postprocess``: a query's score is its highest object-class
    probability (softmax over ``C + 1``, "no object" last), kept above the model's
    ``score_thresh``. ``origin`` is the query index, ``level`` is ``""``, ``features`` the
    last decoder layer's (normed) output embedding ``[K, D]``, ``class_probs`` the full
    softmax ``[K, C + 1]``. Target layers: backbone stages, ``input_proj`` and encoder
    layers (tokens ``[B, S, D]`` are reshaped to the ``h x w`` feature grid).
    """

    family = "detr"

    def __init__(self, model: nn.Module):
        if not is_detr(model):
            raise TypeError(f"{type(model).__name__} does not look like a DETR network (prepare/predict/backbone/...)")
        super().__init__(model)
        self._grid_hw: tuple[int, int] | None = None

    def layer_names(self) -> list[str]:
        names = [f"backbone.{n}" for n, _ in self.model.backbone.named_children() if n.startswith("layer")]
        names.append("input_proj")
        names += [f"encoder.layers.{i}" for i in range(len(self.model.encoder.layers))]
        names += [
            n for n, m in named_modules(self.model) if getattr(m, "detlens_attention_probe", False) and n not in names
        ]
        return names

    def default_layer(self) -> str:
        return [n for n in self.layer_names() if n.startswith("backbone.")][-1]

    def _capture_output(self, name: str, value: Any) -> tuple[Any, Any]:
        if isinstance(value, Tensor) and value.dim() == 3 and self._grid_hw is not None:
            h, w = self._grid_hw
            if value.shape[1] == h * w:  # encoder tokens [B, S, D], row-major positions
                grid = value.transpose(1, 2).reshape(value.shape[0], value.shape[2], h, w)
                return grid, grid.flatten(2).transpose(1, 2)  # same values, now downstream of grid
        return value, None

    def _forward(
        self, images: list[Tensor], capture: LayerCapture, top_k: int | None, score_threshold: float
    ) -> tuple[list[Detections], list[ImageGeometry], RoIScoring | None]:
        net = self.model
        seen: dict[str, Tensor] = {}

        def on_proj(module: nn.Module, args: Any, out: Tensor) -> None:
            # the token grid's size, known before any encoder layer's hook runs
            self._grid_hw = (int(out.shape[-2]), int(out.shape[-1]))

        self._grid_hw = None
        handles = [
            net.input_proj.register_forward_hook(on_proj),
            net.decoder.register_forward_hook(lambda m, a, o: seen.__setitem__("hidden", o)),
        ]
        try:
            batch, mask, sizes = net.prepare(images)
            logits, boxes = net.predict(batch, mask)  # [L, B, Q, C+1], [L, B, Q, 4]
        finally:
            for h in handles:
                h.remove()
        hidden = seen["hidden"][-1]  # [B, Q, D]
        padded = (int(batch.shape[-2]), int(batch.shape[-1]))
        probs_all = logits[-1].float().softmax(-1)  # [B, Q, C+1]
        xyxy = box_convert(boxes[-1].float(), "cxcywh", "xyxy")
        dets, geometry = [], []
        for i, (h, w) in enumerate(sizes):
            scale_f = net.image_size / max(h, w)
            input_size = (max(1, round(h * scale_f)), max(1, round(w * scale_f))) if scale_f != 1.0 else (h, w)
            geometry.append(ImageGeometry(original_size=(h, w), input_size=input_size, batch_size=padded))
            prob = probs_all[i, :, :-1]
            with torch.no_grad():
                scores, classes = prob.max(-1)
                keep = torch.nonzero(scores > max(float(net.score_thresh), score_threshold)).flatten()
                keep = keep[scores[keep].argsort(descending=True, stable=True)]
                if top_k is not None:
                    keep = keep[: max(int(top_k), 0)]
            scale = xyxy.new_tensor([w, h, w, h])
            box_graph = (xyxy[i][keep] * scale).clamp(min=0).minimum(scale)
            dets.append(
                Detections(
                    boxes=box_graph.detach(),
                    scores=scores[keep],
                    labels=classes[keep] + 1,
                    score_graph=prob[keep, classes[keep]],
                    box_graph=box_graph,
                    origin=keep,
                    level=[""] * len(keep),
                    features=hidden[i, keep].detach().float(),
                    class_probs=probs_all[i, keep].detach(),
                )
            )
        return dets, geometry, None
