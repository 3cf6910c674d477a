"""2-D projections of per-detection feature vectors, and how much to trust them.

Box features (``FloatTensor[N, D]``, one row per detection, from
``detlens.adapters``) are projected to 2-D with PCA (torch) or t-SNE (openTSNE with
FFT-accelerated gradients, after PCA to 50 dimensions). Every projection carries its
trustworthiness (scikit-learn; 1 = the 2-D neighbourhoods contain no points that were
not neighbours in feature space) so a picture is never shown without a number saying
how faithful it is. :func:`class_separation` scores how well classes separate
(silhouette), :func:`sample_rows` bounds the number of points (W&B tables hold at most
10,000 rows) and :func:`embed` chains the three for a callback.

Randomness: every function takes a ``seed`` and draws only from its own generators
(``torch.Generator``, ``np.random.default_rng``, ``random_state`` handed to openTSNE);
the global RNGs of ``torch``, ``numpy`` and ``random`` are never read or advanced, so
calling these during training changes nothing about the training run, even from a
background thread. Same input, same seed, same thread count: same output.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import math
import random
import sys
import time
from types import ModuleType
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "EXACT_NEIGHBOURS_ROWS",
    "FFT_EARLY_EXAGGERATION_ITER",
    "MIN_KL_DECREASE",
    "MIN_TSNE_ROWS",
    "P3M_N_ITER",
    "p3m_available",
    "P3M_POLISH_ITER",
    "POLISH_ITER",
    "POLISH_MOMENTUM",
    "TRUSTWORTHINESS_ROWS",
    "EmbeddingSummary",
    "Projection",
    "RowSample",
    "class_separation",
    "embed",
    "library_threads",
    "pca",
    "pca_2d",
    "project",
    "sample_rows",
    "trustworthiness_score",
    "tsne_2d",
]

METHODS: tuple[str, ...] = ("pca", "tsne")

MIN_TSNE_ROWS = 5
"""Fewest points t-SNE is run on. With fewer, a neighbourhood-preserving layout is
meaningless (perplexity would be below 1.5): :func:`tsne_2d` raises and
:func:`project` falls back to PCA and says so in :attr:`Projection.note`."""

TRUSTWORTHINESS_ROWS = 2_000
"""Default number of points trustworthiness is computed on (seeded uniform subsample;
the computation is O(N^2) in time and memory: 2,000 points take about a second)."""

EXACT_NEIGHBOURS_ROWS = 20_000
"""Up to this many points t-SNE's neighbours are exact (brute force on the PCA scores,
O(N^2)); above it openTSNE's approximate index (Annoy) is used."""

FFT_EARLY_EXAGGERATION_ITER = 150
"""Default early-exaggeration iterations of :func:`tsne_2d`'s FFT schedule (openTSNE's and
scikit-learn's 250 stay for Barnes-Hut). On 10,000 x 1,024 box features
(``benchmarks/embedding_projection.py``) the exaggerated KL divergence has made 97% of its
fall over 250 iterations by iteration 150 (94% by 100). On five data sets, against 250 with
the same seeds, stopping at 150 moved trustworthiness by -0.00000, +0.00004, +0.00000,
+0.00004, +0.00002 and the class silhouette by +0.001, +0.002, -0.001, -0.002, +0.007, and
saved 100 FFT iterations (~1.3 s of ~13). With Barnes-Hut (fewer than 10,000 points)
exaggerated iterations are cheap (the clusters are compact): 150 instead of 250 saved
nothing measurable on 400-3,000 points."""

POLISH_ITER = 120
"""Default Barnes-Hut iterations that end :func:`tsne_2d`'s FFT schedule (its ``polish_iter``)."""

P3M_N_ITER = 350
"""Default iterations after early exaggeration of :func:`tsne_2d`'s P3M schedule (the default
from 10,000 points), the last :data:`P3M_POLISH_ITER` of them at :data:`POLISH_MOMENTUM`."""

P3M_POLISH_ITER = 250
"""Default closing iterations of the P3M schedule at :data:`POLISH_MOMENTUM` and learning rate
``2 N``; the 100 before them run at openTSNE's 0.8 and ``N`` (see :func:`tsne_2d`). On the
benchmark's default data set (four seeds, trustworthiness on the same rows), 250 instead of
200 raised trustworthiness by 0.000007-0.000012 per seed, from 0.000003 below scikit-learn's
on one seed to above it on all four, for 50 iterations of ~20 ms."""

POLISH_MOMENTUM = 0.9
"""Default momentum of the closing iterations (openTSNE's own is 0.8; see :func:`tsne_2d`)."""

MIN_KL_DECREASE = 0.01
"""Default ``min_kl_decrease`` of :func:`tsne_2d` with Barnes-Hut throughout (fewer than
10,000 points): after early exaggeration it stops once the KL divergence has fallen by less
than this fraction over :data:`KL_CHECK_EVERY` iterations, instead of always running its
500. Measured (``benchmarks/embedding_projection.py --early-stop 104 300 1000 3000 --dims 256
--classes 5 --n-jobs 1 --data-seeds 0 1 2``): the rule stopped 104 points after 150-200 of
the 500 iterations, 300 after 300-350, 1,000 and 3,000 after 350, at the trustworthiness of
all 500 (-0.00007 to +0.00048) in 0.61-1.00x the time. The trustworthiness after each 50 of
the 500 iterations levels off by iteration 150-200 at every size, while the KL divergence
goes on falling by 0.2-1% per 50; where the rule stops it is 0.2-2% above its value after
500. A logging event's t-SNE of ~100 detections runs 400-450 iterations in all instead of 750."""

