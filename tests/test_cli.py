"""``detlens fit|validate --config``: LightningCLI wiring, the shipped configs, and the W&B run it leaves.

The fit runs in-process through :func:`detlens.cli.build_cli` (the console script's code
path) on a tiny variant of the demo config, then the offline W&B run is read back from
disk: the mAP history, the saved config and the overlay images with their box metadata.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import wandb
import yaml
from wandb_utils import finished_run, image_events, newest_offline_run, scalar_history

from detlens.cli import build_cli
from detlens.data.synthetic import TRAIN_ANN, VAL_ANN
from wandb_offline import find_offline_runs

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    # LightningCLI warns when it is given args while sys.argv holds pytest's own.
    monkeypatch.setattr(sys, "argv", ["detlens"])


def tiny_demo_config(tmp_path: Path) -> Path:
    """The demo config, shrunk to seconds: same classes, callbacks and logger."""
    config = yaml.safe_load((REPO / "configs" / "fasterrcnn_synthetic.yaml").read_text())
    config["trainer"].update(
        max_epochs=1, limit_train_batches=2, limit_val_batches=1, check_val_every_n_epoch=1,
        log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
    )
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path)
    for callback in config["trainer"]["callbacks"]:
        if "every_n_epochs" in callback.get("init_args", {}):
            callback["init_args"]["every_n_epochs"] = 1
        if "num_probe_images" in callback.get("init_args", {}):
            callback["init_args"]["num_probe_images"] = 2
    config["model"]["init_args"].update(min_size=64, max_size=64, fpn_channels=16, representation_size=32)
    config["data"]["init_args"].update(
        root=str(tmp_path / "data"), num_train=4, num_val=2, image_size=64, batch_size=2, num_workers=0
    )
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_shipped_config_parses_and_builds_its_model_and_data(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the configs' relative data/ and wandb/ paths land here
    raw = yaml.safe_load(config.read_text())
    data_args = raw["data"]["init_args"]
    if raw["data"]["class_path"].endswith("SyntheticDataModule"):
        data_args.update(num_train=2, num_val=1)  # generating the full set is not the point here
    else:  # a COCO folder: point it at a tiny synthetic one written in COCO format
        from detlens.data import generate_synthetic_scenes

        root = generate_synthetic_scenes(tmp_path / "coco", num_train=2, num_val=1, image_size=64, progress=False)
        data_args.update(root=str(root), train_ann=TRAIN_ANN, val_ann=VAL_ANN, train_images="train", val_images="val", num_workers=0)
    raw["trainer"].update(accelerator="cpu", devices=1, num_nodes=1, strategy="auto", precision="32-true", sync_batchnorm=False)
    raw["trainer"]["logger"] = False
    path = tmp_path / config.name
    path.write_text(yaml.safe_dump(raw))

    cli = build_cli(["--config", str(path)], run=False)

    assert cli.model.num_classes == cli.datamodule.num_classes == 4  # linked from the data
    assert cli.model.class_names == cli.datamodule.class_names
    assert type(cli.model).__name__ == raw["model"]["class_path"].rsplit(".", 1)[1]


def test_fit_writes_an_offline_wandb_run_with_map_history_config_and_box_overlays(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tiny_demo_config(tmp_path)

    build_cli(["fit", "--config", str(config)])
    wandb.finish()  # what `detlens` (cli.main) does on exit

    run = newest_offline_run(tmp_path)
    assert run.exit_code == 0
    assert len(scalar_history(run, "val/mAP_50")) == 1 and len(scalar_history(run, "val/mAP")) == 1
    assert scalar_history(run, "train/loss")
    saved = run.config["detlens_config"]
    assert saved["model"]["class_path"] == "detlens.lightning_modules.TorchvisionDetector"
    assert saved["model"]["init_args"]["attention_stage"] == "layer3"
    assert saved["data"]["init_args"]["root"] == str(tmp_path / "data")
    assert (run.run_dir / "files" / "config.yaml").is_file()

    (event,) = image_events(run, "predictions/probe")
    assert len(event.captions) == 2 and all(f.is_file() for f in event.image_files(run))
    truth = event.boxes(run, "ground_truth")
    assert all(image["box_data"] for image in truth)  # every synthetic scene holds objects
    assert {b["domain"] for image in truth for b in image["box_data"]} == {"pixel"}
    assert set(truth[0]["class_labels"].values()) >= {"circle", "square", "triangle", "cross"}


def test_validate_subcommand_runs_from_a_checkpoint_under_inference_mode(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tiny_demo_config(tmp_path)
    raw = yaml.safe_load(config.read_text())
    raw["trainer"]["logger"] = False
    raw["trainer"]["callbacks"] = [c for c in raw["trainer"]["callbacks"] if "LearningRateMonitor" not in c["class_path"]]
    raw["trainer"]["enable_checkpointing"] = True
    raw["trainer"]["default_root_dir"] = str(tmp_path / "out")
    config.write_text(yaml.safe_dump(raw))
    build_cli(["fit", "--config", str(config)])
    (ckpt,) = (tmp_path / "out").rglob("*.ckpt")

    cli = build_cli(["validate", "--config", str(config), "--ckpt_path", str(ckpt)])

    assert "val/mAP_50" in cli.trainer.callback_metrics


def test_console_script_reports_a_bad_config_value_without_a_traceback(tmp_path):
    config = tiny_demo_config(tmp_path)
    raw = yaml.safe_load(config.read_text())
    raw["model"]["init_args"]["architecture"] = "fasterrcnn_resnet19_fpn"
    config.write_text(yaml.safe_dump(raw))

    result = subprocess.run(
        [sys.executable, "-m", "detlens.cli", "fit", "--config", str(config)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )

    assert result.returncode != 0
    assert "fasterrcnn_resnet19_fpn" in result.stderr and "fasterrcnn_resnet18_fpn" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_spurious_cue_overlay_composes_with_the_demo_config(tmp_path, monkeypatch):
    """configs/overlays/*.yaml are given after a full config; the cue demo's swaps the callbacks."""
    monkeypatch.chdir(tmp_path)
    demo = yaml.safe_load((REPO / "configs" / "fasterrcnn_synthetic.yaml").read_text())
    demo["data"]["init_args"].update(num_train=2, num_val=1)
    demo["trainer"]["logger"] = False
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(demo))

    cli = build_cli(["--config", str(path), "--config", str(REPO / "configs" / "overlays" / "spurious_cue.yaml")], run=False)

    names = [type(c).__name__ for c in cli.trainer.callbacks]
    assert {"GradCAMCallback", "BoxEmbeddingCallback", "FocusRegressionCallback"} <= set(names)
    assert "AttentionMapCallback" not in names
    (gradcam,) = [c for c in cli.trainer.callbacks if type(c).__name__ == "GradCAMCallback"]
    assert gradcam.layer == "backbone.body.layer2"


LAUNCH = '''
import os
import sys
from pathlib import Path

from detlens.cli import main

# Records this rank's exit (LOCAL_RANK: torchrun sets it on every rank; Lightning's launcher
# on the processes it starts, so the launching process is rank 0).
rank = os.environ.get("LOCAL_RANK", "0")
outcome = "raised"
try:
    code = main()  # as the console script does: arguments from sys.argv
    outcome = str(code or 0)
except SystemExit as exit_:
    outcome = str(exit_.code or 0)
    raise
finally:
    Path(os.environ["DETLENS_TEST_EXITS"], f"rank{rank}").write_text(outcome)
'''


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.parametrize("launcher", ["lightning", "torchrun"])
def test_detlens_fit_under_ddp_exits_0_on_every_rank_with_one_wandb_run(tmp_path, launcher):
    """`detlens fit` as a cluster runs it: 2 CPU processes, every rank its own task."""
    config = tiny_demo_config(tmp_path)
    raw = yaml.safe_load(config.read_text())
    raw["data"]["init_args"].update(num_train=8, num_val=2, batch_size=2)
    raw["trainer"].update(limit_train_batches=2)
    for callback in raw["trainer"]["callbacks"]:  # an untrained model: explain every detection
        if "score_threshold" in callback.get("init_args", {}):
            callback["init_args"]["score_threshold"] = 0.0
    config.write_text(yaml.safe_dump(raw))
    script = tmp_path / "launch.py"
    script.write_text(LAUNCH)
    exits = tmp_path / "exits"
    exits.mkdir()
    args = ["fit", "--config", str(config), "--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.accelerator=cpu"]
    if launcher == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), *args]
    else:
        command = [sys.executable, str(script), *args]
    env = {**os.environ, "DETLENS_TEST_EXITS": str(exits), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    env.pop("LOCAL_RANK", None)

    # The pipes close when every rank has exited, so this waits for rank 1 too.
    done = subprocess.run(command, capture_output=True, text=True, timeout=420, cwd=tmp_path, env=env)

    assert done.returncode == 0, done.stderr[-3000:]
    assert {p.name: p.read_text() for p in exits.iterdir()} == {"rank0": "0", "rank1": "0"}, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "args parameter is intended" not in done.stderr, "LightningCLI got the arguments twice"
    runs = find_offline_runs(tmp_path)
    assert len(runs) == 1, f"one W&B run expected, found {[p.name for p in runs]}"
    run = finished_run(runs[0])
    assert run.exit_code == 0
    logged = {k for row in run.history for k in row}
    for key in ("predictions/probe", "gradcam/probe", "attention/entropy_heatmap", "embeddings/scatter"):
        assert image_events(run, key), f"{key} missing from the run; logged: {sorted(logged)}"
    assert any(k.startswith("attention_maps/") for k in logged)
    assert any(k.startswith("focus/") for k in logged)
