"""Reading a detector's own eval forwards: what it detected, without a forward of detlens's own.

A callback that explains the probe set at the end of a validation epoch would run the
detector again on images the validation loop has just run it on. A
:class:`ForwardObserver` instead sits on the module while the validation loop calls it
and records, per call, the images it received and the detections it returned; for
families whose adapter can track the feature vector behind each detection
(:meth:`detlens.adapters.DetectorAdapter.feature_recorder`: two-stage today), also the
:class:`~detlens.adapters.Detections` with ``features`` and ``origin`` — the same ones
:meth:`DetectorAdapter.run` returns for those images; and what its readers
(:class:`ForwardReader`) read per image (e.g. attention entropy sums).

Only reads: every hook returns ``None`` (the module's outputs are never replaced), no
random numbers are drawn, and a hook that fails drops that call's record instead of
raising into the validation step. Calls in training mode are ignored (their outputs are
losses, and two-stage heads sample proposals).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from .base import Detections, DetectorAdapter

__all__ = ["FeatureRecorder", "ForwardObserver", "ForwardReader", "ObservedForward"]


class FeatureRecorder:
    """What an adapter installs to rebuild its :class:`Detections` from the model's own forward.

    An adapter returns one from :meth:`DetectorAdapter.feature_recorder`. The observer calls
    :meth:`install` on entry, :meth:`reset` before each forward of the observed module and
    :meth:`detections` after it, and removes the installed hooks on exit.
    """

    def install(self) -> list[Any]:
        """Registers the hooks; returns their handles (removed by the observer)."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forgets what the previous forward recorded."""
        raise NotImplementedError

    def detections(self, original_sizes: list[tuple[int, int]]) -> list[Detections] | None:
        """One :class:`Detections` per image of the forward just finished (all the model
        kept, highest score first; boxes in the pixels of the images it was given), or
        ``None`` if the forward did not go the way the recorder expects."""
        raise NotImplementedError

    replays_roi: bool = False
    """Whether :meth:`roi_replay` can rebuild the gradient explainers' RoI fast path."""

    def roi_replay(self, original_sizes: list[tuple[int, int]]) -> Any | None:
        """Two-stage recorders: an object whose ``output(position, detections, top_k,
        score_threshold)`` is the :class:`~detlens.adapters.AdapterOutput` of one image of the
        forward just finished (``detlens.adapters.two_stage.RoIReplay``); else ``None``."""
        return None


class ForwardReader:
    """Something else read per image from each observed call (e.g. attention entropy:
    :class:`detlens.explainers.attention.PerImageEntropy`), given to
    :class:`ForwardObserver` as ``readers={"name": reader}``.

    The observer calls :meth:`install` on entry, :meth:`reset` before each forward of the
    observed module and :meth:`read` after it, and removes what :meth:`install` returned on exit.
    """

    def install(self) -> list[Any]:
        """Starts reading; returns handles whose ``remove()`` stops it."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forgets what was read before this forward."""
        raise NotImplementedError

    def read(self, images: list[Tensor]) -> list[Any] | None:
        """One value per image of the forward just finished, or ``None`` when it could not
        be read per image (the caller then explains those images another way)."""
        raise NotImplementedError


@dataclass(frozen=True)
class ObservedForward:
    """One eval-mode call of the observed module.

    Attributes:
        images: the ``B`` images it was called with (``Tensor[C, H, W]`` each, as given).
        outputs: what it returned: ``B`` dicts ``boxes [K, 4]``, ``scores [K]``, ``labels [K]``.
        detections: ``B`` :class:`Detections` with ``features`` (adapters with a
            :class:`FeatureRecorder`), else ``None``.
        family: the adapter's family (``""`` without an adapter).
        replay: the recorder's :meth:`FeatureRecorder.roi_replay` of this call, or ``None``.
        read: each reader's :meth:`ForwardReader.read` of this call, by the observer's name for it.
    """

    images: list[Tensor]
    outputs: list[dict[str, Tensor]]
    detections: list[Detections] | None
    family: str = ""
    replay: Any | None = None
    read: dict[str, list[Any] | None] = field(default_factory=dict)


