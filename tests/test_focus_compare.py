"""``detlens compare`` / ``detlens report`` on the focus records of real (tiny) fits in offline W&B runs.

Two identical fits compare as no drift and pass; the trained model with randomised weights
compares as drifted and fails; the exit code follows the thresholds; the HTML report is
self-contained and its images decode.
"""

from __future__ import annotations

import base64
import io
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import wandb
from PIL import Image
from pytorch_lightning.loggers import WandbLogger
from wandb_utils import newest_offline_run, scalar_history

from detlens.callbacks.attention_entropy import AttentionEntropyCallback
from detlens.callbacks.gradcam import GradCAMCallback
from detlens.cli import EXIT_BAD_INPUT, EXIT_INSUFFICIENT, EXIT_OK, EXIT_REGRESSION, main
from detlens.data import SyntheticDataModule
from detlens.focus.compare import compare_records
from detlens.focus.drift import focus_metrics
from detlens.focus.evidence import MIN_MATCHED
from detlens.focus.record import FocusRecordWriter, read_focus_record
from detlens.lightning_modules import TorchvisionDetector

SIZE = 64


pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.numerics]


def scenes(root: Path) -> SyntheticDataModule:
    return SyntheticDataModule(root=str(root), num_train=8, num_val=4, image_size=SIZE, batch_size=4, horizontal_flip=False)


def detector(dm: SyntheticDataModule) -> TorchvisionDetector:
    return TorchvisionDetector(
        "fasterrcnn_resnet18_fpn", num_classes=dm.num_classes, class_names=dm.class_names, min_size=SIZE,
        max_size=SIZE, fpn_channels=16, representation_size=32, rpn_proposals_train=50, rpn_proposals_test=20,
        box_batch_size_per_image=16, anchor_sizes=[8, 16, 32, 64, 128], score_thresh=0.0, warmup_steps=1,
        attention_stage="layer3",
    )


def callbacks() -> list[pl.Callback]:
    return [
        GradCAMCallback(top_k=3, score_threshold=0.0, num_probe_images=3, iou_threshold=0.1),
        AttentionEntropyCallback(every_n_train_steps=None, num_probe_images=2),
    ]


def trainer(save_dir: Path, **overrides) -> pl.Trainer:
    kwargs = dict(
        accelerator="cpu", max_epochs=2, logger=WandbLogger(offline=True, save_dir=save_dir), enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1, num_sanity_val_steps=0,
        deterministic=True, callbacks=callbacks(),
    )
    kwargs.update(overrides)
    return pl.Trainer(**kwargs)


def fit(root: Path, save_dir: Path) -> tuple[Path, TorchvisionDetector]:
    dm = scenes(root)
    pl.seed_everything(0)
    model = detector(dm)
    trainer(save_dir).fit(model, dm)
    wandb.finish()
    return newest_offline_run(save_dir).run_dir, model


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run folders: ``a`` and ``b`` two identical fits, ``random`` a validate of ``a``'s model with randomised weights."""
    base = tmp_path_factory.mktemp("focus_runs")
    scenes(base / "scenes")
    run_a, model = fit(base / "scenes", base / "a")
    run_b, _ = fit(base / "scenes", base / "b")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the model-randomisation sanity check: every weight redrawn with its own statistics
        for p in model.parameters():
            std = float(p.std()) if p.numel() > 1 else 0.0
            p.copy_(torch.randn(p.shape, generator=generator) * (std or 0.02) + p.mean())
    trainer(base / "random").validate(model, scenes(base / "scenes"), verbose=False)
    wandb.finish()
    return {"a": run_a, "b": run_b, "random": newest_offline_run(base / "random").run_dir, "base": base}


def decoded_images(html_text: str) -> list[np.ndarray]:
    uris = re.findall(r'src="data:image/png;base64,([^"]+)"', html_text)
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(u))).convert("RGB")) for u in uris]


def test_each_logging_point_is_recorded_with_the_offline_run(runs):
    run = newest_offline_run(runs["a"].parent)
    record = read_focus_record(runs["a"])
    assert record.path == runs["a"] / "files" / "detlens_focus" / "focus.jsonl"
    assert record.header["run_id"] == run.run_id and not record.truncated
    points = record.map_points("gradcam")
    logged_steps = [row["trainer/global_step"] for row in run.history if "gradcam/detections_per_image" in row]
    assert [p.step for p in points] == [2, 4] == logged_steps
    assert all(len(p.images) == 3 and all(len(im) == 3 for im in p.images) for p in points)
    assert {i for (key, i) in record.probe_images if key == "gradcam"} == {im.probe_index for im in points[0].images}
    # The record holds what was logged: the energy-in-box the callback logged is the record's.
    logged = {row["trainer/global_step"]: row["gradcam/energy_in_box"] for row in run.history if "gradcam/energy_in_box" in row}
    assert logged, "the fixture's runs have true positives"
    for p in points:
        if p.step in logged:
            assert focus_metrics(p)["energy_in_box"] == pytest.approx(logged[p.step], rel=1e-5)
    assert [e.step for e in record.entropy_points("probe")] == [2, 4]
    assert scalar_history(run, "gradcam/detections_per_image") == [3.0, 3.0]


