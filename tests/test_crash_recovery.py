"""Crash recovery through the CLI: SIGKILL mid-epoch, ``fit --ckpt_path last``, and a run stopping on NaN.

The training subprocesses load small test callbacks by class path (``tests/`` goes on ``PYTHONPATH``):
``kill_helpers.HoldAtStep`` holds training at a given step so the test can kill it at a known point, and
``NaNAtStep`` from this file poisons a batch with NaN.
"""

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from kill_helpers import run_until_marker_then_sigkill

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "conf" / "quickstart" / "image-fsq.yaml"
# 16-px crops, 175 batches per epoch (every kill is mid-epoch); validation, and with it a checkpoint, every 4 steps
FAST = ["--data.init_args.resolution=16", "--data.init_args.num_workers=0", "--data.init_args.batch_size=8",
        "--trainer.val_check_interval=4", "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
        "--trainer.max_steps=12"]
RUN = Path("runs") / "quickstart-image-fsq"


class NaNAtStep(L.Callback):
    """Test helper: fills the input batch of step ``step`` (0-based global step) with NaN."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            batch.fill_(float("nan"))


def _env():
    # WANDB_SERVICE (set by any earlier in-process wandb.init) would attach the subprocesses to this process's
    # wandb-core, where a SIGKILLed run stays registered and its resumption is refused as "run ID in use"
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    return {**env, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONWARNINGS": "ignore",
            "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}


def _cli(args, cwd, check=True):
    proc = subprocess.run([sys.executable, "-m", "vp_lightning", *args], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def _rows(folder: Path, key: str) -> list[tuple[int, float]]:
    with open(folder / RUN / "version_0" / "metrics.csv") as f:
        return [(int(r["step"]), float(r[key])) for r in csv.DictReader(f) if r.get(key)]


def _wandb_ids(folder: Path) -> list[str]:
    return sorted(p.name.rsplit("-", 1)[-1] for p in (folder / "runs" / "wandb").glob("offline-run-*"))


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_last_continues_the_same_run(tmp_path):
    crashed, straight = tmp_path / "crashed", tmp_path / "straight"
    crashed.mkdir(), straight.mkdir()
    marker = tmp_path / "held"
    hold = f'{{"class_path": "kill_helpers.HoldAtStep", "init_args": {{"step": 6, "marker": "{marker}"}}}}'
    command = [sys.executable, "-m", "vp_lightning", "fit", "--config", str(QUICKSTART), *FAST,
               f"--trainer.callbacks+={hold}"]
    returncode = run_until_marker_then_sigkill(command, crashed, _env(), marker)
    assert returncode == -signal.SIGKILL
    ckpt = crashed / RUN / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 4  # the checkpoint after the validation of step 4

    out = _cli(["fit", "--config", str(QUICKSTART), *FAST, "--ckpt_path", "last"], crashed).stdout
    assert "Resuming" in out
    assert sorted(p.name for p in (crashed / RUN).iterdir()) == ["version_0"]  # same run folder, no new one
    _cli(["fit", "--config", str(QUICKSTART), *FAST], straight)

    # every training step logged exactly once, values as in an uninterrupted run (the resumed part is exact)
    train = _rows(crashed, "train/loss/total")
    assert [step for step, _ in train] == list(range(12))
    assert train == _rows(straight, "train/loss/total")
    val = _rows(crashed, "val/loss/rec")
    assert [step for step, _ in val] == [3, 7, 11]
    assert val == _rows(straight, "val/loss/rec")
    assert not (crashed / RUN / "version_0" / "metrics.before-resume.csv").exists()

    # the W&B run was resumed: a second offline segment of the same run id, the one stored in the checkpoint
    ids = _wandb_ids(crashed)
    assert len(ids) == 2 and ids[0] == ids[1], ids
    stored = torch.load(ckpt, weights_only=True)["callbacks"]["ExactResume"]["wandb_run_id"]
    assert stored == ids[0]


@pytest.mark.slow
def test_nan_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path):
    poison = '{"class_path": "test_crash_recovery.NaNAtStep", "init_args": {"step": 6}}'
    proc = _cli(["fit", "--config", str(QUICKSTART), *FAST, f"--trainer.callbacks+={poison}"], tmp_path, check=False)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("vp-lightning: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "non-finite train loss at step 6" in errors[0] and "Traceback" not in proc.stderr
    checkpoint = torch.load(tmp_path / RUN / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values() if v.is_floating_point())


@pytest.mark.slow
def test_ckpt_path_last_without_a_checkpoint_starts_fresh(tmp_path):
    out = _cli(["fit", "--config", str(QUICKSTART), *FAST, "--trainer.max_steps=2", "--ckpt_path", "last"],
               tmp_path).stdout
    assert "starting a new run" in out
    assert (tmp_path / RUN / "version_0" / "checkpoints" / "last.ckpt").exists()
