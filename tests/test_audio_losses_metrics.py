"""Audio reconstruction loss (waveform L1, multi-resolution STFT, log-mel) and the AudioQuality metric."""

from __future__ import annotations

import math

import pytest
import torch

from vp_lightning.losses.audio import (
    AudioReconstructionLoss,
    frame_mask,
    log_magnitude_l1,
    masked_mean,
    spectral_convergence,
)
from vp_lightning.metrics.audio import AudioQuality

SR = 16000


def speech_like(seconds: float, seed: int = 0) -> torch.Tensor:
    """A voiced-sounding test signal: harmonics of a gliding pitch under a syllable-rate envelope, (1, 1, T)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * SR)) / SR
    f0 = 120 + 30 * torch.sin(2 * math.pi * 0.7 * t)
    phase = 2 * math.pi * torch.cumsum(f0, 0) / SR
    voiced = sum(torch.sin(k * phase) / k for k in range(1, 12))
    envelope = torch.sin(math.pi * 4 * t).abs() ** 0.5
    return (0.25 * voiced * envelope + 0.003 * torch.randn(t.shape, generator=g)).view(1, 1, -1)


# -- small pure functions, checked by hand ----------------------------------------------------------------------


def test_masked_mean_by_hand():
    values = torch.tensor([[1.0, 2.0, 3.0, 10.0]])
    assert masked_mean(values, torch.tensor([[1.0, 1.0, 1.0, 0.0]])).item() == pytest.approx(2.0)
    assert masked_mean(values, None).item() == pytest.approx(4.0)
    assert masked_mean(values, torch.zeros(1, 4)).item() == 0.0  # all padding: no NaN


def test_frame_mask_uses_frame_centres():
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]], dtype=torch.float32)
    # hop 2, centred frames at samples 0, 2, 4, 6, 8 (8 lies past the end)
    assert frame_mask(mask, 2, 5).tolist() == [[1, 1, 1, 0, 0]]


def test_spectral_convergence_by_hand():
    mag = torch.tensor([[[3.0, 4.0]]])  # Frobenius norm 5
    assert spectral_convergence(torch.zeros_like(mag), mag).item() == pytest.approx(1.0)
    assert spectral_convergence(mag, mag).item() == 0.0
    assert spectral_convergence(torch.tensor([[[3.0, 1.0]]]), mag).item() == pytest.approx(3.0 / 5.0)


def test_log_magnitude_l1_by_hand_and_masked():
    mag = torch.full((1, 2, 3), math.e)
    mag_hat = torch.ones(1, 2, 3)
    assert log_magnitude_l1(mag_hat, mag, None).item() == pytest.approx(1.0)
    mag_hat[..., 2] = 1000.0  # a padded frame: excluded by the frame mask
    assert log_magnitude_l1(mag_hat, mag, torch.tensor([[1.0, 1.0, 0.0]])).item() == pytest.approx(1.0)


# -- the loss ---------------------------------------------------------------------------------------------------


def test_l1_term_by_hand_excludes_padding():
    loss = AudioReconstructionLoss(l1=1.0, stft=0.0)
    x = torch.zeros(1, 1, 4)
    x_hat = torch.tensor([[[1.0, 1.0, 3.0, 3.0]]])
    assert loss(x_hat, x, torch.tensor([[[1.0, 1.0, 0.0, 0.0]]]))["l1"].item() == pytest.approx(1.0)
    assert loss(x_hat, x)["l1"].item() == pytest.approx(2.0)


def test_loss_returns_raw_named_terms_with_weights():
    loss = AudioReconstructionLoss(l1=2.0, stft=0.5, mel=0.25)
    assert loss.weights == {"l1": 2.0, "stft": 0.5, "mel": 0.25}
    x = speech_like(0.5)
    terms = loss(x + 0.05 * torch.randn_like(x), x)
    assert set(terms) == {"l1", "stft", "mel"} and all(v.dim() == 0 and v > 0 for v in terms.values())
    same = loss(x, x)
    assert all(v.item() == pytest.approx(0.0, abs=1e-6) for v in same.values())
    assert set(AudioReconstructionLoss(l1=1.0, stft=0.0)(x, x)) == {"l1"}  # zero weight: not computed


def test_loss_ignores_whatever_lies_in_the_padding():
    loss = AudioReconstructionLoss(l1=1.0, stft=1.0, mel=1.0, stft_resolutions=[(256, 64, 256), (512, 128, 512)])
    x = torch.cat([speech_like(0.5, 0), speech_like(0.5, 1)])  # (2, 1, T)
    mask = torch.ones_like(x)
    mask[1, :, 5000:] = 0
    x_hat = x + 0.02 * torch.randn_like(x)
    garbage = x_hat.clone()
    garbage[1, :, 5000:] = 0.9
    clean, noisy = loss(x_hat, x, mask), loss(garbage, x, mask)
    for name in clean:
        assert clean[name].item() == pytest.approx(noisy[name].item(), rel=1e-5), name
    assert loss(garbage, x)["stft"] > clean["stft"]  # without the mask the garbage counts


def test_loss_gradient_and_shapes():
    loss = AudioReconstructionLoss(stft_resolutions=[(128, 32, 128)])
    x = speech_like(0.1)
    x_hat = (x + 0.1).requires_grad_()
    sum(loss(x_hat, x).values()).backward()
    assert torch.isfinite(x_hat.grad).all() and x_hat.grad.abs().sum() > 0
    loss(x_hat[:, 0], x[:, 0])  # (b, T) works too


def test_loss_rejects_bad_configuration():
    with pytest.raises(ValueError, match=">= 0"):
        AudioReconstructionLoss(l1=-1.0)
    with pytest.raises(ValueError, match="at least one positive weight"):
        AudioReconstructionLoss(l1=0.0, stft=0.0, mel=0.0)
    with pytest.raises(ValueError, match="n_fft, hop_length, win_length"):
        AudioReconstructionLoss(stft_resolutions=[(256, 64)])


# -- the metric -------------------------------------------------------------------------------------------------


def test_quality_orders_clean_above_noisy_and_is_scale_invariant():
    x = speech_like(1.5)
    clean, noisy = AudioQuality(), AudioQuality()
    clean.update(x.clone(), x)
    noisy.update((x + 0.05 * torch.randn_like(x)).clamp(-1, 1), x)
    c, n = clean.compute(), noisy.compute()
    assert c["pesq"] > 4.0 and c["stoi"] > 0.99 and c["mel_distance"] == pytest.approx(0.0, abs=1e-6)
    assert n["pesq"] < c["pesq"] and n["stoi"] < c["stoi"] and n["si_snr"] < c["si_snr"]
    assert n["mel_distance"] > 0
    scaled = AudioQuality(pesq=False, stoi=False)
    scaled.update(0.5 * x, x)  # SI-SNR ignores the gain
    assert scaled.compute()["si_snr"] > 40
    assert c["pesq_skipped"] == 0 and c["stoi_skipped"] == 0


def test_quality_scores_only_real_samples():
    x = torch.cat([speech_like(1.0, 0), speech_like(1.0, 1)])
    x_hat = x + 0.02 * torch.randn_like(x)
    mask = torch.ones_like(x)
    mask[1, :, 12000:] = 0
    masked, cropped = AudioQuality(), AudioQuality()
    garbage = x_hat.clone()
    garbage[1, :, 12000:] = 0.8
    masked.update(garbage, x, mask)
    cropped.update(x_hat[:1], x[:1])
    cropped.update(x_hat[1:, :, :12000], x[1:, :, :12000])
    for name, value in masked.compute().items():
        assert value.item() == pytest.approx(cropped.compute()[name].item(), rel=1e-4), name


def test_quality_skips_and_counts_clips_pesq_and_stoi_cannot_score():
    metric = AudioQuality()
    x = torch.zeros(3, 1, 16000)
    x[0] = speech_like(1.0)[0]
    x[1, :, :2000] = speech_like(0.125)[0]  # 1/8 s of audio: too short for PESQ and STOI
    mask = torch.ones_like(x)
    mask[1, :, 2000:] = 0
    # x[2] is silent: nothing to score for PESQ, STOI or SI-SNR
    metric.update(x.clone(), x, mask)
    out = metric.compute()
    assert out["pesq_skipped"] == 2 and out["stoi_skipped"] == 2 and out["si_snr_skipped"] == 1
    assert out["pesq"] > 4.0  # the one scorable utterance
    fully_padded = AudioQuality(pesq=False, stoi=False)
    fully_padded.update(torch.zeros(1, 1, 100), torch.zeros(1, 1, 100), torch.zeros(1, 1, 100))
    assert math.isnan(fully_padded.compute()["si_snr"])  # nothing real to score: ignored, not skipped
    assert fully_padded.compute()["si_snr_skipped"] == 0


def test_quality_states_sum_like_a_distributed_reduction():
    x = torch.cat([speech_like(0.8, s) for s in range(3)])
    x_hat = x + 0.03 * torch.randn_like(x)
    whole, rank0, rank1 = (AudioQuality(stoi=False) for _ in range(3))
    whole.update(x_hat, x)
    rank0.update(x_hat[:2], x[:2])
    rank1.update(x_hat[2:], x[2:])
    from torchmetrics.utilities.data import dim_zero_sum

    assert all(fx is dim_zero_sum for fx in whole._reductions.values())  # every state: dist_reduce_fx="sum"
    rank0.merge_state(rank1)  # what the all-reduce with dist_reduce_fx="sum" computes
    for name, value in whole.compute().items():
        assert rank0.compute()[name].item() == pytest.approx(value.item(), rel=1e-5), name


def test_quality_resamples_for_pesq_at_other_rates():
    import torchaudio

    x16 = speech_like(1.0)
    x24 = torchaudio.functional.resample(x16, SR, 24000)
    metric = AudioQuality(sample_rate=24000, stoi=False)
    metric.update(x24.clone(), x24)
    assert metric.compute()["pesq"] > 4.0


def test_loss_and_metric_compute_in_float32_under_autocast():
    x = speech_like(0.25)
    x_hat = x + 0.01 * torch.randn_like(x)
    loss = AudioReconstructionLoss(mel=1.0, stft_resolutions=[(256, 64, 256)])
    reference = loss(x_hat, x)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        terms = loss(x_hat.bfloat16(), x)
    for name, value in terms.items():
        assert value.dtype == torch.float32
        assert value.item() == pytest.approx(reference[name].item(), rel=0.05), name
    metric = AudioQuality(pesq=False, stoi=False)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        metric.update(x_hat, x)
    plain = AudioQuality(pesq=False, stoi=False)
    plain.update(x_hat, x)
    assert metric.compute()["mel_distance"].item() == pytest.approx(plain.compute()["mel_distance"].item(), rel=1e-5)