def test_identical_runs_compare_as_no_drift_and_pass(runs, tmp_path):
    out = tmp_path / "same.html"
    assert main(["compare", str(runs["a"]), str(runs["b"]), "--out", str(out)]) == EXIT_OK
    comparison = compare_records(read_focus_record(runs["a"]), read_focus_record(runs["b"]))
    assert comparison.passed and comparison.drift is not None
    assert comparison.drift.drift == pytest.approx(0.0, abs=1e-9) and comparison.drift.match_rate == 1.0
    assert comparison.entropy is not None and comparison.entropy.max == pytest.approx(0.0, abs=1e-6)
    html_text = out.read_text()
    assert "PASS" in html_text and "FAIL" not in html_text
    assert "0.000" in html_text and runs["a"].name in html_text and runs["b"].name in html_text


def test_the_model_with_randomised_weights_never_passes(runs, tmp_path):
    """Randomised weights move the maps (a failure) or the detections (too few matched for a
    verdict): either way the gate does not pass."""
    out = tmp_path / "random.html"
    code = main(["compare", str(runs["a"]), str(runs["random"]), "--out", str(out)])
    comparison = compare_records(read_focus_record(runs["a"]), read_focus_record(runs["random"]), max_drift=0.5)
    drift = comparison.drift
    assert drift is not None and not comparison.passed
    if drift.matched >= MIN_MATCHED:
        assert code == EXIT_REGRESSION and drift.drift > 0.5 and "FAIL" in out.read_text()
    else:
        assert code == EXIT_INSUFFICIENT and "NOT ENOUGH EVIDENCE" in out.read_text()


def shifted_copy(run_dir: Path, out_dir: Path, shift: int) -> Path:
    """``run_dir``'s record with every stored map rolled ``shift`` cells to the right (same detections)."""
    record = read_focus_record(run_dir)
    writer = FocusRecordWriter(out_dir)
    for (key, index), pixels in record.probe_images.items():
        writer.write_probe_image(key, index, pixels)
    for point in record.maps:
        for image in point.images:
            image.maps = np.roll(image.maps, shift, axis=2)
        writer.write(point)
    for point in record.entropy:
        writer.write(point)
    return out_dir


def edited_copy(run_dir: Path, out_dir: Path, edit) -> Path:  # type: ignore[no-untyped-def]
    """``run_dir``'s record with ``edit(point)`` applied to every map point (returns the new images)."""
    record = read_focus_record(run_dir)
    writer = FocusRecordWriter(out_dir)
    for point in record.maps:
        point.images = edit(point)
        writer.write(point)
    return out_dir


def without_detections(point):  # type: ignore[no-untyped-def]
    """The point's images as explained by a model that detected nothing (an early model at score 0.5)."""
    for image in point.images:
        keep = np.zeros(len(image), bool)
        for name in ("boxes", "labels", "scores", "maps", "peaks", "is_tp", "energy_in_box", "chance", "pointing_game",
                     "below_threshold"):
            setattr(image, name, getattr(image, name)[keep])
    return point.images


def test_two_runs_without_detections_are_not_enough_evidence_never_a_pass(runs, tmp_path):
    a = edited_copy(runs["a"], tmp_path / "a", without_detections)
    b = edited_copy(runs["b"], tmp_path / "b", without_detections)
    out = tmp_path / "empty.html"

    code = main(["compare", str(a), str(b), "--out", str(out), "--min-energy-in-box", "0.3"])

    assert code == EXIT_INSUFFICIENT
    comparison = compare_records(read_focus_record(a), read_focus_record(b), min_energy_in_box=0.3)
    assert comparison.verdict == "insufficient" and not comparison.passed and not comparison.violations
    assert comparison.drift is not None and comparison.drift.matched == 0 and np.isnan(comparison.drift.match_rate)
    reasons = " ".join(comparison.insufficient)
    assert "0 matched detections" in reasons and "no true positive" in reasons
    html_text = out.read_text()
    assert "NOT ENOUGH EVIDENCE" in html_text and "verdict pass" not in html_text and "PASS" not in html_text
    assert "100%" not in html_text and "no detections to match" in html_text
    assert main(["compare", str(a), str(b), "--out", str(out), "--allow-insufficient-evidence"]) == EXIT_OK


