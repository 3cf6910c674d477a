"""Projections of box features: faithful (trustworthiness), class-separating, bounded, seeded, and RNG-neutral."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA

from detlens.explainers.embeddings import (
    _KLConverged,
    class_separation,
    embed,
    library_threads,
    pca,
    pca_2d,
    project,
    sample_rows,
    trustworthiness_score,
    tsne_2d,
)

torch.set_num_threads(1)


def clusters(n_per_class: int = 60, classes: int = 4, dims: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Well separated Gaussian classes: ``([n, dims], [n])``."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dims, generator=g) * 3.0
    labels = torch.arange(classes).repeat_interleave(n_per_class) + 1
    return centres[labels - 1] + torch.randn(len(labels), dims, generator=g), labels


def decaying_spectrum(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scales = 0.7 ** torch.arange(d, dtype=torch.float64)
    return (torch.randn(n, d, generator=g, dtype=torch.float64) * scales) @ torch.linalg.qr(
        torch.randn(d, d, generator=g, dtype=torch.float64)).Q


@pytest.mark.parametrize("shape", [(300, 40), (2000, 600)], ids=["exact-svd", "randomised-svd"])
def test_pca_gives_scikit_learns_scores_with_stable_signs(shape):
    x = decaying_spectrum(*shape)
    ours = pca(x, 5, seed=3)
    theirs = torch.from_numpy(PCA(5, svd_solver="full").fit_transform(x.numpy()))
    torch.testing.assert_close(ours.abs(), theirs.abs(), atol=1e-6, rtol=1e-6)
    # Signs are fixed by the loadings, so a second call (another seed) does not flip the picture.
    torch.testing.assert_close(pca(x, 5, seed=7), ours, atol=1e-6, rtol=1e-6)
    assert pca_2d(x).shape == (shape[0], 2)


def test_pca_of_rank_deficient_input_pads_with_zero_columns():
    x = torch.tensor([[0.0, 1.0, 2.0], [1.0, 1.0, 2.0], [2.0, 1.0, 2.0]])  # varies along one axis only
    out = pca(x, 4)
    assert out.shape == (3, 4)
    torch.testing.assert_close(out[:, 0].abs(), torch.tensor([1.0, 0.0, 1.0]))
    assert torch.all(out[:, 3] == 0)
    assert torch.all(pca(x[:1], 2) == 0), "one point has no direction of variance"


def test_tsne_separates_classes_faithfully_and_is_deterministic_for_a_seed():
    x, labels = clusters()
    first = project(x, "tsne", seed=0)
    again = project(x, "tsne", seed=0)
    other = project(x, "tsne", seed=1)

    assert first.method == "tsne" and first.coords.shape == (240, 2) and first.note == ""
    assert first.trustworthiness > 0.9
    assert class_separation(first.coords, labels) > 0.7
    assert torch.equal(first.coords, again.coords)
    assert not torch.equal(first.coords, other.coords)
    assert first.params["perplexity"] == 30.0 and first.params["pca_dims"] == 50
    assert first.params["negative_gradient_method"] == "bh"  # below 10,000 points
    assert first.params["early_exaggeration_iter"] == 250  # openTSNE's and scikit-learn's with Barnes-Hut


def test_barnes_hut_iterations_stop_once_the_kl_divergence_levels_off_at_the_same_quality():
    x, labels = clusters()
    stopped = tsne_2d(x, seed=0)
    full = tsne_2d(x, seed=0, min_kl_decrease=0)  # all 500 iterations after early exaggeration
    assert not torch.equal(stopped, full), "240 clustered points converge well before 500 iterations"
    assert torch.equal(stopped, tsne_2d(x, seed=0))
    assert trustworthiness_score(x, stopped) >= trustworthiness_score(x, full) - 0.002
    assert class_separation(stopped, labels) > 0.7
    assert project(x, "tsne", seed=0).params["min_kl_decrease"] == 0.01

    converged = _KLConverged(0.01)  # called every 50 iterations with the KL divergence
    assert [converged(i, kl, None) for i, kl in ((50, 1.0), (100, 0.9), (150, 0.895), (200, 0.5))] == [
        False, False, True, False]
    rising = _KLConverged(0.01)
    assert [rising(i, kl, None) for i, kl in ((50, 1.0), (100, 1.02))] == [False, True]
    with pytest.raises(ValueError, match=r"min_kl_decrease must be in \[0, 1\), got 1.0"):
        tsne_2d(x, min_kl_decrease=1.0)


def test_fft_schedule_with_barnes_hut_polish_separates_classes_and_is_deterministic():
    # The path taken from 10,000 points (FFT gradients, then Barnes-Hut iterations at
    # momentum 0.9 and learning rate 2 N), forced here on a small set.
    x, labels = clusters()
    first = tsne_2d(x, seed=0, negative_gradient_method="fft")
    again = project(x, "tsne", seed=0, negative_gradient_method="fft")
    assert first.shape == (240, 2) and torch.isfinite(first).all()
    assert torch.equal(first, again.coords)
    assert again.params["negative_gradient_method"] == "fft"
    assert again.params["n_iter"] == 220 and again.params["polish_iter"] == 120
    assert again.params["early_exaggeration_iter"] == 150
    assert again.params["polish_momentum"] == 0.9 and again.params["polish_learning_rate"] == 480.0
    assert trustworthiness_score(x, first) > 0.9
    assert class_separation(first, labels) > 0.7
    with pytest.raises(ValueError, match=r"polish_momentum must be in \[0, 1\), got 1.0"):
        tsne_2d(x, negative_gradient_method="fft", polish_momentum=1.0)
    with pytest.raises(ValueError, match="polish_learning_rate must be > 0 or None, got 0"):
        tsne_2d(x, negative_gradient_method="fft", polish_learning_rate=0)
    with pytest.raises(ValueError, match="early_exaggeration_iter must be >= 0, got -1"):
        tsne_2d(x, early_exaggeration_iter=-1)


def test_p3m_schedule_separates_classes_is_deterministic_and_the_same_on_any_number_of_threads():
    # The path taken from 10,000 points (early exaggeration on FFT gradients, then P3M
    # gradients: 100 iterations at openTSNE's momentum, 250 at 0.9 and 2 N), forced here.
    x, labels = clusters()
    one = project(x, "tsne", seed=0, negative_gradient_method="p3m", n_jobs=1)
    two = tsne_2d(x, seed=0, negative_gradient_method="p3m", n_jobs=2)
    assert torch.equal(one.coords, two), "every per-point sum runs in a fixed order"
    assert torch.equal(one.coords, tsne_2d(x, seed=0, negative_gradient_method="p3m"))
    assert not torch.equal(one.coords, tsne_2d(x, seed=1, negative_gradient_method="p3m"))
    assert one.params["negative_gradient_method"] == "p3m"
    assert one.params["n_iter"] == 350 and one.params["polish_iter"] == 250
    assert one.params["early_exaggeration_iter"] == 150 and one.params["polish_learning_rate"] == 480.0
    assert one.trustworthiness > 0.9
    assert class_separation(one.coords, labels) > 0.7
    # polish_iter covers every iteration, or none of them
    assert torch.isfinite(tsne_2d(x, seed=0, negative_gradient_method="p3m", n_iter=50, polish_iter=80)).all()
    assert torch.isfinite(tsne_2d(x, seed=0, negative_gradient_method="p3m", n_iter=50, polish_iter=0)).all()
    with pytest.raises(ValueError, match="negative_gradient_method must be 'auto', 'p3m', 'fft' or 'bh', got 'exact'"):
        tsne_2d(x, negative_gradient_method="exact")


def test_trustworthiness_is_one_for_an_exact_picture_and_low_for_noise():
    x, _ = clusters(dims=2)
    assert trustworthiness_score(x, x) == pytest.approx(1.0)
    noise = torch.randn(len(x), 2, generator=torch.Generator().manual_seed(5))
    assert trustworthiness_score(x, noise) < 0.7
    # Above max_rows a seeded subsample is scored: same seed, same value.
    a = trustworthiness_score(x, noise, max_rows=100, seed=2)
    assert a == trustworthiness_score(x, noise, max_rows=100, seed=2)
    assert np.isnan(trustworthiness_score(x[:2], x[:2]))


def test_silhouette_high_for_separated_classes_and_undefined_with_one_class():
    x, labels = clusters()
    assert class_separation(x, labels) > 0.5
    shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    assert class_separation(x, shuffled) < 0.05
    assert np.isnan(class_separation(x, torch.ones(len(x))))


def test_stratified_sampling_keeps_rare_classes_and_proportions():
    keys = np.array(["car"] * 9000 + ["bus"] * 990 + ["cat/fp"] * 10 + ["dog"] * 3)
    sample = sample_rows(len(keys), max_rows=1000, stratify_by=keys, seed=0)
    picked = keys[sample.indices.numpy()]
    counts = {k: int((picked == k).sum()) for k in np.unique(keys)}

    assert len(sample.indices) == 1000 and len(set(sample.indices.tolist())) == 1000
    assert torch.all(sample.indices[1:] > sample.indices[:-1])
    assert counts["dog"] >= 1 and counts["cat/fp"] >= 1, "rare classes stay visible"
    assert abs(counts["car"] - 900) <= 4 and abs(counts["bus"] - 99) <= 4  # 1 per class first, then shares
    assert sample.description == "1,000 of 10,003 rows, stratified by class (all 4 classes kept, seed 0)"
    assert torch.equal(sample_rows(len(keys), 1000, keys, seed=0).indices, sample.indices)
    assert sample_rows(50, max_rows=1000).description == "all 50 rows"
    uniform = sample_rows(5000, max_rows=10)
    assert len(uniform.indices) == 10 and "uniform" in uniform.description
    with pytest.raises(ValueError, match="stratify_by"):
        sample_rows(10, 5, stratify_by=[1, 2])


def test_embed_bounds_the_rows_and_reports_stable_scalars():
    x, labels = clusters(n_per_class=100)
    summary = embed(x, labels, method="pca", max_rows=150, seed=0)
    assert len(summary.indices) == 150 and summary.projection.coords.shape == (150, 2)
    assert set(labels[summary.indices].tolist()) == {1, 2, 3, 4}
    scalars = summary.scalars()
    assert set(scalars) == {
        "embeddings/trustworthiness", "embeddings/silhouette", "embeddings/silhouette_features",
        "embeddings/projection_seconds", "embeddings/points",
    }
    assert scalars["embeddings/points"] == 150 and 0.5 < scalars["embeddings/trustworthiness"] <= 1.0


def test_a_projection_keeps_the_native_libraries_to_its_n_jobs_threads_and_gives_them_back(monkeypatch):
    """n_jobs=1 (the callbacks') must mean one thread in BLAS and OpenMP too, not a pool
    as large as the machine beside training; the caller's settings come back afterwards, and
    a thread's OpenMP count is never raised."""
    from threadpoolctl import threadpool_info, threadpool_limits

    import detlens.explainers.embeddings as embeddings

    def threads() -> dict[tuple[str, str], int]:
        return {(i["user_api"], i["filepath"]): i["num_threads"] for i in threadpool_info()}

    seen: list[dict[tuple[str, str], int]] = []
    real_score = embeddings.trustworthiness_score

    def spy(*args, **kwargs):  # runs inside the projection, on its thread
        seen.append(threads())
        return real_score(*args, **kwargs)

    monkeypatch.setattr(embeddings, "trustworthiness_score", spy)
    x, labels = clusters(n_per_class=20)
    with threadpool_limits(limits=3, user_api="blas"), threadpool_limits(limits=3, user_api="openmp"):
        before = threads()
        assert any(api == "blas" for api, _ in before)  # numpy's OpenBLAS at least
        embed(x, labels, method="tsne", n_jobs=1)
        project(x, method="pca", n_jobs=1)
        assert threads() == before
    assert len(seen) == 2 and all(set(s.values()) == {1} and set(s) == set(before) for s in seen)
    with threadpool_limits(limits=3, user_api="blas"):
        blas = lambda: {n for (api, _), n in threads().items() if api == "blas"}  # noqa: E731
        with library_threads(2):
            assert blas() == {2}
        with library_threads(0):  # n_jobs < 1 (all cores in openTSNE's terms): no cap
            assert blas() == {3}
        assert blas() == {3}
    openmp = lambda: {n for (api, _), n in threads().items() if api == "openmp"}  # noqa: E731
    with threadpool_limits(limits=1, user_api="openmp"):  # as on detlens' media thread
        with library_threads(2):
            assert openmp() == {1}  # capped, never raised: that thread opens no OpenMP team


def test_too_few_points_for_tsne_fall_back_to_pca_and_say_so():
    x, _ = clusters(n_per_class=1)
    result = project(x, "tsne")
    assert result.method == "pca" and "PCA shown instead" in result.note and result.coords.shape == (4, 2)
    with pytest.raises(ValueError, match="at least 5 points"):
        tsne_2d(x)


def test_identical_features_fall_back_to_pca_instead_of_nan_coordinates():
    # A box head whose ReLUs are all off gives every detection the same (zero) feature vector.
    result = project(torch.zeros(6, 32), "tsne")
    assert result.method == "pca" and "distinct feature vectors" in result.note
    assert torch.isfinite(result.coords).all() and result.coords.shape == (6, 2)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="unknown projection method 'tnse'.*'tsne'"):
        project(torch.zeros(10, 3), "tnse")
    bad = torch.zeros(10, 3)
    bad[4, 1] = float("nan")
    with pytest.raises(ValueError, match="1 rows with NaN/inf values \\(first: \\[4\\]\\)"):
        pca(bad, 2)
    with pytest.raises(ValueError, match=r"must be \[N, D\]"):
        pca(torch.zeros(10), 2)


