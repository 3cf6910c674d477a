"""``AttentionEntropyCallback``: attention entropy per layer and head, over training and on the probe set.

Two sources, one set of stable keys (``<log_key>`` defaults to ``attention``):

* **Training batches** (every ``every_n_train_steps`` optimiser steps): an
  :class:`~detlens.explainers.attention.EntropyMonitor` is armed at
  ``on_train_batch_start`` and disarmed before ``backward``, so the training forward
  itself is read — no extra forward, no hooks on the other steps.
  ``nn.MultiheadAttention`` weights are recomputed from the call's inputs under
  ``no_grad``, so training stays bit-identical; a probe-protocol block must keep its
  output unchanged while armed (``SpatialSelfAttention`` computes its softmax beside the
  fused SDPA call that still makes its output, also under bf16 autocast).
  Logged: ``<log_key>/entropy/<layer>/head<i>``.
  **DDP**: every rank sends its entropy sums and row counts to rank 0 (one gather on
  every rank at the same, counter-determined steps; never inside a rank-zero branch),
  which logs the mean over *all ranks' rows* — the same number a single process would
  log for the global batch — once, to the one W&B run.
* **The probe set** (the :class:`~detlens.callbacks.base.ProbeCallback` cadence): each
  probe image's entropy is what a forward of that image alone in eval mode gives (so the
  numbers do not depend on how the probe set is batched or sharded over ranks). A probe
  image the epoch's validation loop runs is read from that forward
  (:class:`~detlens.explainers.attention.PerImageEntropy`: per-image sums), when its batch
  holds images of one size only (no padding to a common size) and reading cannot change
  the validation outputs (not for ``nn.TransformerEncoderLayer`` self-attention, whose
  fused inference kernel hooks turn off: see
  :attr:`~detlens.explainers.attention.EntropyMonitor.changes_inference_forward`); the
  others are run alone at the epoch's end. Logged:
  ``<log_key>/entropy_probe/<layer>/head<i>`` and ``<log_key>/entropy_heatmap`` (a layer x
  head image).

Learnable temperatures: every watched block whose softmax temperature trains
(``SpatialSelfAttention(temperature="learnable")``: ``learnable_temperature`` and
``temperature`` of the probe protocol) has its ``T`` logged as
``<log_key>/temperature/<block>`` with the training readings (the probe readings when
``every_n_train_steps`` is ``None``), read from the parameter on rank 0 (DDP keeps it equal
on every rank), and written into the focus record's entropy entries.

Collapse: a :class:`~detlens.explainers.entropy.CollapseDetector` watches the training
entropies (the probe entropies when ``every_n_train_steps`` is ``None``) and the learnable
temperatures. When a layer/head's entropy, or a block's temperature (``T`` running towards
0 sharpens every row: an early sign of collapse), falls by more than ``drop_fraction`` of
its maximum within ``window`` readings it warns in the log, sends a ``wandb.alert`` if the
W&B run is online (never offline or disabled), and logs ``<log_key>/collapse`` (1 while
any head or temperature is flagged, else 0), ``<log_key>/collapsed_heads`` (how many
heads) and, with learnable temperatures, ``<log_key>/collapsed_temperatures`` with every
reading. Its history is in the callback's ``state_dict``, so a resumed run keeps watching
the same window.
"""

from __future__ import annotations

import functools
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn

from detlens.adapters import DetectorAdapter
from detlens.adapters.observe import ForwardObserver, ObservedForward
from detlens.callbacks.attention_maps import no_attention_error
from detlens.callbacks.base import ProbeCallback, ProbeResult
from detlens.callbacks.focus import FocusRecorder, record_entropy
from detlens.distributed import RankError, gather_to_rank_zero
from detlens.explainers.attention import (
    AttentionUnavailableWarning,
    EntropyMonitor,
    PerImageEntropy,
    find_attention_modules,
)
from detlens.explainers.entropy import CollapseDetector, entropy_metrics
from detlens.adapters.modules import named_modules
from detlens.render.media_jobs import entropy_heatmap_media
from detlens.sinks import log_media, log_media_later
from detlens.sinks.online import is_online

__all__ = ["AttentionEntropyCallback"]

Sums = dict[str, tuple[Tensor, Tensor]]  # module name -> (entropy sum [heads], row count [])
_TEMPERATURE = "temperature/"  # collapse-detector keys of learnable temperatures


