"""A few audio reconstructions after each validation: FLAC files, spectrogram images and W&B audio players."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import soundfile as sf
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from vp_lightning.callbacks.token_usage import run_dir, wandb_run


def log_spectrogram(wave: Tensor, n_fft: int = 512, hop_length: int = 128) -> np.ndarray:
    """``(t,)`` waveform -> ``(n_fft // 2 + 1, frames)`` magnitude in dB (floor -100 dB), for plotting."""
    window = torch.hann_window(n_fft, dtype=wave.dtype)
    spec = torch.stft(wave, n_fft, hop_length, window=window, center=True, pad_mode="constant", return_complex=True)
    return (20 * spec.abs().clamp_min(1e-5).log10()).numpy()


class AudioSamples(L.Callback):
    """Reconstructs the first utterances of the first validation batch with ``pl_module.reconstruct(x)``.

    After each validation (not the sanity check), rank 0 writes
    ``<run>/audio_samples/step<step>/<i>_original.flac``, ``<i>_reconstruction.flac`` and ``spectrograms.png``
    (original left, reconstruction right), and, if a WandbLogger is attached, logs ``val/audio/original`` and
    ``val/audio/reconstruction`` as ``wandb.Audio`` plus ``val/audio/spectrograms`` as an image. The same utterances
    are used every time (validation data is not shuffled), so the files show progress over training.

    Args:
        num_samples: utterances to reconstruct.
        max_seconds: clip each utterance to this length (whole utterances can be long).
        sample_rate: sample rate of the audio; default: the DataModule's ``sample_rate``, else 16000.
    """

    def __init__(self, num_samples: int = 4, max_seconds: float = 10.0, sample_rate: int | None = None):
        super().__init__()
        if num_samples < 1 or max_seconds <= 0:
            raise ValueError(f"num_samples must be >= 1 and max_seconds > 0, got {num_samples}, {max_seconds}")
        self.num_samples, self.max_seconds, self.sample_rate = num_samples, max_seconds, sample_rate
        self._batch: tuple[Tensor, Tensor] | None = None

    def _rate(self, trainer: L.Trainer) -> int:
        return int(self.sample_rate or getattr(trainer.datamodule, "sample_rate", None) or 16000)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx != 0 or dataloader_idx != 0 or trainer.sanity_checking or trainer.global_rank != 0:
            return
        x = batch["x"] if isinstance(batch, dict) else batch
        if not isinstance(x, Tensor) or x.dim() != 3:
            return
        mask = batch.get("mask") if isinstance(batch, dict) else None
        n = self.num_samples
        mask = torch.ones_like(x[:n]) if mask is None else mask[:n].expand_as(x[:n])
        limit = int(self.max_seconds * self._rate(trainer))
        self._batch = (x[:n, :, :limit].detach().clone(), mask[:, :, :limit].detach().clone())

    @rank_zero_only
    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self._batch is None or trainer.sanity_checking:
            return
        x, mask = self._batch
        self._batch = None
        x_hat = pl_module.reconstruct(x.to(pl_module.device)).float().cpu()  # (n, 1, T)
        lengths = mask[:, 0].sum(-1).long().tolist()
        pairs = [(x[i, 0, :n].float().cpu(), x_hat[i, 0, :n].clamp(-1, 1)) for i, n in enumerate(lengths) if n > 0]
        if not pairs:
            return
        out = run_dir(trainer) / "audio_samples" / f"step{trainer.global_step:07d}"
        out.mkdir(parents=True, exist_ok=True)
        rate = self._rate(trainer)
        for i, (original, reconstruction) in enumerate(pairs):
            sf.write(out / f"{i}_original.flac", original.numpy(), rate, subtype="PCM_16")
            sf.write(out / f"{i}_reconstruction.flac", reconstruction.numpy(), rate, subtype="PCM_16")
        image = self._plot(pairs, rate, out / "spectrograms.png", trainer.global_step)
        run = wandb_run(trainer)
        if run is not None:
            import wandb

            run.log({
                "val/audio/original": [wandb.Audio(o.numpy(), sample_rate=rate, caption=f"{i} original")
                                       for i, (o, _) in enumerate(pairs)],
                "val/audio/reconstruction": [wandb.Audio(r.numpy(), sample_rate=rate, caption=f"{i} reconstruction")
                                             for i, (_, r) in enumerate(pairs)],
                "val/audio/spectrograms": wandb.Image(str(image)),
                "trainer/global_step": trainer.global_step,
            })

    @staticmethod
    def _plot(pairs: list[tuple[Tensor, Tensor]], rate: int, path: Path, step: int) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(len(pairs), 2, figsize=(10, 2.2 * len(pairs)), squeeze=False)
        for row, (original, reconstruction) in enumerate(pairs):
            for col, (wave, title) in enumerate(((original, "original"), (reconstruction, "reconstruction"))):
                spec = log_spectrogram(wave)
                seconds = len(wave) / rate
                axes[row, col].imshow(spec, origin="lower", aspect="auto", cmap="magma", vmin=-100, vmax=20,
                                      extent=(0, seconds, 0, rate / 2000))
                axes[row, col].set_title(f"{row}: {title}", fontsize=9)
                axes[row, col].set_ylabel("kHz", fontsize=8)
        axes[-1, 0].set_xlabel("seconds", fontsize=8)
        axes[-1, 1].set_xlabel("seconds", fontsize=8)
        fig.suptitle(f"validation reconstructions, step {step}", fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)
        return path
