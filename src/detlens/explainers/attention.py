"""Read attention weights out of a model's own forward pass.

Two readers share one hook machinery:

* :class:`AttentionCapture` — a context manager for explanation passes: keeps every
  attention module's weights ``FloatTensor[B, heads, Q, K]`` per module name.
* :class:`EntropyMonitor` — the cheap training-time reader: armed on the training
  forward itself every ``n`` steps, it reduces each attention call to per-head entropy
  sums inside the hook, so no ``[B, h, Q, K]`` tensor outlives the hook.

How ``nn.MultiheadAttention`` weights are read
-----------------------------------------------
``nn.TransformerEncoderLayer``/``DecoderLayer`` call their attention with
``need_weights=False``. Forcing ``need_weights=True`` (a forward pre-hook, the
approach of ``docs/ARCHITECTURE.md``) switches ``F.multi_head_attention_forward`` from
``scaled_dot_product_attention`` to an explicit ``bmm`` + softmax: in the installed
torch the module *output* then differs by ~1e-7 whenever grad is enabled, and in
training mode the dropout on the weights draws from the global RNG differently. That
breaks "training is untouched" (docs/DESIGN.md rule 1). So by default
(``strategy="recompute"``) detlens leaves the call alone and, in a forward hook,
recomputes ``softmax(q k^T / sqrt(d) + mask)`` from the call's own inputs with the
module's own projection weights, under ``no_grad`` and in float32 — exactly the maths
of ``F.multi_head_attention_forward`` (masks, ``bias_k``/``bias_v``,
``add_zero_attn``, separate q/k/v projections), minus dropout. Outputs, gradients and
RNG stay bit-identical. ``strategy="need_weights"`` forces the weights instead (the
module's own numbers, post-dropout in training). A subclass of
``nn.MultiheadAttention`` that overrides ``forward`` cannot be recomputed faithfully and
always uses ``need_weights``; if it still returns no weights it is reported as
:class:`AttentionUnavailable`.

PyTorch's inference fast paths: in the installed torch any hook on a
``TransformerEncoderLayer``'s submodules disables that layer's fused kernel, and
``nn.MultiheadAttention``'s own fast path still calls hooks; ``nn.TransformerEncoder``
in eval + ``no_grad`` with a padding mask turns its input into a NestedTensor, which the
hook handles (weights are padded back to ``[B, h, S, S]`` with zero rows/columns at the
padding, and the padding mask is recorded).

Custom attention modules are read through the probe protocol of
``docs/ARCHITECTURE.md`` (``detlens_attention_probe`` flag, ``last_attention``).
Modules that attend with a fused kernel (``F.scaled_dot_product_attention``,
flash-attn, xformers) and do not implement the protocol are listed by name as
:class:`AttentionUnavailable` (a warning when discovered automatically, an error when
asked for by name) — never silently skipped.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from detlens.adapters.hf_detr import hf_attention_kind, hf_attention_weights
from detlens.explainers.entropy import entropy_sums
from detlens.adapters.modules import named_modules

__all__ = [
    "PROBE_FLAG",
    "AttentionCapture",
    "AttentionUnavailable",
    "AttentionUnavailableWarning",
    "EntropyMonitor",
    "PerImageAttention",
    "PerImageEntropy",
    "find_attention_modules",
    "mha_attention_weights",
]

PROBE_FLAG = "detlens_attention_probe"
_FUSED_MARKERS = ("scaled_dot_product_attention", "flash_attn", "memory_efficient_attention")
_MHA_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)

Strategy = Literal["recompute", "need_weights"]


class AttentionUnavailable(RuntimeError):
    """A module attends but its weights cannot be read; ``.modules`` maps name -> reason."""

    def __init__(self, modules: dict[str, str]) -> None:
        self.modules = dict(modules)
        lines = "\n".join(f"  {name}: {why}" for name, why in self.modules.items())
        super().__init__(f"attention weights are unavailable for {len(self.modules)} module(s):\n{lines}")


class AttentionUnavailableWarning(UserWarning):
    """Warning category for attention modules found but not readable."""


# ----------------------------------------------------------------- discovery
def _is_mha(module: nn.Module) -> bool:
    return isinstance(module, nn.MultiheadAttention)


def _is_probe(module: nn.Module) -> bool:
    return hasattr(module, PROBE_FLAG)


def _is_returning(module: nn.Module) -> bool:
    """A ``transformers`` attention module that returns its weights (see ``detlens.adapters.hf_detr``)."""
    return hf_attention_kind(module) is not None and _returning_reason(module) is None


def _returning_reason(module: nn.Module) -> str | None:
    """Why a ``transformers`` dense attention module returns no weights (not eager), else ``None``."""
    if hf_attention_kind(module) != "dense":
        return None
    implementation = getattr(getattr(module, "config", None), "_attn_implementation", "eager")
    if implementation in (None, "eager"):
        return None
    return (
        f"{type(module).__name__} runs the {implementation!r} attention implementation, which returns no weights; "
        "build or load the transformers model with attn_implementation='eager' to read it"
    )


def _can_recompute(module: nn.Module) -> bool:
    # A subclass that overrides forward may compute something else from the same weights.
    return _is_mha(module) and type(module).forward is nn.MultiheadAttention.forward


def _fused_attention_reason(module: nn.Module) -> str | None:
    """Static check: does the module's own ``forward`` call a fused attention kernel?"""
    cls = type(module)
    if hf_attention_kind(module) is not None:
        return _returning_reason(module)
    if cls.__module__.startswith("torch.") or _is_mha(module) or _is_probe(module):
        return None
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return None
    for marker in _FUSED_MARKERS:
        if marker in source:
            return (
                f"{cls.__name__}.forward calls a fused attention kernel ({marker}) that returns no weights; "
                f"implement the detlens attention probe protocol ({PROBE_FLAG} / last_attention) to read it"
            )
    return None