KL_CHECK_EVERY = 50
"""Iterations between two KL-divergence checks of ``min_kl_decrease`` (openTSNE computes
the divergence only at these iterations)."""

SILHOUETTE_ROWS = 5_000
"""Default number of points the silhouette score is computed on (class-stratified
seeded subsample; O(N^2 D))."""


# --------------------------------------------------------------------------- inputs


def _import(name: str) -> ModuleType:
    """``importlib.import_module(name)`` with the global ``random``/``numpy`` RNG states restored.

    Importing ``sklearn.neighbors`` (and so ``sklearn.manifold``) advances Python's
    global ``random`` stream (measured with scikit-learn 1.x); the first projection of a
    training run must not shift the run's random numbers. Imports are local so that
    ``import detlens`` stays light.
    """
    if name in sys.modules:
        return importlib.import_module(name)
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        return importlib.import_module(name)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)



def _as_features(features: Any, name: str = "features") -> Tensor:
    """``[N, D]`` floating tensor, finite, float32 or float64."""
    if not isinstance(features, Tensor):
        features = torch.as_tensor(np.asarray(features))
    if features.dim() != 2:
        raise ValueError(f"{name} must be [N, D], got shape {list(features.shape)}")
    features = features.detach()
    if not features.is_floating_point():
        features = features.float()
    elif features.dtype not in (torch.float32, torch.float64):
        features = features.float()  # bf16/fp16 from mixed-precision models
    bad = ~torch.isfinite(features).all(dim=1)
    if bool(bad.any()):
        rows = torch.nonzero(bad).flatten()[:5].tolist()
        raise ValueError(f"{name} has {int(bad.sum())} rows with NaN/inf values (first: {rows})")
    return features


def _as_labels(labels: Any, n: int, name: str = "labels") -> np.ndarray:
    if isinstance(labels, Tensor):
        labels = labels.detach().cpu().numpy()
    array = np.asarray(labels)
    if array.ndim != 1 or array.shape[0] != n:
        raise ValueError(f"{name} must be a sequence of {n} entries, got shape {list(array.shape)}")
    return array


def _check_method(method: str) -> str:
    if method not in METHODS:
        close = difflib.get_close_matches(str(method), METHODS, n=2, cutoff=0.3)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown projection method {method!r}; choose one of {list(METHODS)}.{hint}")
    return method


# --------------------------------------------------------------------------- PCA


def _svd_flip(components: Tensor) -> Tensor:
    """Signs such that each component's largest-magnitude loading is positive (as sklearn's ``svd_flip``)."""
    idx = components.abs().argmax(dim=1)
    signs = torch.sign(components[torch.arange(components.shape[0]), idx])
    signs[signs == 0] = 1
    return signs


def _top_components(centred: Tensor, k: int, seed: int) -> Tensor:
    """``[k, D]`` leading right singular vectors of ``centred [N, D]``, sign-fixed.

    Randomised SVD (Halko, Martinsson & Tropp 2011, as scikit-learn's
    ``randomized_svd``) when ``k`` is well below ``min(N, D)``, exact SVD otherwise.
    Hand-written because ``torch.svd_lowrank`` draws its test matrix from the global RNG.
    """
    n, d = centred.shape
    if max(n, d) <= 500 or k >= 0.8 * min(n, d):
        _, _, vh = torch.linalg.svd(centred, full_matrices=False)
        components = vh[:k]
    else:
        generator = torch.Generator(device=centred.device).manual_seed(int(seed))
        width = k + 10  # oversampling
        omega = torch.randn(d, width, generator=generator, device=centred.device, dtype=centred.dtype)
        q = torch.linalg.qr(centred @ omega).Q  # [N, width]
        for _ in range(4):  # power iterations sharpen the spectrum's decay
            q = torch.linalg.qr(centred.T @ q).Q  # [D, width]
            q = torch.linalg.qr(centred @ q).Q  # [N, width]
        _, _, vh = torch.linalg.svd(q.T @ centred, full_matrices=False)  # [width, D]
        components = vh[:k]
    return components * _svd_flip(components)[:, None]


def pca(features: Tensor, n_components: int, seed: int = 0) -> Tensor:
    """Project ``features [N, D]`` onto their top ``n_components`` principal components.

    Centred, not whitened; components ordered by explained variance; each component's
    sign makes its largest-magnitude loading positive, so the result does not flip
    between calls. When ``min(N, D) < n_components`` the missing components are zero
    columns (rank-deficient input has no further directions).

    Returns:
        ``FloatTensor[N, n_components]`` (dtype of ``features``, float32 at least), on
        the device of ``features``.
    """
    if n_components < 1:
        raise ValueError(f"n_components must be >= 1, got {n_components}")
    x = _as_features(features)
    n, d = x.shape
    out = x.new_zeros(n, n_components)
    k = min(n_components, n, d)
    if n < 2 or k == 0:
        return out
    centred = x - x.mean(dim=0, keepdim=True)
    components = _top_components(centred, k, seed)
    out[:, :k] = centred @ components.T
    return out


