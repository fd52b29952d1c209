"""DDP equivalence for every quantizer: 2 CPU processes (gloo) evaluate exactly what 1 process does.

The validation split here has 5 images and the batch size is 2, so it does not divide by the world size: rank 0
evaluates images 0, 2, 4 (two batches), rank 1 images 1, 3 (one batch, one fewer than rank 0). Nothing is
padded or counted twice, so token counts must be equal, not merely close.
"""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vp_lightning.data.embedded_images import build_embedded_photos
from vp_lightning.data.image import find_images

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "conf" / "quickstart"
FAST = ["--data.init_args.resolution=16", "--data.init_args.num_workers=0", "--data.init_args.batch_size=2",
        "--trainer.enable_progress_bar=false"]


def _cli(args, cwd):
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "vp_lightning", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def _odd_val_split(tmp_path: Path) -> Path:
    files = find_images(build_embedded_photos(None, 0) / "val")[::40][:5]
    path = tmp_path / "val5.txt"
    path.write_text("\n".join(str(f) for f in files))
    assert len(files) == 5
    return path


def _run_folder(cwd: Path, name: str) -> Path:
    folders = sorted((cwd / "runs" / name).glob("version_*"))
    assert len(folders) == 1, folders
    return folders[0]


def _validate_1_and_2(tmp_path: Path, config: str, extra: list[str]) -> list[tuple[torch.Tensor, dict]]:
    """`validate` on 1 and 2 processes; returns (token counts, last val metrics row) per world size."""
    results = []
    val = _odd_val_split(tmp_path)
    name = "quickstart-image-" + config.removeprefix("image-").removesuffix(".yaml")
    for devices in (1, 2):
        cwd = tmp_path / f"world{devices}"
        cwd.mkdir()
        strategy = "ddp" if devices > 1 else "auto"
        _cli(["validate", "--config", str(QUICKSTART / config), *FAST, f"--data.init_args.val_split={val}",
              f"--trainer.devices={devices}", f"--trainer.strategy={strategy}", *extra], cwd)
        folder = _run_folder(cwd, name)
        counts = torch.load(sorted((folder / "token_usage").glob("val_step*.counts.pt"))[-1])
        with open(folder / "metrics.csv") as f:
            rows = [r for r in csv.DictReader(f) if r.get("val/psnr")]
        results.append((counts, {k: float(v) for k, v in rows[-1].items() if k.startswith("val/") and v}))
    return results


def _assert_equivalent(results, tokens_per_image: int = 16):
    (counts_1, metrics_1), (counts_2, metrics_2) = results
    assert int(counts_1.sum()) == 5 * tokens_per_image  # each image once (16 px -> 4 x 4 tokens)
    assert torch.equal(counts_1, counts_2)
    assert metrics_1.keys() == metrics_2.keys()
    for key in ("val/psnr", "val/ssim", "val/loss/rec", "val/codebook/perplexity", "val/codebook/utilization"):
        # per-image sums reduced over ranks: only the order of float additions differs
        assert metrics_2[key] == pytest.approx(metrics_1[key], rel=1e-5, abs=1e-6), key


@pytest.mark.slow
@pytest.mark.parametrize("config", ["image-fsq.yaml", "image-fsp.yaml", "image-vqvae.yaml"])
def test_seeded_model_validates_identically_on_1_and_2_processes(tmp_path, config):
    _assert_equivalent(_validate_1_and_2(tmp_path, config, []))


@pytest.mark.slow
def test_vp_fitted_codebook_is_identical_on_ranks_and_validates_identically(tmp_path):
    # 2-process training: the final codebook is fitted on latents gathered from both ranks and must end identical;
    # the latent queue and its statistics are per rank by design (RankConsistencyCheck skips them)
    check = '{"class_path": "vp_lightning.callbacks.RankConsistencyCheck", "init_args": {"every_n_steps": 2}}'
    train = tmp_path / "train"
    train.mkdir()
    _cli(["fit", "--config", str(QUICKSTART / "image-vpvae.yaml"), *FAST, "--data.init_args.batch_size=8",
          "--model.init_args.quantizer.init_args.codebook_size=64", "--trainer.max_steps=4",
          "--trainer.val_check_interval=4", "--trainer.devices=2", "--trainer.strategy=ddp",
          f"--trainer.callbacks+={check}"], train)
    folder = _run_folder(train, "quickstart-image-vpvae")
    report = json.loads((folder / "rank_consistency.json").read_text())
    assert report["world_size"] == 2 and report["mismatched"] == []
    assert "codebook" in report["checked"] and "queue" not in report["checked"]
    final = folder / "checkpoints" / "final.ckpt"
    assert torch.load(final, weights_only=True)["state_dict"]["quantizer.codebook_frozen"]
    results = _validate_1_and_2(tmp_path, "image-vpvae.yaml",
                                ["--model.init_args.quantizer.init_args.codebook_size=64", f"--ckpt_path={final}"])
    _assert_equivalent(results)
