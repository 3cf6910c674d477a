"""``detlens`` command line: ``detlens fit|validate|test --config configs/<name>.yaml``, ``detlens compare|report``.

Training subcommands go through Lightning's ``LightningCLI`` (jsonargparse), so a config
is a plain Lightning config: ``model``, ``data``, ``trainer`` (callbacks under
``trainer.callbacks`` with ``class_path``/``init_args``). detlens adds three things:

* the data module's ``num_classes`` and ``class_names`` are linked into the model, so a
  config names the classes once (in the data);
* W&B is the default logger, offline (runs land in ``./wandb/``; ``wandb sync`` uploads
  them later); ``offline: false`` in the YAML, or another logger, switches it;
* the resolved config is saved into every W&B run (its config panel and a
  ``config.yaml`` file) besides the usual ``config.yaml`` in the log dir.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_info

from detlens.focus.evidence import MIN_CLASS_COUNT, MIN_MATCHED, require_min_count

DEFAULT_LOGGER: dict[str, Any] = {
    "class_path": "pytorch_lightning.loggers.WandbLogger",
    "init_args": {"project": "detlens", "offline": True, "save_dir": "."},
}


class ConfigToLoggersCallback(SaveConfigCallback):
    """Saves the resolved config to the log dir *and* into each W&B run.

    Lightning's ``SaveConfigCallback`` only writes ``config.yaml`` next to the
    checkpoints; a W&B user compares runs by their config panel, so it is also
    pushed into ``run.config`` (nested, as in the YAML) and uploaded as a file.
    """

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        config_yaml = self.parser.dump(self.config, skip_none=False)
        for logger in trainer.loggers:
            if not isinstance(logger, WandbLogger):
                continue
            run = logger.experiment
            run.config.update({"detlens_config": self.config.as_dict()}, allow_val_change=True)
            config_file = Path(run.dir) / "config.yaml"
            config_file.write_text(config_yaml)
            run.save(str(config_file), base_path=run.dir, policy="now")


class DetlensCLI(LightningCLI):
    """``LightningCLI`` with detlens's links between data and model, and W&B by default."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.init_args.class_names", apply_on="instantiate")

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                _drop_anonymous(logger)
        return trainer

    def after_fit(self) -> None:
        _print_run_locations(self.trainer)

    def after_validate(self) -> None:
        _print_run_locations(self.trainer)

    def after_test(self) -> None:
        _print_run_locations(self.trainer)


def _drop_anonymous(logger: WandbLogger) -> None:
    """Stops Lightning's ``WandbLogger`` passing ``anonymous=None`` to ``wandb.init``.

    wandb deprecated the setting and warns "The anonymous setting has no effect" whenever the
    key is given, whatever its value; Lightning always gives it. Left out when unset, before
    the run starts (the logger starts it on first use).
    """
    init = getattr(logger, "_wandb_init", None)
    if isinstance(init, dict) and init.get("anonymous") is None:
        init.pop("anonymous", None)


def _print_run_locations(trainer: pl.Trainer) -> None:
    # Rank zero only: on the other ranks of a DDP run the W&B logger's experiment is
    # Lightning's dummy (every attribute a no-op method), and under torchrun or SLURM every
    # rank is its own task, whose failure fails the job.
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            run = logger.experiment
            run_dir = Path(run.dir).parent
            rank_zero_info(
                f"detlens: W&B run {run.id} ({'offline' if run.offline else 'online'})"
                f" in {run_dir}\n  media: {Path(run.dir) / 'media'}\n"
                f"  upload it with: wandb sync {run_dir}"
            )
        elif logger.log_dir is not None:
            rank_zero_info(f"detlens: {type(logger).__name__} logs in {logger.log_dir}")


def build_cli(args: list[str] | None = None, run: bool = True) -> DetlensCLI:
    """Builds (and by default runs) the training CLI; ``args`` defaults to ``sys.argv[1:]``."""
    from detlens.lightning_modules import DetectionModule

    return DetlensCLI(
        model_class=DetectionModule,
        subclass_mode_model=True,
        datamodule_class=pl.LightningDataModule,
        subclass_mode_data=True,
        save_config_callback=ConfigToLoggersCallback,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"logger": DEFAULT_LOGGER},
        args=args,
        run=run,
        auto_configure_optimizers=False,
    )


# ---------------------------------------------------------------------------------------
# detlens compare / detlens report (focus records; see detlens.focus)
# ---------------------------------------------------------------------------------------

EXIT_OK, EXIT_REGRESSION, EXIT_BAD_INPUT, EXIT_INSUFFICIENT = 0, 1, 2, 3
"""Exit codes of ``compare``/``report``: passed, a threshold crossed, unreadable input, not
enough evidence for a verdict (too few detections; ``--allow-insufficient-evidence`` makes it 0)."""


