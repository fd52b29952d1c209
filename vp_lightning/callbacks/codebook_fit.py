"""Explicit codebook fitting for codebook-free quantizers (VP): monitoring fits and the final fit.

VP trains without a codebook; its tokens come from a k-means codebook fitted on latents. This callback calls the
quantizer's named lifecycle methods at well-defined moments instead of hiding a fit inside ``train()``/``eval()``:

* before every validation (not the sanity check): ``quantizer.fit_codebook_from_queue()``, a cheap fit on the
  queue of recent latents, so validation reports real tokens and codebook usage;
* at the end of training: one pass over the training dataloader collecting ``pl_module.encode_latents(x)`` until
  ``latents_per_code * K`` latents (over all ranks) are gathered, ``quantizer.fit_codebook(latents, freeze=True)``,
  then ``final.ckpt`` is saved next to the other checkpoints. ``validate``/``test --ckpt_path .../final.ckpt``
  evaluate with that frozen codebook (monitoring fits skip a frozen codebook).

For quantizers without these methods (VQ, FSQ, FSP) the callback does nothing.
"""

from __future__ import annotations

import math
import os
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from vp_lightning.models.tokenizer import token_mask_from_sample_mask, unpack_batch


def _quantizer(pl_module: L.LightningModule) -> Any:
    return getattr(pl_module, "quantizer", None)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class CodebookFitting(L.Callback):
    """Fit the quantizer's codebook for monitoring (each validation) and once more, frozen, after training.

    Args:
        monitor_on_validation: fit on the quantizer's queue before each validation.
        final_fit: after training, fit on latents of the training set and freeze the codebook.
        latents_per_code: the final fit collects at least this many latents per code (over all ranks).
        max_batches: cap on training batches read per rank for the final fit (``None`` = until enough latents).
        save_final_checkpoint: save ``final_checkpoint_name`` after the final fit, in the checkpoint callback's
            ``dirpath`` (``<default_root_dir>/checkpoints`` without one).
        final_checkpoint_name: file name of that checkpoint.
        progress_bar: show progress of latent collection and k-means (rank 0).

    Attributes:
        final_checkpoint_path: where the final checkpoint was written (``None`` before).
        history: one dict per fit with ``stage``, ``quantization_error`` and, when known, ``eta_ratio``.
    """

    def __init__(
        self,
        monitor_on_validation: bool = True,
        final_fit: bool = True,
        latents_per_code: int = 50,
        max_batches: int | None = None,
        save_final_checkpoint: bool = True,
        final_checkpoint_name: str = "final.ckpt",
        progress_bar: bool = True,
    ):
        super().__init__()
        if latents_per_code < 1:
            raise ValueError(f"latents_per_code must be >= 1, got {latents_per_code}")
        if max_batches is not None and max_batches < 1:
            raise ValueError(f"max_batches must be >= 1 or None, got {max_batches}")
        self.monitor_on_validation = monitor_on_validation
        self.final_fit = final_fit
        self.latents_per_code = latents_per_code
        self.max_batches = max_batches
        self.save_final_checkpoint = save_final_checkpoint
        self.final_checkpoint_name = final_checkpoint_name
        self.progress_bar = progress_bar
        self.final_checkpoint_path: str | None = None
        self.history: list[dict[str, Any]] = []
        self._pending_log: dict[str, float] = {}

    # -- monitoring ---------------------------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        quantizer = _quantizer(pl_module)
        if hasattr(quantizer, "unfreeze_codebook"):
            # Training moves the latents: a final codebook from an earlier run is stale from here on.
            quantizer.unfreeze_codebook()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        quantizer = _quantizer(pl_module)
        if not self.monitor_on_validation or trainer.sanity_checking:
            return
        if not hasattr(quantizer, "fit_codebook_from_queue"):
            return
        if not quantizer.fit_codebook_from_queue(progress_bar=self._show_progress(trainer)):
            return  # frozen (final) codebook
        error = _fit_error(quantizer)
        self._record("monitor", quantizer, error, None)
        self._pending_log = {"val/codebook/quantization_error": error}
        ratio = _ratio(quantizer, error)
        if math.isfinite(ratio):
            self._pending_log["val/codebook/eta_ratio"] = ratio

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Logged here, where Lightning accepts epoch-level values; identical on all ranks (no sync needed).
        for name, value in self._pending_log.items():
            pl_module.log(name, value, on_step=False, on_epoch=True, sync_dist=False)
        self._pending_log = {}

    # -- final fit ----------------------------------------------------------------------------------------------
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # on_train_end (not on_fit_end): the strategy, its process group and the dataloaders are still up.
        quantizer = _quantizer(pl_module)
        if not self.final_fit or not hasattr(quantizer, "fit_codebook"):
            return
        latents = self.collect_latents(trainer, pl_module)
        total = _global_count(latents.shape[0], latents.device)
        k = int(quantizer.codebook_size)
        if total < k:
            rank_zero_warn(
                f"final codebook fit: only {total} latents for {k} codes; fitting on the queue instead "
                "(use more training data or a smaller codebook)"
            )
            latents = quantizer.queue
        elif total < self.latents_per_code * k:
            rank_zero_warn(
                f"final codebook fit: the training set gave {total} latents, fewer than "
                f"latents_per_code * K = {self.latents_per_code * k}"
            )
        rank_zero_info(f"Fitting the final codebook: K={k} on {total} latents")
        quantizer.fit_codebook(latents, freeze=True, progress_bar=self._show_progress(trainer))
        error = quantizer.quantization_error(latents)
        ratio = _ratio(quantizer, error)
        self._record("final", quantizer, error, ratio)
        metrics = {"codebook/final_quantization_error": error}
        if math.isfinite(ratio):
            metrics["codebook/final_eta_ratio"] = ratio
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        rank_zero_info(f"Final codebook: mean quantization error {error:.4g}, eta ratio {ratio:.3g}")
        if self.save_final_checkpoint:
            self.final_checkpoint_path = self._final_path(trainer)
            trainer.save_checkpoint(self.final_checkpoint_path)
            rank_zero_info(f"Saved the checkpoint with the final codebook to {self.final_checkpoint_path}")

    @torch.no_grad()
    def collect_latents(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Tensor:
        """This rank's share of ``latents_per_code * K`` training latents as ``(N, d)`` (padding excluded)."""
        quantizer = _quantizer(pl_module)
        world = dist.get_world_size() if _distributed() else 1
        wanted = math.ceil(self.latents_per_code * int(quantizer.codebook_size) / world)
        loader = trainer.train_dataloader
        if loader is None:
            trainer.fit_loop.setup_data()
            loader = trainer.train_dataloader
        # Read the plain loader under any resumable wrapper: this extra pass must not move the training position
        # that a checkpoint records.
        loader = getattr(loader, "loader", loader)
        chunks: list[Tensor] = []
        count = 0
        was_training = pl_module.training
        pl_module.eval()
        bar = self._bar(trainer, wanted)
        try:
            for i, batch in enumerate(_iterate(loader)):
                if count >= wanted or (self.max_batches is not None and i >= self.max_batches):
                    break
                batch = trainer.strategy.batch_to_device(batch)
                x, mask = unpack_batch(batch)
                with trainer.precision_plugin.forward_context():
                    z = pl_module.encode_latents(x).float()  # (b, *positions, d)
                flat = _real_tokens(z, mask)  # (m, d)
                chunks.append(flat)
                count += flat.shape[0]
                if bar is not None:
                    bar.update(flat.shape[0])
        finally:
            pl_module.train(was_training)
            if bar is not None:
                bar.close()
        if not chunks:
            return quantizer.codebook.new_zeros(0, quantizer.dim)
        return torch.cat(chunks)[: max(wanted, 1)].to(quantizer.codebook.device)

    # -- helpers ------------------------------------------------------------------------------------------------
    def _final_path(self, trainer: L.Trainer) -> str:
        ckpt = trainer.checkpoint_callback
        dirpath = getattr(ckpt, "dirpath", None) if ckpt is not None else None
        if not dirpath:
            dirpath = os.path.join(trainer.default_root_dir, "checkpoints")
        return os.path.join(dirpath, self.final_checkpoint_name)

    def _record(self, stage: str, quantizer: Any, error: float, ratio: float | None) -> None:
        entry: dict[str, Any] = {"stage": stage, "quantization_error": error}
        if ratio is not None:
            entry["eta_ratio"] = ratio
        fit = getattr(quantizer, "last_fit", None)
        if fit is not None:
            entry["iterations"] = fit.iterations
        self.history.append(entry)

    def _show_progress(self, trainer: L.Trainer) -> bool:
        return self.progress_bar and trainer.is_global_zero

    def _bar(self, trainer: L.Trainer, total: int):
        if not self._show_progress(trainer):
            return None
        try:
            from tqdm.auto import tqdm
        except ImportError:  # progress display is optional
            return None
        return tqdm(total=total, desc="collecting latents", unit="latent", leave=False)


def _iterate(loader: Any):
    """Batches of a DataLoader, or of each loader in a list/dict of them (Lightning's combined forms)."""
    if isinstance(loader, dict):
        for inner in loader.values():
            yield from inner
    elif isinstance(loader, (list, tuple)):
        for inner in loader:
            yield from inner
    else:
        yield from loader


def _real_tokens(z: Tensor, mask: Tensor | None) -> Tensor:
    """(b, *positions, d) latents -> (m, d), dropping tokens that cover mostly padding (audio batches)."""
    d = z.shape[-1]
    token_mask = token_mask_from_sample_mask(mask, tuple(z.shape[1:-1])) if mask is not None else None
    if token_mask is None:
        return z.reshape(-1, d)
    return z.reshape(z.shape[0], -1, d)[token_mask.to(z.device)]


def _global_count(n: int, device: torch.device) -> int:
    total = torch.tensor([n], dtype=torch.float64, device=device)
    if _distributed():
        dist.all_reduce(total)
    return int(total.item())


def _fit_error(quantizer: Any) -> float:
    fit = getattr(quantizer, "last_fit", None)
    return float(fit.mean_distance) if fit is not None else float("nan")


def _ratio(quantizer: Any, error: float) -> float:
    norm = quantizer.accepted_perturbation_norm() if hasattr(quantizer, "accepted_perturbation_norm") else float("nan")
    return error / norm if norm > 0 else float("nan")


__all__ = ["CodebookFitting"]