def pca_2d(features: Tensor, seed: int = 0) -> Tensor:
    """``FloatTensor[N, 2]``: the first two principal-component scores (see :func:`pca`)."""
    return pca(features, 2, seed=seed)


# --------------------------------------------------------------------------- t-SNE


def tsne_2d(
    features: Tensor,
    seed: int = 0,
    perplexity: float = 30.0,
    pca_dims: int = 50,
    n_jobs: int = 1,
    n_iter: int | None = None,
    early_exaggeration_iter: int | None = None,
    negative_gradient_method: Literal["auto", "p3m", "fft", "bh"] = "auto",
    polish_iter: int | None = None,
    polish_momentum: float = POLISH_MOMENTUM,
    polish_learning_rate: float | None = None,
    min_kl_decrease: float = MIN_KL_DECREASE,
    **opentsne_kwargs: Any,
) -> Tensor:
    """t-SNE of ``features [N, D]`` to 2-D: PCA to ``pca_dims``, then openTSNE.

    openTSNE (Poličar et al. 2024): its affinities and optimiser, with Barnes-Hut gradients
    below 10,000 points and, from 10,000 up (``"auto"``, openTSNE's own threshold for
    leaving Barnes-Hut), early exaggeration on openTSNE's FFT-accelerated gradients (FIt-SNE
    interpolation, O(N) per iteration) followed by detlens' P3M gradients
    (:mod:`detlens.explainers.tsne_p3m`: a grid for the far field, exact pairs near; more
    accurate than Barnes-Hut and 2-3.5x faster per iteration at 10,000 points). ``learning_rate="auto"``
    (N / exaggeration; the closing iterations use their own, see ``polish_learning_rate``), exact neighbours up to
    :data:`EXACT_NEIGHBOURS_ROWS` points (approximate ones, Annoy, above), and PCA
    initialisation (the first two PCA scores, rescaled to std 1e-4 and jittered from
    ``seed``, as openTSNE's ``initialization="pca"``).

    Args:
        features: ``FloatTensor[N, D]``, ``N >= MIN_TSNE_ROWS``.
        seed: seeds the PCA, the neighbour index and the jitter.
        perplexity: effective number of neighbours. Clipped to ``(N - 1) / 3`` so
            that ``3 * perplexity`` neighbours exist; the clipped value is used silently.
        pca_dims: dimensions kept by the PCA before t-SNE (denoises and speeds up the
            neighbour search; ``min(pca_dims, N, D)`` in practice).
        n_jobs: threads for neighbours and gradients (``-1``: all cores). Defaults to 1
            so that explaining on rank 0 does not starve the training's data loaders.
        n_iter: iterations after early exaggeration; ``None``: 500 with Barnes-Hut
            (openTSNE's default), :data:`P3M_N_ITER` (350) with P3M gradients, 220 on the
            FFT schedule (see ``polish_iter``).
        early_exaggeration_iter: early-exaggeration iterations; ``None``: openTSNE's 250
            with Barnes-Hut, :data:`FFT_EARLY_EXAGGERATION_ITER` (150) on FFT gradients
            (the P3M and FFT schedules).
        negative_gradient_method: ``"auto"`` (P3M from 10,000 points, Barnes-Hut below;
            without numba, the ``detlens[p3m]`` extra, the FFT schedule instead of P3M),
            ``"p3m"``, ``"bh"``, or ``"fft"``: from 10,000 points FFT gradients after early
            exaggeration too, then Barnes-Hut (``polish_iter``).
        polish_iter: the last ``polish_iter`` of the ``n_iter`` iterations run at
            ``polish_momentum`` and ``polish_learning_rate``; ``None``:
            :data:`P3M_POLISH_ITER` (250) with P3M gradients, :data:`POLISH_ITER` (120)
            on the FFT schedule, where they also switch to Barnes-Hut (theta 0.5), whose
            near-field forces are accurate where the coarse FFT grid's are not. Not used
            with Barnes-Hut throughout. On 10,000 x 1,024 box features
            (``benchmarks/embedding_projection.py``, the default data set, four seeds),
            P3M's 100 + 250 iterations reached trustworthiness 0.99914-0.99916, above
            scikit-learn's (0.99912-0.99914) for every seed, in 8.4-10 s (KL 1.06); the
            FFT schedule's 100 FFT + 120 Barnes-Hut iterations 0.99911 (KL 1.16) in 10.6 s.
        polish_momentum, polish_learning_rate: the closing iterations' momentum and
            learning rate; ``None``: ``2 * N``, twice openTSNE's ``"auto"`` (N / 1). On
            those features (three data sets), 0.9 and ``2 N`` lowered the KL divergence
            after 150 Barnes-Hut iterations from 1.15-1.16 (openTSNE's 0.8 and N) to
            1.10-1.11 and reached 1.15-1.16 in 100 iterations; N / 12 (scikit-learn's
            rate, in openTSNE's units) lowered it only to 1.28. With Barnes-Hut throughout (``"auto"``
            below 10,000 points) openTSNE's 0.8, N and 500 iterations are kept: 0.9
            and ``2 N`` for 300 iterations gave lower trustworthiness on 120-400
            points (equal or higher on 1,000-3,000).
        min_kl_decrease: with Barnes-Hut throughout, stop the iterations after early
            exaggeration once the KL divergence has fallen by less than this fraction over
            :data:`KL_CHECK_EVERY` iterations (see :data:`MIN_KL_DECREASE`); ``0`` runs all
            ``n_iter``. Not used from 10,000 points (the P3M and FFT schedules' iteration
            counts are measured as they are), nor when ``opentsne_kwargs`` brings its own ``callbacks``.
        **opentsne_kwargs: further ``openTSNE.TSNE`` arguments (e.g. ``ints_in_interval``
            for the FFT grid after early exaggeration on the FFT schedule, default 2 here
            (openTSNE: 1; early exaggeration always uses 4), ``n_interpolation_points``,
            ``theta`` for Barnes-Hut).

    Returns:
        ``FloatTensor[N, 2]`` on the CPU (t-SNE units, centred near 0).

    Raises:
        ValueError: fewer than :data:`MIN_TSNE_ROWS` rows.
    """
    TSNE = _import("openTSNE").TSNE
    initialization = _import("openTSNE.initialization")
    jitter, rescale = initialization.jitter, initialization.rescale

    x = _as_features(features)
    n = x.shape[0]
    if n < MIN_TSNE_ROWS:
        raise ValueError(
            f"t-SNE needs at least {MIN_TSNE_ROWS} points, got {n}; use pca_2d, or project(), "
            "which falls back to PCA"
        )
    if perplexity <= 0:
        raise ValueError(f"perplexity must be > 0, got {perplexity}")
    if not 0.0 <= polish_momentum < 1.0:
        raise ValueError(f"polish_momentum must be in [0, 1), got {polish_momentum}")
    if polish_learning_rate is not None and not polish_learning_rate > 0:
        raise ValueError(f"polish_learning_rate must be > 0 or None, got {polish_learning_rate}")
    if not 0.0 <= min_kl_decrease < 1.0:
        raise ValueError(f"min_kl_decrease must be in [0, 1), got {min_kl_decrease}")
    method = _gradient_method(negative_gradient_method, n)
    if n_iter is None:
        n_iter = _default_n_iter(method)
    if early_exaggeration_iter is None:
        early_exaggeration_iter = _default_early_exaggeration_iter(method)
    if early_exaggeration_iter < 0:
        raise ValueError(f"early_exaggeration_iter must be >= 0, got {early_exaggeration_iter}")
    polish = _polish_iterations(polish_iter, n_iter, method)
    early_grid: dict[str, Any] = {}
    if method in ("fft", "p3m"):
        # The FFT interpolation grid sets both the cost and the accuracy of the repulsive
        # forces (openTSNE's default is one interval per unit of the embedding's span, which
        # reaches ~150 units for 10,000 points and makes numpy's FFT the bottleneck). The
        # final layout needs accurate near-field forces, early exaggeration does not (it only
        # sorts points into clusters). Measured on 10,000 x 1,024 box features
        # (benchmarks/embedding_projection.py, 2 cores): 2 units per interval after
        # exaggeration, 4 (and as few as 10 intervals) during it.
        opentsne_kwargs.setdefault("ints_in_interval", 2.0)
        early_grid = {"ints_in_interval": 4.0, "min_num_intervals": 10}
    reduced = pca(x.cpu(), min(pca_dims, x.shape[1], n), seed=seed).double().numpy()
    init = rescale(reduced[:, :2].copy(), inplace=False)
    init = jitter(init, random_state=np.random.RandomState(seed))  # openTSNE's own helper, seeded
    tsne = TSNE(
        n_components=2,
        perplexity=min(float(perplexity), (n - 1) / 3.0),
        learning_rate="auto",
        n_iter=n_iter,
        early_exaggeration_iter=early_exaggeration_iter,
        initialization=np.ascontiguousarray(init),
        # Exact neighbours (scikit-learn's brute force on the PCA scores: 0.8 s for 10,000
        # points, Annoy took 3.7 s and is approximate); Annoy beyond EXACT_NEIGHBOURS_ROWS.
        neighbors="exact" if n <= EXACT_NEIGHBOURS_ROWS else "auto",
        negative_gradient_method="fft" if method == "p3m" else method,  # early exaggeration
        n_jobs=n_jobs,
        random_state=int(seed),
        verbose=False,
        **opentsne_kwargs,
    )
    # TSNE.fit's two phases, run here so that early exaggeration can use the coarser grid.
    embedding = tsne.prepare_initial(reduced)
    embedding.optimize(
        n_iter=early_exaggeration_iter, exaggeration=tsne.early_exaggeration, momentum=tsne.initial_momentum,
        inplace=True, propagate_exception=True, **early_grid,
    )
    stop: dict[str, Any] = {}
    if method == "bh" and min_kl_decrease > 0 and opentsne_kwargs.get("callbacks") is None:
        # openTSNE's own early stop: a callback returning True interrupts the optimisation,
        # and optimize(propagate_exception=False) keeps the layout reached (inplace).
        stop = {"callbacks": [_KLConverged(min_kl_decrease)], "callbacks_every_iters": KL_CHECK_EVERY,
                "propagate_exception": False}
    gradient: Any = method
    if method == "p3m":
        # One gradient function for both phases: it keeps its far-field kernels between iterations.
        gradient = _import("detlens.explainers.tsne_p3m").P3MGradient()
    if n_iter - polish > 0:
        embedding.optimize(
            n_iter=n_iter - polish, exaggeration=tsne.exaggeration, momentum=tsne.final_momentum, inplace=True,
            negative_gradient_method=gradient, **{"propagate_exception": True, **stop},
        )
    if polish:
        embedding.optimize(
            n_iter=polish, exaggeration=tsne.exaggeration, momentum=float(polish_momentum),
            learning_rate=_polish_learning_rate(polish_learning_rate, n), inplace=True, propagate_exception=True,
            **({"negative_gradient_method": gradient} if method == "p3m" else {"negative_gradient_method": "bh", "theta": 0.5}),
        )
    # np.array copies out of TSNEEmbedding, dropping its affinity matrix and optimiser state.
    return torch.from_numpy(np.array(embedding, dtype=np.float32))