class AttentionEntropyCallback(ProbeCallback):
    """Logs normalised attention entropy (1 = uniform, 0 = one key) per layer and head.

    See the module docstring for what is logged when, and how DDP is handled.

    Args:
        every_n_train_steps: read the training forward every ``n`` optimiser steps
            (steps ``0, n, 2n, ...``; the first micro-batch of a step under gradient
            accumulation); ``None`` = probe set only.
        modules: attention modules to watch, as names in the LightningModule (e.g.
            ``"model.encoder.layers.0.self_attn"``) or in its ``.model`` network
            (``"encoder.layers.0.self_attn"``); a container name selects every attention
            module inside. ``None`` = every ``nn.MultiheadAttention`` and probe-protocol
            module. Log keys use the name inside ``.model``.
        drop_fraction, window, min_history: the collapse detector's thresholds (see
            :class:`~detlens.explainers.entropy.CollapseDetector`).
        alert: send a ``wandb.alert`` on a new collapse when the W&B run is online.
        every_n_epochs, every_n_steps, num_probe_images, probe_indices, probe_dir, log_key, adapter, model_attr:
            the probe-set cadence and keys, and how the detector is found and run on the probe
            images (through its adapter when the module has no detlens-style ``forward(images)``),
            see :class:`~detlens.callbacks.base.ProbeCallback`.

    Raises:
        ValueError: bad arguments; at ``setup``: a model without readable attention (the
            message names the model class and what is looked for), an unknown module name.
    """

    def __init__(
        self,
        every_n_train_steps: int | None = 50,
        modules: list[str] | None = None,
        drop_fraction: float = 0.5,
        window: int = 5,
        min_history: int = 3,
        alert: bool = True,
        every_n_epochs: int | None = 1,
        every_n_steps: int | None = None,
        num_probe_images: int = 4,
        probe_indices: list[int] | None = None,
        probe_dir: str | None = None,
        log_key: str = "attention",
        adapter: dict[str, Any] | DetectorAdapter | None = None,
        model_attr: str | None = None,
    ) -> None:
        super().__init__(
            every_n_epochs=every_n_epochs,
            every_n_steps=every_n_steps,
            num_probe_images=num_probe_images,
            probe_indices=probe_indices,
            probe_dir=probe_dir,
            adapter=adapter,
            model_attr=model_attr,
            log_key=log_key,
        )
        self.focus_recorder = FocusRecorder()  # the run's focus record, if this is its first recording callback
        name = type(self).__name__
        if every_n_train_steps is not None and (not isinstance(every_n_train_steps, int) or every_n_train_steps < 1):
            raise ValueError(f"{name}: every_n_train_steps must be a positive int or None, got {every_n_train_steps!r}")
        if modules is not None:
            if isinstance(modules, str):
                raise ValueError(f"{name}: modules must be a list of module names, got the string {modules!r}")
            modules = [str(m) for m in modules]
            if not modules:
                raise ValueError(f"{name}: modules is empty; give module names or None (every attention module)")
        try:
            self.collapse = CollapseDetector(drop_fraction=drop_fraction, window=window, min_history=min_history)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from err
        self.every_n_train_steps = every_n_train_steps
        self.modules = modules
        self.alert = bool(alert)
        self._train_monitor: EntropyMonitor | None = None
        self._probe_monitor: EntropyMonitor | None = None
        self._display: dict[str, str] = {}  # module name in the LightningModule -> name in logs
        self._temperature_blocks: dict[str, nn.Module] = {}  # name in logs -> block with a learnable temperature
        self._armed_step: int | None = None
        self._last_train_step = -1

    # ------------------------------------------------------------------ setup / teardown
    @property
    def watched_layers(self) -> list[str]:
        """The watched modules as named in the log keys (empty before ``setup``)."""
        return list(self._display.values())

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._attach(pl_module)
        super().setup(trainer, pl_module, stage)

    def _attach(self, pl_module: nn.Module) -> None:
        who = type(self).__name__
        names = None if self.modules is None else [_resolve_name(pl_module, n, who) for n in self.modules]
        readable, unavailable = find_attention_modules(pl_module, names)
        if not readable:
            raise no_attention_error(who, pl_module, unavailable)
        if unavailable:
            rank_zero_warn(
                f"[detlens] {who}: not watching {len(unavailable)} attention module(s) whose weights cannot be read: "
                + "; ".join(f"{n}: {why}" for n, why in unavailable.items()),
                category=AttentionUnavailableWarning,
            )
        for monitor in (self._train_monitor, self._probe_monitor):
            if monitor is not None:
                monitor.disarm()
        watched = list(readable)
        self._train_monitor = EntropyMonitor(pl_module, watched)
        self._probe_monitor = EntropyMonitor(pl_module, watched)
        strip = "model." if isinstance(getattr(pl_module, "model", None), nn.Module) else ""
        self._display = {n: n[len(strip):] if strip and n.startswith(strip) else n for n in watched}
        self._temperature_blocks = {
            self._display[n]: m for n, m in readable.items() if getattr(m, "learnable_temperature", False) is True
        }

    @property
    def temperature_blocks(self) -> list[str]:
        """The watched blocks with a learnable temperature, as named in the log keys."""
        return list(self._temperature_blocks)

    def temperatures(self) -> dict[str, float]:
        """Each learnable temperature's current ``T`` by block name (in the log keys)."""
        return {name: float(block.temperature) for name, block in self._temperature_blocks.items()}

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._disarm_all()
        super().teardown(trainer, pl_module, stage)
        self.focus_recorder.publish(trainer)  # online runs: the focus record as a W&B artifact

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._disarm_all()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._disarm_all()
        super().on_exception(trainer, pl_module, exception)

    def _disarm_all(self) -> None:
        for monitor in (self._train_monitor, self._probe_monitor):
            if monitor is not None:
                monitor.disarm()
        self._armed_step = None

    # ------------------------------------------------------------------ training forward
    def _train_due(self, trainer: pl.Trainer) -> bool:
        step = trainer.global_step
        return (
            self.every_n_train_steps is not None
            and not trainer.sanity_checking
            and not trainer.fast_dev_run
            and step % self.every_n_train_steps == 0
            and step != self._last_train_step
        )

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._train_monitor is None:
            self._attach(pl_module)
        if self._train_due(trainer):
            assert self._train_monitor is not None
            self._armed_step = trainer.global_step
            self._train_monitor.arm()

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        # The forward is over: backward (and an activation-checkpointing re-forward) runs unwatched.
        if self._train_monitor is not None:
            self._train_monitor.disarm()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any) -> None:
        if self._armed_step is not None:
            self._log_training_entropy(trainer)
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)

    def _log_training_entropy(self, trainer: pl.Trainer) -> None:
        step, self._armed_step = self._armed_step, None
        assert self._train_monitor is not None and step is not None
        payload: Sums | RankError
        try:
            self._train_monitor.disarm()
            payload = self._train_monitor.collect_sums()
        except Exception as err:  # noqa: BLE001 - the gather below must still be joined
            payload = RankError(trainer.global_rank, f"{type(err).__name__}: {err}")
        gathered = gather_to_rank_zero(payload, trainer.strategy)  # every rank, same steps
        self._last_train_step = step
        if not trainer.is_global_zero or gathered is None:
            return
        errors = [p for p in gathered if isinstance(p, RankError)]
        if errors:
            rank_zero_warn(
                f"[detlens] {type(self).__name__} skipped the entropy of step {step}: "
                + "; ".join(f"rank {e.rank}: {e.message}" for e in errors)
            )
            return
        entropies = self._mean(gathered)
        if not entropies:
            return
        temperatures = self.temperatures()
        scalars = entropy_metrics(entropies, prefix=self.key("entropy"))
        scalars.update({self.key(f"temperature/{name}"): t for name, t in temperatures.items()})
        if self.every_n_train_steps is not None:
            scalars.update(self._watch_collapse(trainer, step, entropies, temperatures))
        log_media(trainer, scalars=scalars, step=step)
        record_entropy(self, trainer, entropies, origin="train", step=step, temperatures=temperatures)  # focus record

    # ------------------------------------------------------------------ probe set
    def _probe_monitor_of(self, pl_module: pl.LightningModule) -> EntropyMonitor:
        if self._probe_monitor is None:
            self._attach(pl_module)
        assert self._probe_monitor is not None
        return self._probe_monitor

    reads_validation_forward = True

    def validation_observer(self, pl_module: pl.LightningModule) -> ForwardObserver | None:
        monitor = self._probe_monitor_of(pl_module)
        if monitor.changes_inference_forward:  # the validation outputs must not change
            return None
        return ForwardObserver(pl_module, readers={"entropy": PerImageEntropy(monitor)})

    def from_validation(self, call: ObservedForward, position: int, target: dict[str, Any]) -> Sums:
        per_image = call.read.get("entropy")
        if per_image is None:  # e.g. images of several sizes: the probe forward runs this image alone
            raise RuntimeError("the validation batch cannot be read per image")
        return per_image[position]

    def explain_shard(
        self, pl_module: pl.LightningModule, images: list[Tensor], targets: list[dict[str, Any]], indices: list[int]
    ) -> list[Sums]:
        monitor = self._probe_monitor_of(pl_module)
        adapter = self.detector_adapter(pl_module) if self.runs_through_adapter(pl_module) else None
        results = []
        with torch.no_grad():  # entropies only: no graph
            for image in images:  # one image per forward: independent of batching and sharding
                with monitor.armed_for():
                    if adapter is None:
                        pl_module([image])
                    else:
                        adapter.run([image], [], with_grad=False)
                results.append(monitor.collect_sums())
        return results

    def log_results(self, trainer: pl.Trainer, pl_module: pl.LightningModule, results: list[ProbeResult]) -> None:
        entropies = self._mean([r.value for r in results])
        if not entropies:
            return
        step = self.model_step(trainer)
        temperatures = self.temperatures()
        scalars = entropy_metrics(entropies, prefix=self.key("entropy_probe"))
        if self.every_n_train_steps is None:
            scalars.update({self.key(f"temperature/{name}"): t for name, t in temperatures.items()})
            scalars.update(self._watch_collapse(trainer, step, entropies, temperatures))
        title = f"attention entropy · probe set ({len(results)} images) · step {step}"
        caption = f"probe set, {len(results)} images · step {step}"
        # The matplotlib heatmap (~0.25 s) is drawn by detlens' media worker (process or thread).
        build = functools.partial(
            entropy_heatmap_media, entropies, key=self.key("entropy_heatmap"), title=title, caption=caption,
            scalars=scalars,
        )
        log_media_later(trainer, build, step=step)
        record_entropy(self, trainer, entropies, origin="probe", step=step, temperatures=temperatures)  # focus record

    # ------------------------------------------------------------------ helpers (rank 0)
    def _mean(self, parts: list[Sums]) -> dict[str, Tensor]:
        """Pooled mean entropy per head over every row of every part, keyed by log name, in model order."""
        totals: dict[str, tuple[Tensor, Tensor]] = {}
        for part in parts:
            for name, (s, n) in part.items():
                prev = totals.get(name)
                totals[name] = (s, n) if prev is None else (prev[0] + s, prev[1] + n)
        return {
            self._display.get(name, name): totals[name][0] / totals[name][1].clamp(min=1)
            for name in self._display
            if name in totals and totals[name][1] > 0
        }

    def _watch_collapse(
        self, trainer: pl.Trainer, step: int, entropies: dict[str, Tensor], temperatures: dict[str, float]
    ) -> dict[str, float]:
        values = {k.removeprefix(self.key("entropy") + "/"): v for k, v in entropy_metrics(entropies, self.key("entropy")).items()}
        values.update({f"{_TEMPERATURE}{name}": t for name, t in temperatures.items()})
        for key in self.collapse.update(step, values):
            event = next(e for e in reversed(self.collapse.events) if e["key"] == key)
            kind, name = ("temperature", key.removeprefix(_TEMPERATURE)) if key.startswith(_TEMPERATURE) else ("entropy", key)
            message = (
                f"attention {kind} collapse at step {step}: {name} fell to {event['value']:.3f} from "
                f"{event['window_max']:.3f} within the last {self.collapse.window} readings "
                f"(drop > {self.collapse.drop_fraction:.0%})"
            )
            rank_zero_warn(f"[detlens] {type(self).__name__}: {message}")
            if self.alert:
                _alert_if_online(trainer, key, message)
        flagged_t = sum(key.startswith(_TEMPERATURE) for key in self.collapse.flagged)
        scalars = {self.key("collapse"): float(bool(self.collapse.flagged)),
                   self.key("collapsed_heads"): float(len(self.collapse.flagged) - flagged_t)}
        if self._temperature_blocks:
            scalars[self.key("collapsed_temperatures")] = float(flagged_t)
        return scalars

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "collapse": self.collapse.state_dict(), "last_train_step": self._last_train_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if "collapse" in state_dict:
            self.collapse.load_state_dict(state_dict["collapse"])
        self._last_train_step = int(state_dict.get("last_train_step", -1))


def _resolve_name(pl_module: nn.Module, name: str, who: str) -> str:
    """``name`` in the LightningModule, accepting names relative to its ``.model`` too."""
    named = dict(named_modules(pl_module))
    if name in named:
        return name
    if isinstance(getattr(pl_module, "model", None), nn.Module) and f"model.{name}" in named:
        return f"model.{name}"
    return name  # find_attention_modules reports it with close matches


def _alert_if_online(trainer: pl.Trainer, key: str, message: str) -> None:
    """``wandb.alert`` on every online W&B run of the trainer; offline/disabled runs get none."""
    for logger in trainer.loggers:
        if not isinstance(logger, WandbLogger):
            continue
        try:
            run = logger.experiment
            if is_online(run):
                run.alert(title=f"attention collapse: {key}"[:63], text=message, level="WARN")
        except Exception as err:  # noqa: BLE001 - an alert must never stop training
            rank_zero_warn(f"[detlens] W&B alert failed: {type(err).__name__}: {err}")