def find_attention_modules(
    model: nn.Module, modules: list[str] | None = None
) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """Resolve the attention modules of ``model``.

    Args:
        model: any ``nn.Module`` (a LightningModule works; names are relative to it).
        modules: module names (``model.named_modules()`` keys). A name of a container
            (e.g. ``"encoder.layers.0"``) selects every attention module inside it.
            ``None``: every ``nn.MultiheadAttention`` and probe-protocol module.

    Returns:
        ``(readable, unavailable)``: name -> module for modules whose weights can be read,
        and name -> reason for modules that attend with a fused kernel and cannot be read
        (only reported for automatic discovery; see ``AttentionUnavailable``).

    Raises:
        ValueError: a name does not exist (the message lists close matches).
        AttentionUnavailable: a requested name exists but exposes no attention weights.
    """
    named = dict(named_modules(model))
    readable: dict[str, nn.Module] = {}
    unavailable: dict[str, str] = {}
    if modules is None:
        for name, mod in named.items():
            if _is_mha(mod) or _is_probe(mod) or _is_returning(mod):
                readable[name] = mod
            elif (why := _fused_attention_reason(mod)) is not None:
                unavailable[name] = why
        return readable, unavailable

    if isinstance(modules, str):
        raise TypeError(f"modules must be a list of names, got the string {modules!r}")
    refused: dict[str, str] = {}
    for name in modules:
        if name not in named:
            close = difflib.get_close_matches(name, list(named), n=5, cutoff=0.5)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise ValueError(f"module {name!r} not found in {type(model).__name__}.{hint}")
        mod = named[name]
        if _is_mha(mod) or _is_probe(mod) or _is_returning(mod):
            readable[name] = mod
            continue
        inner = {
            f"{name}.{sub}" if name else sub: m
            for sub, m in named_modules(mod)
            if sub and (_is_mha(m) or _is_probe(m) or _is_returning(m))
        }
        if inner:
            readable.update(inner)
        else:
            refused[name] = _fused_attention_reason(mod) or (
                f"{type(mod).__name__} is neither nn.MultiheadAttention nor implements the "
                f"detlens attention probe protocol ({PROBE_FLAG} / last_attention)"
            )
    if refused:
        raise AttentionUnavailable(refused)
    return readable, unavailable