class _KLConverged:
    """openTSNE callback (called every :data:`KL_CHECK_EVERY` iterations with the KL
    divergence): True, which stops the optimisation, once it fell by less than
    ``min_decrease`` (a fraction) since the previous call, or rose."""

    def __init__(self, min_decrease: float) -> None:
        self.min_decrease = float(min_decrease)
        self.last: float | None = None

    def __call__(self, iteration: int, error: float, embedding: Any) -> bool:
        converged = self.last is not None and error > self.last * (1.0 - self.min_decrease)
        self.last = float(error)
        return converged


def _polish_iterations(polish_iter: int | None, n_iter: int, gradient_method: str) -> int:
    """How many of the ``n_iter`` iterations close the schedule (``polish_iter``, within
    ``[0, n_iter]``; ``None``: the method's default): 0 with Barnes-Hut throughout."""
    if gradient_method == "bh":
        return 0
    if polish_iter is None:
        polish_iter = P3M_POLISH_ITER if gradient_method == "p3m" else POLISH_ITER
    return min(max(int(polish_iter), 0), n_iter)


def _polish_learning_rate(rate: float | None, n: int) -> float:
    """The closing Barnes-Hut iterations' learning rate: ``rate``, or ``2 N`` (see :func:`tsne_2d`)."""
    return float(rate) if rate is not None else 2.0 * n