def test_runs_without_a_shared_probe_image_are_not_enough_evidence(runs, tmp_path):
    def renumbered(point):  # type: ignore[no-untyped-def]
        for image in point.images:
            image.probe_index += 100
        return point.images

    other = edited_copy(runs["b"], tmp_path / "other", renumbered)
    comparison = compare_records(read_focus_record(runs["a"]), read_focus_record(other))
    assert comparison.verdict == "insufficient"
    assert "no probe image was explained in both" in comparison.insufficient[0]
    assert main(["compare", str(runs["a"]), str(other), "--out", str(tmp_path / "r.html")]) == EXIT_INSUFFICIENT


def test_min_matched_and_min_class_count_are_never_zero(runs, tmp_path):
    with pytest.raises(ValueError, match="min_matched must be an integer >= 1"):
        compare_records(read_focus_record(runs["a"]), read_focus_record(runs["b"]), min_matched=0)
    with pytest.raises(SystemExit):
        main(["compare", str(runs["a"]), str(runs["b"]), "--min-class-count", "0"])


def test_the_exit_code_follows_the_thresholds_and_the_evidence(runs, tmp_path):
    moved = shifted_copy(runs["a"], tmp_path / "moved", shift=6)
    comparison = compare_records(read_focus_record(runs["a"]), read_focus_record(moved), max_drift=2.0)
    drift = comparison.drift
    assert drift is not None and drift.match_rate == 1.0 and 0.0 < drift.drift < 2.0
    (check,) = comparison.checks  # the drift, with its count and interval
    assert check.count == drift.matched >= MIN_MATCHED and check.value == pytest.approx(drift.drift)
    assert 0.0 < check.low < check.value < check.high, "the moved maps do not all drift alike"
    a, out = str(runs["a"]), str(tmp_path / "r.html")

    def compare(candidate, *args: str) -> int:
        return main(["compare", a, str(candidate), "--out", out, *args])

    # below the whole interval: crossed; between its low end and the mean: not shown; above the mean: within
    assert compare(moved, "--max-drift", f"{check.low * 0.9:.6f}") == EXIT_REGRESSION
    assert "focus drift from the baseline" in Path(out).read_text() and "FAIL" in Path(out).read_text()
    between = f"{(check.low + check.value) / 2:.6f}"
    assert compare(moved, "--max-drift", between) == EXIT_INSUFFICIENT
    assert "NOT ENOUGH EVIDENCE" in Path(out).read_text() and "verdict pass" not in Path(out).read_text()
    assert compare(moved, "--max-drift", between, "--allow-insufficient-evidence") == EXIT_OK
    assert compare(moved, "--max-drift", f"{check.value * 1.01:.6f}") == EXIT_OK
    assert compare(moved, "--max-drift", "-1") == EXIT_OK  # drift not gated
    assert compare(moved, "--max-drift", "1.9", "--min-matched", str(drift.matched + 1)) == EXIT_INSUFFICIENT
    # Energy-in-box is checked per class on the candidate's true positives.
    energy = [c for c in compare_records(read_focus_record(runs["a"]), read_focus_record(runs["b"]), max_drift=None,
                                         min_energy_in_box=0.0, min_class_count=1).checks]
    assert energy and all(c.name.startswith("energy_in_box/") and c.count >= 1 for c in energy)
    b = str(runs["b"])
    lowest_high = min(c.high for c in energy)
    assert compare(b, "--max-drift", "-1", "--min-class-count", "1", "--min-energy-in-box", f"{lowest_high + 1e-4:.6f}") == EXIT_REGRESSION
    lowest_mean = min(c.value for c in energy)
    assert compare(b, "--max-drift", "-1", "--min-class-count", "1", "--min-energy-in-box", f"{max(lowest_mean - 1e-4, 0):.6f}") == EXIT_OK
    # a class with fewer true positives than --min-class-count gets no verdict, never a failure
    most = max(c.count for c in energy)
    assert compare(b, "--max-drift", "-1", "--min-class-count", str(most + 1), "--min-energy-in-box", "0.99") == EXIT_INSUFFICIENT
    assert compare(tmp_path / "missing") == EXIT_BAD_INPUT


def test_the_comparison_report_is_self_contained_and_its_images_load(runs, tmp_path):
    out = tmp_path / "report.html"
    main(["compare", str(runs["a"]), str(runs["random"]), "--out", str(out)])
    html_text = out.read_text()
    assert "<img" in html_text and "http://" not in html_text and "https://" not in html_text  # nothing to fetch
    for section in ("Focus metrics", "Drift from the baseline", "Focus over training", "Attention entropy", "Probe images"):
        assert section in html_text, section
    images = decoded_images(html_text)
    # 2 training charts + 2 entropy charts (one per run) + 3 probe images x 2 runs.
    assert len(images) == 2 + 2 + 3 * 2
    assert len(re.findall(r"<img ", html_text)) == len(images)
    for pixels in images:
        assert min(pixels.shape[:2]) >= 64 and pixels.std() > 5, "a drawn image, not a blank one"


