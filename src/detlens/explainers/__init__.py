"""detlens.explainers: model + images -> per-detection maps, attention, metrics. No Lightning, no wandb.

Notebook entry point: :func:`explain` (also ``detlens.explain``).

Names are imported on first use (PEP 562): ``import detlens.explainers.embeddings`` (in
detlens' media process, say) does not import torchvision and every explainer, and
``detlens.adapters`` can import ``detlens.explainers.modules`` without an import cycle.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from detlens.explainers.api import Explanation, box_focus, explain, focus_summary, peak_values
    from detlens.explainers.attention import (
        AttentionCapture,
        AttentionUnavailable,
        AttentionUnavailableWarning,
        EntropyMonitor,
        PerImageEntropy,
        find_attention_modules,
    )
    from detlens.explainers.box_features import BoxFeatureSet, ImageBoxFeatures, concat_box_features, extract_box_features
    from detlens.explainers.cams import eigencam, feature_grid, input_gradient
    from detlens.explainers.boundary import BoundaryResult, boundary
    from detlens.explainers.drise import drise
    from detlens.explainers.embeddings import (
        class_separation,
        embed,
        pca,
        project,
        sample_rows,
        trustworthiness_score,
        tsne_2d,
    )
    from detlens.explainers.entropy import CollapseDetector, attention_entropy, entropy_metrics
    from detlens.explainers.gradcam import gradcam
    from detlens.explainers.matching import MatchResult, match_detections
    from detlens.explainers.metrics import (
        PerturbationCurve,
        RandomisationResult,
        box_area_fraction,
        deletion_insertion,
        detect_with,
        energy_in_box,
        perturbation_curve,
        pointing_game,
        randomisation_check,
        spearman_per_map,
        summarise,
    )
    from detlens.explainers.rollout import attention_rollout, decoder_rollout, point_attention_maps, query_attention_maps
    from detlens.explainers.scale import FixedScale, display_maps

_HOMES = {
    "Explanation": "detlens.explainers.api",
    "box_focus": "detlens.explainers.api",
    "explain": "detlens.explainers.api",
    "focus_summary": "detlens.explainers.api",
    "peak_values": "detlens.explainers.api",
    "AttentionCapture": "detlens.explainers.attention",
    "AttentionUnavailable": "detlens.explainers.attention",
    "AttentionUnavailableWarning": "detlens.explainers.attention",
    "EntropyMonitor": "detlens.explainers.attention",
    "PerImageEntropy": "detlens.explainers.attention",
    "find_attention_modules": "detlens.explainers.attention",
    "BoxFeatureSet": "detlens.explainers.box_features",
    "ImageBoxFeatures": "detlens.explainers.box_features",
    "concat_box_features": "detlens.explainers.box_features",
    "extract_box_features": "detlens.explainers.box_features",
    "eigencam": "detlens.explainers.cams",
    "feature_grid": "detlens.explainers.cams",
    "input_gradient": "detlens.explainers.cams",
    "drise": "detlens.explainers.drise",
    "boundary": "detlens.explainers.boundary",
    "BoundaryResult": "detlens.explainers.boundary",
    "class_separation": "detlens.explainers.embeddings",
    "embed": "detlens.explainers.embeddings",
    "pca": "detlens.explainers.embeddings",
    "project": "detlens.explainers.embeddings",
    "sample_rows": "detlens.explainers.embeddings",
    "trustworthiness_score": "detlens.explainers.embeddings",
    "tsne_2d": "detlens.explainers.embeddings",
    "CollapseDetector": "detlens.explainers.entropy",
    "attention_entropy": "detlens.explainers.entropy",
    "entropy_metrics": "detlens.explainers.entropy",
    "gradcam": "detlens.explainers.gradcam",
    "MatchResult": "detlens.explainers.matching",
    "match_detections": "detlens.explainers.matching",
    "PerturbationCurve": "detlens.explainers.metrics",
    "RandomisationResult": "detlens.explainers.metrics",
    "box_area_fraction": "detlens.explainers.metrics",
    "deletion_insertion": "detlens.explainers.metrics",
    "detect_with": "detlens.explainers.metrics",
    "energy_in_box": "detlens.explainers.metrics",
    "perturbation_curve": "detlens.explainers.metrics",
    "pointing_game": "detlens.explainers.metrics",
    "randomisation_check": "detlens.explainers.metrics",
    "spearman_per_map": "detlens.explainers.metrics",
    "summarise": "detlens.explainers.metrics",
    "attention_rollout": "detlens.explainers.rollout",
    "decoder_rollout": "detlens.explainers.rollout",
    "point_attention_maps": "detlens.explainers.rollout",
    "query_attention_maps": "detlens.explainers.rollout",
    "FixedScale": "detlens.explainers.scale",
    "display_maps": "detlens.explainers.scale",
}

__all__ = [
    "AttentionCapture",
    "AttentionUnavailable",
    "AttentionUnavailableWarning",
    "BoxFeatureSet",
    "CollapseDetector",
    "EntropyMonitor",
    "Explanation",
    "FixedScale",
    "ImageBoxFeatures",
    "MatchResult",
    "PerImageEntropy",
    "PerturbationCurve",
    "RandomisationResult",
    "attention_entropy",
    "attention_rollout",
    "box_area_fraction",
    "box_focus",
    "class_separation",
    "concat_box_features",
    "decoder_rollout",
    "deletion_insertion",
    "detect_with",
    "display_maps",
    "drise",
    "boundary",
    "BoundaryResult",
    "eigencam",
    "embed",
    "energy_in_box",
    "entropy_metrics",
    "explain",
    "extract_box_features",
    "feature_grid",
    "find_attention_modules",
    "focus_summary",
    "gradcam",
    "input_gradient",
    "match_detections",
    "pca",
    "peak_values",
    "perturbation_curve",
    "point_attention_maps",
    "pointing_game",
    "project",
    "query_attention_maps",
    "randomisation_check",
    "sample_rows",
    "spearman_per_map",
    "summarise",
    "trustworthiness_score",
    "tsne_2d",
]


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'detlens.explainers' has no attribute {name!r}")