def _default_n_iter(gradient_method: str) -> int:
    """Iterations after early exaggeration: openTSNE's 500 for Barnes-Hut; :data:`P3M_N_ITER`
    with P3M gradients; 220 on the FFT schedule, the last ``polish_iter`` of them Barnes-Hut
    (see :func:`tsne_2d`)."""
    return {"p3m": P3M_N_ITER, "fft": 220}.get(gradient_method, 500)


def _default_early_exaggeration_iter(gradient_method: str) -> int:
    """Early-exaggeration iterations: 250 (openTSNE, scikit-learn) with Barnes-Hut,
    :data:`FFT_EARLY_EXAGGERATION_ITER` on FFT gradients (the P3M and FFT schedules)."""
    return FFT_EARLY_EXAGGERATION_ITER if gradient_method in ("fft", "p3m") else 250


def _gradient_method(method: str, n: int) -> str:
    if method not in ("auto", "p3m", "fft", "bh"):
        raise ValueError(f"negative_gradient_method must be 'auto', 'p3m', 'fft' or 'bh', got {method!r}")
    if method == "auto":
        if n < 10_000:
            return "bh"
        return "p3m" if p3m_available() else "fft"
    if method == "p3m" and not p3m_available():
        raise ImportError(
            "negative_gradient_method='p3m' needs numba: pip install 'detlens[p3m]' "
            "(or use 'auto', which takes the FFT schedule without it)"
        )
    return method


def p3m_available() -> bool:
    """Whether the P3M gradients can run: numba (the optional ``detlens[p3m]`` extra) imports."""
    try:
        _import("detlens.explainers.tsne_p3m")
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------- quality


