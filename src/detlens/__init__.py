"""detlens: see what an object detector looks at while it trains.

Lightning callbacks live in :mod:`detlens.callbacks`, detectors and data in
:mod:`detlens.lightning_modules` and :mod:`detlens.data`; :func:`explain` explains a model
on images directly (a notebook's entry point).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from detlens.explainers.api import Explanation, explain

__all__ = ["Explanation", "explain"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Lazy (PEP 562): `import detlens.render...` in detlens' media process must not pay for
    # torchvision and the explainers.
    if name in __all__:
        from detlens.explainers import api

        return getattr(api, name)
    raise AttributeError(f"module 'detlens' has no attribute {name!r}")
