"""Wall-time and peak-memory overhead of detlens's callbacks on the demo training run.

Fits the demo config twice — once with every callback in it, once with the detlens
callbacks removed (Lightning's own callbacks stay) — each in a fresh subprocess so that
peak RSS is measured per run, and prints the overhead as a percentage of wall time::

    python benchmarks/callback_overhead.py                      # the full demo config
    python benchmarks/callback_overhead.py --max-epochs 1       # quicker, same cadence rules

Both runs use the same seed and data; W&B runs offline into a temporary folder. The
figure includes everything the callbacks cost: explaining, rendering and logging media.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _strip_detlens_callbacks(config: dict) -> dict:
    callbacks = config["trainer"].get("callbacks") or []
    config["trainer"]["callbacks"] = [c for c in callbacks if not c["class_path"].startswith("detlens.")]
    return config


def _child(config_path: str, out_path: str) -> None:
    """Runs one fit in this process and writes its wall time and peak RSS as JSON."""
    import wandb

    from detlens.cli import build_cli

    start = time.perf_counter()
    cli = build_cli(["fit", "--config", config_path])
    if wandb.run is not None:
        wandb.finish()
    wall = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}
    Path(out_path).write_text(json.dumps({"wall_s": wall, "peak_rss_mib": peak_kib / 1024, "metrics": metrics}))


def _run_variant(name: str, config: dict, workdir: Path) -> dict:
    config_path = workdir / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    out_path = workdir / f"{name}.json"
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true")
    print(f"[{name}] fitting {config_path.name} ...", flush=True)
    subprocess.run(
        [sys.executable, __file__, "--child", str(config_path), str(out_path)], cwd=workdir, env=env, check=True
    )
    return json.loads(out_path.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "fasterrcnn_synthetic.yaml"))
    parser.add_argument("--max-epochs", type=int, default=None, help="override trainer.max_epochs")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(*args.child)
        return

    config = yaml.safe_load(Path(args.config).read_text())
    trainer = config["trainer"]
    trainer.update(enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    if args.max_epochs is not None:
        trainer["max_epochs"] = args.max_epochs
    detlens_callbacks = [c["class_path"] for c in trainer.get("callbacks") or [] if c["class_path"].startswith("detlens.")]
    with tempfile.TemporaryDirectory(prefix="detlens-overhead-") as tmp:
        workdir = Path(tmp)
        data_root = config["data"]["init_args"].get("root")
        if data_root and not Path(data_root).is_absolute():  # share one generated dataset
            config["data"]["init_args"]["root"] = str((REPO / data_root).resolve())
        trainer["logger"]["init_args"]["save_dir"] = str(workdir)
        baseline = _run_variant("without", _strip_detlens_callbacks(json.loads(json.dumps(config))), workdir)
        full = _run_variant("with", config, workdir)

    overhead = 100.0 * (full["wall_s"] - baseline["wall_s"]) / baseline["wall_s"]
    rss = full["peak_rss_mib"] - baseline["peak_rss_mib"]
    print(f"config: {args.config} (max_epochs={trainer['max_epochs']})")
    print(f"detlens callbacks: {', '.join(c.rsplit('.', 1)[1] for c in detlens_callbacks)}")
    print(f"wall time without callbacks: {baseline['wall_s']:.1f} s   with: {full['wall_s']:.1f} s")
    print(f"callback overhead: {overhead:.1f}% of wall time")
    print(f"peak RSS without: {baseline['peak_rss_mib']:.0f} MiB   with: {full['peak_rss_mib']:.0f} MiB   overhead: {rss:+.0f} MiB")
    print(f"val/mAP_50 without: {baseline['metrics'].get('val/mAP_50', float('nan')):.3f}   with: {full['metrics'].get('val/mAP_50', float('nan')):.3f}")


if __name__ == "__main__":
    main()
