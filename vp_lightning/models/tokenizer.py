"""One LightningModule for every tokenizer: encoder -> Linear(C, d) -> quantizer -> Linear(d, C) -> decoder."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from torch import Tensor, nn
from torchmetrics import Metric

from vp_lightning.losses.base import ReconstructionLoss
from vp_lightning.quantizers.base import QuantizerOutput

Batch = Tensor | tuple | list | dict


def unpack_batch(batch: Batch) -> tuple[Tensor, Tensor | None]:
    """A batch is a Tensor, an (x, label) pair, or ``{"x": Tensor, "mask": Tensor?}``; returns ``(x, mask)``."""
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, dict):
        return batch["x"], batch.get("mask")
    if isinstance(batch, (tuple, list)):
        return batch[0], None
    raise TypeError(f"unsupported batch type {type(batch).__name__}: expected Tensor, (x, label) or dict with 'x'")


def token_mask_from_sample_mask(mask: Tensor | None, positions: tuple[int, ...]) -> Tensor | None:
    """(b, 1, T) sample mask (1 = real) -> (b, n) token mask: a token counts when at least half its window is real."""
    if mask is None:
        return None
    if len(positions) != 1:
        raise ValueError("sample masks are supported for 1-D (audio) inputs only")
    b = mask.shape[0]
    pooled = F.adaptive_avg_pool1d(mask.float().reshape(b, 1, -1), positions[0])  # (b, 1, n)
    return pooled.reshape(b, positions[0]) >= 0.5


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/inf; the message names the step and the loss terms."""


