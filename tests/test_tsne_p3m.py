"""P3M t-SNE gradients: the exact O(N^2) sums within their stated error, openTSNE's conventions, thread-safe."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from openTSNE import TSNE
from openTSNE.tsne import kl_divergence_bh

from detlens.explainers.tsne_p3m import P3MGradient, repulsion


def layout(n: int = 3000, seed: int = 0) -> np.ndarray:
    """A t-SNE-like 2-D layout: dense clusters of different sizes, ~60 units across, and a few stragglers."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(-30, 30, size=(12, 2))
    sizes = rng.dirichlet(np.ones(12)) * (n - 50)
    parts = [c + rng.normal(scale=rng.uniform(1.0, 4.0), size=(int(k), 2)) for c, k in zip(centres, sizes)]
    y = np.concatenate(parts + [rng.uniform(-40, 40, size=(n - sum(len(p) for p in parts), 2))])
    return y


def exact(y: np.ndarray) -> tuple[np.ndarray, float]:
    d = y[:, None, :] - y[None, :, :]
    q = 1.0 / (1.0 + (d**2).sum(-1))
    np.fill_diagonal(q, 0.0)
    return ((q**2)[..., None] * d).sum(1), float(q.sum())


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_the_repulsive_forces_and_normaliser_match_the_exact_sums_and_the_cutoff_sets_the_accuracy():
    y = layout()
    forces, z = exact(y)
    p3m_forces, p3m_z = repulsion(y)  # defaults: h 0.75, rc 2.5
    assert relative_error(p3m_forces / p3m_z, forces / z) < 0.015  # Barnes-Hut at theta 0.5: 1.4-1.6%
    assert abs(p3m_z - z) / z < 2e-3
    wider, wider_z = repulsion(y, rc=4.0)
    assert relative_error(wider / wider_z, forces / z) < 0.5 * relative_error(p3m_forces / p3m_z, forces / z)
    # A point far from every other: the grid reaches it (its force is tiny; float32 rounding
    # of the grid sums is relative to the largest forces).
    lonely = np.concatenate([y, [[400.0, -300.0]]])
    f, _ = exact(lonely)
    got, _ = repulsion(lonely)
    assert np.abs(got[-1] - f[-1]).max() < 1e-4 * np.abs(f).max()
    assert relative_error(got, f) < 0.015


def test_a_layout_too_wide_for_the_grid_gets_a_coarser_grid_and_keeps_its_accuracy():
    y = np.concatenate([layout(1500, seed=3), [[3000.0, 0.0]]])  # 4,000 nodes a side at h 0.75
    forces, z = exact(y)
    got, got_z = repulsion(y)
    assert relative_error(got / got_z, forces / z) < 0.015
    assert abs(got_z - z) / z < 2e-3
    with pytest.raises(ValueError, match=r"finite \[N, 2\]"):
        repulsion(np.array([[0.0, np.nan], [1.0, 1.0]]))


def test_the_gradient_and_kl_divergence_follow_opentsnes_conventions():
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(loc=c, size=(100, 10)) for c in (0.0, 4.0, 8.0)])
    embedding = TSNE(random_state=0, n_jobs=1).prepare_initial(x)  # openTSNE's own affinities
    y = np.asarray(embedding)
    y = y / y.std() * 10  # spread like a layout after early exaggeration (~50 units across)
    P = embedding.affinities.P
    kl_exact, grad_exact = kl_divergence_bh(y, P, dof=1, bh_params={"theta": 0.0}, should_eval_error=True)
    kl, grad = P3MGradient()(y, P, should_eval_error=True)
    assert relative_error(grad, grad_exact) < 0.015
    assert kl == pytest.approx(kl_exact, abs=2e-3)  # its log Z term: Z is within 0.2%
    # With a cutoff as wide as the layout nearly every pair is exact: the conventions
    # (signs, normalisation, the divergence's terms) are openTSNE's to 1e-4.
    kl, grad = P3MGradient(rc=20.0)(y, P, should_eval_error=True)
    assert relative_error(grad, grad_exact) < 1e-4
    assert kl == pytest.approx(kl_exact, rel=1e-5)
    assert P3MGradient()(y, P)[0] == 0.0  # the divergence only when asked for
    with pytest.raises(NotImplementedError):
        P3MGradient()(y, P, dof=0.5)


def test_results_do_not_depend_on_threads_and_concurrent_callers_are_served_one_at_a_time():
    # numba's workqueue threading layer aborts the process when two threads enter it at once:
    # two projections on the media and drain threads must each get their result, on one
    # thread (the serial loops) or several.
    y = layout(2000, seed=2)
    one, z_one = repulsion(y, n_jobs=1)
    two, z_two = repulsion(y, n_jobs=2)
    assert np.array_equal(one, two) and z_one == z_two
    results: list[tuple[np.ndarray, float]] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for jobs in (2, 1, 2, 1, 2):
                results.append(repulsion(y, n_jobs=jobs))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(results) == 15
    assert all(np.array_equal(r, one) and z == z_one for r, z in results)


ONE_THREAD = """
import threading, numpy as np, numba
from detlens.explainers.tsne_p3m import repulsion
repulsion(np.random.default_rng(0).normal(size=(3000, 2)) * 20, n_jobs=1)
try:
    numba.threading_layer()
except ValueError:  # "Threading layer is not initialized."
    print("not started", threading.active_count())
"""


def test_one_job_runs_on_the_calling_thread_and_never_starts_numbas_threading_layer():
    # Its OpenMP backend, even set to one thread, kept an idle worker spinning on a second
    # core; the callbacks project with n_jobs=1 next to training.
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", ONE_THREAD], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["not", "started", "1"]
