"""Audio reconstruction loss: named waveform L1, multi-resolution STFT and log-mel terms, all padding-aware.

Batches of variable-length utterances come with a sample mask (1 = real sample, 0 = padding). Every term
excludes padding: the waveform L1 averages over real samples only, and the spectral terms zero the padding in
both signals and average over the frames whose centre sample is real.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from vp_lightning.losses.base import ReconstructionLoss

# (n_fft, hop_length, win_length) of the multi-resolution STFT, as in Parallel WaveGAN / DAC-style codecs
DEFAULT_RESOLUTIONS: tuple[tuple[int, int, int], ...] = ((512, 128, 512), (1024, 256, 1024), (2048, 512, 2048))
_EPS = 1e-5


def as_waveform(x: Tensor) -> Tensor:
    """``(b, T)`` or ``(b, 1, T)`` -> ``(b, T)``; audio here is mono."""
    if x.dim() == 3 and x.shape[1] == 1:
        return x[:, 0]
    if x.dim() == 2:
        return x
    raise ValueError(f"expected a mono waveform of shape (b, 1, T) or (b, T), got {tuple(x.shape)}")


def masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``values`` over positions where ``mask`` is 1 (all positions if ``mask`` is None); 0 if none."""
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype).expand_as(values)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def frame_mask(mask: Tensor, hop_length: int, num_frames: int) -> Tensor:
    """Sample mask ``(b, T)`` -> frame mask ``(b, num_frames)`` of a centred STFT: frame ``t`` (centred on sample
    ``t * hop_length``) is real when that sample is real; frames centred past the end count as padding."""
    padded = F.pad(mask.float(), (0, hop_length * num_frames))
    return padded[:, : hop_length * num_frames : hop_length]


def stft_magnitude(x: Tensor, n_fft: int, hop_length: int, win_length: int) -> Tensor:
    """``(b, T)`` -> magnitude ``(b, n_fft // 2 + 1, frames)`` with a Hann window, centred frames."""
    window = torch.hann_window(win_length, device=x.device, dtype=x.dtype)
    # reflect padding needs T > n_fft // 2; zero padding works for any length and padding is zero here anyway
    spec = torch.stft(x, n_fft, hop_length, win_length, window, center=True, pad_mode="constant", return_complex=True)
    return spec.abs()


def spectral_convergence(mag_hat: Tensor, mag: Tensor) -> Tensor:
    """``‖|S| - |Ŝ|‖_F / ‖|S|‖_F`` over the whole batch (padding, zeroed in both signals, adds nothing)."""
    return torch.linalg.vector_norm(mag - mag_hat) / torch.linalg.vector_norm(mag).clamp_min(_EPS)


def log_magnitude_l1(mag_hat: Tensor, mag: Tensor, frames: Tensor | None) -> Tensor:
    """Mean ``|log|S| - log|Ŝ||`` over frequencies and real frames; ``frames`` is ``(b, n_frames)`` or None."""
    diff = (torch.log(mag.clamp_min(_EPS)) - torch.log(mag_hat.clamp_min(_EPS))).abs()  # (b, f, t)
    return masked_mean(diff, None if frames is None else frames[:, None, :])


class AudioReconstructionLoss(ReconstructionLoss):
    """``l1 * |x̂ - x| + stft * MR-STFT(x̂, x) + mel * |log mel(x̂) - log mel(x)|``, excluding padding.

    The multi-resolution STFT term averages, over ``stft_resolutions``, spectral convergence plus the L1 distance
    of log magnitudes. Terms whose weight is 0 are neither computed nor returned.

    Args:
        l1: weight of the waveform mean absolute error.
        stft: weight of the multi-resolution STFT loss.
        mel: weight of the log-mel L1 loss (0 disables it).
        stft_resolutions: ``(n_fft, hop_length, win_length)`` triples.
        sample_rate: sample rate of the waveforms (for the mel filterbank).
        n_mels: mel bands.
        mel_n_fft: FFT size of the mel spectrogram.
        mel_hop_length: hop of the mel spectrogram.
    """

    def __init__(
        self,
        l1: float = 1.0,
        stft: float = 1.0,
        mel: float = 0.0,
        stft_resolutions: Sequence[Sequence[int]] = DEFAULT_RESOLUTIONS,
        sample_rate: int = 16000,
        n_mels: int = 80,
        mel_n_fft: int = 1024,
        mel_hop_length: int = 256,
    ):
        super().__init__()
        all_weights = {"l1": l1, "stft": stft, "mel": mel}
        for name, weight in all_weights.items():
            if weight < 0:
                raise ValueError(f"loss weight {name} must be >= 0, got {weight}")
        self.weights = {name: float(w) for name, w in all_weights.items() if w > 0}
        if not self.weights:
            raise ValueError("AudioReconstructionLoss needs at least one positive weight (l1, stft or mel)")
        self.resolutions = [tuple(int(v) for v in r) for r in stft_resolutions]
        if stft > 0 and (not self.resolutions or any(len(r) != 3 or r[2] > r[0] for r in self.resolutions)):
            raise ValueError(
                f"stft_resolutions must be (n_fft, hop_length, win_length) triples with win_length <= n_fft, "
                f"got {stft_resolutions}"
            )
        self.mel_hop_length = mel_hop_length
        self.melspec = None
        if mel > 0:
            import torchaudio

            self.melspec = torchaudio.transforms.MelSpectrogram(
                sample_rate=sample_rate, n_fft=mel_n_fft, hop_length=mel_hop_length, n_mels=n_mels, power=1.0,
                pad_mode="constant",
            )

    def forward(self, x_hat: Tensor, x: Tensor, mask: Tensor | None = None) -> dict[str, Tensor]:
        # spectra and logs of small magnitudes need float32, also when the model trains in bf16/fp16
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self._terms(x_hat, x, mask)

    def _terms(self, x_hat: Tensor, x: Tensor, mask: Tensor | None) -> dict[str, Tensor]:
        # b batch, T samples
        x_hat, x = as_waveform(x_hat).float(), as_waveform(x).float()  # (b, T)
        m = None if mask is None else as_waveform(mask.expand(x.shape[0], *mask.shape[1:])).float()  # (b, T)
        if m is not None:  # zero the padding so spectral frames overlapping it see the same signal on both sides
            x_hat, x = x_hat * m, x * m
        terms: dict[str, Tensor] = {}
        if "l1" in self.weights:
            terms["l1"] = masked_mean((x_hat - x).abs(), m)
        if "stft" in self.weights:
            terms["stft"] = torch.stack([self._stft_term(x_hat, x, m, *r) for r in self.resolutions]).mean()
        if self.melspec is not None:
            mel_hat, mel = self.melspec(x_hat), self.melspec(x)  # (b, n_mels, frames)
            frames = None if m is None else frame_mask(m, self.mel_hop_length, mel.shape[-1])
            terms["mel"] = log_magnitude_l1(mel_hat, mel, frames)
        return terms

    @staticmethod
    def _stft_term(x_hat: Tensor, x: Tensor, m: Tensor | None, n_fft: int, hop: int, win: int) -> Tensor:
        mag_hat, mag = stft_magnitude(x_hat, n_fft, hop, win), stft_magnitude(x, n_fft, hop, win)
        frames = None if m is None else frame_mask(m, hop, mag.shape[-1])
        return spectral_convergence(mag_hat, mag) + log_magnitude_l1(mag_hat, mag, frames)

