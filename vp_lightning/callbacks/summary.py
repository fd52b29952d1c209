"""A short printed summary at the end of fit/validate/test: final metrics and where the run's files are."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only

from vp_lightning.callbacks.token_usage import run_dir

DEFAULT_KEYS = (
    "loss/rec", "psnr", "ssim", "lpips", "pesq", "stoi", "si_snr", "mel_distance",
    "codebook/perplexity", "codebook/cvu", "codebook/utilization", "codebook/dead_codes",
)


def format_summary(metrics: dict[str, float], stage: str, keys: tuple[str, ...] = DEFAULT_KEYS) -> list[str]:
    """Lines ``  stage/key  value`` for the keys present in ``metrics``."""
    rows = [(f"{stage}/{k}", metrics[f"{stage}/{k}"]) for k in keys if f"{stage}/{k}" in metrics]
    width = max((len(name) for name, _ in rows), default=0)
    return [f"  {name:<{width}}  {value:.4f}" for name, value in rows]


class RunSummary(L.Callback):
    """Prints final validation/test metrics, the run folder, the best/last checkpoint and the W&B folder."""

    def _print(self, trainer: L.Trainer, stage: str) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        lines = [f"== vp-lightning {stage} summary (step {trainer.global_step}) =="]
        lines += format_summary(metrics, "test" if stage == "test" else "val")
        lines.append(f"  run folder: {run_dir(trainer)}")
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint):
                best = cb.best_model_path or cb.last_model_path
                if best:
                    lines.append(f"  checkpoint: {best}")
        for cb in trainer.callbacks:
            if getattr(cb, "final_checkpoint_path", None):
                lines.append(f"  final codebook: {cb.final_checkpoint_path} (use it with validate/test --ckpt_path)")
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                exp = logger.experiment
                folder = getattr(exp, "dir", None)
                if folder:
                    lines.append(f"  W&B run: {folder.rsplit('/files', 1)[0]} (offline runs upload with `wandb sync <folder>`)")
        print("\n".join(lines), flush=True)

    @rank_zero_only
    def on_train_start(self, trainer, pl_module) -> None:
        counts = getattr(trainer.datamodule, "bad_input_counts", None)
        if counts:  # skipped / converted files found by the DataModule, logged once as data/<kind>
            for logger in trainer.loggers:
                logger.log_metrics({f"data/{k}": float(v) for k, v in counts.items()}, step=trainer.global_step)

    @rank_zero_only
    def on_fit_end(self, trainer, pl_module) -> None:
        self._print(trainer, "fit")

    @rank_zero_only
    def on_test_end(self, trainer, pl_module) -> None:
        self._print(trainer, "test")

    @rank_zero_only
    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "validate":
            self._print(trainer, "validate")
