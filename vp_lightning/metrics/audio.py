"""Audio quality of reconstructions: wideband PESQ, STOI, SI-SNR and log-mel distance, per utterance.

Every score is computed on the real (unpadded) samples of each utterance and averaged over utterances; states
are sums and counts reduced by summation, so a multi-process run averages over exactly the utterances a
single-process run sees.

PESQ needs at least 1/4 s of audio containing speech, and STOI needs enough non-silent 25 ms frames (about
0.4 s of speech); on shorter or silent clips the libraries fail or return a placeholder. Such utterances are
skipped for that score only and counted: ``compute()`` reports ``pesq_skipped`` / ``stoi_skipped`` /
``si_snr_skipped`` next to the means, so a run that skipped most utterances is visible. Utterances with no real
sample at all (fully padded items) are ignored by every score.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.audio import scale_invariant_signal_noise_ratio

_SILENCE = 1e-6  # peak amplitude under which a reference counts as silent


def pesq_score(x_hat: np.ndarray, x: np.ndarray, sample_rate: int) -> float | None:
    """Wideband PESQ (narrowband at 8 kHz) of ``x_hat`` against reference ``x``; None when PESQ cannot score
    the clip (shorter than 1/4 s, silent, no utterance detected)."""
    from pesq import PesqError, pesq

    if np.abs(x).max() < _SILENCE or len(x) < sample_rate // 4:
        return None
    try:
        return float(pesq(sample_rate, x, x_hat, "wb" if sample_rate == 16000 else "nb"))
    except PesqError:
        return None


def stoi_score(x_hat: np.ndarray, x: np.ndarray, sample_rate: int) -> float | None:
    """STOI of ``x_hat`` against ``x``; None when too little non-silent audio remains to score it."""
    from pystoi import stoi

    if np.abs(x).max() < _SILENCE:
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = float(stoi(x, x_hat, sample_rate, extended=False))
    # pystoi warns and returns a 1e-5 placeholder when it cannot score the clip
    if any("Not enough STFT frames" in str(w.message) for w in caught) or not np.isfinite(value):
        return None
    return value


class AudioQuality(Metric):
    """Mean per-utterance PESQ (wideband), STOI, SI-SNR (dB) and log-mel L1 distance of reconstructions.

    Args:
        sample_rate: sample rate of the waveforms. PESQ runs at 16 kHz (wideband) or 8 kHz (narrowband); other
            rates are resampled to 16 kHz for PESQ only.
        pesq: compute PESQ (CPU, roughly 0.1 s per utterance second).
        stoi: compute STOI (CPU).
        n_mels, n_fft, hop_length: log-mel spectrogram of the mel distance.
    """

    full_state_update = False
    higher_is_better = None

    def __init__(self, sample_rate: int = 16000, pesq: bool = True, stoi: bool = True, n_mels: int = 80,
                 n_fft: int = 1024, hop_length: int = 256, **kwargs):
        super().__init__(**kwargs)
        import torchaudio

        self.sample_rate = sample_rate
        self.use_pesq, self.use_stoi = pesq, stoi
        self.melspec = torchaudio.transforms.MelSpectrogram(
            sample_rate=sample_rate, n_fft=n_fft, hop_length=hop_length, n_mels=n_mels, power=1.0,
            pad_mode="constant",
        )
        self.names = (["pesq"] if pesq else []) + (["stoi"] if stoi else []) + ["si_snr", "mel_distance"]
        for name in self.names:
            self.add_state(f"sum_{name}", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"count_{name}", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
            if name != "mel_distance":
                self.add_state(f"skipped_{name}", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, x_hat: Tensor, x: Tensor, mask: Tensor | None = None) -> None:
        """x_hat, x: ``(b, 1, T)`` (or ``(b, T)``) waveforms in [-1, 1]; mask broadcastable to x, 1 = real sample."""
        if x_hat.shape != x.shape:
            raise ValueError(f"x_hat {tuple(x_hat.shape)} and x {tuple(x.shape)} must have the same shape")
        x_hat, x = x_hat.detach().float().reshape(x.shape[0], -1), x.detach().float().reshape(x.shape[0], -1)
        keep = None if mask is None else mask.expand(x.shape[0], *mask.shape[1:]).reshape(x.shape[0], -1) > 0.5
        with torch.autocast(device_type=x.device.type, enabled=False):  # the mel filterbank matmul in float32
            for i in range(x.shape[0]):
                ref, deg = (x[i], x_hat[i]) if keep is None else (x[i][keep[i]], x_hat[i][keep[i]])
                if ref.numel() > 0:
                    self._update_one(deg.clamp(-1, 1), ref)

    def _update_one(self, deg: Tensor, ref: Tensor) -> None:
        # T real samples of one utterance
        self._add("mel_distance", self._mel_distance(deg, ref))
        silent = ref.abs().max().item() < _SILENCE
        si_snr = None if silent else scale_invariant_signal_noise_ratio(deg, ref).item()
        self._add("si_snr", si_snr)
        if self.use_pesq or self.use_stoi:
            ref_np, deg_np = ref.cpu().double().numpy(), deg.cpu().double().numpy()
        if self.use_pesq:
            self._add("pesq", self._pesq(deg, ref) if self.sample_rate not in (8000, 16000)
                      else pesq_score(deg_np, ref_np, self.sample_rate))
        if self.use_stoi:
            self._add("stoi", stoi_score(deg_np, ref_np, self.sample_rate))

    def _pesq(self, deg: Tensor, ref: Tensor) -> float | None:
        from torchaudio.functional import resample

        deg, ref = (resample(t, self.sample_rate, 16000).cpu().double().numpy() for t in (deg, ref))
        return pesq_score(deg, ref, 16000)

    def _mel_distance(self, deg: Tensor, ref: Tensor) -> float:
        mel_deg, mel_ref = self.melspec(deg), self.melspec(ref)  # (n_mels, frames)
        return (mel_deg.clamp_min(1e-5).log() - mel_ref.clamp_min(1e-5).log()).abs().mean().item()

    def _add(self, name: str, value: float | None) -> None:
        if value is None or not np.isfinite(value):
            getattr(self, f"skipped_{name}").add_(1)
            return
        getattr(self, f"sum_{name}").add_(value)
        getattr(self, f"count_{name}").add_(1)

    def compute(self) -> dict[str, Tensor]:
        """Means over scored utterances (NaN for a score that scored none) and the skip counts."""
        out: dict[str, Tensor] = {}
        for name in self.names:
            count = getattr(self, f"count_{name}")
            mean = getattr(self, f"sum_{name}") / count if count > 0 else torch.tensor(float("nan"))
            out[name] = mean.float()
        for name in self.names:
            if name != "mel_distance":
                out[f"{name}_skipped"] = getattr(self, f"skipped_{name}").float()
        return out
