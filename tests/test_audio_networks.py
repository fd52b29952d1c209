"""1-D audio codec networks: exact lengths for any stride list, token masks, activations, and a tiny end-to-end
audio tokenizer step with the audio sample callback."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vp_lightning.networks.audio import AudioDecoder, AudioEncoder, Snake, tiny_audio_codec


@pytest.mark.parametrize("strides", [(4, 5, 8), (3,), (5, 2), (2, 3, 4, 4)])
@pytest.mark.parametrize("length", [1, 95, 96, 161])
def test_lengths_are_exact_for_odd_and_even_strides(strides, length):
    enc = AudioEncoder(channels=4, strides=strides, out_channels=6)
    dec = AudioDecoder(channels=4, strides=strides, in_channels=6)
    hop = math.prod(strides)
    h = enc(torch.randn(2, 1, length))
    assert enc.hop_length == dec.hop_length == hop
    assert h.shape == (2, 6, math.ceil(length / hop)) == (2, enc.out_channels, enc.num_tokens(length))
    assert dec(h).shape == (2, 1, h.shape[-1] * hop)


def test_default_widths_double_per_stage_and_cap():
    enc = AudioEncoder(channels=8, strides=(2, 2, 2))
    assert enc.out_channels == 64
    dec = AudioDecoder(channels=8, strides=(2, 2, 2))
    assert dec.in_channels == 64
    assert AudioEncoder(channels=8, strides=(2, 2, 2), max_channels=16).out_channels == 16


def test_paper_like_config_gives_166_tokens_per_second():
    enc = AudioEncoder(channels=4, strides=(2, 3, 4, 4))
    assert enc.hop_length == 96
    assert enc.num_tokens(16000) == 167  # 16000 / 96 = 166.7 tokens per second, last one padded


def test_encoder_pads_with_zeros_so_padding_does_not_change_earlier_tokens():
    enc = AudioEncoder(channels=4, strides=(4, 5), weight_norm=False).eval()
    x = torch.randn(1, 1, 200)  # exactly 10 tokens
    padded = torch.cat([x, torch.zeros(1, 1, 15)], dim=-1)  # the encoder pads this to 220 with zeros anyway
    assert torch.allclose(enc(padded)[..., :10], enc(torch.cat([x, torch.zeros(1, 1, 20)], -1))[..., :10])


def test_initial_features_follow_a_quiet_waveform():
    # speech has std ~0.1; with PyTorch's default init the features would be nearly constant over time, so every
    # latent would land in one quantizer cell at the start of training
    torch.manual_seed(0)
    enc, dec = AudioEncoder(channels=8, strides=(4, 5, 8)), AudioDecoder(channels=8, strides=(4, 5, 8))
    with torch.no_grad():
        h = enc(0.1 * torch.randn(4, 1, 8000))
        assert h.std(-1).mean() > 0.1  # varies over tokens
        assert 0.01 < dec(torch.randn_like(h)).std() < 0.5  # quiet output, tanh in its linear range


def test_token_mask_marks_tokens_with_any_real_sample():
    enc = AudioEncoder(channels=4, strides=(2, 2))  # hop 4
    mask = torch.tensor([[[1, 1, 1, 1, 1, 1, 0, 0, 0, 0]], [[1, 1, 1, 1, 1, 1, 1, 1, 1, 1]]], dtype=torch.float32)
    # 10 samples -> 3 tokens covering [0:4], [4:8], [8:12] (the last two samples are encoder padding)
    assert enc.token_mask(mask).tolist() == [[True, True, False], [True, True, True]]


def test_snake_matches_formula():
    snake = Snake(2)
    with torch.no_grad():
        snake.alpha.copy_(torch.tensor([1.0, 2.0]).view(1, 2, 1))
    x = torch.tensor([[[0.5], [0.5]]])
    expected = torch.tensor([0.5 + math.sin(0.5) ** 2, 0.5 + math.sin(1.0) ** 2 / 2]).view(1, 2, 1)
    assert torch.allclose(snake(x), expected, atol=1e-6)


@pytest.mark.parametrize("activation", ["elu", "snake"])
def test_gradients_reach_every_parameter(activation):
    enc = AudioEncoder(channels=4, strides=(2, 5), activation=activation)
    dec = AudioDecoder(channels=4, strides=(2, 5), activation=activation)
    y = dec(enc(torch.randn(2, 1, 100)))
    assert y.abs().max() <= 1.0  # tanh output, like the waveform
    y.square().mean().backward()
    for name, p in [*enc.named_parameters(), *dec.named_parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_weight_norm_is_optional():
    with_wn = AudioEncoder(channels=4, strides=(2,), weight_norm=True)
    without = AudioEncoder(channels=4, strides=(2,), weight_norm=False)
    assert any("parametrizations" in n for n, _ in with_wn.named_parameters())
    assert not any("parametrizations" in n for n, _ in without.named_parameters())


def test_bad_arguments_fail_with_clear_messages():
    with pytest.raises(ValueError, match="activation"):
        AudioEncoder(activation="relu")
    with pytest.raises(ValueError, match="strides"):
        AudioDecoder(strides=[])
    with pytest.raises(ValueError, match=r"\(b, 1, T\)"):
        AudioEncoder(channels=4, strides=(2,))(torch.randn(2, 100))
    with pytest.raises(ValueError, match="features"):
        AudioDecoder(channels=4, strides=(2,), in_channels=3)(torch.randn(2, 5, 10))


def test_tiny_tokenizer_trains_on_masked_batches_and_writes_audio_samples(tmp_path):
    import lightning as L
    from torch.utils.data import DataLoader

    from vp_lightning.callbacks.audio_samples import AudioSamples
    from vp_lightning.data.librispeech import pad_collate
    from vp_lightning.losses.audio import AudioReconstructionLoss
    from vp_lightning.metrics.audio import AudioQuality
    from vp_lightning.models import TokenizerModule
    from vp_lightning.quantizers import FSQ

    torch.manual_seed(0)
    t = torch.arange(4000) / 16000
    clips = [(0.3 * torch.sin(2 * math.pi * f * t[:n])).unsqueeze(0) for f, n in [(220, 4000), (330, 2500)]]
    loader = DataLoader(clips, batch_size=2, collate_fn=pad_collate)
    encoder, decoder = tiny_audio_codec(strides=(4, 5, 8), channels=4)
    model = TokenizerModule(encoder, decoder, lambda: FSQ(levels=[8, 5, 5, 5]),
                            AudioReconstructionLoss(l1=1.0, stft=1.0, stft_resolutions=[(256, 64, 256)]),
                            AudioQuality(pesq=False, stoi=False))
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=tmp_path, callbacks=[AudioSamples(num_samples=2, sample_rate=16000)])
    trainer.fit(model, loader, loader)
    assert {"val/si_snr", "val/mel_distance", "val/loss/stft"} <= set(trainer.callback_metrics)
    import soundfile as sf

    out = tmp_path / "audio_samples" / "step0000002"
    reconstruction, rate = sf.read(out / "1_reconstruction.flac")
    assert rate == 16000 and len(reconstruction) == 2500  # cropped to the real (unpadded) length
    assert (out / "spectrograms.png").stat().st_size > 0


# -- audio configs (slow: each runs the command line in a subprocess) --------------------------------------------

CONF = Path(__file__).resolve().parents[1] / "conf"
AUDIO_CONFIGS = sorted(CONF.glob("quickstart/audio-*.yaml")) + sorted(CONF.glob("audio/*.yaml"))


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    return subprocess.run([sys.executable, "-m", "vp_lightning", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


@pytest.mark.slow
@pytest.mark.parametrize("config", AUDIO_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_audio_config_resolves_and_builds_its_networks(config, tmp_path):
    import yaml

    proc = run_cli(["fit", "--config", str(config), "--print_config"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    model = yaml.safe_load(proc.stdout)["model"]["init_args"]
    enc, dec = (model[k]["init_args"] for k in ("encoder", "decoder"))
    encoder = AudioEncoder(**enc)
    decoder = AudioDecoder(**dec)
    assert encoder.out_channels == decoder.in_channels and encoder.hop_length == decoder.hop_length
    assert encoder.hop_length == (96 if config.parent.name == "audio" else 160)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng (apt-get install espeak-ng)")
def test_audio_quickstart_fits_and_reports_audio_metrics(tmp_path):
    fast = ["--trainer.max_steps=3", "--trainer.val_check_interval=3", "--trainer.limit_val_batches=1"]
    proc = run_cli(["fit", "--config", str(CONF / "quickstart" / "audio-fsq.yaml"), *fast], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for key in ("val/pesq", "val/stoi", "val/si_snr", "val/mel_distance", "val/codebook/cvu"):
        assert key in proc.stdout, key
    run = tmp_path / "runs" / "quickstart-audio-fsq" / "version_0"
    assert sorted(p.name for p in (run / "audio_samples" / "step0000003").iterdir())[:2] == [
        "0_original.flac", "0_reconstruction.flac"]
