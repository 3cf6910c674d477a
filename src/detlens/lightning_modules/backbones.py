"""FPN backbones (ResNet / MobileNet-v3 trunks) with an optional self-attention stage.

Built from torchvision parts: the trunks from ``torchvision.models`` (never with
weights), ``BackboneWithFPN`` (``IntermediateLayerGetter`` + ``FeaturePyramidNetwork``)
for the pyramid. torchvision's ``_resnet_fpn_extractor`` / ``_mobilenet_extractor``
hard-code 256 FPN channels and give no place to insert a block between stages, so the
few lines that choose stages and freeze layers are repeated here with both options.

Module names follow torchvision's, so torchvision detection checkpoints load:
``backbone.body.<stage>`` (``conv1``, ``layer1``..``layer4`` for ResNet; ``0``..``16``
for MobileNet-v3 features) and ``backbone.fpn``. The attention block, when asked for,
is ``backbone.body.<stage>_attention`` and its output (not the stage's) feeds both the
next stage and the FPN. Attention blocks on FPN levels are ``backbone.fpn_attention.<level>``
(``<level>`` the key of the backbone's output dict: ``"0"``, ``"1"``, ..., ``"pool"`` or
``"p6"``, ``"p7"``); each level's map attends over its own positions and replaces that
level in the output. Without them the module tree (and so the state_dict) is the one
earlier detlens versions built.
"""

from __future__ import annotations

import difflib
import math
from collections import OrderedDict
from functools import partial
from typing import Any, Callable, Literal

from torch import Tensor, nn
from torchvision.models import mobilenet_v3_large, resnet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7

from detlens.lightning_modules.attention import SpatialSelfAttention, TemperatureMode

__all__ = [
    "BackboneWithFPNAttention",
    "NormName",
    "TrunkName",
    "build_fpn_backbone",
    "fpn_level_names",
    "norm_layer",
    "valid_attention_stages",
]

NormName = Literal["batch", "group", "frozen"]
TrunkName = Literal["resnet18", "resnet34", "resnet50", "mobilenet_v3_large"]
_RESNETS = ("resnet18", "resnet34", "resnet50")


def _group_norm(num_channels: int, max_groups: int = 32) -> nn.GroupNorm:
    # MobileNet widths (16, 24, 40, 72, ...) are not all multiples of 32: take the
    # largest group count <= 32 that divides the width.
    return nn.GroupNorm(math.gcd(max_groups, num_channels), num_channels)


def norm_layer(norm: NormName) -> Callable[[int], nn.Module]:
    """Normalisation layer factory for a trunk.

    ``"batch"``: trainable ``BatchNorm2d`` (the right choice from scratch with >= 4 images
    per device). ``"group"``: ``GroupNorm`` with up to 32 groups (batch-size independent;
    for 1-2 images per device). ``"frozen"``: ``FrozenBatchNorm2d``, only for fine-tuning
    from loaded weights: its statistics are fixed buffers, so from scratch it normalises
    nothing.
    """
    if norm == "batch":
        return nn.BatchNorm2d
    if norm == "group":
        return _group_norm
    if norm == "frozen":
        return FrozenBatchNorm2d
    raise ValueError(f"norm must be one of 'batch', 'group', 'frozen', got {norm!r}")


def _stages(trunk_name: TrunkName, norm: NormName) -> tuple[nn.Module, list[str], dict[str, int], list[str]]:
    """Returns (trunk, ordered stage names usable as FPN inputs, channels per stage, freeze order)."""
    if trunk_name in _RESNETS:
        net = getattr(resnet, trunk_name)(weights=None, norm_layer=norm_layer(norm))
        base = net.inplanes // 8  # torchvision's own formula (64 for resnet18/34, 256 for resnet50)
        stages = ["layer1", "layer2", "layer3", "layer4"]
        channels = {f"layer{k}": base * 2 ** (k - 1) for k in range(1, 5)}
        trunk = nn.Sequential(OrderedDict((n, m) for n, m in net.named_children() if n not in ("avgpool", "fc")))
        # freeze order used by trainable_layers (last entries are frozen first)
        freeze_units = ["conv1", "layer1", "layer2", "layer3", "layer4"]
        return trunk, stages, channels, freeze_units
    if trunk_name == "mobilenet_v3_large":
        # BatchNorm settings of torchvision's MobileNet-v3 (eps=1e-3, momentum=0.01) kept for "batch".
        mnorm = partial(nn.BatchNorm2d, eps=0.001, momentum=0.01) if norm == "batch" else norm_layer(norm)
        features = mobilenet_v3_large(weights=None, dilated=True, norm_layer=mnorm).features
        # Strided blocks start the stages C1..Cn-1; first and last block are always stages.
        idx = [0] + [i for i, b in enumerate(features) if getattr(b, "_is_cn", False)] + [len(features) - 1]
        stages = [str(i) for i in idx]
        channels = {str(i): features[i].out_channels for i in range(len(features))}
        return features, stages, channels, stages
    raise ValueError(f"unknown trunk {trunk_name!r}; choose from {list(_RESNETS) + ['mobilenet_v3_large']}")