RNG_SCRIPT = textwrap.dedent(
    """
    import random, numpy as np, torch
    random.seed(1); np.random.seed(1); torch.manual_seed(1)
    before = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state().clone())
    from detlens.explainers.embeddings import embed, project
    x = torch.cat([torch.zeros(40, 32), torch.ones(40, 32)]) + torch.linspace(0, 1, 80 * 32).reshape(80, 32)
    labels = [1] * 40 + [2] * 40
    embed(x, labels, method="tsne", max_rows=60, seed=3)
    project(x, "pca")
    project(x, "tsne", negative_gradient_method="p3m", n_iter=20)  # numba's first import and compilation too
    after = (random.getstate(), np.random.get_state()[1], torch.get_rng_state())
    assert before[0] == after[0], "python random moved"
    assert np.array_equal(before[1], after[1]), "numpy global RNG moved"
    assert torch.equal(before[2], after[2]), "torch global RNG moved"
    print("unchanged")
    """
)


def test_projections_leave_every_global_rng_unchanged_even_on_first_import():
    # A fresh interpreter: the first import of scikit-learn's neighbours module draws from
    # Python's `random`, which would shift a training run's random numbers.
    done = subprocess.run([sys.executable, "-c", RNG_SCRIPT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "unchanged", done.stderr[-2000:]


def test_scatter_image_shows_each_class_in_its_colour_and_refuses_unknown_outcomes():
    from detlens.render.scatter import _class_colours, render_scatter

    x, labels = clusters(n_per_class=30, classes=3, dims=2)
    outcomes = ["tp"] * 80 + ["background"] * 5 + ["duplicate"] * 5
    pixels = render_scatter(x, labels, outcomes=outcomes, class_names={1: "a", 2: "b", 3: "c"}, method="pca",
                            trustworthiness=0.9, silhouette=0.5, size=(480, 320))
    assert pixels.shape == (320, 480, 3) and pixels.dtype == np.uint8
    flat = pixels.reshape(-1, 3).astype(int)
    for colour in _class_colours([1, 2, 3]).values():
        rgb = np.round(np.array(colour) * 255).astype(int)
        assert (np.abs(flat - rgb).sum(1) <= 3).sum() > 20, f"class colour {rgb} missing from the plot"
    with pytest.raises(ValueError, match="unknown outcomes \\['maybe'\\]"):
        render_scatter(x[:2], labels[:2], outcomes=["tp", "maybe"])
    assert render_scatter(x[:0], labels[:0]).shape == (640, 960, 3)  # empty: an image saying so


def test_thumbnail_is_a_square_crop_around_the_box_with_grey_outside_the_image():
    from detlens.render.scatter import box_thumbnail

    image = torch.zeros(3, 50, 80)
    image[0, 2:12, 30:60] = 1.0  # a red 30 x 10 box near the top edge
    thumb = box_thumbnail(image, [30, 2, 60, 12], size=32, margin=0.0)  # window: x 30..60, y -8..22
    assert thumb.shape == (32, 32, 3) and thumb.dtype == np.uint8
    assert tuple(thumb[16, 16]) == (255, 0, 0) and tuple(thumb[16, 1]) == (255, 0, 0)
    assert tuple(thumb[1, 16]) == (128, 128, 128), "above the image: grey"
    assert tuple(thumb[30, 16]) == (0, 0, 0), "below the box, inside the image: the image"


def test_without_numba_auto_takes_the_fft_schedule_from_10000_points_and_p3m_says_what_to_install(monkeypatch):
    # numba is the optional `detlens[p3m]` extra: without it (`import numba` fails) a t-SNE of
    # 10,000 points or more runs the FFT schedule, and asking for P3M names the extra.
    monkeypatch.setitem(sys.modules, "numba", None)
    monkeypatch.delitem(sys.modules, "detlens.explainers.tsne_p3m", raising=False)
    from detlens.explainers.embeddings import p3m_available

    assert not p3m_available()
    x, _ = clusters(n_per_class=2_500, dims=8)  # 10,000 points
    quick = {"seed": 0, "n_iter": 4, "early_exaggeration_iter": 4, "polish_iter": 2}
    auto = tsne_2d(x, **quick)
    assert auto.shape == (10_000, 2) and torch.isfinite(auto).all()
    assert torch.equal(auto, tsne_2d(x, negative_gradient_method="fft", **quick))
    with pytest.raises(ImportError, match=r"pip install 'detlens\[p3m\]'"):
        tsne_2d(x, negative_gradient_method="p3m", **quick)
    monkeypatch.undo()
    assert p3m_available()  # numba is installed with the dev extra