def trustworthiness_score(
    features: Tensor,
    coords: Tensor,
    n_neighbors: int = 5,
    max_rows: int = TRUSTWORTHINESS_ROWS,
    seed: int = 0,
) -> float:
    """Trustworthiness of ``coords [N, 2]`` as a picture of ``features [N, D]``, in ``[0, 1]``.

    ``sklearn.manifold.trustworthiness`` (Venna & Kaski): 1 when every point's
    ``n_neighbors`` nearest neighbours in 2-D are also among its nearest neighbours in
    feature space, penalised by how far down the feature-space ranking intruders are.
    Above ``max_rows`` points it is computed on a uniform subsample of ``max_rows``
    points drawn with ``seed`` (neighbours are then ranked within the subsample); the
    same ``seed`` gives the same subsample for any two projections of the same data.
    ``n_neighbors`` is clipped below ``N / 2`` (scikit-learn's bound); NaN when
    ``N < 3``.
    """
    trustworthiness = _import("sklearn.manifold").trustworthiness

    x = _as_features(features).cpu()
    y = _as_features(coords, "coords").cpu()
    n = x.shape[0]
    if y.shape[0] != n:
        raise ValueError(f"coords has {y.shape[0]} rows for {n} feature rows")
    if n > max_rows:
        keep = np.sort(np.random.default_rng(seed).choice(n, size=max_rows, replace=False))
        x, y = x[keep], y[keep]
        n = max_rows
    k = min(int(n_neighbors), math.ceil(n / 2) - 1)
    if k < 1:
        return float("nan")
    return float(trustworthiness(x.double().numpy(), y.double().numpy(), n_neighbors=k))


def class_separation(
    coords_or_features: Tensor,
    labels: Sequence[Any] | Tensor,
    max_rows: int = SILHOUETTE_ROWS,
    seed: int = 0,
) -> float:
    """Mean silhouette coefficient of ``labels`` over ``coords_or_features [N, D]``, in ``[-1, 1]``.

    ``sklearn.metrics.silhouette_score`` (euclidean): near 1 when classes form tight,
    distant clusters, near 0 when they overlap. Above ``max_rows`` points it is computed
    on a class-stratified subsample (:func:`sample_rows` with ``seed``). NaN when there
    are fewer than 2 classes, or as many classes as points (silhouette undefined).
    """
    silhouette_score = _import("sklearn.metrics").silhouette_score

    x = _as_features(coords_or_features, "coords_or_features").cpu()
    y = _as_labels(labels, x.shape[0])
    if x.shape[0] > max_rows:
        keep = sample_rows(x.shape[0], max_rows=max_rows, stratify_by=y, seed=seed).indices.numpy()
        x, y = x[keep], y[keep]
    n_classes = len(np.unique(y))
    if n_classes < 2 or n_classes >= x.shape[0]:
        return float("nan")
    return float(silhouette_score(x.double().numpy(), y, metric="euclidean"))


# --------------------------------------------------------------------------- sampling


class RowSample(NamedTuple):
    """Rows kept by :func:`sample_rows`: ``indices`` ``Int64Tensor[M]`` ascending, and a
    one-line ``description`` of what was sampled (for captions and table titles)."""

    indices: Tensor
    description: str


def _quotas(counts: np.ndarray, budget: int) -> np.ndarray:
    """Per-class row counts summing to ``budget``: proportional, at least 1 per class.

    Largest-remainder apportionment (Hamilton's method), hand-written because no
    scientific library exposes it; ``budget >= len(counts)`` and ``budget < counts.sum()``.
    """
    share = counts * (budget - len(counts)) / counts.sum()  # what is left after 1 each
    quota = np.minimum(counts, 1 + np.floor(share).astype(np.int64))
    while quota.sum() < budget:  # hand out the remainder, largest fraction first
        room = quota < counts
        frac = np.where(room, 1 + share - quota, -np.inf)
        quota[int(np.argmax(frac))] += 1
    return quota


def sample_rows(
    n_total: int,
    max_rows: int = 10_000,
    stratify_by: Sequence[Any] | Tensor | None = None,
    seed: int = 0,
) -> RowSample:
    """Choose at most ``max_rows`` of ``n_total`` rows, keeping every class when stratified.

    Without ``stratify_by``: a uniform sample without replacement. With it (one key per
    row, e.g. class labels, or ``(class, outcome)`` strings): each class keeps a share of
    ``max_rows`` proportional to its size, but at least one row, so rare classes stay
    visible; within a class rows are uniform. If there are more classes than
    ``max_rows``, ``max_rows`` classes are drawn uniformly and keep one row each (the
    description says so). Deterministic for ``seed``; the global RNGs are untouched.

    Returns:
        :class:`RowSample` ``(indices, description)``; all rows (ascending) when
        ``n_total <= max_rows``.
    """
    if n_total < 0:
        raise ValueError(f"n_total must be >= 0, got {n_total}")
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    keys = None if stratify_by is None else _as_labels(stratify_by, n_total, "stratify_by")
    if n_total <= max_rows:
        return RowSample(torch.arange(n_total, dtype=torch.long), f"all {n_total:,} rows")
    rng = np.random.default_rng(seed)
    if keys is None:
        keep = rng.choice(n_total, size=max_rows, replace=False)
        text = f"{max_rows:,} of {n_total:,} rows, uniform sample (seed {seed})"
    else:
        classes, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
        members = np.split(np.argsort(inverse, kind="stable"), np.cumsum(counts)[:-1])
        if len(classes) > max_rows:
            chosen = rng.choice(len(classes), size=max_rows, replace=False)
            keep = np.array([rng.choice(members[c]) for c in chosen])
            text = (
                f"{max_rows:,} of {n_total:,} rows: one from each of {max_rows:,} of "
                f"{len(classes):,} classes drawn at random (seed {seed})"
            )
        else:
            quota = _quotas(counts, max_rows)
            keep = np.concatenate([rng.choice(m, size=q, replace=False) for m, q in zip(members, quota)])
            text = (
                f"{max_rows:,} of {n_total:,} rows, stratified by class "
                f"(all {len(classes)} classes kept, seed {seed})"
            )
    return RowSample(torch.from_numpy(np.sort(keep).astype(np.int64)), text)


