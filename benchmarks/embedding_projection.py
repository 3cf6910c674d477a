"""t-SNE of 10,000 box features: detlens (PCA-50 + openTSNE, FFT then Barnes-Hut) vs scikit-learn's TSNE.

Measured, not asserted. Prints the environment, then the wall time and
trustworthiness of both paths on the same features and the speed ratio.

Features (deterministic from ``--seed``): box-head features of a detector look like a
few class clusters, each a curved low-dimensional family of appearances, seen through a
wide ReLU layer. So: ``--classes`` classes with Zipf-like imbalanced counts (as in
detection data sets); per class a 3-D latent appearance ``u ~ N(0, I)`` mapped into a
shared 12-D space by a class-specific smooth nonlinear map (linear + sine), plus the
class centre; lifted to ``--dims`` (default 1,024, the width of torchvision's
``TwoMLPHead``) by a random linear layer with bias, Gaussian noise (std 0.5) and a ReLU.

Both projections use perplexity 30, PCA initialisation, ``learning_rate="auto"`` and the
same ``n_jobs``; scikit-learn runs on the raw features with its defaults (Barnes-Hut,
1,000 iterations), which is what a user would otherwise call. ``--sklearn-on-pca50``
also times scikit-learn on the same PCA-50 input detlens uses, separating the gain of
the PCA step from the gain of the FFT optimiser. Trustworthiness (5 neighbours) is
computed for every projection against the original features on the same seeded
subsample (``--trust-rows``).

Run: ``.venv/bin/python benchmarks/embedding_projection.py [--points 10000 --dims 1024]``

``--data-seeds 0 1 2`` repeats the comparison on three data sets (each seed also seeds both
t-SNEs) and summarises: trustworthiness differences of a few 1e-5 are within what the data
and the sampled rows alone move. ``--tsne-seeds 0 1 2`` runs both t-SNEs once per seed on each
data set (the same features and trustworthiness rows) and prints, per data set, each
method's mean trustworthiness, its spread over the seeds and the difference of the means
with its standard error: how far apart two runs of one method land by their seed alone is
the scale on which "equal" is judged.

``--early-stop 104 300 1000 3000`` instead measures the early stop of detlens' Barnes-Hut t-SNE
(below 10,000 points, as in a logging event; ``min_kl_decrease``) against all its iterations:
where it stopped, time and trustworthiness of both, on each ``--data-seeds`` data set.

``--detector EPOCHS`` instead measures real box features: it trains Faster R-CNN
(ResNet-18 FPN, from scratch, the demo config's sizes) for ``EPOCHS`` epochs on the
synthetic scenes (``detlens.data.SyntheticDataModule``), extracts the box-head feature of
every validation detection (``detlens.explainers.box_features``), projects them with
t-SNE and prints the class silhouette (features and 2-D) and trustworthiness, next to
the same figures for the untrained network; ``--scatter PATH`` saves the scatter plot.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np
import torch


def make_box_features(points: int, dims: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(float32[points, dims], int64[points])``: clustered manifold features and class labels."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, classes + 1) ** 0.8
    counts = np.floor(points * weights / weights.sum()).astype(np.int64)
    counts[: points - counts.sum()] += 1  # the rounding remainder goes to the largest classes
    latent_dim, manifold_dim = 12, 3
    centres = rng.normal(scale=2.5, size=(classes, latent_dim))
    latent, labels = [], []
    for c, count in enumerate(counts):
        u = rng.normal(size=(count, manifold_dim))
        linear = rng.normal(scale=0.6, size=(manifold_dim, latent_dim))
        freq = rng.normal(scale=1.0, size=(manifold_dim, latent_dim))
        latent.append(centres[c] + u @ linear + 0.5 * np.sin(u @ freq))
        labels.append(np.full(count, c + 1))
    z = np.concatenate(latent)
    lift = rng.normal(scale=1.0 / np.sqrt(latent_dim), size=(latent_dim, dims))
    bias = rng.normal(scale=0.2, size=dims)
    features = np.maximum(z @ lift + bias + rng.normal(scale=0.5, size=(z.shape[0], dims)), 0.0)
    order = rng.permutation(z.shape[0])
    return features[order].astype(np.float32), np.concatenate(labels)[order]


def environment(n_jobs: int) -> str:
    import numba
    import openTSNE
    import sklearn

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (
        f"environment: {platform.platform()} | {platform.processor() or platform.machine()} | "
        f"cores available {cores} (os.cpu_count {os.cpu_count()}) | load avg {load} | n_jobs {n_jobs} | "
        f"torch threads {torch.get_num_threads()}\n"
        f"versions: python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, "
        f"scikit-learn {sklearn.__version__}, openTSNE {openTSNE.__version__}, numba {numba.__version__}"
    )


def detector_features(epochs: int, seed: int, scatter: str | None, image_size: int = 128) -> None:
    """Train briefly on synthetic scenes; print how well box features separate classes."""
    import tempfile

    import pytorch_lightning as pl

    from detlens.data import SyntheticDataModule
    from detlens.explainers.box_features import concat_box_features, extract_box_features
    from detlens.explainers.embeddings import embed
    from detlens.lightning_modules import TorchvisionDetector
    from detlens.render.scatter import render_scatter

    root = os.path.join(tempfile.gettempdir(), f"detlens-bench-scenes-{image_size}")
    dm = SyntheticDataModule(root=root, num_train=400, num_val=100, image_size=image_size, seed=seed, batch_size=8)
    pl.seed_everything(seed)
    model = TorchvisionDetector(
        "fasterrcnn_resnet18_fpn", num_classes=dm.num_classes, class_names=dm.class_names,
        min_size=image_size, max_size=image_size, returned_layers=[2, 3, 4], fpn_channels=64,
        anchor_sizes=[16, 32, 64, 128], rpn_proposals_train=300, rpn_proposals_test=150,
        rpn_batch_size_per_image=128, box_batch_size_per_image=128, representation_size=256,
        detections_per_image=20, optimizer="adamw", lr=0.002, warmup_steps=50,
    )
    dm.setup("fit")
    items = [dm.val_dataset[i] for i in range(len(dm.val_dataset))]

    def measure(name: str, score_threshold: float = 0.3) -> None:
        per_image = []
        for start in range(0, len(items), 16):
            chunk = items[start : start + 16]
            per_image += extract_box_features(
                model, [im for im, _ in chunk], [t for _, t in chunk], score_threshold=score_threshold,
                max_detections=10,
            )
        dets = concat_box_features(per_image)
        counts = dets.counts()
        if len(dets) < 10:
            print(f"{name}: only {len(dets)} detections above score {score_threshold} - nothing to project", flush=True)
            return
        summary = embed(dets.features, dets.labels, method="tsne", seed=seed)
        print(
            f"{name}: {len(dets)} detections on {len(items)} val images (TP {counts['tp']}, FP {counts['fp']}, "
            f"FN {counts['fn']}), {dets.features.shape[1]}-d box-head features | silhouette: features "
            f"{summary.silhouette_features:.3f}, t-SNE 2-D {summary.silhouette_2d:.3f} | trustworthiness "
            f"{summary.projection.trustworthiness:.4f} | t-SNE {summary.projection.seconds:.1f} s",
            flush=True,
        )
        if scatter and name.startswith("trained"):
            from PIL import Image

            rows = summary.indices.tolist()
            pixels = render_scatter(
                summary.projection.coords, dets.labels[rows], outcomes=[dets.outcome[r] for r in rows],
                class_names=dm.class_names, method="tsne", trustworthiness=summary.projection.trustworthiness,
                silhouette=summary.silhouette_2d,
                subtitle=f"Faster R-CNN R18-FPN, {epochs} epochs on synthetic scenes: {len(dets)} val detections",
            )
            Image.fromarray(pixels).save(scatter)
            print(f"scatter plot: {scatter}")

    # Untrained scores sit near 1 / (C + 1): its top 10 boxes per image, whatever their score.
    measure("untrained network (top 10 per image, any score)", score_threshold=0.0)
    start = time.perf_counter()
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
    )
    trainer.fit(model, dm)
    print(f"trained {epochs} epochs ({trainer.global_step} steps) in {time.perf_counter() - start:.0f} s", flush=True)
    measure(f"trained network ({epochs} epochs)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=10_000)
    parser.add_argument("--dims", type=int, default=1_024)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--perplexity", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-seeds", type=int, nargs="+", default=None, metavar="SEED",
                        help="repeat the comparison on the data sets of these seeds (each also seeds both t-SNEs) "
                             "and summarise; default: --seed only")
    parser.add_argument("--tsne-seeds", type=int, nargs="+", default=None, metavar="SEED",
                        help="random states of both t-SNEs, one run each per data set; default: the data seed")
    parser.add_argument("--trust-rows", type=int, default=5_000)
    parser.add_argument("--n-jobs", type=int, default=0, help="threads for both (0: all available cores)")
    parser.add_argument("--gradient", choices=("p3m", "fft"), default="p3m",
                        help="detlens' schedule from 10,000 points: p3m (the default: P3M gradients after early "
                             "exaggeration) or fft (the previous one: FFT gradients, then Barnes-Hut)")
    parser.add_argument("--n-iter", type=int, default=None,
                        help="openTSNE iterations after early exaggeration, the last --polish-iter of them closing ones; "
                             "default: detlens' (300 with p3m, 220 with fft)")
    parser.add_argument("--polish-iter", type=int, default=None,
                        help="closing iterations at momentum 0.9 and 2 N, Barnes-Hut with fft (default: detlens' "
                             "200 with p3m, 120 with fft)")
    parser.add_argument("--early-exaggeration-iter", type=int, default=None,
                        help="early-exaggeration iterations (default: detlens' 150 with FFT gradients)")
    parser.add_argument("--ints-in-interval", type=float, default=None,
                        help="openTSNE FFT grid coarseness after early exaggeration (default: detlens' 2; openTSNE's own is 1)")
    parser.add_argument("--sklearn-on-pca50", action="store_true", help="also time sklearn on the PCA-50 input")
    parser.add_argument("--detector", type=int, default=0, metavar="EPOCHS",
                        help="instead: train Faster R-CNN for EPOCHS on synthetic scenes and measure its box features")
    parser.add_argument("--scatter", default=None, help="with --detector: save the trained model's scatter PNG here")
    parser.add_argument("--gradient-accuracy", action="store_true",
                        help="instead: the repulsive forces of P3M, Barnes-Hut and FFT interpolation against the exact "
                             "O(N^2) sum, and the time of one evaluation, on detlens' layouts of each --data-seeds data set")
    parser.add_argument("--early-stop", type=int, nargs="+", default=None, metavar="POINTS",
                        help="instead: at each of these sizes (under 10,000: Barnes-Hut throughout) detlens' t-SNE "
                             "with its KL early stop against all 500 iterations, on each --data-seeds data set")
    args = parser.parse_args(argv)
    if args.detector:
        torch.set_num_threads(args.n_jobs or 1)
        detector_features(args.detector, args.seed, args.scatter)
        return

    n_jobs = args.n_jobs or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    torch.set_num_threads(n_jobs)
    print(environment(n_jobs))
    if args.gradient == "p3m" and not args.early_stop:
        from detlens.explainers.tsne_p3m import compile_kernels

        # numba compiles the P3M loops once per environment (cache=True) and loads them after that.
        print(f"P3M loops compiled or loaded from numba's cache in {compile_kernels():.1f} s (not in the times below)")
    seeds = args.data_seeds if args.data_seeds is not None else [args.seed]
    if args.gradient_accuracy:
        for seed in seeds:
            gradient_accuracy(args, seed, n_jobs)
        return
    if args.early_stop:
        early_stop(args, args.early_stop, seeds, n_jobs)
        return
    runs = [(seed, tsne_seed) for seed in seeds for tsne_seed in (args.tsne_seeds or [seed])]
    results = [compare(args, seed, n_jobs, tsne_seed) for seed, tsne_seed in runs]
    if len(results) > 1:
        print(f"over {len(results)} runs (data seed / t-SNE seed):")
        for (seed, tsne_seed), (wall_ours, wall_sk, trust_ours, trust_sk) in zip(runs, results):
            print(f"  {seed} / {tsne_seed}: {wall_sk / wall_ours:.1f}x, trustworthiness {trust_ours - trust_sk:+.5f}")
        ratios = [wall_sk / wall_ours for wall_ours, wall_sk, _, _ in results]
        wins = sum(trust_ours >= trust_sk for _, _, trust_ours, trust_sk in results)
        print(f"  speed {min(ratios):.1f}x to {max(ratios):.1f}x; trustworthiness equal or better in {wins} of "
              f"{len(results)}, mean difference {np.mean([o - k for _, _, o, k in results]):+.5f}")
    if args.tsne_seeds is not None and len(args.tsne_seeds) > 1:
        for seed in seeds:
            ours = np.array([r[2] for (d, _), r in zip(runs, results) if d == seed])
            theirs = np.array([r[3] for (d, _), r in zip(runs, results) if d == seed])
            se = np.sqrt(ours.var(ddof=1) / len(ours) + theirs.var(ddof=1) / len(theirs))
            print(
                f"data seed {seed}, {len(ours)} t-SNE seeds: trustworthiness detlens {ours.mean():.5f} "
                f"(sd {ours.std(ddof=1):.5f}), scikit-learn {theirs.mean():.5f} (sd {theirs.std(ddof=1):.5f}); "
                f"difference of means {ours.mean() - theirs.mean():+.5f} (standard error {se:.5f})"
            )


def gradient_accuracy(args: argparse.Namespace, seed: int, n_jobs: int) -> None:
    """Relative error of the repulsive forces ``Σ_j q_ij² (y_i - y_j) / Z`` against the exact
    sum, and milliseconds per evaluation (median of 5), for each method on two of detlens'
    layouts of the data set: after early exaggeration and 100 P3M iterations, and the final one."""
    from openTSNE import _tsne  # openTSNE's own gradient routines, as its optimiser calls them
    from openTSNE.quad_tree import QuadTree

    from detlens.explainers.embeddings import tsne_2d
    from detlens.explainers.tsne_p3m import repulsion

    features, _ = make_box_features(args.points, args.dims, args.classes, seed)
    x = torch.from_numpy(features)
    layouts = {
        "after 100 iterations": tsne_2d(x, seed=seed, n_jobs=n_jobs, n_iter=100, polish_iter=0),
        "final": tsne_2d(x, seed=seed, n_jobs=n_jobs),
    }

    def exact(y: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(y)
        forces, z = torch.zeros_like(t), 0.0
        for start in range(0, len(t), 1000):  # O(N^2) in blocks of rows
            d = t[start:start + 1000, None, :] - t[None, :, :]
            q = 1.0 / (1.0 + (d**2).sum(-1))
            q[torch.arange(len(q)), torch.arange(start, start + len(q))] = 0.0
            z += float(q.sum())
            forces[start:start + 1000] = ((q**2)[..., None] * d).sum(1)
        return (forces / z).numpy()

    def bh(theta: float):
        def run(y: np.ndarray) -> np.ndarray:
            g = np.zeros_like(y)
            _tsne.estimate_negative_gradient_bh(QuadTree(y), y, g, theta=theta, dof=1, num_threads=n_jobs,
                                                pairwise_normalization=True)
            return -g  # openTSNE writes -forces / Z
        return run

    def fft(ints_in_interval: float):
        def run(y: np.ndarray) -> np.ndarray:
            g = np.zeros_like(y)
            _tsne.estimate_negative_gradient_fft_2d(y, g, n_interpolation_points=3, min_num_intervals=50,
                                                    ints_in_interval=ints_in_interval, dof=1)
            return -g  # the same convention
        return run

    def p3m(h: float, rc: float):
        def run(y: np.ndarray) -> np.ndarray:
            forces, z = repulsion(y, h=h, rc=rc, n_jobs=n_jobs)
            return forces / z
        return run

    methods = {
        "P3M h 0.75, rc 2.5 (detlens' default)": p3m(0.75, 2.5),
        "P3M h 0.75, rc 3": p3m(0.75, 3.0),
        "Barnes-Hut theta 0.5": bh(0.5),
        "Barnes-Hut theta 0.7": bh(0.7),
        "FFT, 2 units per interval": fft(2.0),
        "FFT, 1 unit per interval (openTSNE's default)": fft(1.0),
    }
    for name, coords in layouts.items():
        y = coords.double().numpy()
        truth = exact(y)
        span = y.max(0) - y.min(0)
        print(f"data seed {seed}, layout {name} ({len(y):,} points, {span[0]:.0f} x {span[1]:.0f} units):")
        for label, method in methods.items():
            method(y)  # warm
            times = []
            for _ in range(5):
                start = time.perf_counter()
                got = method(y)
                times.append(time.perf_counter() - start)
            error = np.linalg.norm(got - truth) / np.linalg.norm(truth)
            print(f"  {label:<48s} relative error {error:7.2%}   {1000 * np.median(times):6.1f} ms", flush=True)


def early_stop(args: argparse.Namespace, sizes: list[int], seeds: list[int], n_jobs: int) -> None:
    """``tsne_2d``'s early stop (``min_kl_decrease``, Barnes-Hut below 10,000 points) against
    all its iterations: where it stopped, the time and the trustworthiness of both."""
    from detlens.explainers import embeddings

    stopped_at: list[int] = []

    class Watched(embeddings._KLConverged):  # records the iteration at which it stops
        def __call__(self, iteration: int, error: float, embedding) -> bool:
            stop = super().__call__(iteration, error, embedding)
            if stop:
                stopped_at.append(iteration)
            return stop

    embeddings._KLConverged = Watched  # tsne_2d looks the class up when it runs
    full_iter = embeddings._default_n_iter("bh")
    print(f"Barnes-Hut t-SNE, perplexity {args.perplexity}, {args.dims}-D box features of {args.classes} classes, "
          f"min_kl_decrease {embeddings.MIN_KL_DECREASE} (checked every {embeddings.KL_CHECK_EVERY} iterations) "
          f"against all {full_iter} iterations after early exaggeration")
    for points in sizes:
        for seed in seeds:
            features, _ = make_box_features(points, args.dims, args.classes, seed)
            x = torch.from_numpy(features)
            runs = []
            for tol in (embeddings.MIN_KL_DECREASE, 0.0):
                stopped_at.clear()
                start = time.perf_counter()
                coords = embeddings.tsne_2d(x, seed=seed, perplexity=args.perplexity, n_jobs=n_jobs,
                                            negative_gradient_method="bh", min_kl_decrease=tol)
                wall = time.perf_counter() - start
                trust = embeddings.trustworthiness_score(x, coords, max_rows=args.trust_rows, seed=seed)
                runs.append((wall, trust, stopped_at[0] if stopped_at else full_iter))
            (wall, trust, iters), (wall_full, trust_full, _) = runs
            print(f"{points:>6,} points, data seed {seed}: stopped after {iters} of {full_iter} iterations   "
                  f"{wall:6.2f} s vs {wall_full:6.2f} s ({wall / wall_full:.2f}x the time)   "
                  f"trustworthiness {trust:.5f} vs {trust_full:.5f} ({trust - trust_full:+.5f})", flush=True)


def compare(args: argparse.Namespace, seed: int, n_jobs: int, tsne_seed: int) -> tuple[float, float, float, float]:
    """detlens' t-SNE and scikit-learn's on the data set of ``seed``, both seeded with ``tsne_seed``;
    ``(wall detlens, wall sklearn, trust detlens, trust sklearn)``."""
    from sklearn.manifold import TSNE as SklearnTSNE

    from detlens.explainers.embeddings import (
        FFT_EARLY_EXAGGERATION_ITER,
        _default_n_iter,
        _polish_iterations,
        class_separation,
        pca,
        trustworthiness_score,
        tsne_2d,
    )

    features, labels = make_box_features(args.points, args.dims, args.classes, seed)
    x = torch.from_numpy(features)
    tsne_kwargs = {} if args.ints_in_interval is None else {"ints_in_interval": args.ints_in_interval}
    # detlens' own defaults unless overridden, so the label below names what actually ran.
    n_iter = args.n_iter if args.n_iter is not None else _default_n_iter(args.gradient)
    polish = _polish_iterations(args.polish_iter, n_iter, args.gradient)
    early = args.early_exaggeration_iter if args.early_exaggeration_iter is not None else FFT_EARLY_EXAGGERATION_ITER
    print(
        f"data (seed {seed}, t-SNE seed {tsne_seed}): {features.shape[0]:,} x {features.shape[1]:,} float32 features, "
        f"{args.classes} classes "
        f"(sizes {np.bincount(labels)[1:].min()}..{np.bincount(labels)[1:].max()}), perplexity {args.perplexity}, "
        f"trustworthiness on {min(args.trust_rows, args.points):,} seeded rows, 5 neighbours"
    )

    def report(name: str, coords: np.ndarray | torch.Tensor, wall: float, cpu: float) -> float:
        trust = trustworthiness_score(x, torch.as_tensor(coords), max_rows=args.trust_rows, seed=seed)
        sil = class_separation(torch.as_tensor(coords), labels, seed=seed)
        print(
            f"{name:<60s} wall {wall:7.1f} s  cpu {cpu:7.1f} s   trustworthiness {trust:.5f}   "
            f"silhouette(2-D) {sil:.3f}",
            flush=True,
        )
        return trust

    def timed(fn):  # wall time, and CPU time of all this process's threads (robust to a loaded machine)
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn()
        return out, time.perf_counter() - wall, time.process_time() - cpu

    ours, wall_ours, cpu_ours = timed(
        lambda: tsne_2d(
            x, seed=tsne_seed, perplexity=args.perplexity, pca_dims=50, n_jobs=n_jobs,
            n_iter=n_iter, negative_gradient_method=args.gradient, polish_iter=polish, early_exaggeration_iter=early,
            **tsne_kwargs,
        )
    )
    schedule = (f"{early} FFT+{n_iter} P3M" if args.gradient == "p3m"
                else f"{early}+{n_iter - polish} FFT+{polish} BH")
    trust_ours = report(f"detlens: PCA-50, exact kNN, openTSNE {schedule}", ours, wall_ours, cpu_ours)

    def sklearn_tsne(data: np.ndarray) -> np.ndarray:
        return SklearnTSNE(
            n_components=2, perplexity=args.perplexity, init="pca", learning_rate="auto",
            method="barnes_hut", n_jobs=n_jobs, random_state=tsne_seed,
        ).fit_transform(data)

    sk, wall_sk, cpu_sk = timed(lambda: sklearn_tsne(features))
    trust_sk = report("scikit-learn TSNE (barnes_hut, 1000 iter) on raw features", sk, wall_sk, cpu_sk)

    if args.sklearn_on_pca50:
        sk50, wall50, cpu50 = timed(lambda: sklearn_tsne(pca(x, 50, seed=tsne_seed).numpy()))
        report("scikit-learn TSNE (barnes_hut) on the same PCA-50 input", sk50, wall50, cpu50)

    verdict = "equal or better" if trust_ours >= trust_sk else f"lower by {trust_sk - trust_ours:.5f}"
    print(
        f"speed: detlens {wall_sk / wall_ours:.1f}x faster than scikit-learn in wall time "
        f"({wall_ours:.1f} s vs {wall_sk:.1f} s), {cpu_sk / cpu_ours:.1f}x in CPU time; "
        f"trustworthiness {verdict} ({trust_ours:.5f} vs {trust_sk:.5f})",
        flush=True,
    )
    return wall_ours, wall_sk, trust_ours, trust_sk


if __name__ == "__main__":
    sys.exit(main())
