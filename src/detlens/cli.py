"""``detlens`` command line: ``detlens fit|validate|test --config configs/<name>.yaml``.

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

import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_info

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

    def after_fit(self) -> None:
        _print_run_locations(self.trainer)


def _print_run_locations(trainer: pl.Trainer) -> None:
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


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``detlens`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    build_cli(argv)
    import wandb

    if wandb.run is not None:  # close the run now (flushes history, writes its exit record)
        wandb.finish()


if __name__ == "__main__":  # pragma: no cover
    main()