def _focus_parser(command: str) -> argparse.ArgumentParser:
    if command == "compare":
        parser = argparse.ArgumentParser(
            prog="detlens compare",
            description="Compare the focus of a candidate run with a baseline run (their focus records) and write an "
            "HTML report. Each gated metric is a mean over detections with a 95%% bootstrap interval; a threshold counts "
            "as crossed only when the whole interval lies beyond it. Exit code 0: within thresholds, 1: a threshold "
            "was crossed, 2: unreadable input, 3: not enough evidence for a verdict (too few matched detections or "
            "true positives, no detections at all, or a crossing the interval does not confirm).",
        )
        parser.add_argument("baseline", help="baseline: W&B run folder (offline-run-*/run-*), its files/detlens_focus, or focus.jsonl")
        parser.add_argument("candidate", help="candidate: same forms as baseline")
        parser.add_argument("--max-drift", type=float, default=0.5,
                            help="largest allowed map drift (mean 1 - Spearman rho of matched detections; default 0.5); "
                            "a negative value disables the check")
        parser.add_argument("--min-energy-in-box", type=float, default=None,
                            help="smallest allowed per-class energy-in-box of the candidate (default: not checked)")
        parser.add_argument("--max-margin-drop", type=float, default=None,
                            help="largest allowed mean drop of the decision-boundary margin (BoundaryCallback) over "
                            "detections matched between the two runs' last boundary points, in the margin's units "
                            "(default: not checked)")
        parser.add_argument("--min-matched", type=_min_count, default=MIN_MATCHED,
                            help=f"matched detections needed for a drift verdict (default {MIN_MATCHED}; >= 1)")
        parser.add_argument("--min-class-count", type=_min_count, default=MIN_CLASS_COUNT,
                            help=f"true positives of a class needed for its energy-in-box verdict (default {MIN_CLASS_COUNT}; >= 1)")
        parser.add_argument("--allow-insufficient-evidence", action="store_true",
                            help="exit 0 instead of 3 when the evidence is not enough for a verdict (it is still reported)")
    else:
        parser = argparse.ArgumentParser(
            prog="detlens report",
            description="Write an HTML report of one run's focus over training (from its focus record).",
        )
        parser.add_argument("run", help="W&B run folder (offline-run-*/run-*), its files/detlens_focus, or focus.jsonl")
    parser.add_argument("--out", default="report.html", help="HTML file to write (default: report.html)")
    parser.add_argument("--log-key", default=None, help="map source to use (default: the first in the record, e.g. gradcam)")
    parser.add_argument("--iou-threshold", type=float, default=0.5, help="IoU (same class) matching detections (default 0.5)")
    return parser


def _min_count(text: str) -> int:
    try:
        return require_min_count("the count", int(text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def focus_command(argv: list[str]) -> int:
    """``detlens compare ...`` / ``detlens report ...``; returns the exit code."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from detlens.focus.compare import compare_records, load_record
    from detlens.focus.record import FocusRecordError
    from detlens.focus.report import render_comparison_report, render_run_report, write_report

    command, rest = argv[0], argv[1:]
    args = _focus_parser(command).parse_args(rest)
    console = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:

        def track(items: Iterable[Any], description: str, work: Callable[[Any], Any] | None = None) -> Any:
            """Iterates ``items`` with a progress bar; with ``work``, returns ``[work(item), ...]``
            (the bar then advances as each item's work finishes, not before it starts)."""
            items = list(items)
            if work is None:
                return progress.track(items, total=len(items), description=description)
            task = progress.add_task(description, total=len(items))
            done = []
            for item in items:
                done.append(work(item))
                progress.advance(task)
            return done

        try:
            if command == "compare":
                baseline, candidate = track([args.baseline, args.candidate], "reading records", load_record)
                max_drift = args.max_drift if args.max_drift is not None and args.max_drift >= 0 else None
                comparison = compare_records(baseline, candidate, log_key=args.log_key, max_drift=max_drift,
                                             min_energy_in_box=args.min_energy_in_box, iou_threshold=args.iou_threshold,
                                             min_matched=args.min_matched, min_class_count=args.min_class_count,
                                             max_margin_drop=args.max_margin_drop)
                html_text = render_comparison_report(comparison, track=track)
            else:
                record = load_record(args.run)
                html_text = render_run_report(record, log_key=args.log_key, track=track)
        except (FocusRecordError, OSError) as err:
            console.print(f"[red]detlens {command}: {err}[/red]")
            return EXIT_BAD_INPUT
    out = write_report(html_text, args.out)
    if command == "report":
        console.print(f"detlens report: {record.name}: {len(record.maps)} map points, {len(record.boundary)} boundary "
                      f"points -> {out}")
        return EXIT_OK
    drift = comparison.drift
    summary = (f"{drift.matched} matched of {drift.count_a}/{drift.count_b} detections on {len(drift.images)} shared "
               f"probe images" if drift is not None else "no map points to match")
    console.print(f"detlens compare: {baseline.name} -> {candidate.name}: {summary}; report: {out}")
    for check in comparison.checks:
        console.print(f"  {check.summary()}: {check.verdict}")
    for block, (ta, tb) in comparison.temperatures.items():
        console.print(f"  attention temperature {block}: {ta:.4g} -> {tb:.4g}")
    verdict = comparison.verdict
    if verdict == "pass":
        console.print("[green]PASS[/green]: focus within thresholds" + ("" if comparison.checks else " (no threshold set)"))
        return EXIT_OK
    if verdict == "fail":
        for violation in comparison.violations:
            console.print(f"[red]FAIL[/red]: {violation}")
        return EXIT_REGRESSION
    for reason in comparison.insufficient:
        console.print(f"[yellow]NOT ENOUGH EVIDENCE[/yellow]: {reason}")
    if args.allow_insufficient_evidence:
        console.print("exit 0: --allow-insufficient-evidence")
        return EXIT_OK
    return EXIT_INSUFFICIENT


def main(argv: list[str] | None = None) -> int | None:
    """Entry point of the ``detlens`` console script.

    ``compare`` and ``report`` are handled here (they read focus records and return an exit
    code); everything else (``fit``, ``validate``, ``test``, ...) goes to ``LightningCLI``.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("compare", "report"):
        return focus_command(args)
    # From the console script LightningCLI reads sys.argv itself: handing it the same
    # arguments again makes it warn that they were given twice.
    build_cli(None if argv is None else args)
    import wandb

    if wandb.run is not None:  # close the run now (flushes history, writes its exit record)
        wandb.finish()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
