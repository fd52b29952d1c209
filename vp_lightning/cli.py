"""Command line: ``vp-lightning fit|validate|test|predict --config <yaml> [--key=value ...]``.

A LightningCLI in subclass mode: the model (any LightningModule: the tokenizer, the WiSparse job) and the data
(any LightningDataModule) are chosen in YAML with ``class_path``/``init_args``; several ``--config`` files merge in
order; ``--print_config`` shows the resolved result.
"""

from __future__ import annotations

import netrc
import os
import sys

import yaml
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from vp_lightning.callbacks.token_usage import run_dir
from vp_lightning.errors import UserError
from vp_lightning.resume import ExactResume, checkpoint_run_info, find_last_checkpoint, set_csv_history_aside


def wandb_logged_in() -> bool:
    """True when an API key is available (env var or ~/.netrc entry for the W&B host)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def configure_wandb_environment() -> None:
    """W&B runs offline unless the user is logged in or chose a mode; it never reports errors to the network."""
    if "WANDB_MODE" not in os.environ and not wandb_logged_in():
        os.environ["WANDB_MODE"] = "offline"
    os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
    os.environ.setdefault("WANDB_DISABLE_GIT", "true")


class SaveRunConfig(SaveConfigCallback):
    """Saves the resolved config as ``config.yaml`` in this run's own folder and sends it once to W&B.

    Lightning's default writes to ``trainer.log_dir``, which for a WandbLogger is the shared ``save_dir``, so two
    runs overwrite (or refuse) each other's file. The run folder (the CSV logger's ``version_N``) is unique.
    """

    def __init__(self, *args, **kwargs):
        kwargs["save_to_log_dir"] = False
        super().__init__(*args, **kwargs)

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        folder = run_dir(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        self.parser.save(self.config, str(folder / self.config_filename), skip_none=False, overwrite=True, multifile=False)
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.config.update(config, allow_val_change=True)
                logger.experiment.save(str(folder / self.config_filename), base_path=str(folder), policy="now")


class VPLightningCLI(LightningCLI):
    """LightningCLI with the project's defaults (subclass mode, per-run config saving, no auto optimizer args)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("save_config_callback", SaveRunConfig)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)
        super().__init__(
            LightningModule, LightningDataModule, *args, subclass_mode_model=True, subclass_mode_data=True, **kwargs
        )

    def instantiate_trainer(self, **kwargs):
        """Every run gets :class:`~vp_lightning.resume.ExactResume` (exact mid-epoch resume, run continued in place)."""
        trainer = super().instantiate_trainer(**kwargs)
        if not any(isinstance(cb, ExactResume) for cb in trainer.callbacks):
            trainer.callbacks.insert(0, ExactResume())  # before ModelCheckpoint, which Lightning keeps last
        return trainer

    def before_instantiate_classes(self) -> None:
        if self.subcommand == "fit":
            continue_run(self.config["fit"])

    def after_fit(self) -> None:
        """When a final codebook was fitted after training (VP), validate once more with it."""
        fitted = [cb for cb in self.trainer.callbacks if getattr(cb, "final_checkpoint_path", None)]
        if fitted and self.trainer.state.finished:
            print(f"Validating with the final codebook ({fitted[0].final_checkpoint_path})", flush=True)
            self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)


def _logger_specs(trainer_config) -> list:
    loggers = trainer_config.get("logger")
    if loggers is None or isinstance(loggers, bool):
        return []
    return list(loggers) if isinstance(loggers, list) else [loggers]


def _class_name(spec) -> str:
    return str(spec.get("class_path", "")).rsplit(".", 1)[-1] if hasattr(spec, "get") else ""


def continue_run(config) -> None:
    """``fit --ckpt_path last`` (or a checkpoint inside a run folder): continue that run in place.

    ``last`` means ``<save_dir>/<name>/version_N/checkpoints/last.ckpt`` of the CSV logger's newest run folder that
    has one (with none, training starts fresh, as Lightning does). When the checkpoint lies in a run folder of the
    configured CSV logger, the CSV logger reuses that folder (``version: N``; its ``metrics.csv`` continues after the
    checkpoint step) and the W&B logger resumes the W&B run recorded in the checkpoint (``id``, ``resume: allow``).
    """
    ckpt = config.get("ckpt_path")
    loggers = _logger_specs(config["trainer"])
    csv_spec = next((spec for spec in loggers if _class_name(spec) == "CSVLogger"), None)
    if not ckpt or csv_spec is None:
        return
    args = csv_spec["init_args"]
    save_dir, name = args.get("save_dir") or ".", args.get("name") or "lightning_logs"
    if ckpt == "last":
        found = find_last_checkpoint(save_dir, name)
        if found is None:
            print(f"No last.ckpt under {os.path.join(save_dir, name)}: starting a new run", flush=True)
            config["ckpt_path"] = None
            return
        ckpt = str(found)
        config["ckpt_path"] = ckpt
    path = os.path.abspath(ckpt)
    run_folder = os.path.dirname(os.path.dirname(path))
    version = os.path.basename(run_folder)
    inside = os.path.dirname(run_folder) == os.path.abspath(os.path.join(save_dir, name))
    if not (inside and version.startswith("version_") and version[8:].isdigit()):
        return  # a checkpoint from elsewhere starts a new run folder
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {ckpt} does not exist")
    args["version"] = int(version[8:])
    info = checkpoint_run_info(path)
    for spec in loggers:
        if _class_name(spec) == "WandbLogger" and info.get("wandb_run_id"):
            spec["init_args"]["id"] = info["wandb_run_id"]
            spec["init_args"]["resume"] = "allow"
    if rank_zero_only.rank == 0:  # once, before any process opens the folder
        set_csv_history_aside(run_folder)
    print(f"Resuming {run_folder} from {path}", flush=True)


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions that report a user's mistake: printed as one line, no traceback."""
    from vp_lightning.data import DatasetLayoutError, TooManyBadFilesError
    from vp_lightning.losses import MissingWeightsError
    from vp_lightning.models import NonFiniteLossError

    return (UserError, DatasetLayoutError, TooManyBadFilesError, MissingWeightsError, NonFiniteLossError)


TOOLS = {
    "sweep": "vp_lightning.tracking.sweep_runner",
    "report": "vp_lightning.tracking.report",
    "dashboard": "vp_lightning.tracking.dashboard",
}


def main(args: list[str] | None = None) -> None:
    """Entry point of ``vp-lightning`` and ``python -m vp_lightning``."""
    argv = list(sys.argv[1:] if args is None else args)
    configure_wandb_environment()
    if argv and argv[0] in TOOLS:
        import importlib

        try:
            module = importlib.import_module(TOOLS[argv[0]])
        except ModuleNotFoundError as err:
            sys.exit(f"vp-lightning: error: '{argv[0]}' is not available in this installation ({err})")
        sys.exit(module.main(argv[1:]))
    try:
        VPLightningCLI(args=None if args is None else argv)
    except user_error_types() as err:
        print(f"vp-lightning: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
