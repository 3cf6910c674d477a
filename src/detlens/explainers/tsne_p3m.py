"""t-SNE gradients by particle-particle particle-mesh (P3M): a grid for the far field, exact pairs near.

From 10,000 points, :func:`detlens.explainers.embeddings.tsne_2d` optimises its layout with
:class:`P3MGradient`, a gradient function for openTSNE's own optimiser
(``TSNEEmbedding.optimize(negative_gradient_method=...)`` takes a callable).

Why not openTSNE's gradients: the repulsive forces are the cost of a t-SNE iteration (the
attractive ones are a sparse sum over ~90 neighbours per point). openTSNE computes them
either by Barnes-Hut (θ 0.5: 1.4-1.6% relative error against the exact O(N²) sum, 40-60 ms
per iteration for 10,000 points on 2 cores) or by FFT interpolation on a grid (FIt-SNE),
whose error is in the near field: the kernel ``1 / (1 + r²)`` bends sharply within a unit
or two, so a grid coarse enough to be fast misses it (24% error at 2 units per interval,
21 ms; 3% at openTSNE's default 1 unit, 92 ms). No library we know of offers the classic
remedy, so it is written here.

P3M (Hockney & Eastwood, *Computer Simulation Using Particles*, 1988) splits each kernel
``K`` into a far part ``K_far`` that equals ``K`` beyond a cutoff ``rc`` and continues it
smoothly inside (its cubic Taylor polynomial in ``s = r²`` about ``rc²``), and a near part
``K - K_far`` that is zero beyond ``rc``. The far part is smooth enough for a grid: the
points are spread onto nodes ``h`` apart with cubic Lagrange weights (4 x 4 nodes each), the
grid is convolved with ``K_far`` by FFT and the sums are interpolated back with the same
weights. The near part is summed exactly over the pairs closer than ``rc`` (a cell list of
``rc``-sized cells). Both kernels t-SNE needs are handled this way: ``q = 1 / (1 + r²)``
(its sum ``Z`` normalises the forces) and ``q²`` (the repulsive force
``Σ_j q_ij² (y_i - y_j) / Z``).

Measured on the layouts of ``benchmarks/embedding_projection.py`` (10,000 points, after
the FFT iterations and at the end): with the defaults (``h`` 0.75, ``rc`` 2.5) the
repulsive forces are within 0.9% of the exact sum (Barnes-Hut θ 0.5: 1.4-1.6%), in
11-13 ms (Barnes-Hut: 39-43 ms); ``rc`` 3: 0.4%, 15-16 ms.

The loops are compiled by numba (``cache=True``: once per environment, about 10 s, then
loaded from its cache in well under a second). With several threads they run on numba's
threading layer, under a lock (its workqueue backend aborts the process when two threads
enter it at once); with one (``n_jobs=1``, the callbacks' default) serial twins run on the
calling thread and the layer is never started (its OpenMP backend kept an idle worker
spinning on a second core even when set to one thread: about 4 CPU seconds over a
10,000-point t-SNE). Every per-point sum runs in a fixed order, so the result does not
depend on the number of threads.
"""

from __future__ import annotations

import math
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import torch
from numba import get_num_threads, njit, prange, set_num_threads

__all__ = ["CUTOFF", "GRID_SPACING", "MAX_GRID_NODES", "P3MGradient", "compile_kernels", "repulsion"]

GRID_SPACING = 0.75
"""Default distance ``h`` between grid nodes, in t-SNE units."""

CUTOFF = 2.5
"""Default cutoff ``rc`` in t-SNE units: pairs closer than this are summed exactly."""

MAX_GRID_NODES = 1024
"""Most grid nodes along a side. A layout wider than ``MAX_GRID_NODES * h`` (768 units at
the default ``h``; 10,000 points span about 150) gets a coarser grid and a proportionally
wider cutoff, which keeps the relative accuracy at a higher near-field cost instead of
letting the FFT's memory grow with the square of the span."""

_PARALLEL = threading.Lock()  # numba's workqueue threading layer is not thread-safe


# ---------------------------------------------------------------- compiled loops


@njit(cache=True)
def _lagrange4(t: float, out: np.ndarray) -> None:  # pragma: no cover - compiled
    """Cubic Lagrange weights of nodes -1, 0, 1, 2 at ``t`` in [0, 1)."""
    tm1 = t - 1.0
    tm2 = t - 2.0
    tp1 = t + 1.0
    out[0] = -t * tm1 * tm2 / 6.0
    out[1] = tp1 * tm1 * tm2 / 2.0
    out[2] = -tp1 * t * tm2 / 2.0
    out[3] = tp1 * t * tm1 / 6.0