# --------------------------------------------------------------------------- projection


@dataclass(frozen=True)
class Projection:
    """A 2-D picture of ``N`` feature vectors and how faithful it is.

    Attributes:
        coords: ``FloatTensor[N, 2]`` on the CPU (PCA: score units of the features;
            t-SNE: arbitrary units).
        method: what was actually run, ``"pca"`` or ``"tsne"``.
        trustworthiness: in ``[0, 1]`` (see :func:`trustworthiness_score`), NaN when
            ``N < 3``.
        seconds: wall time of the projection itself (trustworthiness excluded).
        trustworthiness_rows: number of points trustworthiness was computed on.
        params: the settings used (``perplexity`` after clipping, ``pca_dims``,
            ``n_jobs``, ``seed``, ...), ready for a run config.
        note: empty, or why the method run differs from the one asked for.
    """

    coords: Tensor
    method: str
    trustworthiness: float
    seconds: float
    trustworthiness_rows: int
    params: dict[str, Any] = field(default_factory=dict)
    note: str = ""


def project(
    features: Tensor,
    method: Literal["pca", "tsne"] = "pca",
    seed: int = 0,
    *,
    perplexity: float = 30.0,
    pca_dims: int = 50,
    n_jobs: int = 1,
    n_iter: int | None = None,
    negative_gradient_method: Literal["auto", "p3m", "fft", "bh"] = "auto",
    n_neighbors: int = 5,
    trustworthiness_rows: int = TRUSTWORTHINESS_ROWS,
) -> Projection:
    """Project ``features [N, D]`` to 2-D with ``method`` and measure its trustworthiness.

    ``"pca"``: :func:`pca_2d`. ``"tsne"``: :func:`tsne_2d` with ``perplexity``,
    ``pca_dims``, ``n_jobs``, ``n_iter`` (``None``: its default), ``negative_gradient_method``; for fewer than :data:`MIN_TSNE_ROWS` points
    PCA is used instead (``method="pca"`` and a ``note`` in the result). Trustworthiness
    is measured against the original ``D``-dimensional features with ``n_neighbors``,
    on at most ``trustworthiness_rows`` points.
    """
    with library_threads(n_jobs):  # every library the projection and its score call
        _check_method(method)
        x = _as_features(features).cpu()
        n = x.shape[0]
        note = ""
        params: dict[str, Any] = {"seed": int(seed), "points": n}
        start = time.perf_counter()
        if method == "tsne" and n >= MIN_TSNE_ROWS:
            distinct = int(torch.unique(x, dim=0).shape[0])  # 0.1 s for 10,000 x 1,024
            if distinct < MIN_TSNE_ROWS:
                # t-SNE's affinities and its PCA initialisation (scaled by the first score's std)
                # are undefined on identical points: seen with a box head whose ReLUs were all off.
                note = f"only {distinct} distinct feature vectors among {n} points: t-SNE is undefined, PCA shown instead"
                method = "pca"
        if method == "tsne" and n >= MIN_TSNE_ROWS:
            coords = tsne_2d(
                x, seed=seed, perplexity=perplexity, pca_dims=pca_dims, n_jobs=n_jobs, n_iter=n_iter,
                negative_gradient_method=negative_gradient_method,
            )
            gradient = _gradient_method(negative_gradient_method, n)
            params.update(
                perplexity=min(float(perplexity), (n - 1) / 3.0),
                pca_dims=min(pca_dims, x.shape[1], n),
                n_jobs=n_jobs,
                early_exaggeration_iter=_default_early_exaggeration_iter(gradient),
                n_iter=n_iter if n_iter is not None else _default_n_iter(gradient),
                negative_gradient_method=gradient,
            )
            if gradient == "bh":  # the early stop of tsne_2d's iterations after early exaggeration
                params.update(min_kl_decrease=MIN_KL_DECREASE, kl_check_every=KL_CHECK_EVERY)
            if gradient in ("fft", "p3m"):  # the closing iterations (Barnes-Hut on the FFT schedule), as tsne_2d ran them
                params.update(
                    polish_iter=_polish_iterations(None, params["n_iter"], gradient),
                    polish_momentum=POLISH_MOMENTUM,
                    polish_learning_rate=_polish_learning_rate(None, n),
                )
        else:
            if method == "tsne":
                note = f"t-SNE needs at least {MIN_TSNE_ROWS} points, got {n}: PCA shown instead"
                method = "pca"
            coords = pca_2d(x, seed=seed).float()
        seconds = time.perf_counter() - start
        rows = min(n, trustworthiness_rows)
        trust = trustworthiness_score(x, coords, n_neighbors=n_neighbors, max_rows=trustworthiness_rows, seed=seed)
        params.update(trustworthiness_neighbors=n_neighbors)
        return Projection(
            coords=coords.contiguous(),
            method=method,
            trustworthiness=trust,
            seconds=seconds,
            trustworthiness_rows=rows,
            params=params,
            note=note,
        )