# ------------------------------------------------------------- recomputation
def _bind_mha_call(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    bound = _MHA_SIGNATURE.bind(module, *args, **kwargs)
    bound.apply_defaults()
    return bound.arguments


def _to_batch_first(x: Tensor, batch_first: bool) -> Tensor:
    if x.dim() == 2:  # unbatched [L, E]
        return x.unsqueeze(0)
    return x if batch_first else x.transpose(0, 1)


def _additive(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


def _nested_to_padded(x: Tensor) -> tuple[Tensor, Tensor]:
    """NestedTensor ``[B, (L_i), E]`` -> padded ``[B, Lmax, E]`` and padding mask ``[B, Lmax]``."""
    lengths = [t.shape[0] for t in x.unbind()]
    padded = x.to_padded_tensor(0.0)
    pad = torch.arange(padded.shape[1], device=padded.device)[None, :] >= torch.tensor(
        lengths, device=padded.device
    )[:, None]
    return padded, pad


def _qk_and_mask(
    module: nn.MultiheadAttention,
    query: Tensor,
    key: Tensor,
    key_padding_mask: Tensor | None,
    attn_mask: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """The pieces of ``F.multi_head_attention_forward`` that the weights depend on.

    Returns ``q [B, h, Q, d]`` (already scaled by ``1/sqrt(d)``), ``k [B, h, K', d]``,
    the additive mask ``[B, h|1, Q, K'] | None`` (``K' = K`` plus ``bias_k`` and
    ``add_zero_attn`` keys), and the query padding mask ``[B, Q] | None`` (from a
    NestedTensor input only). Everything in float32.
    """
    query_pad = None
    if query.is_nested:
        query, query_pad = _nested_to_padded(query)
        key, key_pad = _nested_to_padded(key) if key.is_nested else (key, None)
        key_padding_mask = key_pad if key_padding_mask is None else key_padding_mask
        batch_first = True
    else:
        batch_first = module.batch_first
    q_in = _to_batch_first(query, batch_first).float()
    k_in = _to_batch_first(key, batch_first).float()
    e, h = module.embed_dim, module.num_heads
    if module._qkv_same_embed_dim:
        w_q, w_k, _ = module.in_proj_weight.float().chunk(3)
    else:
        w_q, w_k = module.q_proj_weight.float(), module.k_proj_weight.float()
    b_q = b_k = None
    if module.in_proj_bias is not None:
        b_q, b_k, _ = module.in_proj_bias.float().chunk(3)
    q = F.linear(q_in, w_q, b_q)  # [B, Q, E]
    k = F.linear(k_in, w_k, b_k)  # [B, K, E]
    bsz, n_q, n_k = q.shape[0], q.shape[1], k.shape[1]

    mask = _additive(attn_mask, torch.float32)
    if mask is not None:
        mask = mask.view(1, 1, n_q, n_k) if mask.dim() == 2 else mask.view(bsz, h, n_q, n_k)
    kpm = _additive(key_padding_mask, torch.float32)
    if kpm is not None:
        kpm = kpm.view(bsz, 1, 1, n_k)
        mask = kpm if mask is None else mask + kpm

    if module.bias_k is not None:  # one learned extra key, masked by nobody
        k = torch.cat([k, module.bias_k.float().view(1, 1, e).expand(bsz, 1, e)], dim=1)
        if mask is not None:
            mask = F.pad(mask, (0, 1))
    d = e // h
    q = q.view(bsz, n_q, h, d).transpose(1, 2)
    k = k.view(bsz, k.shape[1], h, d).transpose(1, 2)
    if module.add_zero_attn:  # one all-zero key after projection
        k = torch.cat([k, k.new_zeros(bsz, h, 1, d)], dim=2)
        if mask is not None:
            mask = F.pad(mask, (0, 1))
    q = q * math.sqrt(1.0 / float(d))  # same order of operations as F.multi_head_attention_forward
    return q, k, mask, query_pad


def _softmax_rows(q: Tensor, k: Tensor, mask: Tensor | None) -> Tensor:
    """``[B,h,q,d] x [B,h,K,d] -> [B,h,q,K]``; rows with every key masked become zeros."""
    logits = q @ k.transpose(-2, -1)
    if mask is not None:
        logits = logits + mask
    weights = torch.softmax(logits, dim=-1)
    # In place when nothing differentiates through it (saves a [B, h, q, K] copy).
    return weights.nan_to_num(0.0) if weights.requires_grad else weights.nan_to_num_(0.0)


def mha_attention_weights(
    module: nn.MultiheadAttention,
    query: Tensor,
    key: Tensor,
    key_padding_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
) -> Tensor:
    """Per-head attention weights of one ``nn.MultiheadAttention`` call, recomputed.

    Args:
        module: the attention module whose projection weights are used.
        query, key: the call's inputs in the module's layout (``[B, L, E]`` if
            ``batch_first`` else ``[L, B, E]``; ``[L, E]`` unbatched; NestedTensor allowed).
        key_padding_mask: ``[B, K]`` (bool True = ignore, or additive float).
        attn_mask: ``[Q, K]`` or ``[B * heads, Q, K]`` (bool True = not allowed, or additive).

    Returns:
        ``FloatTensor[B, heads, Q, K']`` float32 softmax rows (``K'`` includes ``bias_k``
        / ``add_zero_attn`` keys); rows whose keys are all masked are zero. Differentiable
        if grad is enabled (no dropout is applied).
    """
    q, k, mask, query_pad = _qk_and_mask(module, query, key, key_padding_mask, attn_mask)
    weights = _softmax_rows(q, k, mask)
    if query_pad is not None:
        weights = weights.masked_fill(query_pad[:, None, :, None], 0.0)
    return weights


# ------------------------------------------------------------ hook machinery
class _HookSet:
    """Installs the read hooks; calls ``on_mha`` / ``on_probe`` with what it read.

    ``on_mha(name, module, call)`` gets the bound call arguments (for recomputation) and
    the output; ``on_probe(name, weights)`` the module's ``last_attention``.
    """

    def __init__(
        self,
        model: nn.Module,
        modules: dict[str, nn.Module],
        strategy: Strategy,
        on_weights: Callable[[str, Tensor | None, dict[str, Any]], None],
    ) -> None:
        if strategy not in ("recompute", "need_weights"):
            raise ValueError(f"strategy must be 'recompute' or 'need_weights', got {strategy!r}")
        self.model = model
        self.modules = modules
        self.strategy = strategy
        self.on_weights = on_weights
        self._handles: list[RemovableHandle | _ProbeReaderHandle] = []
        # Sequence length S of the enclosing nn.TransformerEncoder call, to pad weights
        # read from NestedTensor inputs back to [B, h, S, S].
        self._encoder_len: dict[int, int] = {}
        self._encoder_of: dict[str, nn.TransformerEncoder] = {}

    def install(self) -> None:
        try:
            self._install()
        except BaseException:
            self.remove()
            raise

    def _install(self) -> None:
        for enc_name, enc in named_modules(self.model):
            if isinstance(enc, nn.TransformerEncoder):
                prefix = f"{enc_name}." if enc_name else ""
                for name in self.modules:
                    if name.startswith(prefix):
                        self._encoder_of[name] = enc
                if any(n.startswith(prefix) for n in self.modules):
                    self._handles.append(
                        enc.register_forward_pre_hook(self._encoder_pre_hook(enc), with_kwargs=True)
                    )
        for name, mod in self.modules.items():
            if _is_mha(mod):
                force = self.strategy == "need_weights" or not _can_recompute(mod)
                if force:
                    self._handles.append(mod.register_forward_pre_hook(_force_weights, with_kwargs=True))
                self._handles.append(mod.register_forward_hook(self._mha_hook(name, force), with_kwargs=True))
            elif _is_returning(mod):
                self._handles.append(mod.register_forward_hook(self._returned_hook(name)))
            else:
                self._handles.append(_ProbeReaders.add(mod, functools.partial(self._read_probe, name)))

    def remove(self) -> None:
        errors: list[BaseException] = []
        for handle in self._handles:
            try:
                handle.remove()
            except BaseException as exc:  # noqa: BLE001  remove every hook and restore every flag before reporting
                errors.append(exc)
        self._handles.clear()
        self._encoder_len.clear()
        if errors:
            raise errors[0]

    def _encoder_pre_hook(self, enc: nn.Module) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            src = args[0] if args else kwargs["src"]
            first = module.layers[0].self_attn.batch_first if len(module.layers) else True
            self._encoder_len[id(enc)] = src.shape[-2] if (first or src.dim() == 2) else src.shape[0]

        return hook

    def _mha_hook(self, name: str, forced: bool) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            try:
                call = _bind_mha_call(module, args, kwargs)
            except TypeError:  # only reachable for forced subclasses with their own signature
                call = {"query": None, "key": None, "key_padding_mask": None}
            weights = output[1] if forced and isinstance(output, tuple) and len(output) > 1 else None
            if forced and weights is not None and weights.dim() == 3:  # unbatched [h, Q, K]
                weights = weights.unsqueeze(0)
            enc = self._encoder_of.get(name)
            call["_sequence_length"] = self._encoder_len.get(id(enc)) if enc is not None else None
            call["_forced"] = forced
            self.on_weights(name, weights, call)

        return hook

    def _returned_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            self.on_weights(name, hf_attention_weights(module, output), {"_probe": True, "_returned": True})

        return hook

    def _read_probe(self, name: str, weights: Tensor | None) -> None:
        self.on_weights(name, weights, {"_probe": True})


class _ProbeReaders:
    """Every reader of one probe-protocol module, sharing one forward hook and one flag.

    Readers may overlap (two entropy monitors armed on the same step, a capture inside a
    monitored step) and be removed in any order: the flag is on while any reader is
    installed and returns to its value before the first one when the last one leaves;
    each call's ``last_attention`` is handed to every reader and then, unless the flag was
    on before detlens, dropped (so no ``[B, h, HW, HW]`` tensor lives between calls).
    """

    _by_module: dict[int, _ProbeReaders] = {}  # id(module) -> state (holds the module)

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.was_on = bool(getattr(module, PROBE_FLAG))
        self.readers: dict[int, Callable[[Tensor | None], None]] = {}
        self._next = 0
        self._hook = module.register_forward_hook(self._on_forward)
        setattr(module, PROBE_FLAG, True)

    @classmethod
    def add(cls, module: nn.Module, read: Callable[[Tensor | None], None]) -> _ProbeReaderHandle:
        state = cls._by_module.get(id(module))
        if state is None:
            state = cls._by_module[id(module)] = cls(module)
        key, state._next = state._next, state._next + 1
        state.readers[key] = read
        return _ProbeReaderHandle(state, key)

    def _on_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        try:
            weights = getattr(module, "last_attention", None)
            for read in list(self.readers.values()):
                read(weights)
        finally:
            if not self.was_on:
                module.last_attention = None

    def discard(self, key: int) -> None:
        self.readers.pop(key, None)
        if self.readers or _ProbeReaders._by_module.get(id(self.module)) is not self:
            return
        del _ProbeReaders._by_module[id(self.module)]
        self._hook.remove()
        setattr(self.module, PROBE_FLAG, self.was_on)
        if not self.was_on:  # the protocol: readers clear the stored tensor when done
            self.module.last_attention = None


class _ProbeReaderHandle:
    """``remove()`` takes one reader off its :class:`_ProbeReaders` (idempotent)."""

    def __init__(self, state: _ProbeReaders, key: int) -> None:
        self._state: _ProbeReaders | None = state
        self._key = key

    def remove(self) -> None:
        state, self._state = self._state, None
        if state is not None:
            state.discard(self._key)


def _force_weights(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    # need_weights / average_attn_weights are args 5 and 7 of MHA.forward; move them to kwargs.
    try:
        call = _bind_mha_call(module, args, kwargs)
    except TypeError:  # a subclass with its own signature: leave the call alone
        return None
    call.pop("self")
    call["need_weights"] = True
    call["average_attn_weights"] = False
    return (), call


def _pad_to(weights: Tensor, length: int | None) -> Tensor:
    """Zero-pad ``[B, h, Lq, Lk]`` read from a NestedTensor call to ``[B, h, S, S]``."""
    if length is None:
        return weights
    return F.pad(weights, (0, length - weights.shape[-1], 0, length - weights.shape[-2]))


def _padding_masks(call: dict[str, Any], weights: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """``(key_padding [B, K], query_padding [B, Q])`` of a call (bool, True = padding)."""
    query, key = call.get("query"), call.get("key")
    b, _, n_q, n_k = weights.shape
    if query is not None and query.is_nested:
        lengths = torch.tensor([t.shape[0] for t in query.unbind()], device=weights.device)
        pad = torch.arange(n_k, device=weights.device)[None, :] >= lengths[:, None]
        return pad, pad[:, :n_q]
    kpm = call.get("key_padding_mask")
    if kpm is None:
        return None, None
    kpm = kpm if kpm.dtype == torch.bool else torch.isinf(kpm)
    kpm = kpm.reshape(b, -1).to(weights.device)
    if kpm.shape[1] != n_k:  # bias_k / add_zero_attn keys are never padding
        kpm = F.pad(kpm, (0, n_k - kpm.shape[1]), value=False)
    self_attention = query is key
    return kpm, (kpm if self_attention and n_q == kpm.shape[1] else None)


# -------------------------------------------------------------- the readers
class AttentionCapture:
    """Capture per-head attention weights of every attention module during a forward.

    ```python
    with AttentionCapture(model) as cap:
        model(images)
    cap.weights["encoder.layers.0.self_attn"]  # FloatTensor[B, heads, Q, K]
    ```

    Args:
        model: the model (or a LightningModule); names are ``model.named_modules()`` keys.
        modules: names of attention modules or of containers holding them; ``None`` =
            every ``nn.MultiheadAttention`` and probe-protocol module.
        detach: detach the weights (default). With ``False`` and grad enabled the
            recomputed weights are differentiable w.r.t. the inputs and projection weights.
        to_cpu: move captured weights to CPU as they arrive (frees accelerator memory).
        strategy: ``"recompute"`` (default; outputs bit-identical) or ``"need_weights"``
            (force the module to return its weights); see the module docstring.
        on_unavailable: ``"warn"`` (default) or ``"raise"`` for modules that attend with a
            fused kernel and cannot be read (always an error for modules requested by name).

    Attributes (filled during the ``with`` block; the last call of each module wins):
        weights: name -> ``FloatTensor[B, heads, Q, K]`` (float32).
        key_padding_masks / query_padding_masks: name -> ``BoolTensor[B, K] / [B, Q]``
            (True = padding) or ``None``.
        num_calls: name -> how many times the module ran.
        unavailable: name -> reason, for attention modules that cannot be read.

    Hooks are removed and probe flags restored on exit, even if the forward raised.
    """

    def __init__(
        self,
        model: nn.Module,
        modules: list[str] | None = None,
        *,
        detach: bool = True,
        to_cpu: bool = False,
        strategy: Strategy = "recompute",
        on_unavailable: Literal["warn", "raise"] = "warn",
    ) -> None:
        if on_unavailable not in ("warn", "raise"):
            raise ValueError(f"on_unavailable must be 'warn' or 'raise', got {on_unavailable!r}")
        self.model = model
        self.detach = detach
        self.to_cpu = to_cpu
        self.on_unavailable = on_unavailable
        self.modules, self.unavailable = find_attention_modules(model, modules)
        self._hooks = _HookSet(model, self.modules, strategy, self._on_weights)
        self.weights: dict[str, Tensor] = {}
        self.key_padding_masks: dict[str, Tensor | None] = {}
        self.query_padding_masks: dict[str, Tensor | None] = {}
        self.num_calls: dict[str, int] = {}

    def __enter__(self) -> AttentionCapture:
        for name in [n for n in self.unavailable if n in self.modules]:
            del self.unavailable[name]  # runtime findings of a previous capture
        if self.unavailable:
            if self.on_unavailable == "raise":
                raise AttentionUnavailable(self.unavailable)
            warnings.warn(str(AttentionUnavailable(self.unavailable)), AttentionUnavailableWarning, stacklevel=2)
        self.clear()
        self._hooks.install()
        return self

    def clear(self) -> None:
        """Forgets what earlier forwards recorded (weights, padding masks, call counts)."""
        self.weights.clear()
        self.key_padding_masks.clear()
        self.query_padding_masks.clear()
        self.num_calls.clear()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._hooks.remove()
        if exc_type is None:
            missing = {n: r for n, r in self.unavailable.items() if n in self.modules}
            if missing:  # forced modules that returned no weights (found during the forward)
                if self.on_unavailable == "raise":
                    raise AttentionUnavailable(missing)
                warnings.warn(str(AttentionUnavailable(missing)), AttentionUnavailableWarning, stacklevel=2)

    def _on_weights(self, name: str, weights: Tensor | None, call: dict[str, Any]) -> None:
        self.num_calls[name] = self.num_calls.get(name, 0) + 1
        module = self.modules[name]
        if call.get("_probe"):
            if weights is None or weights.dim() != 4:
                self.unavailable[name] = (
                    f"{type(module).__name__} returned no attention weights: load or build the transformers model "
                    "with attn_implementation='eager'" if call.get("_returned") else
                    f"{type(module).__name__} has {PROBE_FLAG} but stored no last_attention "
                    f"[B, heads, Q, K] (got {None if weights is None else tuple(weights.shape)})"
                )
                return
            kpm = qpm = None
        elif call["_forced"]:
            if weights is None:
                self.unavailable[name] = (
                    f"{type(module).__name__} returned no attention weights although need_weights=True "
                    "was forced (fused attention in an overridden forward)"
                )
                return
            kpm, qpm = _padding_masks(call, weights)
        else:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.detach):
                weights = mha_attention_weights(
                    module, call["query"], call["key"], call["key_padding_mask"], call["attn_mask"]
                )
            kpm, qpm = _padding_masks(call, weights)
        length = call.get("_sequence_length") if call.get("query") is not None and call["query"].is_nested else None
        weights = _pad_to(weights.float(), length)
        if kpm is not None and length is not None:
            kpm = F.pad(kpm, (0, length - kpm.shape[1]), value=True)
            qpm = kpm
        if self.detach:
            weights = weights.detach()
        if self.to_cpu:
            weights = weights.cpu()
            kpm = None if kpm is None else kpm.cpu()
            qpm = None if qpm is None else qpm.cpu()
        self.weights[name] = weights
        self.key_padding_masks[name] = kpm
        self.query_padding_masks[name] = qpm


class EntropyMonitor:
    """Per-layer/head attention entropy read from the training forward itself.

    ```python
    monitor = EntropyMonitor(model)
    monitor.arm()            # e.g. on_train_batch_start, every n steps
    loss = model(batch)      # the normal training forward; no extra forward
    monitor.disarm()         # e.g. on_before_backward / on_train_batch_end
    monitor.collect()        # {"encoder.layers.0.self_attn": FloatTensor[heads], ...}
    ```

    Each attention call is reduced inside the hook to per-head sums of normalised row
    entropy (see :func:`detlens.explainers.entropy.attention_entropy`); the weights are
    computed in query chunks of at most ``chunk_elements`` scores, under ``no_grad`` in
    float32, and dropped. For ``nn.MultiheadAttention`` the weights are recomputed from
    the call's inputs (module docstring), so parameters, gradients and the RNG stream are
    bit-identical to an unmonitored step. A probe-protocol module computes its weights
    itself once its flag is on; keeping its output unchanged meanwhile is the module's
    business (``SpatialSelfAttention`` computes the softmax beside its fused SDPA call,
    which still makes the output).

    Disarm before ``backward`` if the model uses activation checkpointing, or the
    re-run forward is counted again.

    Args:
        model: the model; names are ``model.named_modules()`` keys.
        modules: as for :class:`AttentionCapture`.
        chunk_elements: cap on ``B * heads * rows * K`` scores held at once.
    """

    def __init__(self, model: nn.Module, modules: list[str] | None = None, *, chunk_elements: int = 1 << 24) -> None:
        if chunk_elements < 1:
            raise ValueError(f"chunk_elements must be positive, got {chunk_elements}")
        self.model = model
        self.chunk_elements = chunk_elements
        self.modules, self.unavailable = find_attention_modules(model, modules)
        self._hooks = _HookSet(model, self.modules, "recompute", self._on_weights)
        self._sums: dict[str, tuple[Tensor, Tensor]] = {}  # name -> ([B, heads], [B])
        self._mixed: set[str] = set()  # modules called with different batch sizes
        self._armed = False

    @property
    def names(self) -> list[str]:
        """Names of the monitored modules, in model order."""
        return list(self.modules)

    @property
    def armed(self) -> bool:
        return self._armed

    @property
    def changes_inference_forward(self) -> bool:
        """Whether arming changes the numbers of an eval-mode forward: a watched
        ``nn.MultiheadAttention`` is the self-attention of an ``nn.TransformerEncoderLayer``,
        whose fused inference kernel any hook turns off (outputs then differ by ~1e-5). A
        training forward is never affected (no fused kernel in training), nor are other
        ``nn.MultiheadAttention`` calls or probe-protocol modules."""
        watched = {id(m) for m in self.modules.values()}
        return any(
            isinstance(layer, nn.TransformerEncoderLayer) and id(getattr(layer, "self_attn", None)) in watched
            for _, layer in named_modules(self.model)
        )

    def arm(self) -> None:
        """Install the hooks (idempotent). Entropies accumulate until :meth:`collect`."""
        if not self._armed:
            self._hooks.install()
            self._armed = True

    def disarm(self) -> None:
        """Remove the hooks and restore probe flags (idempotent, safe in ``finally``)."""
        if self._armed:
            self._armed = False
            self._hooks.remove()

    @contextmanager
    def armed_for(self) -> Iterator[EntropyMonitor]:
        """``with monitor.armed_for(): loss = model(batch)`` — arm, then always disarm."""
        self.arm()
        try:
            yield self
        finally:
            self.disarm()

    def collect_sums(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Name -> ``(entropy_sum [heads], row_count [])`` accumulated since the last collect,
        for summing across ranks before dividing; resets the accumulators."""
        sums, self._sums = self._sums, {}
        self._mixed.clear()
        return {k: (s.sum(0).cpu(), n.sum(0).cpu()) for k, (s, n) in sums.items()}

    def collect_per_image(self, batch_size: int) -> list[dict[str, tuple[Tensor, Tensor]]] | None:
        """What :meth:`collect_sums` would have returned for each image of a batched forward
        alone: ``batch_size`` dicts name -> ``(entropy_sum [heads], row_count [])``, image
        ``b`` the ``b``-th element of every call's batch. ``None`` if some watched module was
        called with another batch size (its batch dimension is not the images). Resets.

        Only the caller knows whether batching changed what an image's attention saw
        (padding to a common size does); equal image sizes in the batch are the safe case.
        """
        sums, mixed = self._sums, bool(self._mixed)
        self._sums = {}
        self._mixed.clear()
        if mixed or any(s.shape[0] != batch_size for s, _ in sums.values()):
            return None
        return [{k: (s[b].cpu(), n[b].cpu()) for k, (s, n) in sums.items()} for b in range(batch_size)]

    def collect(self) -> dict[str, Tensor]:
        """Name -> mean normalised entropy per head ``FloatTensor[heads]`` (CPU, in [0, 1])
        over every row seen since the last collect; resets. Modules that did not run
        are absent."""
        return {k: s / n.clamp(min=1) for k, (s, n) in self.collect_sums().items()}

    def _on_weights(self, name: str, weights: Tensor | None, call: dict[str, Any]) -> None:
        module = self.modules[name]
        with torch.no_grad(), torch.autocast(device_type=_device_type(module, weights), enabled=False):
            if call.get("_probe") or call.get("_forced"):
                if weights is None or weights.dim() != 4:
                    self.unavailable[name] = f"{type(module).__name__} produced no attention weights" + (
                        " (a transformers model returns them under attn_implementation='eager')"
                        if call.get("_returned") else "")
                    return
                kpm, qpm = _padding_masks(call, weights) if not call.get("_probe") else (None, None)
                s, n = entropy_sums(weights.detach().float(), kpm, qpm, per_image=True)
            else:
                s, n = self._recompute_sums(module, call)
        # Kept per batch element ([B, heads], [B]) for collect_per_image; calls of one module
        # with different batch sizes are pooled into one row.
        prev = self._sums.get(name)
        if prev is not None and prev[0].shape[0] != s.shape[0]:
            self._mixed.add(name)
        if name in self._mixed:
            s, n = s.sum(0, keepdim=True), n.sum(0, keepdim=True)
            if prev is not None:
                prev = (prev[0].sum(0, keepdim=True), prev[1].sum(0, keepdim=True))
        self._sums[name] = (s, n) if prev is None else (prev[0] + s, prev[1] + n)

    def _recompute_sums(self, module: nn.MultiheadAttention, call: dict[str, Any]) -> tuple[Tensor, Tensor]:
        q, k, mask, query_pad = _qk_and_mask(
            module, call["query"], call["key"], call["key_padding_mask"], call["attn_mask"]
        )
        b, h, n_q, _ = q.shape
        n_k = k.shape[2]
        probe = torch.empty(b, h, 1, n_k, device=q.device)
        kpm, qpm = _padding_masks(call, probe.expand(b, h, n_q, n_k))
        if query_pad is not None:
            qpm = query_pad
        rows = max(1, self.chunk_elements // max(1, b * h * n_k))
        total_s = q.new_zeros(b, h)
        total_n = q.new_zeros(b)
        for start in range(0, n_q, rows):
            sl = slice(start, start + rows)
            m = None if mask is None else (mask if mask.shape[2] == 1 else mask[:, :, sl])
            w = _softmax_rows(q[:, :, sl], k, m)
            s, n = entropy_sums(w, kpm, None if qpm is None else qpm[:, sl], per_image=True)
            total_s += s
            total_n += n
        return total_s, total_n


class PerImageEntropy:
    """Per-image attention entropy sums of a batched eval forward, read while it runs: a
    :class:`~detlens.adapters.observe.ForwardReader` for
    :class:`~detlens.adapters.observe.ForwardObserver` (``readers={"entropy": PerImageEntropy(monitor)}``).

    :meth:`read` returns, per image, what ``monitor.collect_sums()`` gives after a forward of
    that image alone, or ``None`` when that cannot be read from this batch: images of
    different sizes (padding to a common size changes what an image's attention sees), or
    a watched module whose batch dimension is not the images
    (:meth:`EntropyMonitor.collect_per_image`). The caller then runs the images alone.
    Check :attr:`EntropyMonitor.changes_inference_forward` before reading a forward whose
    outputs must not change.

    Args:
        monitor: the monitor to arm while observing (not armed by anyone else meanwhile).
    """

    def __init__(self, monitor: EntropyMonitor) -> None:
        self.monitor = monitor

    def install(self) -> list[Any]:
        self.monitor.collect_sums()  # drop anything read before
        self.monitor.arm()
        return [self]

    def remove(self) -> None:
        """Disarms the monitor (the observer's handle)."""
        self.monitor.disarm()
        self.monitor.collect_sums()

    def reset(self) -> None:
        self.monitor.collect_sums()

    def read(self, images: list[Tensor]) -> list[dict[str, tuple[Tensor, Tensor]]] | None:
        """``[{module name: (entropy_sum [heads], row_count [])}]``, one per image, or ``None``."""
        if not _one_size(images):
            self.monitor.collect_sums()
            return None
        return self.monitor.collect_per_image(len(images))


class PerImageAttention:
    """Per-image attention weights of a batched eval forward, read while it runs: a
    :class:`~detlens.adapters.observe.ForwardReader` for
    :class:`~detlens.adapters.observe.ForwardObserver`
    (``readers={"attention": PerImageAttention(model, names)}``).

    :meth:`read` returns, per image, ``{module name: (weights [heads, Q, K], grid (h, w))}``:
    what :class:`AttentionCapture` records for that image and the spatial size of the
    module's ``[B, C, h, w]`` output. ``None`` when that cannot be read from this batch:
    images of different sizes (padding to a common size changes what an image's attention
    sees), or a module that did not run exactly once with the images as its batch. Only for
    modules whose weights can be read without changing their outputs (probe-protocol
    blocks; not the self-attention of an ``nn.TransformerEncoderLayer``, see
    :attr:`EntropyMonitor.changes_inference_forward`). Memory: each module's weights of the
    whole batch (``[B, heads, Q, K]``, float32, on the model's device) are kept from the
    module's call until the observer lets go of the call (the end of that validation batch
    in detlens' callbacks), as :class:`AttentionCapture` keeps them for a forward of its
    own; the block itself materialises the same matrix in its forward.

    Args:
        model: the network the names are relative to.
        modules: names of the attention modules to read.

    Raises:
        AttentionUnavailable: on install, a module whose weights cannot be read.
    """

    def __init__(self, model: nn.Module, modules: list[str]) -> None:
        self.capture = AttentionCapture(model, modules, on_unavailable="raise")
        self._grids: dict[str, tuple[int, int] | None] = {}

    def install(self) -> list[Any]:
        self.capture.__enter__()
        handles: list[Any] = [self]
        for name, module in self.capture.modules.items():
            handles.append(module.register_forward_hook(functools.partial(self._record_grid, name)))
        return handles

    def remove(self) -> None:
        """Takes the capture's hooks off (the observer's handle)."""
        try:
            self.capture.__exit__(None, None, None)
        except AttentionUnavailable:  # found during a forward: that read already returned None
            pass
        self.reset()

    def reset(self) -> None:
        self.capture.clear()
        self._grids.clear()

    def _record_grid(self, name: str, module: nn.Module, args: Any, output: Any) -> None:
        out = output[0] if isinstance(output, (tuple, list)) else output
        self._grids[name] = (int(out.shape[-2]), int(out.shape[-1])) if isinstance(out, Tensor) and out.dim() == 4 else None

    def read(self, images: list[Tensor]) -> list[dict[str, tuple[Tensor, tuple[int, int]]]] | None:
        """``[{module name: (weights [heads, Q, K], (h, w))}]``, one per image, or ``None``."""
        if not _one_size(images):
            return None
        found: dict[str, tuple[Tensor, tuple[int, int]]] = {}
        for name in self.capture.modules:
            weights, grid = self.capture.weights.get(name), self._grids.get(name)
            if weights is None or grid is None or self.capture.num_calls.get(name) != 1 or weights.shape[0] != len(images):
                return None
            found[name] = (weights, grid)
        return [{name: (weights[b], grid) for name, (weights, grid) in found.items()} for b in range(len(images))]


def _one_size(images: list[Tensor]) -> bool:
    """Whether every image has one shape: a batch read per image only then (padding to a
    common size changes what an image's attention sees)."""
    return len({tuple(image.shape) for image in images}) == 1


def _device_type(module: nn.Module, weights: Tensor | None) -> str:
    if weights is not None:
        return weights.device.type
    param = next(module.parameters(), None)
    return param.device.type if param is not None else "cpu"