@njit(nogil=True, cache=True)
def _stencil(x, y, lox, loy, h, wx, wy):  # pragma: no cover - compiled
    """Grid column and row of the cell that holds ``(x, y)``; its 4 + 4 weights into ``wx``, ``wy``."""
    ux = (x - lox) / h
    uy = (y - loy) / h
    ix = int(math.floor(ux))
    iy = int(math.floor(uy))
    _lagrange4(ux - ix, wx)
    _lagrange4(uy - iy, wy)
    return ix, iy


@njit(cache=True)
def _spread(xs, ys, lox, loy, h, m, grids):  # pragma: no cover - compiled
    """Adds each point's charges 1, x, y to its 4 x 4 nodes of the ``m x m`` grid (flat)."""
    wx = np.empty(4)
    wy = np.empty(4)
    for i in range(xs.shape[0]):
        ix, iy = _stencil(xs[i], ys[i], lox, loy, h, wx, wy)
        for a in range(4):
            row = (ix - 1 + a) * m
            for b in range(4):
                w = wx[a] * wy[b]
                k = row + iy - 1 + b
                grids[0, k] += w
                grids[1, k] += w * xs[i]
                grids[2, k] += w * ys[i]


@njit(nogil=True, cache=True)
def _interpolate_at(i, xs, ys, lox, loy, h, m, conv, out):  # pragma: no cover - compiled
    """``out[c, i]``: the 4 convolved grids ``conv[c]`` at point ``i``, same weights as ``_spread``."""
    wx = np.empty(4)
    wy = np.empty(4)
    ix, iy = _stencil(xs[i], ys[i], lox, loy, h, wx, wy)
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    for a in range(4):
        row = (ix - 1 + a) * m
        for b in range(4):
            w = wx[a] * wy[b]
            k = row + iy - 1 + b
            s0 += w * conv[0, k]
            s1 += w * conv[1, k]
            s2 += w * conv[2, k]
            s3 += w * conv[3, k]
    out[0, i] = s0
    out[1, i] = s1
    out[2, i] = s2
    out[3, i] = s3


@njit(nogil=True, cache=True)
def _cells(xs, ys, rc):  # pragma: no cover - compiled
    """Cell list of ``rc``-sized cells from ``(xmin, ymin)``: ``(order, start, sorted x, sorted y,
    ncx, ncy, xmin, ymin)``; the points of cell ``c`` are ``order[start[c]:start[c + 1]]``."""
    n = xs.shape[0]
    xmin = xs.min()
    ymin = ys.min()
    ncx = int((xs.max() - xmin) / rc) + 1
    ncy = int((ys.max() - ymin) / rc) + 1
    cell = np.empty(n, np.int64)
    for i in range(n):
        cell[i] = int((xs[i] - xmin) / rc) * ncy + int((ys[i] - ymin) / rc)
    order = np.argsort(cell, kind="mergesort")  # stable: a fixed summation order
    start = np.zeros(ncx * ncy + 1, np.int64)
    for i in range(n):
        start[cell[i] + 1] += 1
    for c in range(ncx * ncy):
        start[c + 1] += start[c]
    return order, start, xs[order], ys[order], ncx, ncy, xmin, ymin


@njit(nogil=True, cache=True)
def _near_at(p, order, start, sx, sy, ncx, ncy, xmin, ymin, rc, c1, c2, fx_out, fy_out, z_out):  # pragma: no cover
    """Exact ``K - K_far`` over the pairs closer than ``rc`` of the point ``order[p]``."""
    sc = rc * rc
    xi = sx[p]
    yi = sy[p]
    cx = int((xi - xmin) / rc)
    cy = int((yi - ymin) / rc)
    fx = 0.0
    fy = 0.0
    z = 0.0
    for ax in range(max(cx - 1, 0), min(cx + 2, ncx)):
        for ay in range(max(cy - 1, 0), min(cy + 2, ncy)):
            c = ax * ncy + ay
            for q in range(start[c], start[c + 1]):
                if q == p:
                    continue
                dx = xi - sx[q]
                dy = yi - sy[q]
                s = dx * dx + dy * dy
                if s < sc:
                    k1 = 1.0 / (1.0 + s)
                    d = s - sc
                    far1 = ((c1[3] * d + c1[2]) * d + c1[1]) * d + c1[0]
                    far2 = ((c2[3] * d + c2[2]) * d + c2[1]) * d + c2[0]
                    near2 = k1 * k1 - far2
                    z += k1 - far1
                    fx += near2 * dx
                    fy += near2 * dy
    i = order[p]
    fx_out[i] = fx
    fy_out[i] = fy
    z_out[i] = z