@dataclass(frozen=True)
class EmbeddingSummary:
    """What :func:`embed` found: the rows drawn, their projection and class separation.

    Attributes:
        indices: ``Int64Tensor[M]`` rows of the input that were projected (ascending).
        description: one line saying what was sampled (see :func:`sample_rows`).
        projection: the :class:`Projection` of those ``M`` rows (``coords[i]`` belongs
            to input row ``indices[i]``).
        silhouette_2d: :func:`class_separation` of the 2-D coordinates (what the picture shows).
        silhouette_features: :func:`class_separation` of the original features (how
            separable the model's features are; independent of the projection).
    """

    indices: Tensor
    description: str
    projection: Projection
    silhouette_2d: float
    silhouette_features: float

    def scalars(self, prefix: str = "embeddings") -> dict[str, float]:
        """Stable metric keys, the same whichever method ran (the method is fixed per run):

        ``<prefix>/trustworthiness``, ``<prefix>/silhouette`` (of the 2-D coordinates),
        ``<prefix>/silhouette_features``, ``<prefix>/projection_seconds`` and
        ``<prefix>/points``. NaN values (too few points or classes) are left out.
        """
        values = {
            f"{prefix}/trustworthiness": self.projection.trustworthiness,
            f"{prefix}/silhouette": self.silhouette_2d,
            f"{prefix}/silhouette_features": self.silhouette_features,
            f"{prefix}/projection_seconds": self.projection.seconds,
            f"{prefix}/points": float(len(self.indices)),
        }
        return {k: float(v) for k, v in values.items() if math.isfinite(v)}


def embed(
    features: Tensor,
    labels: Sequence[Any] | Tensor,
    method: Literal["pca", "tsne"] = "tsne",
    seed: int = 0,
    max_rows: int = 10_000,
    stratify_by: Sequence[Any] | Tensor | None = None,
    **project_kwargs: Any,
) -> EmbeddingSummary:
    """Sample, project and score box features in one call (what an embedding callback needs).

    Args:
        features: ``FloatTensor[N, D]`` one row per detection.
        labels: ``N`` class labels (colour and silhouette classes).
        method: ``"pca"`` or ``"tsne"``.
        seed: seeds sampling, projection and the score subsamples.
        max_rows: most points projected (W&B tables hold at most 10,000 rows).
        stratify_by: ``N`` keys the sample keeps every value of; defaults to ``labels``.
        **project_kwargs: passed to :func:`project` (``perplexity``, ``n_jobs``, ...).
    """
    _check_method(method)
    x = _as_features(features).cpu()
    y = _as_labels(labels, x.shape[0])
    sample = sample_rows(x.shape[0], max_rows=max_rows, stratify_by=y if stratify_by is None else stratify_by, seed=seed)
    keep = sample.indices
    x, y = x[keep], y[keep.numpy()]
    projection = project(x, method=method, seed=seed, **project_kwargs)  # caps its own threads
    with library_threads(project_kwargs.get("n_jobs", 1)):  # the silhouettes' (scikit-learn)
        return EmbeddingSummary(
            indices=keep,
            description=sample.description,
            projection=projection,
            silhouette_2d=class_separation(projection.coords, y, seed=seed),
            silhouette_features=class_separation(x, y, seed=seed),
        )


@contextlib.contextmanager
def library_threads(n_jobs: int) -> Iterator[None]:
    """Caps the threads of the native libraries a projection calls at ``n_jobs`` (``< 1``: no cap).

    ``n_jobs`` is openTSNE's thread count, but the neighbour search, trustworthiness and
    silhouette (scikit-learn) and numpy's matrix products also run on BLAS (OpenBLAS: a
    pool as large as the machine, whose workers spin for a while after each call) and on
    OpenMP teams of their own. On the media thread, next to training that keeps every core
    busy, those helpers took CPU beyond the media thread's own: 0.15 s in one box-embedding
    job of the demo. As scikit-learn's own estimators do (``KMeans``), with threadpoolctl:
    BLAS is capped process-wide while the projection runs (numpy's, SciPy's and OpenCV's
    OpenBLAS; PyTorch's BLAS is built into it and not touched), OpenMP (PyTorch's and
    scikit-learn's) for the calling thread only. OpenMP is capped, never raised: detlens'
    media thread runs on one OpenMP thread, so that it opens no OpenMP team of its own
    (``detlens.sinks.fanout._one_openmp_thread`` says why).
    """
    if n_jobs is None or int(n_jobs) < 1:
        yield
        return
    from threadpoolctl import ThreadpoolController

    controller = ThreadpoolController()
    openmp = [lib.num_threads for lib in controller.select(user_api="openmp").lib_controllers]
    with (
        controller.limit(limits=int(n_jobs), user_api="blas"),
        controller.limit(limits=min([int(n_jobs), *openmp]), user_api="openmp"),
    ):
        yield
