"""Exact resume: N steps, stop, resume to 2N == an uninterrupted 2N run (data order, losses, buffers, weights).

Runs are in-process through the real CLI class (``run=False``), tiny (16 px crops, 40 training images = 5 batches
per epoch), so the checkpoint at step N = 6 falls in the middle of the second epoch and the resumed run crosses
another epoch boundary. Validation runs every 3 steps, also at the checkpoint step (a resumed run does not repeat
that validation, so this also checks that validation leaves the training generators alone).
"""

import csv
import hashlib
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch import Callback

from vp_lightning.cli import VPLightningCLI
from vp_lightning.data.embedded_images import build_embedded_photos
from vp_lightning.data.image import find_images
from vp_lightning.resume import ResumableLoader, rng_states, set_rng_states

ROOT = Path(__file__).resolve().parents[1]
N = 6


class Recorder(Callback):
    """Per step: a hash of the batch, the loss and a draw from each generator after the step (bitwise)."""

    def __init__(self):
        self.steps: dict[int, dict] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        data = batch.detach().cpu().contiguous().numpy().tobytes()
        self.steps[trainer.global_step] = {
            "batch": hashlib.sha1(data).hexdigest(),
            "loss": float(outputs["loss"]),
            "epoch": trainer.current_epoch,
        }


def _splits(tmp_path: Path) -> tuple[Path, Path]:
    root = build_embedded_photos(None, 0)
    train = find_images(root / "train")[::35][:40]
    val = find_images(root / "val")[:8]
    lists = []
    for name, files in (("train", train), ("val", val)):
        path = tmp_path / f"{name}.txt"
        path.write_text("\n".join(str(f) for f in files))
        lists.append(path)
    assert len(train) == 40
    return lists[0], lists[1]


