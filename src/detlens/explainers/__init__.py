"""detlens.explainers: model + images -> per-detection maps, attention, metrics. No Lightning, no wandb.

Notebook entry point: :func:`explain` (also ``detlens.explain``).
"""

from __future__ import annotations

from detlens.explainers.api import Explanation, box_focus, explain, focus_summary, peak_values
from detlens.explainers.attention import (
    AttentionCapture,
    AttentionUnavailable,
    AttentionUnavailableWarning,
    EntropyMonitor,
    PerImageEntropy,
    find_attention_modules,
)
from detlens.explainers.boundary import BoundaryResult, boundary
from detlens.explainers.box_features import BoxFeatureSet, ImageBoxFeatures, concat_box_features, extract_box_features
from detlens.explainers.cams import eigencam, feature_grid, input_gradient
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

__all__ = [
    "AttentionCapture",
    "AttentionUnavailable",
    "AttentionUnavailableWarning",
    "BoundaryResult",
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
    "boundary",
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
