"""Token-usage logging: perplexity, CVU, utilization and dead codes per validation, plus a usage plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from vp_lightning.metrics.token_usage import TokenUsage, usage_statistics


def run_dir(trainer: L.Trainer) -> Path:
    """The folder of this run: the first logger's ``log_dir`` (CSV/TensorBoard) or the trainer's root dir."""
    for logger in trainer.loggers:
        log_dir = getattr(logger, "log_dir", None)
        if log_dir and "wandb" not in type(logger).__name__.lower():
            return Path(log_dir)
    return Path(trainer.default_root_dir)


def wandb_run(trainer: L.Trainer):
    """The W&B run of the first WandbLogger, or None."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            return logger.experiment
    return None


def has_real_tokens(quantizer: Any) -> bool:
    """Codebook-free quantizers (VP) have real tokens only after a codebook fit."""
    fitted = getattr(quantizer, "codebook_fitted", None)
    return True if fitted is None else bool(fitted)


class TokenUsageMonitor(L.Callback):
    """Counts tokens of every validation/test batch and logs ``<stage>/codebook/{perplexity,cvu,utilization,dead_codes}``.

    Counts are a summed ``torchmetrics`` state, so figures cover the whole evaluation set on every rank count.
    Training usage is logged every ``train_window`` steps over that window (``train/codebook/...``); 0 disables it.

    Args:
        train_window: steps per training-usage window (0 = off).
        plot: save (and log to W&B) a sorted-frequency plot of code usage after each validation.
    """

    def __init__(self, train_window: int = 100, plot: bool = True):
        super().__init__()
        self.train_window = train_window
        self.plot = plot
        self.metrics: dict[str, TokenUsage] = {}
        self.last_counts: dict[str, torch.Tensor] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        pl_module.configure_model()
        k = int(pl_module.quantizer.codebook_size)
        nominal = getattr(pl_module.quantizer, "nominal_codebook_size", None)
        self.metrics = {s: TokenUsage(k, nominal).to(pl_module.device) for s in ("train", "val", "test")}

    def _update(self, stage: str, pl_module: L.LightningModule, outputs: Any) -> None:
        if not isinstance(outputs, dict) or "indices" not in outputs:
            return
        metric = self.metrics[stage]
        if metric.device != pl_module.device:
            metric.to(pl_module.device)
        metric.update(outputs["indices"], outputs.get("token_mask"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.train_window <= 0 or not has_real_tokens(pl_module.quantizer):
            return
        self._update("train", pl_module, outputs)
        if (trainer.global_step % self.train_window) == 0:
            # training usage is per rank (no sync in the hot loop); validation figures are the exact ones
            stats = usage_statistics(self.metrics["train"].counts)
            pl_module.log_dict({f"train/codebook/{k}": v for k, v in stats.items() if k != "tokens"}, rank_zero_only=True)
            self.metrics["train"].reset()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._update("val", pl_module, outputs)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._update("test", pl_module, outputs)

    def _log_epoch(self, stage: str, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metric = self.metrics[stage]
        if not metric.update_called:
            return
        stats = metric.compute()  # from the counts summed over ranks
        self.last_counts[stage] = metric.synced_counts.cpu()
        metric.reset()
        pl_module.log_dict({f"{stage}/codebook/{k}": v for k, v in stats.items()}, sync_dist=False)
        if self.plot and not trainer.sanity_checking:
            self._plot(stage, trainer, self.last_counts[stage], stats)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._log_epoch("val", trainer, pl_module)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._log_epoch("test", trainer, pl_module)

    @rank_zero_only
    def _plot(self, stage: str, trainer: L.Trainer, counts: torch.Tensor, stats: dict[str, torch.Tensor]) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        freq = (counts.double() / counts.sum().clamp_min(1)).sort(descending=True).values.numpy()
        fig, ax = plt.subplots(figsize=(6, 3.2))
        ax.plot(range(1, len(freq) + 1), freq, lw=1.5)
        ax.axhline(1.0 / len(freq), color="grey", ls="--", lw=1, label="uniform")
        ax.set_yscale("log")
        ax.set_xlabel("code rank")
        ax.set_ylabel("frequency")
        ax.set_title(
            f"{stage} step {trainer.global_step}: perplexity {stats['perplexity']:.0f}, CVU {stats['cvu']:.3f}, "
            f"used {stats['utilization']:.1%}",
            fontsize=9,
        )
        ax.legend(fontsize=8)
        fig.tight_layout()
        out = run_dir(trainer) / "token_usage" / f"{stage}_step{trainer.global_step:07d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=100)
        plt.close(fig)
        torch.save(counts, out.with_suffix(".counts.pt"))  # raw counts, for reports and cross-run comparisons
        run = wandb_run(trainer)
        if run is not None:
            import wandb

            data = {f"{stage}/codebook/sorted_frequency": wandb.Image(str(out))}
            if len(counts) <= 512:
                data[f"{stage}/codebook/histogram"] = wandb.Histogram(np_histogram=(counts.numpy(), list(range(len(counts) + 1))))
            run.log({**data, "trainer/global_step": trainer.global_step})
