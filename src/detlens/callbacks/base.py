"""``ProbeCallback``: cadence, probe set, side-effect guard, DDP sharding and gathering.

A subclass implements two methods (``docs/ARCHITECTURE.md``)::

    def explain_shard(self, pl_module, images, targets, indices) -> list[Any]:
        # every rank, inside detlens.guard.explaining; one picklable result per image
    def log_results(self, trainer, pl_module, results: list[ProbeResult]) -> None:
        # rank 0 only, no collectives: render and call detlens.sinks.log_media

When it runs (every rank takes the same decision from the same counters):

* ``fit``: every ``every_n_epochs`` epochs at ``on_validation_epoch_end`` (or at
  ``on_train_epoch_end`` in epochs without validation), and every ``every_n_steps``
  optimiser steps at ``on_train_batch_end``; at most once per global step;
* ``validate`` / ``test``: once, at the end of the epoch;
* never during the sanity check or under ``fast_dev_run``.

Reading the validation forward: a subclass that can take its per-image result from the
detector's own eval forward (``validation_observer`` / ``from_validation``: the
prediction overlays; the box embeddings and the gradient Grad-CAM maps on two-stage
detectors) gets it for each probe image the validation loop runs in the epoch of a
logging event — recognised by its ``image_id`` and checked pixel for pixel — and
explains only the rest of the probe set with a forward of its own. Under DDP the ranks first agree (one all-reduce of a flag
per probe image) on which images some rank has already read.

An exception while explaining (on any rank) or logging costs one warning naming the
callback; training continues. The collectives stay matched: a failing rank sends an
error marker to the gather instead of skipping it.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import Dataset

from detlens.adapters import adapter_for
from detlens.adapters.base import DetectorAdapter
from detlens.adapters.observe import ForwardObserver, ObservedForward
from detlens.callbacks.probe_set import batch_digests, evenly_spaced_indices, probe_cache, probe_folder_dataset
from detlens.distributed import RankError, gather_to_rank_zero, shard_indices
from detlens.guard import explaining, map_tensors
from detlens.sinks import flush_media

__all__ = ["ProbeCallback", "ProbeResult"]


@dataclass(frozen=True)
class ProbeResult:
    """One probe image's result as handed to ``log_results``.

    Attributes:
        index: the image's index in the probe dataset.
        value: what ``explain_shard`` returned for it.
    """

    index: int
    value: Any


class ProbeCallback(pl.Callback):
    """Base class of every detlens callback: explains a fixed probe set on a cadence.

    Args:
        every_n_epochs: explain after every ``n``-th training epoch (``None``: not per epoch).
        every_n_steps: explain every ``n`` optimiser steps (``trainer.global_step``;
            ``None``: not per step).
        num_probe_images: size of the probe set, chosen evenly spaced over the probe
            dataset (ignored when ``probe_indices`` is given).
        probe_indices: explicit dataset indices of the probe images.
        probe_dir: a folder of images (with at most one COCO ``*.json``, then ground truth
            is shown) used instead of ``trainer.datamodule.val_dataset``.
        log_key: prefix of every logged key (``"<log_key>/<name>"``); also part of the
            ``state_key``, so two instances with different keys coexist in a checkpoint.
        adapter: for the callbacks that explain through an adapter (Grad-CAM, attention
            maps, box embeddings): a :class:`~detlens.adapters.DetectorAdapter` instance,
            or from YAML ``{class_path: ..., init_args: {...}}`` of an adapter class (built
            with the network found in the LightningModule). ``None``: the registered family
            of the network detlens finds in the module (:mod:`detlens.adapters.registry`).
        model_attr: dotted attribute path of the network in the LightningModule
            (``"detector"``), when the search would find several.

    Raises:
        ValueError: both cadences ``None``, a cadence or count below 1, negative or
            duplicate ``probe_indices``, an empty ``log_key``; at ``setup`` (or first use):
            no probe dataset, or a probe index past its end.
    """

    def __init__(
        self,
        every_n_epochs: int | None = 1,
        every_n_steps: int | None = None,
        num_probe_images: int = 8,
        probe_indices: list[int] | None = None,
        probe_dir: str | None = None,
        log_key: str = "probe",
        adapter: dict[str, Any] | DetectorAdapter | None = None,
        model_attr: str | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if adapter is not None and not isinstance(adapter, (dict, DetectorAdapter)):
            raise TypeError(f"{name}: adapter must be a detlens.adapters.DetectorAdapter, a class_path/init_args "
                            f"mapping or None, got {type(adapter).__name__}")
        self.adapter = adapter
        self.model_attr = model_attr
        self._adapter_cache: tuple[int, DetectorAdapter] | None = None
        if every_n_epochs is None and every_n_steps is None:
            raise ValueError(f"{name}: every_n_epochs and every_n_steps are both None; set at least one")
        for arg, value in (("every_n_epochs", every_n_epochs), ("every_n_steps", every_n_steps)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}: {arg} must be a positive int or None, got {value!r}")
        if not isinstance(num_probe_images, int) or num_probe_images < 1:
            raise ValueError(f"{name}: num_probe_images must be a positive int, got {num_probe_images!r}")
        if probe_indices is not None:
            probe_indices = [int(i) for i in probe_indices]
            if not probe_indices:
                raise ValueError(f"{name}: probe_indices is empty; give indices or leave it None")
            if min(probe_indices) < 0:
                raise ValueError(f"{name}: probe_indices must be >= 0, got {sorted(i for i in probe_indices if i < 0)}")
            if len(set(probe_indices)) != len(probe_indices):
                raise ValueError(f"{name}: probe_indices has duplicates: {probe_indices}")
        if not log_key or log_key.strip("/") != log_key:
            raise ValueError(f"{name}: log_key must be a non-empty key without leading/trailing '/', got {log_key!r}")
        self.every_n_epochs = every_n_epochs
        self.every_n_steps = every_n_steps
        self.num_probe_images = num_probe_images
        self.probe_dir = probe_dir
        self.log_key = log_key
        self._requested_indices = probe_indices
        self._probe_indices: list[int] | None = None
        self._dataset: Dataset | None = None
        self._folder_dataset: Dataset | None = None
        self._num_events = 0
        self._checkpoint_step: int | None = None  # the global step of a checkpoint loaded for validate/test
        self._last_epoch = -1
        self._last_step = -1
        # image_id -> (probe index, pixel_digest of its image): reading the validation forward
        self._probe_ids: dict[int, tuple[int, tuple]] | None = None
        self._observing: tuple[ForwardObserver, list[Tensor], list[Any], dict[int, int]] | None = None
        self._from_validation: dict[int, Any] = {}  # probe index -> result read from the validation forward

    # ------------------------------------------------------------------ subclass API
    def explain_shard(
        self, pl_module: pl.LightningModule, images: list[Tensor], targets: list[dict[str, Any]], indices: list[int]
    ) -> list[Any]:
        """Explains this rank's probe images; one picklable result per image.

        Runs on every rank inside :func:`detlens.guard.explaining` (eval mode, gradients
        on, precision context, RNG and ``.grad`` protected). Never called with an empty shard.

        Args:
            pl_module: the LightningModule (call it directly, not its DDP wrapper).
            images: ``FloatTensor[3, H, W]`` in ``[0, 1]`` on ``pl_module.device``, normal
                (not inference-mode) tensors that do not require grad.
            targets: the dataset's targets, tensors on ``pl_module.device``.
            indices: the probe-dataset indices of ``images``.

        Returns:
            One result per image, in the same order; tensors are detached and moved to the
            CPU by the base class before gathering.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement explain_shard")

    def log_results(self, trainer: pl.Trainer, pl_module: pl.LightningModule, results: list[ProbeResult]) -> None:
        """Rank 0 only, no collectives: renders ``results`` (sorted by index) and logs them.

        Use :func:`detlens.sinks.log_media` with ``step=trainer.global_step`` and keys from
        :meth:`key`.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement log_results")

    def validation_observer(self, pl_module: pl.LightningModule) -> ForwardObserver | None:
        """Optional: an observer that reads this callback's results from the validation forward.

        Return a :class:`~detlens.adapters.observe.ForwardObserver` on the module whose calls
        :meth:`from_validation` reads, or ``None`` (the default: every probe image is
        explained by :meth:`explain_shard`). Set ``reads_validation_forward = True`` on
        the subclass too: it decides, the same way on every rank, whether the ranks
        exchange what they have read.
        """
        return None

    def from_validation(self, call: ObservedForward, position: int, target: dict[str, Any]) -> Any:
        """The result :meth:`explain_shard` would return for image ``position`` of ``call``.

        Runs on the rank that validated the image, inside the validation loop (inference
        mode). ``target`` is the image's target from the validation batch.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement from_validation")

    reads_validation_forward: bool = False
    """Whether :meth:`validation_observer` is implemented (a class attribute, or a property
    that depends only on the callback's arguments: every rank must see the same value)."""

    # ------------------------------------------------------------------ helpers for subclasses
    def key(self, name: str) -> str:
        """``"<log_key>/<name>"``: the stable metric key of ``name``."""
        return f"{self.log_key}/{name}"

    @property
    def probe_indices(self) -> list[int] | None:
        """The probe-dataset indices in use (``None`` until the probe dataset is known)."""
        return None if self._probe_indices is None else list(self._probe_indices)

    @property
    def num_logging_events(self) -> int:
        """How many times the probe set was explained (restored on resume)."""
        return self._num_events

    def probe_item(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        """``probe_dataset[index]``: ``(FloatTensor[3, H, W], target)`` on the CPU, a copy the
        caller may change. Read from the dataset once per process and kept for every callback
        on it (:class:`~detlens.callbacks.probe_set.ProbeItemCache`, bounded by
        ``DETLENS_PROBE_CACHE_MIB``)."""
        dataset = self._dataset
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}: the probe dataset is not known yet")
        with torch.inference_mode(False):  # normal tensors, usable by autograd, even inside validation
            item = probe_cache.get(dataset, index)
            if item is None:
                with torch.random.fork_rng(devices=[]):
                    item = dataset[index]
                probe_cache.put(dataset, index, item, _tensor_bytes(item))
            return map_tensors(item, Tensor.clone)

    def detector_adapter(self, pl_module: nn.Module) -> DetectorAdapter:
        """The adapter explaining ``pl_module``'s detector: ``adapter`` if given, else the
        registered family of the network found in it (``model_attr`` or a search of its
        submodules, :func:`detlens.adapters.adapter_for`). Resolved once per module."""
        if self._adapter_cache is None or self._adapter_cache[0] != id(pl_module):
            self._adapter_cache = (id(pl_module), adapter_for(pl_module, self.adapter, self.model_attr))
        return self._adapter_cache[1]

    def runs_through_adapter(self, pl_module: nn.Module) -> bool:
        """Whether the detector is run through its adapter rather than ``pl_module(images)``: an
        ``adapter``/``model_attr`` was given, or the module has no ``forward`` of its own (a
        LightningModule that only holds its network). A ``forward`` of another kind (e.g.
        ``forward(pixel_values, pixel_mask)``) needs ``adapter=`` or ``model_attr=``."""
        own_forward = type(pl_module).forward not in (pl.LightningModule.forward, nn.Module.forward)
        return self.adapter is not None or self.model_attr is not None or not own_forward

    def model_step(self, trainer: pl.Trainer) -> int:
        """The global step of the model being explained: ``trainer.global_step`` while fitting;
        under ``validate``/``test``/``predict`` of a checkpoint, the step it was saved at
        (there the trainer's own counter starts at 0)."""
        if trainer.state.fn != TrainerFn.FITTING and self._checkpoint_step is not None:
            return self._checkpoint_step
        return int(trainer.global_step)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        step = checkpoint.get("global_step")
        self._checkpoint_step = int(step) if isinstance(step, int) else None

    def caption(self, trainer: pl.Trainer, index: int, target: dict[str, Any] | None = None) -> str:
        """``"img 17 (id 42) · step 300"``: probe index, dataset image id, the model's global step."""
        image_id = _image_id(target)
        id_part = f" (id {image_id})" if image_id is not None else ""
        return f"img {index}{id_part} · step {self.model_step(trainer)}"

    # ------------------------------------------------------------------ Lightning hooks
    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            log_key=self.log_key, every_n_epochs=self.every_n_epochs, every_n_steps=self.every_n_steps
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            # Before the probe dataset is known: the indices asked for (or restored).
            "probe_indices": self.probe_indices if self._probe_indices is not None else self._requested_indices,
            "num_logging_events": self._num_events,
            "last_epoch": self._last_epoch,
            "last_step": self._last_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._num_events = int(state_dict.get("num_logging_events", 0))
        self._last_epoch = int(state_dict.get("last_epoch", -1))
        self._last_step = int(state_dict.get("last_step", -1))
        restored = state_dict.get("probe_indices")
        if restored is not None and self._requested_indices is None:
            # The run continues on the probe set it started with; checked against the dataset at first use.
            self._requested_indices = [int(i) for i in restored]
            self._probe_indices = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._adapter_cache = None
        self._dataset = self._find_dataset(trainer, stage, required=trainer.datamodule is not None)
        self._probe_ids = None
        if self._dataset is not None:
            self._choose_indices()

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_observing()
        self._from_validation = {}

    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._stop_observing()
        if not self.reads_validation_forward or dataloader_idx != 0 or not self._validation_event_due(trainer):
            return
        try:
            images, targets, positions = self._probe_positions(batch)
            if not positions:
                return
            observer = self.validation_observer(pl_module)
            if observer is not None:
                observer.__enter__()
                self._observing = (observer, images, targets, positions)
        except Exception:  # noqa: BLE001 - these images are then explained by the probe forward
            self._stop_observing()

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._observing is None:
            return
        observer, images, targets, positions = self._observing
        self._stop_observing()
        try:
            call = observer.find(images)
            if call is None:  # the validation step did not call the observed module on this batch
                return
            read = {i: self.from_validation(call, pos, targets[pos]) for pos, i in positions.items()}
            self._from_validation.update({i: map_tensors(v, lambda x: x.detach().cpu()) for i, v in read.items()})
        except Exception:  # noqa: BLE001 - these images are then explained by the probe forward
            return

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any) -> None:
        flush_media(wait=False)  # W&B media the media worker finished are logged from here
        step = trainer.global_step
        if self.every_n_steps is not None and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self._run(trainer, pl_module, "train")

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            if self._epoch_due(trainer):
                self._run(trainer, pl_module, "validation")
        elif trainer.state.fn == TrainerFn.VALIDATING:
            self._run(trainer, pl_module, "validation")

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._run(trainer, pl_module, "test")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Reached after the epoch's validation (Lightning 2.x), so this only fires in epochs
        # that did not validate (no val loop, check_val_every_n_epoch > 1).
        if self._epoch_due(trainer):
            self._run(trainer, pl_module, "train")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._stop_observing()
        flush_media(wait=True)  # nothing the media worker built is left unlogged

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._stop_observing()
        flush_media(wait=True)  # an interrupted run keeps the media of every finished event

    # ------------------------------------------------------------------ internals
    def _epoch_due(self, trainer: pl.Trainer) -> bool:
        epoch = trainer.current_epoch
        return (
            self.every_n_epochs is not None
            and (epoch + 1) % self.every_n_epochs == 0
            and epoch != self._last_epoch
            and trainer.global_step != self._last_step
        )

    def _validation_event_due(self, trainer: pl.Trainer) -> bool:
        """Whether this validation epoch ends in a logging event (so its forward is worth reading)."""
        if trainer.sanity_checking or trainer.fast_dev_run:
            return False
        if trainer.state.fn == TrainerFn.VALIDATING:
            return True
        return trainer.state.fn == TrainerFn.FITTING and self._epoch_due(trainer)

    def _stop_observing(self) -> None:
        if self._observing is not None:
            self._observing[0].close()
            self._observing = None

    def _probe_positions(self, batch: Any) -> tuple[list[Tensor], list[Any], dict[int, int]]:
        """``(images, targets, {position in the batch: probe index})`` for the probe images of
        a validation batch ``(list[image], list[target])``, found by ``image_id`` and checked
        pixel for pixel against the probe dataset by
        :func:`~detlens.callbacks.probe_set.pixel_digest` (loading the probe images at every
        validation batch cost 0.5 s per demo fit; other batch layouts: none found). Digests
        are shared by the callbacks: the probe images' through ``probe_cache``, the batch's
        through ``batch_digests``."""
        if not (isinstance(batch, (list, tuple)) and len(batch) == 2):
            return [], [], {}
        images, targets = batch
        stacked = images if isinstance(images, Tensor) and images.dim() == 4 else None
        if stacked is not None:
            images = list(stacked.unbind(0))
        if not isinstance(images, (list, tuple)) or not isinstance(targets, (list, tuple)) or len(images) != len(targets):
            return [], [], {}
        ids = self._probe_image_ids()
        positions: dict[int, int] = {}
        for pos, (image, target) in enumerate(zip(images, targets)):
            probe = ids.get(_image_id(target)) if isinstance(target, dict) else None
            if probe is None or probe[0] in self._from_validation or not isinstance(image, Tensor):
                continue
            # hashed once per batch for every callback (BatchDigests)
            digest = batch_digests.get(id(batch), image) if stacked is None else batch_digests.get(id(batch), stacked, pos)
            if probe[1] == digest:
                positions[pos] = probe[0]
        return list(images), list(targets), positions

    def _probe_image_ids(self) -> dict[int, tuple[int, tuple]]:
        """``{image_id: (probe index, pixel_digest of its image)}`` of the probe images (read
        once; validation batches are checked against the digests; ids that repeat are left out)."""
        if self._probe_ids is None:
            ids: dict[int, tuple[int, tuple]] = {}
            if self._dataset is not None and self._probe_indices is not None and self.probe_dir is None:
                found = []
                for i in self._probe_indices:
                    image_id, digest = probe_cache.digest(self._dataset, i, lambda i=i: self._image_id_and_image(i))
                    found.append((image_id, (i, digest)))
                counts: dict[int | None, int] = {}
                for image_id, _ in found:
                    counts[image_id] = counts.get(image_id, 0) + 1
                ids = {image_id: probe for image_id, probe in found if image_id is not None and counts[image_id] == 1}
            self._probe_ids = ids
        return self._probe_ids

    def _image_id_and_image(self, index: int) -> tuple[Any, Tensor]:
        image, target = self.probe_item(index)
        return _image_id(target), image

    def _find_dataset(self, trainer: pl.Trainer, stage: str, *, required: bool) -> Dataset | None:
        name = type(self).__name__
        if self.probe_dir is not None:
            if self._folder_dataset is None:
                self._folder_dataset = probe_folder_dataset(self.probe_dir)
            return self._folder_dataset
        datamodule = trainer.datamodule
        if datamodule is not None:
            dataset = getattr(datamodule, "val_dataset", None)
            if dataset is None and stage == "test":
                dataset = getattr(datamodule, "test_dataset", None)
            if dataset is None and required:
                raise ValueError(
                    f"{name}: trainer.datamodule ({type(datamodule).__name__}) has no val_dataset after "
                    f"setup('{stage}') and no probe_dir was given; set probe_dir or expose val_dataset"
                )
            return dataset
        # No DataModule: the dataset behind the evaluation dataloader (read by index only).
        loaders = trainer.test_dataloaders if stage == "test" else trainer.val_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) and loaders else loaders
        dataset = getattr(loader, "dataset", None)
        if dataset is None and required:
            raise ValueError(f"{name}: no probe dataset: give probe_dir, or a DataModule with val_dataset")
        return dataset

    def _choose_indices(self) -> None:
        assert self._dataset is not None
        size = len(self._dataset)  # type: ignore[arg-type]
        if self._requested_indices is None:
            self._probe_indices = evenly_spaced_indices(size, self.num_probe_images)
            return
        too_far = [i for i in self._requested_indices if i >= size]
        if too_far:
            raise ValueError(
                f"{type(self).__name__}: probe indices {too_far} are past the end of the probe dataset "
                f"({size} items, valid 0..{size - 1})"
            )
        self._probe_indices = list(self._requested_indices)

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, trigger: str) -> None:
        if trainer.sanity_checking or trainer.fast_dev_run:
            return
        if self._dataset is None:
            stage = "test" if trigger == "test" else "validate"
            self._dataset = self._find_dataset(trainer, stage, required=True)
        if self._probe_indices is None:
            self._choose_indices()
        assert self._probe_indices is not None
        rank, world = trainer.global_rank, trainer.world_size
        self._stop_observing()
        read, self._from_validation = (self._from_validation if trigger == "validation" else {}), {}
        remaining = self._not_read_anywhere(trainer, pl_module, read)
        payload = self._explain_safely(trainer, pl_module, shard_indices(remaining, rank, world))
        if not isinstance(payload, RankError):
            payload = [ProbeResult(i, v) for i, v in read.items()] + payload
        gathered = gather_to_rank_zero(payload, trainer.strategy)  # every rank, never rank-zero-only
        self._num_events += 1
        self._last_step = trainer.global_step
        if trainer.state.fn == TrainerFn.FITTING:
            self._last_epoch = trainer.current_epoch
        if not trainer.is_global_zero or gathered is None:
            return
        errors = [p for p in gathered if isinstance(p, RankError)]
        if errors:
            detail = "; ".join(f"rank {e.rank}: {e.message}" for e in errors)
            rank_zero_warn(f"[detlens] {type(self).__name__} skipped step {trainer.global_step} ({trigger}): {detail}")
            return
        # An image two ranks validated (DistributedSampler pads with repeats) is kept once.
        unique = {r.index: r for shard_results in reversed(gathered) for r in reversed(shard_results)}
        results = sorted(unique.values(), key=lambda r: r.index)
        try:
            self.log_results(trainer, pl_module, results)
        except Exception as err:  # noqa: BLE001 - logging must never stop training
            rank_zero_warn(
                f"[detlens] {type(self).__name__} failed to log at step {trainer.global_step} ({trigger}): "
                f"{type(err).__name__}: {err}"
            )

    def _not_read_anywhere(self, trainer: pl.Trainer, pl_module: pl.LightningModule, read: dict[int, Any]) -> list[int]:
        """The probe indices no rank read from the validation forward (to explain with a forward)."""
        assert self._probe_indices is not None
        if not self.reads_validation_forward or trainer.world_size == 1:
            return [i for i in self._probe_indices if i not in read]
        # Every rank, every event (the same decision everywhere): one flag per probe image.
        flags = torch.tensor([float(i in read) for i in self._probe_indices], device=pl_module.device)
        flags = trainer.strategy.reduce(flags, reduce_op="sum")
        return [i for i, f in zip(self._probe_indices, flags.tolist()) if f == 0]

    def _explain_safely(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, shard: list[int]
    ) -> list[ProbeResult] | RankError:
        """This rank's results, or a :class:`RankError` marker (exceptions never escape)."""
        if not shard:
            return []
        try:
            with explaining(pl_module, trainer):
                device = pl_module.device
                items = [self.probe_item(i) for i in shard]  # copies: the explainer may change them
                images = [image.to(device) for image, _ in items]
                targets = [map_tensors(t, lambda x: x.to(device)) for _, t in items]
                values = self.explain_shard(pl_module, images, targets, list(shard))
            if len(values) != len(shard):
                raise RuntimeError(f"explain_shard returned {len(values)} results for {len(shard)} images")
            values = [map_tensors(v, lambda x: x.detach().cpu()) for v in values]
            return [ProbeResult(i, v) for i, v in zip(shard, values)]
        except Exception as err:  # noqa: BLE001 - reported on rank 0 as one warning
            where = traceback.extract_tb(err.__traceback__)[-1]
            return RankError(
                trainer.global_rank, f"{type(err).__name__}: {err} (at {where.filename}:{where.lineno})"
            )


def _image_id(target: Any) -> int | None:
    value = target.get("image_id") if isinstance(target, dict) else None
    if isinstance(value, Tensor):
        value = value.item() if value.numel() == 1 else None
    return None if value is None else int(value)


def _tensor_bytes(value: Any) -> int:
    """Bytes of tensor data in ``value`` (nested as :func:`map_tensors` walks it)."""
    total = 0

    def add(t: Tensor) -> Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    map_tensors(value, add)
    return total


def class_names_of(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[int, str] | None:
    """Label -> class name: the module's ``class_names``, else the DataModule's (``None`` without either)."""
    for owner in (pl_module, trainer.datamodule):
        names = getattr(owner, "class_names", None)
        if names:
            return {int(k): str(v) for k, v in dict(names).items()}
    return None