@njit(nogil=True, cache=True)
def _attract_at(i, indptr, indices, data, xs, ys, gx, gy, eval_error, kl):  # pragma: no cover - compiled
    """``g_i = Σ_j p_ij q_ij (y_i - y_j)`` over the CSR affinities; ``kl_i = Σ_j p_ij log(p_ij / q_ij)``."""
    fx = 0.0
    fy = 0.0
    e = 0.0
    for k in range(indptr[i], indptr[i + 1]):
        j = indices[k]
        dx = xs[i] - xs[j]
        dy = ys[i] - ys[j]
        q = 1.0 / (1.0 + dx * dx + dy * dy)
        p = data[k]
        fx += p * q * dx
        fy += p * q * dy
        if eval_error:
            e += p * math.log((p + 1e-16) / (q + 1e-16))
    gx[i] = fx
    gy[i] = fy
    kl[i] = e


# Each per-point loop twice: over numba's threads (prange), and on the calling thread alone
# for one job, which does not start numba's threading layer (its OpenMP backend kept an idle
# worker spinning on a second core even when set to one thread).


@njit(parallel=True, cache=True)
def _interpolate(xs, ys, lox, loy, h, m, conv, out):  # pragma: no cover - compiled
    for i in prange(xs.shape[0]):
        _interpolate_at(i, xs, ys, lox, loy, h, m, conv, out)


@njit(nogil=True, cache=True)
def _interpolate_1(xs, ys, lox, loy, h, m, conv, out):  # pragma: no cover - compiled
    for i in range(xs.shape[0]):
        _interpolate_at(i, xs, ys, lox, loy, h, m, conv, out)


@njit(parallel=True, cache=True)
def _near(order, start, sx, sy, ncx, ncy, xmin, ymin, rc, c1, c2, fx_out, fy_out, z_out):  # pragma: no cover
    for p in prange(sx.shape[0]):
        _near_at(p, order, start, sx, sy, ncx, ncy, xmin, ymin, rc, c1, c2, fx_out, fy_out, z_out)


@njit(nogil=True, cache=True)
def _near_1(order, start, sx, sy, ncx, ncy, xmin, ymin, rc, c1, c2, fx_out, fy_out, z_out):  # pragma: no cover
    for p in range(sx.shape[0]):
        _near_at(p, order, start, sx, sy, ncx, ncy, xmin, ymin, rc, c1, c2, fx_out, fy_out, z_out)


@njit(parallel=True, cache=True)
def _attract(indptr, indices, data, xs, ys, gx, gy, eval_error, kl):  # pragma: no cover - compiled
    for i in prange(xs.shape[0]):
        _attract_at(i, indptr, indices, data, xs, ys, gx, gy, eval_error, kl)


@njit(nogil=True, cache=True)
def _attract_1(indptr, indices, data, xs, ys, gx, gy, eval_error, kl):  # pragma: no cover - compiled
    for i in range(xs.shape[0]):
        _attract_at(i, indptr, indices, data, xs, ys, gx, gy, eval_error, kl)


# ---------------------------------------------------------------- kernels and grid


def _taylor(sc: float) -> tuple[np.ndarray, np.ndarray]:
    """Cubic Taylor coefficients in ``s - sc`` of ``1 / (1 + s)`` and ``1 / (1 + s)²``."""
    c1 = np.array([(-1.0) ** k / (1.0 + sc) ** (k + 1) for k in range(4)])
    c2 = np.array([(-1.0) ** k * (k + 1) / (1.0 + sc) ** (k + 2) for k in range(4)])
    return c1, c2


def _cubic(c: np.ndarray, d: np.ndarray | float) -> np.ndarray | float:
    return ((c[3] * d + c[2]) * d + c[1]) * d + c[0]


def _fft_length(n: int) -> int:
    """Smallest ``2^a 3^b 5^c >= n`` (pocketfft's fast lengths)."""
    best = 1 << max(int(n - 1).bit_length(), 0)  # a power of two always qualifies
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            v = p35
            while v < n:
                v *= 2
            best = min(best, v)
            p35 *= 3
        p5 *= 5
    return best


