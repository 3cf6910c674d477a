"""Which adapter explains a network: an open registry, and the search for the network in a LightningModule.

A detector family is a ``(predicate, adapter_class)`` pair: ``predicate(network)`` says
whether ``adapter_class(network)`` can explain it. detlens' own families register
themselves in :mod:`detlens.adapters`; another package adds its family either by calling
:func:`register` or, without anyone importing it, through the Python entry-point group
``detlens.adapters`` (each entry point loads a zero-argument function that calls
:func:`register`), e.g. in its ``pyproject.toml``::

    [project.entry-points."detlens.adapters"]
    yolo = "detlens_yolo:register_adapters"

:func:`find_network` looks for the network a registered family recognises anywhere in a
LightningModule (any attribute name, nested wrappers, ``torch.compile``, DDP), so a user's
module holding its detector as ``self.detector`` or ``self.net`` needs no configuration;
none or several found is an error naming the candidates and how to choose.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from torch import nn

from .base import DetectorAdapter

__all__ = ["ENTRY_POINT_GROUP", "AdapterRegistry", "Family", "find_network", "register", "registry", "resolve_adapter"]

ENTRY_POINT_GROUP = "detlens.adapters"

Predicate = Callable[[nn.Module], bool]


@dataclass(frozen=True)
class Family:
    """One registered detector family: ``predicate(network)`` -> ``adapter_class(network)``."""

    name: str
    predicate: Predicate
    adapter_class: type[DetectorAdapter]


class AdapterRegistry:
    """The registered families, in registration order (the first whose predicate accepts a
    network wins); entry points of ``group`` are loaded once, at the first lookup."""

    def __init__(self, group: str = ENTRY_POINT_GROUP) -> None:
        self.group = group
        self._families: list[Family] = []
        self._entry_points_loaded = False

    def register(self, predicate: Predicate, adapter_class: type[DetectorAdapter], name: str | None = None) -> None:
        """Adds a family (registering the same adapter class again replaces its predicate)."""
        if not callable(predicate):
            raise TypeError(f"predicate must be callable(network) -> bool, got {predicate!r}")
        if not (isinstance(adapter_class, type) and issubclass(adapter_class, DetectorAdapter)):
            raise TypeError(f"adapter_class must be a subclass of detlens.adapters.DetectorAdapter, got {adapter_class!r}")
        family = Family(name or adapter_class.__name__, predicate, adapter_class)
        self._families = [f for f in self._families if f.adapter_class is not adapter_class] + [family]

    @property
    def families(self) -> list[Family]:
        self._load_entry_points()
        return list(self._families)

    def family_of(self, network: nn.Module) -> Family | None:
        """The first family whose predicate accepts ``network`` (a predicate that raises declines)."""
        for family in self.families:
            try:
                if family.predicate(network):
                    return family
            except Exception:  # noqa: BLE001 - a third-party predicate must not break the search
                continue
        return None

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for point in entry_points(group=self.group):
            try:
                point.load()()
            except Exception as err:  # noqa: BLE001 - one broken plugin must not hide the others
                import warnings

                warnings.warn(f"[detlens] adapter entry point {point.name!r} ({point.value}) failed to load: "
                              f"{type(err).__name__}: {err}", stacklevel=3)


registry = AdapterRegistry()
"""The registry :func:`register`, :func:`find_network` and :func:`resolve_adapter` use."""


def register(predicate: Predicate, adapter_class: type[DetectorAdapter], name: str | None = None) -> None:
    """Registers a detector family with detlens (see the module docstring)."""
    registry.register(predicate, adapter_class, name)


def _unwrapped(module: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` or DDP/FSDP-style wrapper holds."""
    for _ in range(4):
        inner = getattr(module, "_orig_mod", None) or getattr(module, "module", None)
        if not isinstance(inner, nn.Module) or inner is module:
            return module
        module = inner
    return module


def _attribute(root: nn.Module, model_attr: str) -> nn.Module:
    """The (unwrapped) module at the dotted path ``model_attr`` of ``root``."""
    target: Any = root
    for part in model_attr.split("."):
        target = getattr(_unwrapped(target), part, None)
    if not isinstance(target, nn.Module):
        raise ValueError(f"model_attr={model_attr!r} names no submodule of {type(root).__name__}")
    return _unwrapped(target)


