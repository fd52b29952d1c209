"""Mixed precision on CPU: ``--trainer.precision=bf16-mixed`` trains; quantizers stay float32; token usage holds.

Tolerance. Under bf16 autocast the encoder's convolutions round to bfloat16 (8-bit mantissa, relative error up to
2^-9 per operation, accumulating to ~1e-2 over the network). FSQ/FSP bin widths are ~2/levels of the bounded latent,
so only latents lying within that error of a bin boundary change code: a few percent of the tokens. Flipping a
token moves it to a neighbouring code, which changes usage statistics by a fraction of that: we allow 10 % of tokens
to differ and 5 % relative change of perplexity and utilization. A quantizer that ran in bf16 itself (bounding and
rounding a bfloat16 value with 3 significant digits) or an fp16 path that collapsed codes would break these bounds.
"""

from pathlib import Path

import pytest
import torch

from vp_lightning.callbacks import TokenUsageMonitor
from vp_lightning.cli import VPLightningCLI
from vp_lightning.data.embedded_images import build_embedded_photos
from vp_lightning.data.image import find_images
from vp_lightning.metrics.token_usage import usage_statistics

ROOT = Path(__file__).resolve().parents[1]


def _cli(tmp_path: Path, config: str, precision: str, max_steps: int = 3) -> VPLightningCLI:
    files = find_images(build_embedded_photos(None, 0) / "val")[::5][:40]
    val = tmp_path / "val.txt"
    val.write_text("\n".join(str(f) for f in files))
    args = ["--config", str(ROOT / "conf" / "quickstart" / config), "--data.init_args.resolution=16",
            "--data.init_args.num_workers=0", "--data.init_args.batch_size=8", f"--data.init_args.val_split={val}",
            f"--trainer.precision={precision}", f"--trainer.max_steps={max_steps}", "--trainer.logger=false",
            "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", f"--trainer.default_root_dir={tmp_path / precision}",
            "--trainer.callbacks=[{class_path: vp_lightning.callbacks.TokenUsageMonitor, init_args: {plot: false}}]"]
    return VPLightningCLI(args=args, run=False)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["image-fsq.yaml", "image-fsp.yaml"])
def test_bf16_mixed_trains_on_cpu_with_float32_quantizer(tmp_path, config):
    cli = _cli(tmp_path, config, "bf16-mixed")
    cli.model.configure_model()
    seen = []

    def record(module, inputs, output):
        seen.append((inputs[0].dtype, output.quantized.dtype, torch.is_autocast_enabled("cpu")))

    cli.model.quantizer.register_forward_hook(record)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 3
    assert seen and all(z == torch.float32 and q == torch.float32 for z, q, _ in seen)
    assert any(autocast for _, _, autocast in seen)  # the network around the quantizer did run under autocast
    assert all(p.dtype == torch.float32 for p in cli.model.parameters())  # mixed: master weights stay fp32
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss/total"])


def _validate(cli) -> tuple[torch.Tensor, dict]:
    cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
    monitor = next(cb for cb in cli.trainer.callbacks if isinstance(cb, TokenUsageMonitor))
    counts = monitor.last_counts["val"]
    return counts, {k: float(v) for k, v in usage_statistics(counts).items()}


@pytest.mark.slow
@pytest.mark.parametrize("config", ["image-fsq.yaml", "image-fsp.yaml"])
def test_bf16_token_usage_matches_fp32_for_the_same_weights(tmp_path, config):
    # train briefly in fp32 so latents spread over the bins, then evaluate those weights under both precisions
    trained = _cli(tmp_path, config, "32-true", max_steps=30)
    trained.trainer.fit(trained.model, datamodule=trained.datamodule)
    counts_32, stats_32 = _validate(trained)
    mixed = _cli(tmp_path, config, "bf16-mixed")
    mixed.model.configure_model()
    mixed.model.load_state_dict(trained.model.state_dict())
    counts_16, stats_16 = _validate(mixed)

    tokens = int(counts_32.sum())
    assert tokens == int(counts_16.sum()) == 40 * 16
    # tokens that changed code, bounded by half the L1 distance of the histograms
    moved = int((counts_32 - counts_16).abs().sum()) / 2
    assert moved / tokens <= 0.10, (moved, tokens)
    for key in ("perplexity", "utilization"):
        assert stats_16[key] == pytest.approx(stats_32[key], rel=0.05), (key, stats_32, stats_16)

    # the same images tokenized directly: most tokens identical, the quantizer input is float32 in both cases
    x = torch.stack([mixed.datamodule._dataset("val")[i] for i in range(16)])
    model = mixed.model.eval()
    with torch.no_grad():
        fp32 = model.tokenize(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model.tokenize(x)
            assert model.encode_latents(x).dtype == torch.float32
    agreement = (fp32 == bf16).float().mean().item()
    assert agreement >= 0.90, agreement
