"""The command line: config merging, quantizer swap, errors, and end-to-end fit/test/DDP runs (slow)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "conf" / "quickstart" / "image-fsq.yaml"
VQ = ROOT / "conf" / "quantizer" / "vq-1024.yaml"
# Tiny and fast: 16-px crops, 6 steps, validation every 3 steps over the whole embedded val split.
FAST = ["--data.init_args.resolution=16", "--data.init_args.num_workers=0", "--trainer.max_steps=6",
        "--trainer.val_check_interval=3", "--trainer.enable_progress_bar=false"]


def run_cli(args, tmp_path, check=True, timeout=600):
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "vp_lightning", *args]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def test_print_config_shows_swapped_quantizer(tmp_path):
    out = run_cli(["fit", "--config", str(QUICKSTART), "--config", str(VQ), "--print_config"], tmp_path).stdout
    config = yaml.safe_load(out)
    quantizer = config["model"]["init_args"]["quantizer"]
    assert quantizer["class_path"] == "vp_lightning.quantizers.VectorQuantizer"
    assert quantizer["init_args"]["codebook_size"] == 1024
    # a command-line value beats both files
    out = run_cli(["fit", "--config", str(QUICKSTART), "--config", str(VQ),
                   "--model.init_args.quantizer.init_args.codebook_size=256", "--print_config"], tmp_path).stdout
    assert yaml.safe_load(out)["model"]["init_args"]["quantizer"]["init_args"]["codebook_size"] == 256


def test_unknown_key_is_rejected(tmp_path):
    proc = run_cli(["fit", "--config", str(QUICKSTART), "--model.init_args.no_such_option=1", "--print_config"],
                   tmp_path, check=False)
    assert proc.returncode != 0
    assert "no_such_option" in proc.stderr


def test_missing_dataset_root_is_one_clear_line(tmp_path):
    proc = run_cli(["fit", "--config", str(QUICKSTART), *FAST, f"--data.init_args.root={tmp_path / 'nope'}"],
                   tmp_path, check=False)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("vp-lightning: error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert "train/" in errors[0] and "does not exist" in errors[0]
    assert "Traceback" not in proc.stderr


def _metrics(run_folder: Path) -> list[dict]:
    import csv

    with open(run_folder / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _last(rows, key):
    values = [float(r[key]) for r in rows if r.get(key) not in (None, "")]
    return values[-1]


@pytest.mark.slow
def test_fit_then_test_on_users_own_images(tmp_path):
    run_cli(["fit", "--config", str(QUICKSTART), *FAST], tmp_path)
    run_folder = tmp_path / "runs" / "quickstart-image-fsq" / "version_0"
    rows = _metrics(run_folder)
    for key in ["val/psnr", "val/ssim", "val/codebook/perplexity", "val/codebook/cvu", "val/codebook/utilization"]:
        assert 0 < _last(rows, key) < 1e4, key
    assert (run_folder / "config.yaml").exists()
    assert list((tmp_path / "runs" / "wandb").glob("offline-run-*"))
    ckpt = run_folder / "checkpoints" / "last.ckpt"
    assert ckpt.exists()

    # a user's own ImageFolder tree
    mine = tmp_path / "my_images"
    for split in ("train", "val"):
        (mine / split / "cats").mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 30), (40 * i, 100, 200)).save(mine / split / "cats" / f"{i}.jpg")
    out = run_cli(["test", "--config", str(QUICKSTART), *FAST, f"--data.init_args.root={mine}",
                   f"--ckpt_path={ckpt}"], tmp_path).stdout
    assert "test/psnr" in out and "test/codebook/perplexity" in out
    # the second run has its own folder and config, nothing overwritten
    assert (tmp_path / "runs" / "quickstart-image-fsq" / "version_1" / "config.yaml").exists()


def _val_counts(run_folder: Path) -> torch.Tensor:
    files = sorted((run_folder / "token_usage").glob("val_step*.counts.pt"))
    assert files, f"no token counts in {run_folder}"
    return torch.load(files[-1])


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(tmp_path):
    # `validate` of the same seeded model: 1 and 2 processes hold identical weights, so their token counts over
    # the same validation set must be equal (each image counted once, none duplicated by the sampler).
    common = ["validate", "--config", str(QUICKSTART), "--config", str(VQ), *FAST]
    single = tmp_path / "single"
    double = tmp_path / "double"
    for folder, devices in ((single, 1), (double, 2)):
        folder.mkdir()
        strategy = "--trainer.strategy=ddp" if devices > 1 else "--trainer.strategy=auto"
        run_cli([*common, f"--trainer.devices={devices}", strategy], folder)
    counts_1 = _val_counts(single / "runs" / "quickstart-image-fsq" / "version_0")
    counts_2 = _val_counts(double / "runs" / "quickstart-image-fsq" / "version_0")
    assert int(counts_1.sum()) == int(counts_2.sum()) > 0
    assert torch.equal(counts_1, counts_2)


@pytest.mark.slow
def test_ddp_vq_codebooks_stay_identical_and_unsynced_ones_are_caught(tmp_path):
    # checked after every optimisation step, i.e. after each rank's EMA update and before DDP's next buffer broadcast
    check = '{"class_path": "vp_lightning.callbacks.RankConsistencyCheck", "init_args": {"every_n_steps": 1}}'
    common = ["fit", "--config", str(QUICKSTART), "--config", str(VQ), *FAST, "--trainer.devices=2",
              "--trainer.strategy=ddp", f"--trainer.callbacks+={check}",
              "--trainer.max_steps=4", "--trainer.val_check_interval=4"]
    synced = tmp_path / "synced"
    synced.mkdir()
    run_cli(common, synced)
    report = json.loads((synced / "runs" / "quickstart-image-fsq" / "version_0" / "rank_consistency.json").read_text())
    assert report["world_size"] == 2 and report["step"] == 4 and report["mismatched"] == []
    assert any("embed" in name for name in report["checked"])  # the EMA codebook itself was compared
    # negative control: with synchronisation switched off, each rank's EMA update uses only its own shard; the
    # codebooks differ after the step (DDP's buffer broadcast would then silently discard rank 1's update)
    unsynced = tmp_path / "unsynced"
    unsynced.mkdir()
    proc = run_cli([*common, "--model.init_args.quantizer.init_args.sync_codebook=false"], unsynced, check=False)
    assert proc.returncode != 0
    assert "quantizer state differs across 2 ranks" in proc.stderr
