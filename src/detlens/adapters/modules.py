"""Module names as the user wrote the model, whether or not parts of it are ``torch.compile``d.

``torch.compile(module)`` wraps ``module`` in an ``OptimizedModule`` whose only child is
``_orig_mod``, so ``named_modules()`` grows ``backbone._orig_mod.body.layer3`` where the
user wrote ``backbone.body.layer3``. Layer names in configs and metric keys must not
depend on that (stable keys, docs/DESIGN.md rule 5), so detlens resolves names through
:func:`named_modules`, which drops the wrapper and names the original module.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

__all__ = ["COMPILED_CHILD", "clean_module_name", "named_modules"]

COMPILED_CHILD = "_orig_mod"
"""Attribute under which ``torch.compile``'s ``OptimizedModule`` holds the original module."""


def clean_module_name(name: str) -> str:
    """``"backbone._orig_mod.body"`` -> ``"backbone.body"`` (any depth, any number of wrappers)."""
    return ".".join(part for part in name.split(".") if part != COMPILED_CHILD)


def named_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``model.named_modules()`` with compile wrappers skipped and their ``_orig_mod`` segments dropped.

    The original module is yielded under the wrapper's name, so a hook placed on it fires
    inside the compiled call (TorchDynamo traces through hooks) and keys stay unchanged.
    """
    for name, module in model.named_modules():
        if isinstance(getattr(module, COMPILED_CHILD, None), nn.Module):
            continue  # the OptimizedModule wrapper; its _orig_mod comes next under the same clean name
        yield clean_module_name(name), module