def _freeze(trunk: nn.Module, freeze_units: list[str], trainable_layers: int | None) -> None:
    if trainable_layers is None:
        return  # from scratch: everything trains
    if not 0 <= trainable_layers <= len(freeze_units):
        raise ValueError(f"trainable_backbone_layers must be in [0, {len(freeze_units)}], got {trainable_layers}")
    names = list(dict(trunk.named_children()))
    train_from = len(names) if trainable_layers == 0 else names.index(freeze_units[-trainable_layers])
    if trainable_layers == len(freeze_units):
        train_from = 0  # includes stem norm (bn1) as torchvision does
    for name in names[:train_from]:
        for p in getattr(trunk, name).parameters():
            p.requires_grad_(False)


def valid_attention_stages(trunk_name: TrunkName, returned_stages: list[str]) -> list[str]:
    """Stage names after which attention may be inserted (those that feed the FPN)."""
    if trunk_name in _RESNETS:
        last = int(returned_stages[-1].removeprefix("layer"))
        return [f"layer{k}" for k in range(1, last + 1)]
    return [str(i) for i in range(1, int(returned_stages[-1]) + 1)]


class BackboneWithFPNAttention(BackboneWithFPN):
    """``BackboneWithFPN`` with a :class:`SpatialSelfAttention` on some of its output levels.

    ``forward(x[B,3,H,W]) -> OrderedDict[str, [B, C, h, w]]``: the FPN's levels, each level
    named in ``fpn_attention`` replaced by its block's output (same shape). Every block is
    an exact identity at initialisation (its residual gate is zero), so the outputs then
    equal the plain ``BackboneWithFPN``'s bit for bit.
    """

    def __init__(self, *args: Any, fpn_attention: dict[str, SpatialSelfAttention], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fpn_attention = nn.ModuleDict(fpn_attention)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        features = super().forward(x)
        return OrderedDict(
            (name, self.fpn_attention[name](level) if name in self.fpn_attention else level)
            for name, level in features.items()
        )


def fpn_level_names(num_inputs: int, extra_blocks: ExtraFPNBlock | None) -> list[str]:
    """The keys of a ``BackboneWithFPN``'s output dict, finest first: ``"0"`` .. ``str(n-1)``
    for the trunk stages, then the extra block's (``"pool"``; ``"p6"``, ``"p7"``)."""
    names = [str(i) for i in range(num_inputs)]
    if extra_blocks is None or isinstance(extra_blocks, LastLevelMaxPool):
        return names + ["pool"]
    if isinstance(extra_blocks, LastLevelP6P7):
        return names + ["p6", "p7"]
    raise ValueError(f"unknown FPN extra block {type(extra_blocks).__name__}: its level names are not known")


def build_fpn_backbone(
    trunk_name: TrunkName,
    *,
    norm: NormName = "batch",
    trainable_layers: int | None = None,
    returned_layers: list[int] | None = None,
    extra_blocks: ExtraFPNBlock | None = None,
    fpn_channels: int = 256,
    attention_stage: str | None = None,
    attention_heads: int = 1,
    attention_fpn_levels: list[str] | str | None = None,
    attention_temperature: TemperatureMode = "fixed",
) -> BackboneWithFPN:
    """A trunk + FPN, optionally with a :class:`SpatialSelfAttention` after one stage.

    Args:
        trunk_name: ``resnet18|34|50`` or ``mobilenet_v3_large`` (dilated last stage,
            as in ``fasterrcnn_mobilenet_v3_large_fpn``).
        norm: trunk normalisation, see :func:`norm_layer`.
        trainable_layers: ``None`` trains everything (right from scratch); an int
            freezes the stem/earliest stages like torchvision's ``trainable_layers``.
        returned_layers: stages feeding the FPN, as torchvision numbers them
            (ResNet: 1..4, default all; MobileNet: stage ordinals, default the last two).
        extra_blocks: FPN extra levels (``LastLevelMaxPool`` when ``None``).
        fpn_channels: FPN width (torchvision uses 256; smaller is much cheaper on CPU).
        attention_stage: stage name to follow with attention, e.g. ``"layer3"``.
        attention_heads: heads of every attention block.
        attention_fpn_levels: FPN output levels followed by an attention block each
            (``"all"``, or level names such as ``["0", "1"]``; see :func:`fpn_level_names`).
        attention_temperature: ``"fixed"`` or ``"learnable"`` softmax temperature of every
            attention block (:class:`SpatialSelfAttention`).

    Returns:
        ``BackboneWithFPN`` (:class:`BackboneWithFPNAttention` with ``attention_fpn_levels``):
        ``forward(x[B,3,H,W]) -> OrderedDict[str, [B, fpn_channels, h, w]]`` with one entry
        per returned stage (finest first) plus the extra levels.
    """
    trunk, stages, channels, freeze_units = _stages(trunk_name, norm)
    if returned_layers is None:
        returned = stages if trunk_name in _RESNETS else stages[-2:]
    else:
        allowed = range(1, 5) if trunk_name in _RESNETS else range(len(stages))
        if not returned_layers or any(i not in allowed for i in returned_layers):
            raise ValueError(
                f"returned_layers {returned_layers} out of range for {trunk_name}: use values in "
                f"{list(allowed)} ({'layer1..layer4' if trunk_name in _RESNETS else 'stages ' + str(stages)})"
            )
        if trunk_name in _RESNETS:
            returned = [f"layer{k}" for k in sorted(set(returned_layers))]
        else:
            returned = [stages[k] for k in sorted(set(returned_layers))]
    _freeze(trunk, freeze_units, trainable_layers)

    return_layers = {name: str(i) for i, name in enumerate(returned)}
    if attention_stage is not None:
        valid = valid_attention_stages(trunk_name, returned)
        if attention_stage not in valid:
            close = difflib.get_close_matches(attention_stage, valid, n=3)
            hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(
                f"attention_stage {attention_stage!r} is not a stage of {trunk_name} feeding the FPN; "
                f"valid stages: {valid}.{hint}"
            )
        block_name = f"{attention_stage}_attention"
        modules = OrderedDict()
        for name, module in trunk.named_children():
            modules[name] = module
            if name == attention_stage:
                modules[block_name] = SpatialSelfAttention(
                    channels[attention_stage], heads=attention_heads, temperature=attention_temperature
                )
        trunk = nn.Sequential(modules)
        if attention_stage in return_layers:
            return_layers[block_name] = return_layers.pop(attention_stage)

    common = dict(
        return_layers=return_layers,
        in_channels_list=[channels[name] for name in returned],
        out_channels=fpn_channels,
        extra_blocks=extra_blocks,
    )
    levels = _fpn_attention_levels(attention_fpn_levels, fpn_level_names(len(returned), extra_blocks))
    if not levels:
        return BackboneWithFPN(trunk, **common)
    if fpn_channels % attention_heads:
        raise ValueError(f"attention_heads={attention_heads} must divide fpn_channels={fpn_channels}")
    blocks = {
        level: SpatialSelfAttention(
            fpn_channels, heads=attention_heads, temperature=attention_temperature, feature_level=level
        )
        for level in levels
    }
    return BackboneWithFPNAttention(trunk, fpn_attention=blocks, **common)


def _fpn_attention_levels(wanted: list[str] | str | None, valid: list[str]) -> list[str]:
    """``attention_fpn_levels`` as level names in pyramid order (finest first)."""
    if wanted is None:
        return []
    if isinstance(wanted, str):
        if wanted != "all":
            raise ValueError(f"attention_fpn_levels must be 'all' or a list of FPN level names {valid}, got {wanted!r}")
        return list(valid)
    names = [str(w) for w in wanted]
    if not names:
        raise ValueError(f"attention_fpn_levels is empty; give FPN level names {valid}, 'all' or None")
    unknown = [n for n in names if n not in valid]
    if unknown or len(set(names)) != len(names):
        raise ValueError(f"attention_fpn_levels {names}: unknown or repeated levels {unknown}; valid levels: {valid}")
    return [v for v in valid if v in names]
