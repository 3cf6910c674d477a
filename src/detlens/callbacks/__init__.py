"""detlens.callbacks: Lightning callbacks that explain a fixed probe set while a detector trains.

Every callback subclasses :class:`ProbeCallback` (cadence, probe set, guard, DDP gather),
except where noted; all are usable from YAML (``trainer.callbacks`` with ``class_path``).
"""

from detlens.callbacks.attention_entropy import AttentionEntropyCallback
from detlens.callbacks.attention_maps import AttentionMapCallback, AttentionMapResult
from detlens.callbacks.base import ProbeCallback, ProbeResult
from detlens.callbacks.boundary import BoundaryCallback, ProbeBoundary
from detlens.callbacks.embeddings import BoxEmbeddingCallback
from detlens.callbacks.focus import FocusRegressionCallback, FocusRegressionError
from detlens.callbacks.gradcam import GradCAMCallback, ProbeMaps
from detlens.callbacks.prediction_overlay import PredictionOverlayCallback, ProbePrediction

__all__ = [
    "AttentionEntropyCallback",
    "AttentionMapCallback",
    "AttentionMapResult",
    "BoundaryCallback",
    "BoxEmbeddingCallback",
    "FocusRegressionCallback",
    "FocusRegressionError",
    "GradCAMCallback",
    "ProbeMaps",
    "PredictionOverlayCallback",
    "ProbeBoundary",
    "ProbeCallback",
    "ProbePrediction",
    "ProbeResult",
]