def find_network(root: nn.Module, model_attr: str | None = None, reg: AdapterRegistry | None = None) -> tuple[str, nn.Module, Family]:
    """The one network in ``root`` a registered family recognises.

    Args:
        root: a LightningModule, a wrapper, or the network itself.
        model_attr: dotted attribute path to the network (``"model"``, ``"net.detector"``);
            ``None`` searches every submodule, outermost first.

    Returns:
        ``(path, network, family)``; ``path`` is ``""`` when ``root`` itself is the network.

    Raises:
        TypeError: no registered family recognises any submodule (or ``model_attr``);
            ValueError: several separate networks are recognised, or ``model_attr`` names
            no module.
    """
    reg = reg or registry
    if model_attr is not None:
        net = _attribute(root, model_attr)
        family = reg.family_of(net)
        if family is None:
            raise TypeError(_no_adapter_message(root, [(model_attr, net)], reg))
        return model_attr, net, family
    found: list[tuple[str, nn.Module, Family]] = []
    inside: list[str] = []
    for path, module in _unwrapped(root).named_modules():
        if any(path == p or path.startswith(p + ".") for p in inside):
            continue  # part of a network already found
        net = _unwrapped(module)
        family = reg.family_of(net)
        if family is not None:
            found.append((path, net, family))
            inside.append(path)
    if len(found) == 1:
        return found[0]
    if not found:
        candidates = [(p, m) for p, m in _unwrapped(root).named_children()]
        raise TypeError(_no_adapter_message(root, candidates, reg))
    named = ", ".join(f"{p or '(the module itself)'} ({type(m).__name__}, {f.name})" for p, m, f in found)
    raise ValueError(
        f"{type(root).__name__} holds {len(found)} detectors detlens can explain: {named}. Choose one with "
        f"model_attr='{found[0][0]}' (or pass adapter=... to the callbacks and detlens.explain)."
    )


def _no_adapter_message(root: nn.Module, candidates: list[tuple[str, nn.Module]], reg: AdapterRegistry) -> str:
    families = ", ".join(f.name for f in reg.families) or "none"
    seen = ", ".join(f"{p} ({type(m).__name__})" for p, m in candidates[:8]) or "no submodules"
    return (
        f"detlens has no adapter for {type(root).__name__} or any network in it (looked at {seen}; registered "
        f"families: {families}). Pass adapter=MyAdapter(network) (subclass detlens.adapters.DetectorAdapter: "
        "implement layer_names() and _forward(), see detlens.adapters.base), register one with "
        "detlens.adapters.register(predicate, MyAdapter), or install a package that provides one through the "
        f"{ENTRY_POINT_GROUP!r} entry points."
    )


def resolve_adapter(root: nn.Module, adapter: DetectorAdapter | dict[str, Any] | None = None,
                    model_attr: str | None = None) -> DetectorAdapter:
    """The adapter for ``root``.

    Args:
        adapter: an adapter instance (used as is); or, from YAML, ``{"class_path": ...,
            "init_args": {...}}`` of an adapter class, built with the network found in
            ``root`` (``model_attr`` or the search) as its first argument; ``None``: the
            registered family of the network found.
    """
    if isinstance(adapter, DetectorAdapter):
        return adapter
    if isinstance(adapter, dict):
        module_name, _, class_name = str(adapter.get("class_path", "")).rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError, ValueError) as err:
            raise ValueError(f"adapter class_path {adapter.get('class_path')!r} cannot be imported: {err}") from err
        if not (isinstance(cls, type) and issubclass(cls, DetectorAdapter)):
            raise TypeError(f"adapter class_path {adapter['class_path']!r} is not a detlens.adapters.DetectorAdapter")
        return cls(_find_network_or_root(root, model_attr), **dict(adapter.get("init_args") or {}))
    if adapter is not None:
        raise TypeError(f"adapter must be a DetectorAdapter, a class_path/init_args dict or None, got {type(adapter).__name__}")
    _, net, family = find_network(root, model_attr)
    return family.adapter_class(net)


def _find_network_or_root(root: nn.Module, model_attr: str | None) -> nn.Module:
    """``model_attr``'s module, else the recognised network, else ``root`` itself (for an adapter
    class the registry does not know, given explicitly). Several recognised networks stay an
    error: the adapter would otherwise be built on the wrong module."""
    if model_attr is not None:
        return _attribute(root, model_attr)
    try:
        return find_network(root)[1]
    except TypeError:
        return _unwrapped(root)
