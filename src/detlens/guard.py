"""The side-effect guard every detlens explanation runs inside (docs/DESIGN.md rules 1 and 2).

``with explaining(module, trainer) as guard:`` gives an explainer a model it may run
forward and differentiate (eval mode, gradients on, the trainer's precision context) and
promises the training run that nothing it depends on changes:

* every submodule's ``training`` flag and every parameter's ``requires_grad`` are
  restored (the model runs in eval mode inside, so BatchNorm statistics are not updated);
* the global RNG streams (torch CPU, the CUDA devices the module lives on, ``random``,
  ``numpy``) are restored, so the run's random numbers are the ones it would have drawn;
* hooks registered through :meth:`ExplainGuard.track` are removed, even on error;
* every parameter's ``.grad`` is exactly what it was before (same tensor object or
  ``None``). An explainer must use ``torch.autograd.grad`` w.r.t. activations, never
  ``.backward()`` into parameters; if it did, the gradients are put back and
  :class:`GuardViolation` is raised so the bug is seen.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

if TYPE_CHECKING:
    import pytorch_lightning as pl

__all__ = ["ExplainGuard", "GuardViolation", "clone_for_autograd", "explaining", "map_tensors"]

T = TypeVar("T")


class GuardViolation(RuntimeError):
    """An explanation changed training state (parameter gradients); it was restored."""


class ExplainGuard:
    """Handle yielded by :func:`explaining`: collects hook handles to remove on exit."""

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []

    def track(self, handle: RemovableHandle) -> RemovableHandle:
        """Registers a hook handle (``module.register_forward_hook(...)``) for removal on exit."""
        self._handles.append(handle)
        return handle

    def _remove_hooks(self) -> None:
        while self._handles:
            self._handles.pop().remove()


def clone_for_autograd(value: T) -> T:
    """Clones the tensors in ``value`` (nested as :func:`map_tensors` walks it) into normal tensors.

    Tensors created under ``torch.inference_mode()`` (everything a validation loop
    touches) cannot enter autograd; a clone made with inference mode off can. The clones
    do not require grad; set ``requires_grad_`` on the ones you differentiate.
    """
    with torch.inference_mode(False):
        return map_tensors(value, Tensor.clone)


def map_tensors(value: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """``fn`` applied to every tensor in ``value`` (nested dict/list/tuple/namedtuple/dataclass).

    Hand-written because Lightning's ``apply_to_collection`` refuses frozen dataclasses,
    the natural type of an explainer's per-image result.
    """
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, dict):
        return type(value)((k, map_tensors(v, fn)) for k, v in value.items())
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # namedtuple
        return type(value)(*(map_tensors(v, fn) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(map_tensors(v, fn) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = [f.name for f in dataclasses.fields(value) if f.init]
        changed = {name: map_tensors(getattr(value, name), fn) for name in fields}
        if any(changed[name] is not getattr(value, name) for name in fields):
            return dataclasses.replace(value, **changed)
    return value


@contextmanager
def explaining(module: nn.Module, trainer: pl.Trainer | None = None) -> Iterator[ExplainGuard]:
    """Runs the body with ``module`` in eval mode, gradients on, and training state protected.

    Args:
        module: the model to explain (a LightningModule or any ``nn.Module``); it stays on
            its device.
        trainer: when given, the body runs inside
            ``trainer.precision_plugin.forward_context()`` (bf16/fp16 autocast like training).

    Yields:
        An :class:`ExplainGuard`; pass hook handles to ``guard.track`` so they are removed.

    Raises:
        GuardViolation: the body changed a parameter's ``.grad`` (restored before raising).
            Not raised when the body itself raised; its exception propagates unchanged.
    """
    modes = [(m, m.training) for m in module.modules()]
    params = list(module.parameters())
    grads = [p.grad for p in params]
    requires = [p.requires_grad for p in params]
    guard = ExplainGuard()
    py_state = random.getstate()
    np_state = np.random.get_state()
    body_failed = False
    try:
        with ExitStack() as stack:
            device_type, devices = _accelerator_devices(params)
            # fork_rng restores torch's CPU generator and those of the listed devices.
            stack.enter_context(torch.random.fork_rng(devices=devices, device_type=device_type))
            stack.enter_context(torch.inference_mode(False))
            stack.enter_context(torch.enable_grad())
            if trainer is not None:
                stack.enter_context(trainer.precision_plugin.forward_context())
            module.eval()
            try:
                yield guard
            except BaseException:
                body_failed = True
                raise
    finally:
        guard._remove_hooks()
        for m, was_training in modes:
            m.training = was_training
        random.setstate(py_state)
        np.random.set_state(np_state)
        changed = [i for i, p in enumerate(params) if p.grad is not grads[i]]
        for p, g, r in zip(params, grads, requires):
            if p.grad is not g:
                p.grad = g
            if p.requires_grad != r:
                p.requires_grad_(r)
    if changed and not body_failed:
        raise GuardViolation(
            f"the explanation changed .grad of {len(changed)} parameter(s) (restored); "
            "use torch.autograd.grad w.r.t. activations instead of .backward()"
        )


def _accelerator_devices(params: list[nn.Parameter]) -> tuple[str, list[int]]:
    """The non-CPU device type and indices the parameters live on (for ``fork_rng``)."""
    kinds = {p.device.type for p in params if p.device.type != "cpu"}
    if not kinds:
        return "cuda", []
    device_type = sorted(kinds)[0]
    indices = sorted({p.device.index or 0 for p in params if p.device.type == device_type})
    return device_type, indices