def _threads(n_jobs: int) -> int:
    """``n_jobs``, or every thread numba may use for ``n_jobs < 1``, at most that."""
    from numba import config

    return min(int(n_jobs), config.NUMBA_NUM_THREADS) if n_jobs and n_jobs > 0 else config.NUMBA_NUM_THREADS


@contextmanager
def _numba_threads(threads: int) -> Iterator[None]:
    """numba's threads for the calling thread, and the lock its threading layer needs
    (the workqueue backend aborts the process when two threads enter it at once);
    nothing for one thread, which runs the serial loops."""
    if threads == 1:
        yield
        return
    with _PARALLEL:
        before = get_num_threads()
        set_num_threads(threads)
        try:
            yield
        finally:
            set_num_threads(before)


class _FarField:
    """The grid half: the FFT of ``K_far``, kept for the last grid (it changes only when the
    growing layout needs more nodes); ``h`` and ``rc`` are the defaults before any widening."""

    def __init__(self, h: float, rc: float) -> None:
        self.h, self.rc = float(h), float(rc)
        self._key: tuple[float, float, int] | None = None
        self._kernels: torch.Tensor | None = None

    def kernels(self, h: float, rc: float, length: int) -> torch.Tensor:
        if self._key != (h, rc, length):
            sc = rc * rc
            c1, c2 = _taylor(sc)
            k = np.arange(length)
            k = np.where(k < length // 2, k, k - length) * h  # node offsets, wrapped
            s = k[:, None] ** 2 + k[None, :] ** 2
            k1 = np.where(s < sc, _cubic(c1, s - sc), 1.0 / (1.0 + s))
            k2 = np.where(s < sc, _cubic(c2, s - sc), 1.0 / (1.0 + s) ** 2)
            self._kernels = torch.fft.rfft2(torch.from_numpy(np.stack([k1, k2])).float())
            self._key = (h, rc, length)
        assert self._kernels is not None
        return self._kernels


def _repulsion(xs: np.ndarray, ys: np.ndarray, far: _FarField, threads: int) -> tuple[np.ndarray, np.ndarray, float]:
    n = xs.shape[0]
    span = max(float(np.ptp(xs)), float(np.ptp(ys)))
    widen = max(1.0, (span / far.h + 4) / MAX_GRID_NODES)  # see MAX_GRID_NODES
    h, rc = far.h * widen, far.rc * widen
    c1, c2 = _taylor(rc * rc)
    lox, loy = float(xs.min()) - 1.5 * h, float(ys.min()) - 1.5 * h  # room for the 4 x 4 stencils
    m = int(max((xs.max() - lox) / h, (ys.max() - loy) / h)) + 4
    length = _fft_length(2 * m)  # zero-padded: a linear, not circular, convolution
    grids = np.zeros((3, m * m))
    _spread(xs, ys, lox, loy, h, m, grids)
    # A float32 FFT: on the benchmark's layouts it gave the relative error of float64 (0.0116
    # both) in 60% of the time. Its rounding is relative to the largest grid sums, so the
    # weak forces on a point far from all others (1e-5 of the largest) are only rough.
    kernels = far.kernels(h, rc, length)
    charges = torch.fft.rfft2(torch.from_numpy(grids.reshape(3, m, m)).float(), s=(length, length))
    products = torch.stack([charges[0] * kernels[0], charges[0] * kernels[1], charges[1] * kernels[1], charges[2] * kernels[1]])
    conv = torch.fft.irfft2(products, s=(length, length))[:, :m, :m].reshape(4, m * m)
    conv = np.ascontiguousarray(conv.double().numpy())
    sums = np.empty((4, n))
    (_interpolate_1 if threads == 1 else _interpolate)(xs, ys, lox, loy, h, m, conv, sums)
    near_x, near_y, near_z = np.empty(n), np.empty(n), np.empty(n)
    (_near_1 if threads == 1 else _near)(*_cells(xs, ys, rc), rc, c1, c2, near_x, near_y, near_z)
    # Z over ordered pairs i != j: the grid's sum includes each point with itself, K_far(0).
    z = float(sums[0].sum() - n * _cubic(c1, -rc * rc) + near_z.sum())
    rx = xs * sums[1] - sums[2] + near_x  # Σ_j q_ij² (x_i - x_j)
    ry = ys * sums[1] - sums[3] + near_y
    return rx, ry, z


def repulsion(
    embedding: np.ndarray, h: float = GRID_SPACING, rc: float = CUTOFF, n_jobs: int = 1
) -> tuple[np.ndarray, float]:
    """t-SNE's unnormalised repulsive forces and normaliser of a 2-D layout, by P3M.

    Args:
        embedding: ``float64[N, 2]`` layout.
        h: grid spacing; rc: cutoff of the exact near field (t-SNE units).
        n_jobs: threads (``< 1``: all).

    Returns:
        ``(forces float64[N, 2], Z)``: ``forces_i ≈ Σ_{j≠i} q_ij² (y_i - y_j)`` and
        ``Z ≈ Σ_{i≠j} q_ij``, ``q_ij = 1 / (1 + |y_i - y_j|²)``; the repulsive part of the
        KL gradient is ``-forces / Z``.
    """
    y = np.asarray(embedding, dtype=np.float64)
    if y.ndim != 2 or y.shape[1] != 2 or not np.isfinite(y).all():
        raise ValueError(f"embedding must be a finite [N, 2] array, got shape {list(y.shape)}")
    threads = _threads(n_jobs)
    with _numba_threads(threads):
        rx, ry, z = _repulsion(np.ascontiguousarray(y[:, 0]), np.ascontiguousarray(y[:, 1]), _FarField(h, rc), threads)
    return np.stack([rx, ry], 1), z


class P3MGradient:
    """openTSNE gradient function: P3M repulsion, exact attraction over the affinities.

    Pass an instance as ``negative_gradient_method`` to ``TSNEEmbedding.optimize``. It
    keeps the far-field kernels of the last grid size between iterations; use one
    instance per optimisation. Only what ``tsne_2d`` uses is supported: a 2-D embedding
    optimised on its own (no ``reference_embedding``) with the Cauchy kernel (``dof=1``).
    """

    def __init__(self, h: float = GRID_SPACING, rc: float = CUTOFF) -> None:
        if not h > 0 or not rc > 0:
            raise ValueError(f"h and rc must be > 0, got h={h}, rc={rc}")
        self._far = _FarField(h, rc)

    def __call__(
        self,
        embedding: np.ndarray,
        P: Any,
        dof: float = 1,
        reference_embedding: np.ndarray | None = None,
        should_eval_error: bool = False,
        n_jobs: int = 1,
        **_: Any,
    ) -> tuple[float, np.ndarray]:
        """``(KL divergence or 0.0, gradient float64[N, 2])`` as openTSNE's own ``kl_divergence_*``."""
        if reference_embedding is not None or dof != 1 or np.ndim(embedding) != 2 or np.shape(embedding)[1] != 2:
            raise NotImplementedError("P3MGradient optimises a 2-D embedding on its own with dof=1")
        y = np.asarray(embedding, dtype=np.float64)
        xs, ys = np.ascontiguousarray(y[:, 0]), np.ascontiguousarray(y[:, 1])
        n = xs.shape[0]
        gx, gy, kl = np.empty(n), np.empty(n), np.empty(n)
        threads = _threads(n_jobs)
        with _numba_threads(threads):
            rx, ry, z = _repulsion(xs, ys, self._far, threads)
            (_attract_1 if threads == 1 else _attract)(
                P.indptr, P.indices, P.data, xs, ys, gx, gy, bool(should_eval_error), kl
            )
        gradient = np.stack([gx - rx / z, gy - ry / z], 1)
        # KL(P || Q) with Q = q / Z: Σ p log(p / q) + log(Z) Σ p, as openTSNE computes it.
        error = float(kl.sum() + P.data.sum() * math.log(z + 1e-16)) if should_eval_error else 0.0
        return error, gradient


def compile_kernels() -> float:
    """Compiles (or loads from numba's cache) every loop of this module; returns the seconds it took.

    The first P3M t-SNE in an environment compiles them anyway; benchmarks call this first
    so that the compilation is reported apart from the optimisation.
    """
    import scipy.sparse

    start = time.perf_counter()
    rng = np.random.default_rng(0)
    y = rng.normal(size=(64, 2)) * 3
    p = scipy.sparse.random(64, 64, density=0.1, format="csr", random_state=0)
    for jobs in (1, 2):  # the serial twins and the parallel loops
        P3MGradient()(y, p, should_eval_error=True, n_jobs=jobs)
    return time.perf_counter() - start