class ForwardObserver:
    """Context manager recording the eval-mode calls of ``module`` (see the module docstring).

    ```python
    with ForwardObserver(pl_module) as observer:   # or ForwardObserver(adapter.model, adapter=adapter)
        pl_module.validation_step(batch, 0)         # the model's own forward
    call = observer.find(images)                    # the call that saw exactly these images
    ```

    Args:
        module: the module whose calls take ``(images: list[Tensor], ...)`` and return
            torchvision's list of detection dicts (a detector, or a LightningModule's forward).
        adapter: record the feature vector behind each detection too, with this adapter's
            :class:`FeatureRecorder` (its ``model`` must run inside ``module``'s forward).
        readers: more to read per image from each call (:class:`ForwardReader`), by name:
            :attr:`ObservedForward.read`.
        max_calls: calls kept (the first ones); later calls are ignored.
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        adapter: DetectorAdapter | None = None,
        readers: dict[str, ForwardReader] | None = None,
        max_calls: int = 4,
    ) -> None:
        self.module = module
        self.readers = dict(readers or {})
        self.recorder = adapter.feature_recorder() if adapter is not None else None
        self.family = adapter.family if adapter is not None else ""
        self.max_calls = max_calls
        self.observed: list[ObservedForward] = []
        self._handles: list[Any] = []
        self._images: list[Tensor] | None = None

    @property
    def records_features(self) -> bool:
        """Whether the observed calls carry :attr:`ObservedForward.detections`."""
        return self.recorder is not None

    @property
    def replays_roi(self) -> bool:
        """Whether the observed calls carry :attr:`ObservedForward.replay`."""
        return self.recorder is not None and self.recorder.replays_roi

    def __enter__(self) -> ForwardObserver:
        try:
            self._handles.append(self.module.register_forward_pre_hook(self._guarded(self._before)))
            self._handles.append(self.module.register_forward_hook(self._guarded(self._after)))
            if self.recorder is not None:
                self._handles.extend(self.recorder.install())
            for reader in self.readers.values():
                self._handles.extend(reader.install())
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Removes every hook (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._images = None

    def find(self, images: list[Tensor]) -> ObservedForward | None:
        """The first recorded call whose images are ``images`` (the same tensors, or equal ones)."""
        for call in self.observed:
            if len(call.images) == len(images) and all(_same(a, b) for a, b in zip(call.images, images)):
                return call
        return None

    # ------------------------------------------------------------------ hooks
    def _guarded(self, hook: Callable[..., None]) -> Callable[..., None]:
        def run(*args: Any) -> None:
            try:
                hook(*args)
            except Exception:  # noqa: BLE001 - observing must never break the forward; the call is just not recorded
                self._images = None
            return None

        return run

    def _before(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self._images = None
        if module.training or len(self.observed) >= self.max_calls or not args:
            return
        images = args[0]
        if isinstance(images, Tensor) and images.dim() == 4:
            images = list(images.unbind(0))
        if isinstance(images, (list, tuple)) and images and all(isinstance(i, Tensor) and i.dim() == 3 for i in images):
            self._images = list(images)
            if self.recorder is not None:
                self.recorder.reset()
            for reader in self.readers.values():
                reader.reset()

    def _after(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        images, self._images = self._images, None
        if images is None or not isinstance(output, (list, tuple)) or len(output) != len(images):
            return
        if not all(isinstance(o, dict) and {"boxes", "scores", "labels"} <= o.keys() for o in output):
            return
        detections, replay = None, None
        if self.recorder is not None:
            sizes = [(int(i.shape[-2]), int(i.shape[-1])) for i in images]
            detections = self.recorder.detections(sizes)
            if detections is None or len(detections) != len(images):
                return
            replay = self.recorder.roi_replay(sizes)
        read = {name: reader.read(images) for name, reader in self.readers.items()}
        self.observed.append(
            ObservedForward(
                images=images, outputs=list(output), detections=detections, family=self.family, replay=replay,
                read=read,
            )
        )


def _same(a: Tensor, b: Tensor) -> bool:
    if a is b:
        return True
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and bool((a == b).all())