def test_report_writes_one_runs_focus_over_training(runs, tmp_path):
    out = tmp_path / "run.html"
    assert main(["report", str(runs["a"]), "--out", str(out)]) == EXIT_OK
    html_text = out.read_text()
    assert "Focus metrics per logging point" in html_text and "step 2" in html_text and "step 4" in html_text
    assert "energy_in_box" in html_text and "Attention entropy" in html_text
    images = decoded_images(html_text)
    assert len(images) == 1 + 1 + 3 * 2  # training chart, entropy chart, first and last point per probe image
    shutil.copy(out, runs["base"] / "run_report.html")  # kept for a look by eye while the tmp dir lives
    assert main(["report", str(tmp_path / "nothing"), "--out", str(out)]) == EXIT_BAD_INPUT


def test_the_report_shows_each_runs_embedding_scatter_where_recorded(runs, tmp_path):
    from detlens.focus.record import EmbeddingPoint

    record_dir = shutil.copytree(runs["a"] / "files" / "detlens_focus", tmp_path / "with_embedding")
    rng = np.random.default_rng(0)
    coords = np.concatenate([rng.normal(0, 1, (20, 2)), rng.normal(6, 1, (20, 2))]).astype(np.float32)
    labels = np.repeat([1, 2], 20)
    FocusRecordWriter(record_dir).write(EmbeddingPoint(
        "embeddings", 4, 1, "tsne", coords, labels, ["tp"] * 30 + ["background"] * 10, np.arange(40) % 4, 0.9, 0.7,
        {1: "circle", 2: "square"}))
    out = tmp_path / "embedding.html"
    assert main(["report", str(record_dir), "--out", str(out)]) == EXIT_OK
    html_text = out.read_text()
    assert "Box embeddings" in html_text
    scatter = decoded_images(html_text)[-1]
    assert scatter.shape[:2] == (420, 640) and scatter.std() > 5
    Image.fromarray(scatter).save(runs["base"] / "scatter.png")  # kept for a look by eye


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def test_the_report_opens_in_headless_chromium_with_every_image_loaded(runs, tmp_path):
    """What a person sees: the comparison report in a real browser (Debian's chromium), every
    ``<img>`` decoded by the browser itself, and a screenshot kept for a look by eye."""
    import os
    import subprocess

    browser = chromium_binary()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; `make test` installs Debian's chromium package on a fresh machine")
        pytest.skip("chromium is not installed (Debian package `chromium`; `make test` installs it where it can)")
    report = tmp_path / "compare.html"
    main(["compare", str(runs["a"]), str(runs["random"]), "--out", str(report)])
    # The browser reports, into the DOM it dumps, how many images it decoded (naturalWidth > 0).
    probe = tmp_path / "probe.html"
    probe.write_text(report.read_text().replace(
        "</body>",
        "<script>window.addEventListener('load', () => { const imgs = [...document.images];"
        " document.body.dataset.loaded = imgs.filter(i => i.complete && i.naturalWidth > 0).length;"
        " document.body.dataset.total = imgs.length; });</script></body>",
    ))
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000",
    ]
    dom = subprocess.run([browser, *flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    loaded = re.search(r'data-loaded="(\d+)"', dom.stdout)
    total = re.search(r'data-total="(\d+)"', dom.stdout)
    assert loaded and total, f"chromium did not render the report: {dom.stderr[-1500:]}"
    assert int(total.group(1)) == len(decoded_images(report.read_text())) > 0
    assert loaded.group(1) == total.group(1), f"{loaded.group(1)} of {total.group(1)} images loaded in chromium"
    # The verdict a person reads: two runs without detections give no green banner.
    empty = [edited_copy(runs[k], tmp_path / f"empty_{k}", without_detections) for k in ("a", "b")]
    verdict_report = tmp_path / "empty.html"
    assert main(["compare", *map(str, empty), "--out", str(verdict_report)]) == EXIT_INSUFFICIENT
    dom = subprocess.run([browser, *flags, "--dump-dom", verdict_report.as_uri()], capture_output=True, text=True, timeout=120)
    verdicts = re.findall(r'<div class="verdict (\w+)">([^<]*)', dom.stdout)
    assert [(cls, text.split(":")[0]) for cls, text in verdicts] == [("insufficient", "NOT ENOUGH EVIDENCE")], dom.stdout[-2000:]
    shot = runs["base"] / "compare_screenshot.png"
    subprocess.run([browser, *flags, "--window-size=1280,2400", f"--screenshot={shot}", report.as_uri()],
                   capture_output=True, timeout=120, check=True)
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (2400, 1280) and pixels.std() > 5, "the screenshot shows a rendered page"