class TokenizerModule(L.LightningModule):
    """Autoencoder with a discrete bottleneck; the same class for VQ, FSQ, FSP and VP, images and audio.

    Args:
        encoder: ``(b, ch, *spatial) -> (b, C, *positions)``, exposing ``out_channels`` (C).
        decoder: ``(b, C', *positions) -> (b, ch, *spatial)``, exposing ``in_channels`` (C').
        quantizer: factory returning a quantizer (see ``vp_lightning.quantizers``). It is called in
            :meth:`configure_model`, after the distributed process group exists, so quantizers that decide on
            cross-rank synchronisation at construction (the VQ library) see the right world size.
        loss: reconstruction loss returning named raw terms; weights live in ``loss.weights``.
        quality: validation/test quality metric (``update(x_hat, x, mask)``, ``compute() -> dict``), e.g.
            :class:`vp_lightning.metrics.ImageQuality`.
        optimizer: optimizer factory; default ``Adam(lr=1e-4, betas=(0.5, 0.9))`` as in VQGAN.
        lr_scheduler: optional LR scheduler factory, stepped every ``lr_scheduler_interval``.
        lr_scheduler_interval: ``"step"`` or ``"epoch"``.
        on_nonfinite_loss: ``"raise"`` stops training with :class:`NonFiniteLossError` naming the step and the loss
            terms (checkpoints already written stay the last good ones); ``"skip"`` skips that optimisation step
            and counts it in ``train/skipped_nonfinite_steps``.
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        quantizer: Callable[[], nn.Module],
        loss: ReconstructionLoss,
        quality: Metric | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: str = "step",
        on_nonfinite_loss: str = "raise",
    ):
        super().__init__()
        if _given_hyperparameters.get() is not None:  # built by the CLI: hparams are the (picklable) config
            self.save_hyperparameters(logger=False)
        else:
            self.save_hyperparameters(
                ignore=["encoder", "decoder", "quantizer", "loss", "quality", "optimizer", "lr_scheduler"], logger=False
            )
        for name, module, attr in (("encoder", encoder, "out_channels"), ("decoder", decoder, "in_channels")):
            if not hasattr(module, attr):
                raise TypeError(f"{name} {type(module).__name__} must expose `{attr}` (channels at the bottleneck)")
        if lr_scheduler_interval not in ("step", "epoch"):
            raise ValueError(f"lr_scheduler_interval must be 'step' or 'epoch', got {lr_scheduler_interval!r}")
        if on_nonfinite_loss not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite_loss must be 'raise' or 'skip', got {on_nonfinite_loss!r}")
        self.on_nonfinite_loss = on_nonfinite_loss
        self.skipped_nonfinite_steps = 0
        self.encoder = encoder
        self.decoder = decoder
        self.quantizer_factory = quantizer
        self.loss_fn = loss
        self.val_quality = quality
        self.test_quality = quality.clone() if quality is not None else None
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.lr_scheduler_interval = lr_scheduler_interval
        self.quantizer: nn.Module | None = None

    # -- construction -------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Build quantizer and bottleneck projections (idempotent; Lightning calls it once the process group is up)."""
        if self.quantizer is not None:
            return
        factory = self.quantizer_factory
        # With a global seed, the parts built here get the same initial values whatever consumed random numbers
        # between construction and this call (the launcher, data setup), so every rank and every world size agree.
        seed = os.environ.get("PL_GLOBAL_SEED")
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(int(seed) + 1)
            quantizer = factory if isinstance(factory, nn.Module) else factory()
            for attr in ("dim", "codebook_size", "indices_to_codes"):
                if not hasattr(quantizer, attr):
                    raise TypeError(f"quantizer {type(quantizer).__name__} lacks `{attr}`; see vp_lightning.quantizers")
            self.proj_in = nn.Linear(self.encoder.out_channels, quantizer.dim)
            self.proj_out = nn.Linear(quantizer.dim, self.decoder.in_channels)
        self.quantizer = quantizer

    # -- forward passes -----------------------------------------------------------------------------------------
    def encode_latents(self, x: Tensor) -> Tensor:
        """x: (b, ch, *spatial) -> z: (b, *positions, d) float32, the quantizer's input."""
        self.configure_model()
        h = self.encoder(x)  # (b, C, *positions)
        return self.proj_in(h.movedim(1, -1)).float()

    def decode_latents(self, q: Tensor) -> Tensor:
        """q: (b, *positions, d) -> x_hat: (b, ch, *spatial)."""
        return self.decoder(self.proj_out(q).movedim(-1, 1))

    def forward(self, x: Tensor) -> tuple[Tensor, QuantizerOutput]:
        """Returns the reconstruction (cropped to ``x``'s size) and the quantizer output."""
        z = self.encode_latents(x)
        out = self.quantizer(z)
        x_hat = self.decode_latents(out.quantized.to(z.dtype))
        return x_hat[(..., *[slice(0, s) for s in x.shape[2:]])], out

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Eval-mode reconstruction of ``x`` (no gradients)."""
        return self(x)[0]

    @torch.no_grad()
    def tokenize(self, x: Tensor) -> Tensor:
        """x -> (b, *positions) int64 tokens (eval mode)."""
        return self.quantizer(self.encode_latents(x)).indices

    # -- steps --------------------------------------------------------------------------------------------------
    def _shared_step(self, batch: Batch, stage: str) -> dict[str, Any]:
        x, mask = unpack_batch(batch)
        x_hat, out = self(x)
        terms = self.loss_fn(x_hat, x, mask)
        rec = sum(self.loss_fn.weights[name] * value for name, value in terms.items())
        total = rec + out.loss
        train = stage == "train"
        # A float batch size: Lightning averages the per-rank sample counts of an epoch mean as an integer tensor,
        # truncating them when shards are uneven (5 images on 2 ranks: 2.5 -> 2), which skews val/loss/* of a
        # multi-process run; a float count keeps the mean exact.
        log_kw = dict(on_step=train, on_epoch=not train, sync_dist=not train, batch_size=float(x.shape[0]))
        for name, value in terms.items():
            self.log(f"{stage}/loss/{name}", value, **log_kw)
        self.log(f"{stage}/loss/rec", rec, prog_bar=not train, **log_kw)
        self.log(f"{stage}/loss/quantizer", out.loss, **log_kw)
        self.log(f"{stage}/loss/total", total, prog_bar=train, **log_kw)
        for name, value in out.metrics.items():
            self.log(f"{stage}/quantizer/{name}", value, **log_kw)
        if not torch.isfinite(total):
            bad = [name for name, value in {**terms, "quantizer": out.loss}.items() if not torch.isfinite(value)]
            message = f"non-finite {stage} loss at step {self.global_step}: terms {bad}"
            if not (train and self.on_nonfinite_loss == "skip"):
                raise NonFiniteLossError(message + " (set model.on_nonfinite_loss=skip to skip such steps)")
            self.skipped_nonfinite_steps += 1
            self.log("train/skipped_nonfinite_steps", float(self.skipped_nonfinite_steps), on_step=True)
            return None
        token_mask = token_mask_from_sample_mask(mask, tuple(out.indices.shape[1:]))
        return {"loss": total, "indices": out.indices.detach(), "token_mask": token_mask, "x": x, "x_hat": x_hat.detach()}

    def training_step(self, batch: Batch, batch_idx: int) -> dict[str, Any] | None:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: Batch, batch_idx: int) -> dict[str, Any]:
        result = self._shared_step(batch, "val")
        if self.val_quality is not None:
            self.val_quality.update(result["x_hat"], result["x"], unpack_batch(batch)[1])
        return result

    def test_step(self, batch: Batch, batch_idx: int) -> dict[str, Any]:
        result = self._shared_step(batch, "test")
        if self.test_quality is not None:
            self.test_quality.update(result["x_hat"], result["x"], unpack_batch(batch)[1])
        return result

    def predict_step(self, batch: Batch, batch_idx: int) -> dict[str, Tensor]:
        x, _ = unpack_batch(batch)
        x_hat, out = self(x)
        return {"indices": out.indices, "x_hat": x_hat}

    def _log_quality(self, metric: Metric | None, stage: str) -> None:
        if metric is None or not metric.update_called:
            return
        for name, value in metric.compute().items():
            self.log(f"{stage}/{name}", value, sync_dist=False)  # already reduced over ranks by the metric
        metric.reset()

    def on_validation_epoch_start(self) -> None:
        if self.val_quality is not None:
            self.val_quality.reset()  # fresh state tensors (never shared between spawned processes)

    def on_test_epoch_start(self) -> None:
        if self.test_quality is not None:
            self.test_quality.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_quality(self.val_quality, "val")

    def on_test_epoch_end(self) -> None:
        self._log_quality(self.test_quality, "test")

    # -- optimisation -------------------------------------------------------------------------------------------
    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_factory is None:
            optimizer = torch.optim.Adam(params, lr=1e-4, betas=(0.5, 0.9))
        else:
            optimizer = self.optimizer_factory(params)
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.lr_scheduler_interval}}
