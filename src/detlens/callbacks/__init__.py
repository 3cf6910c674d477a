"""detlens.callbacks: Lightning callbacks that explain a fixed probe set while a detector trains.

Every callback subclasses :class:`ProbeCallback` (cadence, probe set, guard, DDP gather).
"""

from detlens.callbacks.base import ProbeCallback, ProbeResult
from detlens.callbacks.prediction_overlay import PredictionOverlayCallback, ProbePrediction

__all__ = ["PredictionOverlayCallback", "ProbeCallback", "ProbePrediction", "ProbeResult"]