def _overlay(tmp_path: Path, vp: bool, every_n_train_steps: int) -> Path:
    # every_n_train_steps=0: checkpoints after each validation (as the quickstart configs do)
    trigger = {"every_n_train_steps": every_n_train_steps} if every_n_train_steps else {}
    callbacks = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True, **trigger}},
        {"class_path": "vp_lightning.callbacks.TokenUsageMonitor", "init_args": {"train_window": 2, "plot": False}},
    ]
    if vp:
        callbacks.insert(1, {"class_path": "vp_lightning.callbacks.CodebookFitting",
                             "init_args": {"latents_per_code": 1, "max_batches": 2, "progress_bar": False}})
    overlay = {"trainer": {"callbacks": callbacks, "logger": [
        {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs", "name": "r"}}]}}
    path = tmp_path / f"overlay-{vp}.yaml"
    path.write_text(yaml.safe_dump(overlay))
    return path


def _cli(config, folder, max_steps, tmp_path, extra=(), workers=0, every_n_train_steps=N) -> VPLightningCLI:
    train, val = _splits(tmp_path)
    vp = "vpvae" in config
    overlay = _overlay(tmp_path, vp, every_n_train_steps)
    args = ["--config", str(ROOT / "conf" / "quickstart" / config), "--config", str(overlay),
            "--data.init_args.resolution=16", f"--data.init_args.num_workers={workers}",
            "--data.init_args.batch_size=8", f"--data.init_args.train_split={train}",
            f"--data.init_args.val_split={val}", f"--trainer.max_steps={max_steps}",
            "--trainer.val_check_interval=3", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", "--trainer.log_every_n_steps=1",
            f"--trainer.default_root_dir={folder}", *extra]
    if vp:
        args.append("--model.init_args.quantizer.init_args.codebook_size=64")
    cli = VPLightningCLI(args=args, run=False)
    cli.trainer.callbacks.insert(0, Recorder())
    return cli


def _fit(cli, ckpt_path=None) -> Recorder:
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    return next(cb for cb in cli.trainer.callbacks if isinstance(cb, Recorder))


def _state(cli) -> dict[str, torch.Tensor]:
    state = {f"model.{k}": v.detach().clone() for k, v in cli.model.state_dict().items()}
    optimizer = cli.trainer.optimizers[0].state_dict()
    for index, values in optimizer["state"].items():
        for key, value in values.items():
            state[f"optim.{index}.{key}"] = torch.as_tensor(value).clone()
    return state


def _csv_steps(folder: Path, key: str) -> list[tuple[int, float]]:
    with open(folder / "runs" / "r" / "version_0" / "metrics.csv") as f:
        return [(int(r["step"]), float(r[key])) for r in csv.DictReader(f) if r.get(key)]


def _run_three(tmp_path, monkeypatch, config, workers=0, extra=(), every_n_train_steps=N):
    runs = {}
    for name in ("straight", "first", "resumed"):
        (tmp_path / name).mkdir()
    monkeypatch.chdir(tmp_path / "straight")
    straight = _cli(config, tmp_path / "straight", 2 * N, tmp_path, extra, workers, every_n_train_steps)
    runs["straight"] = (_fit(straight), _state(straight), straight)
    monkeypatch.chdir(tmp_path / "first")
    first = _cli(config, tmp_path / "first", N, tmp_path, extra, workers, every_n_train_steps)
    _fit(first)
    ckpt = tmp_path / "first" / "runs" / "r" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == N  # loads without trusting pickles
    # the resumed run is a new process in practice: scramble the generators to be sure nothing leaks through
    torch.manual_seed(12345), np.random.seed(12345), random.seed(12345)
    monkeypatch.chdir(tmp_path / "resumed")
    resumed = _cli(config, tmp_path / "resumed", 2 * N, tmp_path, extra, workers, every_n_train_steps)
    torch.manual_seed(999)
    runs["resumed"] = (_fit(resumed, str(ckpt)), _state(resumed), resumed)
    return runs


def _assert_identical(runs):
    rec_a, state_a, cli_a = runs["straight"]
    rec_b, state_b, cli_b = runs["resumed"]
    assert sorted(rec_b.steps) == list(range(N + 1, 2 * N + 1))
    assert rec_b.steps[N + 1]["epoch"] == 1  # resumed mid-epoch (5 batches per epoch)
    assert rec_b.steps[2 * N]["epoch"] == 2  # and crossed an epoch boundary
    for step in range(N + 1, 2 * N + 1):
        assert rec_a.steps[step] == rec_b.steps[step], f"step {step} differs: {rec_a.steps[step]} vs {rec_b.steps[step]}"
    assert state_a.keys() == state_b.keys()
    different = [name for name in state_a if not torch.equal(state_a[name], state_b[name])]
    assert not different, f"not bitwise equal after resume: {different[:10]}"
    return cli_a, cli_b


@pytest.mark.slow
@pytest.mark.parametrize(("config", "every_n_train_steps"), [("image-vpvae.yaml", 0), ("image-vqvae.yaml", N)])
def test_resume_mid_epoch_matches_uninterrupted_run(tmp_path, monkeypatch, config, every_n_train_steps):
    # VP: checkpoint after the validation at step N (its codebook fit is in the checkpoint); VQ: checkpoint every N
    # steps, written before the validation of that step, which the resumed run then does not repeat
    runs = _run_three(tmp_path, monkeypatch, config, every_n_train_steps=every_n_train_steps)
    cli_a, cli_b = _assert_identical(runs)
    quantizer = runs["resumed"][2].model.quantizer
    names = set(dict(quantizer.named_buffers()))
    if "vpvae" in config:
        # VP queue, pointer, running norm statistics and the final fitted (frozen) codebook were compared above
        assert {"queue", "queue_ptr", "codebook", "codebook_fitted", "accepted_norm_ema"} <= names
        assert bool(quantizer.codebook_frozen)
    # metrics: validation after the resume and the CSV history of the resumed part equal the uninterrupted run
    for key in ("train/loss/total", "val/loss/rec", "val/codebook/perplexity"):
        a = [row for row in _csv_steps(tmp_path / "straight", key) if row[0] >= N]
        b = _csv_steps(tmp_path / "resumed", key)
        assert a and a == b, key


@pytest.mark.slow
def test_resume_with_dataloader_workers(tmp_path, monkeypatch):
    # two non-persistent workers: their random crops are seeded from the epoch's generator state, which the replay
    # reproduces
    runs = _run_three(tmp_path, monkeypatch, "image-fsp.yaml", workers=2,
                      extra=["--data.init_args.persistent_workers=false"])
    _assert_identical(runs)


def test_rng_states_round_trip_and_are_weights_only_safe(tmp_path):
    states = rng_states()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.save(states, tmp_path / "rng.pt")
    set_rng_states(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]


class _Shuffled(torch.utils.data.Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, i):
        return torch.tensor([i, int(torch.randint(0, 1000, ()))])  # index + a random "augmentation"


def test_resumable_loader_replays_to_the_checkpoint_position():
    # what Lightning does: iterate with one batch prefetched, save state after 2 trained batches, resume elsewhere
    def run(resume_state=None, batches=5):
        torch.manual_seed(0)
        trained = [0]
        loader = ResumableLoader(torch.utils.data.DataLoader(_Shuffled(), batch_size=2, shuffle=True),
                                 batches_trained=lambda: trained[0])
        if resume_state is not None:
            torch.manual_seed(77)  # a new process starts elsewhere
            loader.load_state_dict(resume_state)
        out, state, iterator = [], None, iter(loader)
        pending = next(iterator)  # prefetch
        for step in range(batches):
            batch = pending
            pending = next(iterator, None)
            out.append((batch, torch.rand(1)))  # the "model" consumes randomness after the fetch, as training does
            trained[0] += 1
            if step == 1 and resume_state is None:
                state = loader.state_dict()
            if pending is None:
                break
        return out, state

    straight, state = run()
    assert state["ranks"][0]["yielded"] == 3 and state["ranks"][0]["trained"] == 2  # + one prefetched
    resumed, _ = run(state, batches=3)
    for (xa, ra), (xb, rb) in zip(straight[2:], resumed, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ra, rb)
