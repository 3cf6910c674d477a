"""detlens: see what an object detector looks at while it trains.

Lightning callbacks live in :mod:`detlens.callbacks`, detectors and data in
:mod:`detlens.lightning_modules` and :mod:`detlens.data`; :func:`explain` explains a model
on images directly (a notebook's entry point).
"""

from detlens.explainers.api import Explanation, explain

__all__ = ["Explanation", "explain"]
__version__ = "0.1.0"
