"""Helpers shared by the torchvision adapters: layer names and image geometry."""

from __future__ import annotations

import weakref
from collections import OrderedDict

import torch
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from detlens.adapters.modules import named_modules
from .base import DetectorAdapter, ImageGeometry, LayerCapture

FEATURES = "features"


class TorchvisionAdapterMixin(DetectorAdapter):
    """Layer naming common to torchvision detectors.

    Virtual layers: ``"features/<key>"`` is one level of the multi-scale feature dict
    the backbone returns (FPN outputs when the backbone has an FPN, e.g. ``"0"``,
    ``"1"``, ``"pool"``); ``"features"`` is, per detection, the level that detection
    was read from (two-stage: the level its RoI was pooled from; one-stage: the level
    of its anchor). Any backbone module name is also a valid target layer.
    """

    _feature_keys: list[str] | None = None

    def _transform_and_features(
        self, images: list[Tensor], capture: LayerCapture | None
    ) -> tuple[ImageList, OrderedDict[str, Tensor], list[ImageGeometry]]:
        model = self.model
        original_sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        image_list, _ = model.transform(images)
        features = model.backbone(image_list.tensors)
        if isinstance(features, Tensor):
            features = OrderedDict([("0", features)])
        self._feature_keys = list(features.keys())
        if capture is not None:
            for key, value in features.items():
                capture.record(f"{FEATURES}/{key}", value)
        padded = (int(image_list.tensors.shape[-2]), int(image_list.tensors.shape[-1]))
        geometry = [
            ImageGeometry(original_size=o, input_size=(int(s[0]), int(s[1])), batch_size=padded)
            for o, s in zip(original_sizes, image_list.image_sizes)
        ]
        return image_list, features, geometry

    def feature_keys(self) -> list[str]:
        """Keys of the backbone's feature dict.

        Read from the module structure for torchvision's ``BackboneWithFPN``; other
        backbones (SSD) get one backbone-only probe run on a blank image, cached per model.
        """
        if self._feature_keys is None:
            self._feature_keys = _static_feature_keys(self.model.backbone) or _PROBED.get(self.model)
        if self._feature_keys is None:
            model = self.model
            modes = {m: m.training for m in model.modules()}
            try:
                model.eval()
                device = next(model.parameters()).device
                size = int(getattr(model.transform, "fixed_size", None) and model.transform.fixed_size[0] or 256)
                with torch.no_grad():
                    out = model.backbone(torch.zeros(1, 3, size, size, device=device))
            finally:
                for m, mode in modes.items():
                    m.training = mode
            self._feature_keys = list(out.keys()) if isinstance(out, dict) else ["0"]
            _PROBED[self.model] = list(self._feature_keys)
        return list(self._feature_keys)

    def virtual_layers(self) -> list[str]:
        return [FEATURES] + [f"{FEATURES}/{k}" for k in self.feature_keys()]

    def level_layers(self) -> dict[str, str]:
        return {FEATURES: f"{FEATURES}/"}

    def default_layer(self) -> str:
        return FEATURES

    def _stage_names(self) -> list[str]:
        """Backbone stages and FPN output convs, the modules users usually target."""
        backbone = self.model.backbone
        names: list[str] = []
        body = getattr(backbone, "body", None)
        if isinstance(body, nn.Module):
            names += [f"backbone.body.{n}" for n, _ in body.named_children()]
        fpn = getattr(backbone, "fpn", None)
        if fpn is not None and hasattr(fpn, "layer_blocks"):
            names += [f"backbone.fpn.layer_blocks.{i}" for i in range(len(fpn.layer_blocks))]
        if not names:
            names += [f"backbone.{n}" for n, _ in backbone.named_children()]
        names += [
            n for n, m in named_modules(self.model) if getattr(m, "detlens_attention_probe", False) and n not in names
        ]
        return names

    def layer_names(self) -> list[str]:
        return self.virtual_layers() + self._stage_names()


_PROBED: weakref.WeakKeyDictionary[nn.Module, list[str]] = weakref.WeakKeyDictionary()


def _static_feature_keys(backbone: nn.Module) -> list[str] | None:
    """``BackboneWithFPN``'s output keys: the body's return names, then the extra levels'."""
    body, fpn = getattr(backbone, "body", None), getattr(backbone, "fpn", None)
    returns = getattr(body, "return_layers", None)
    if not isinstance(returns, dict) or fpn is None:
        return None
    keys = [str(v) for v in returns.values()]
    extra = getattr(fpn, "extra_blocks", None)
    if extra is None:
        return keys
    if isinstance(extra, LastLevelMaxPool):
        return keys + ["pool"]
    if isinstance(extra, LastLevelP6P7):
        return keys + ["p6", "p7"]
    return None  # a custom extra block: its names are only known by running it
