"""Exact resume: a run stopped at step N and resumed from its checkpoint continues as if it had never stopped.

A checkpoint alone restores weights, optimizer and quantizer buffers. What it misses is where the *randomness* and
the *data* were: Lightning restarts a mid-epoch training dataloader from the beginning of the epoch, and the
random number generators (torch, numpy, python; they drive the shuffle, random crops and flips, VP's perturbations
and push decisions, FSP's noise) restart wherever the new process happens to be. This module adds the missing
state:

* :class:`ResumableLoader` wraps the training dataloader. At the start of every epoch it records the generator
  states (which fix the shuffle order, the random crops and the worker seeds) and counts the batches it hands out.
  Its ``state_dict`` (saved by Lightning's fit loop in every checkpoint, per rank) holds those, the sampler epoch and
  the generator states at the moment of the checkpoint. On resume it replays the epoch from its start, discarding
  the batches already trained on (they are loaded again, but no model step runs), then puts the generators back
  to their checkpoint state, so the next batch and every random draw after it equal those of an uninterrupted run.
* :class:`ExactResume` (added to every run by ``vp-lightning``) installs the wrapper, keeps validation from moving
  the training generators (so a resumed run, which does not repeat the validation of its checkpoint step, stays
  in step), and continues the run's records in place: the CSV history of the run folder is kept up to the
  checkpoint step (rows of steps that are about to be trained again are dropped, so none is duplicated), and the
  W&B run id is stored in the checkpoint so that ``--ckpt_path last`` resumes the same W&B run.

Replay costs one pass of data loading over the part of the epoch already done (no forward or backward passes).
With ``num_workers > 0`` the replay reproduces the workers' random crops as well, since workers are seeded from the
main process's generator when the epoch's iterator is created. Persistent workers (``persistent_workers=True``)
keep their generators from one epoch to the next and are recreated by a resumed process, so with them the resumed
augmentations are exact only when resuming within the first epoch of the process lifetime; shuffle order and every
other random draw stay exact.
"""

from __future__ import annotations

import collections
import csv
import random
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

# ------------------------------------------------------------------------------------------------------------------
# Random number generator states


def rng_states() -> dict[str, Any]:
    """The states of torch's CPU (and CUDA, when initialised) generators, numpy's global and python's ``random``.

    Only tensors and plain python values, so checkpoints holding them load with ``torch.load(weights_only=True)``.
    """
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, words, gauss_next = random.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": version, "words": list(words), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore states captured by :func:`rng_states` (the CUDA ones only when CUDA is in use here too)."""
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = states["python"]
    random.setstate((p["version"], tuple(p["words"]), p["gauss_next"]))
    if "cuda" in states and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.set_rng_state_all(states["cuda"])


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _samplers(loader: Any) -> list[Any]:
    """Samplers of a DataLoader that take an epoch (``DistributedSampler`` and alike)."""
    found = []
    for sampler in (getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        if sampler is not None and callable(getattr(sampler, "set_epoch", None)) and sampler not in found:
            found.append(sampler)
    return found


# ------------------------------------------------------------------------------------------------------------------
# Training dataloader wrapper

#: Batches a trainer may hold loaded but not yet trained on (Lightning prefetches one when a loader has no length).
MAX_PREFETCH = 4


class ResumableLoader:
    """Wraps a (training) dataloader so that a run can be resumed mid-epoch exactly.

    Any attribute not defined here is read from the wrapped loader (``dataset``, ``sampler``, ``batch_size``...),
    so Lightning's sampler-epoch handling keeps working. The state is per process and gathered over all ranks when a
    checkpoint is written (each rank resumes with its own generators and position).

    Args:
        loader: The dataloader (any sized iterable of batches).
        batches_trained: Returns how many batches of the current epoch training has consumed when a checkpoint
            is written. Batches handed out beyond that were prefetched (Lightning prefetches one batch when a
            loader has no length) and are handed out again first on resume. Default: every batch handed out.
    """

    def __init__(self, loader: Iterable, batches_trained: Callable[[], int] | None = None) -> None:
        self.loader = loader
        self.batches_trained = batches_trained
        self._epoch_start_rng: dict[str, Any] | None = None
        self._epoch: int | None = None
        self._yielded = 0
        self._pending: dict[str, Any] | None = None
        self._before_fetch: collections.deque = collections.deque(maxlen=MAX_PREFETCH + 1)

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        if name == "loader":  # not yet set (unpickling): avoid infinite recursion
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator:
        pending, self._pending = self._pending, None
        if pending is not None:
            return self._resumed(pending)
        return self._fresh()

    def _fresh(self) -> Iterator:
        self._epoch = self._sampler_epoch()
        self._epoch_start_rng = rng_states()
        self._yielded = 0
        yield from self._counted(iter(self.loader))

    def _counted(self, iterator: Iterator) -> Iterator:
        while True:
            # The generator states before each fetch: a batch that was prefetched (loaded, not yet trained on)
            # when a checkpoint was written is loaded again from exactly these states on resume.
            self._before_fetch.append(rng_states())
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self._yielded += 1
            yield batch

    def _resumed(self, state: dict[str, Any]) -> Iterator:
        for sampler in _samplers(self.loader):
            sampler.set_epoch(state["epoch"])
        if state["trained"] >= len(self.loader):
            # the checkpoint was written at the end of an epoch: the next one starts from the checkpoint's state
            set_rng_states(state["rng"])
            yield from self._fresh()
            return
        set_rng_states(state["epoch_start_rng"])
        self._epoch, self._epoch_start_rng = state["epoch"], state["epoch_start_rng"]
        iterator = iter(self.loader)
        # Replay (load and discard) the batches already trained on; load the prefetched ones from the states they
        # were first loaded from; then continue from the checkpoint's states, as the uninterrupted run did.
        for _ in range(state["trained"]):
            next(iterator)
        prefetched = []
        for before in state["before_prefetch"]:
            set_rng_states(before)
            prefetched.append(next(iterator))
        set_rng_states(state["rng"])
        self._yielded = state["trained"]
        for batch in prefetched:
            self._yielded += 1
            yield batch
        yield from self._counted(iterator)

    def _sampler_epoch(self) -> int:
        samplers = _samplers(self.loader)
        return int(getattr(samplers[0], "epoch", 0)) if samplers else 0

    def state_dict(self) -> dict[str, Any]:
        """This rank's position and generator states, gathered from all ranks (a collective under DDP)."""
        trained = self._yielded if self.batches_trained is None else min(self.batches_trained(), self._yielded)
        if self._yielded - trained > MAX_PREFETCH:
            raise RuntimeError(f"{self._yielded - trained} batches prefetched; ResumableLoader supports {MAX_PREFETCH}")
        local = {
            "epoch": self._epoch if self._epoch is not None else self._sampler_epoch(),
            "yielded": self._yielded,
            "trained": trained,
            "before_prefetch": list(self._before_fetch)[len(self._before_fetch) - (self._yielded - trained):],
            "epoch_start_rng": self._epoch_start_rng if self._epoch_start_rng is not None else rng_states(),
            "rng": rng_states(),
        }
        world, _ = _world()
        ranks = [local]
        if world > 1:
            ranks = [None] * world
            dist.all_gather_object(ranks, local)
        return {"ranks": ranks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume at the saved position at the next ``iter()`` (the saved world size must match)."""
        ranks = state_dict["ranks"]
        world, rank = _world()
        if len(ranks) != world:
            rank_zero_warn(
                f"The checkpoint was written by {len(ranks)} process(es), this run has {world}: the data order and "
                "random draws cannot continue exactly; the epoch restarts from its beginning."
            )
            return
        self._pending = ranks[rank]


# ------------------------------------------------------------------------------------------------------------------
# The callback


#: Where a resumed run's earlier CSV history waits until the resumed trainer knows the checkpoint step.
CSV_ASIDE = "metrics.before-resume.csv"


def set_csv_history_aside(run_folder: str | Path) -> None:
    """Move ``metrics.csv`` of a run folder aside before a resumed run reopens the folder.

    Lightning's CSV writer deletes ``metrics.csv`` when it opens an existing folder; :class:`ExactResume` merges the
    rows kept aside back (up to the checkpoint step) once training restarts. Call it once, on the main process,
    before the trainer is built.
    """
    folder = Path(run_folder)
    current, aside = folder / "metrics.csv", folder / CSV_ASIDE
    if not current.is_file():
        return
    if aside.is_file():  # an earlier resume stopped before merging: keep both, older rows first
        _write_rows(aside, _read_rows(aside) + _read_rows(current))
        current.unlink()
    else:
        current.rename(aside)


def _csv_loggers(trainer: L.Trainer) -> list[CSVLogger]:
    return [logger for logger in trainer.loggers if isinstance(logger, CSVLogger)]


def _read_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class ExactResume(L.Callback):
    """Makes resumed runs continue exactly and in place (see the module docstring).

    * wraps the training dataloader in :class:`ResumableLoader` (unless it already has ``state_dict``);
    * restores the training generators after every validation and sanity check, so validation does not move them;
    * on resume, keeps the CSV history of the run folder up to the checkpoint step and appends from there;
    * stores the W&B run id in checkpoints (read by ``vp-lightning fit --ckpt_path last``);
    * flushes the loggers right after each checkpoint, so a killed run loses at most the rows of steps it will
      train again.
    """

    def __init__(self) -> None:
        super().__init__()
        self._train_rng: dict[str, Any] | None = None
        self._sanity_rng: dict[str, Any] | None = None
        self._flush_pending = False
        self.wandb_run_id: str | None = None

    # -- data ----------------------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._wrap_train_dataloader(trainer, pl_module)

    def _wrap_train_dataloader(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from lightning.pytorch.trainer.states import RunningStage

        owner = trainer.datamodule if trainer.datamodule is not None else pl_module
        current = getattr(owner, "train_dataloader", None)
        if current is None:
            return
        original = getattr(current, "_vp_original", current)  # a later fit with another trainer re-wraps

        def train_dataloader():
            loader = original()
            if callable(getattr(loader, "state_dict", None)) and callable(getattr(loader, "load_state_dict", None)):
                return loader  # already resumable
            # Lightning's own sampler injection (DDP without a sharding sampler) only sees a bare DataLoader:
            # apply it before wrapping.
            loader = trainer._data_connector._prepare_dataloader(loader, shuffle=True, mode=RunningStage.TRAINING)
            loop = trainer.fit_loop.epoch_loop
            return ResumableLoader(loader, batches_trained=lambda: loop.batch_progress.current.processed)

        train_dataloader._vp_original = original
        # An instance attribute: the datamodule's class and its other instances are left untouched.
        owner.train_dataloader = train_dataloader

    # -- validation leaves the training generators where they were -----------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._train_rng = rng_states()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._flush_pending:
            self._flush_pending = False
            for logger in trainer.loggers:
                logger.save()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking and self._train_rng is not None:
            set_rng_states(self._train_rng)

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sanity_rng = rng_states()

    def on_sanity_check_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._sanity_rng is not None:
            set_rng_states(self._sanity_rng)
            self._sanity_rng = None

    # -- run records ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        self._flush_pending = True
        return {"wandb_run_id": self.wandb_run_id}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.wandb_run_id = state_dict.get("wandb_run_id") or self.wandb_run_id

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # rows logged so far reach the disk with the checkpoint
        for logger in trainer.loggers:
            logger.save()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and trainer.is_global_zero:
                self.wandb_run_id = logger.experiment.id

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.ckpt_path is not None and trainer.is_global_zero:
            self._restore_csv_history(trainer)

    def _restore_csv_history(self, trainer: L.Trainer) -> None:
        first_step = trainer.global_step  # the first row the resumed run logs has this step
        for logger in _csv_loggers(trainer):
            aside = Path(logger.log_dir) / CSV_ASIDE
            if not aside.is_file():
                continue
            rows = [row for row in _read_rows(aside) if row.get("step") not in (None, "") and int(row["step"]) < first_step]
            writer = logger.experiment
            writer.metrics[:0] = [{k: v for k, v in row.items() if v != ""} for row in rows]
            writer.save()
            aside.unlink()
            rank_zero_info(f"Continuing {logger.log_dir}/metrics.csv after step {first_step - 1} ({len(rows)} rows kept)")


def _write_rows(path: Path, rows: list[dict[str, str]]) -> None:
    keys = sorted(set().union(*rows)) if rows else []
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


# ------------------------------------------------------------------------------------------------------------------
# Finding the run to resume


def find_last_checkpoint(save_dir: str | Path, name: str) -> Path | None:
    """``<save_dir>/<name>/version_N/checkpoints/last.ckpt`` of the highest N that has one, else ``None``."""
    base = Path(save_dir) / name
    found = []
    for folder in base.glob("version_*"):
        suffix = folder.name.split("_", 1)[1]
        if suffix.isdigit() and (folder / "checkpoints" / "last.ckpt").is_file():
            found.append((int(suffix), folder / "checkpoints" / "last.ckpt"))
    return max(found)[1] if found else None


def checkpoint_run_info(ckpt_path: str | Path) -> dict[str, Any]:
    """The :class:`ExactResume` state stored in a checkpoint (``{}`` when there is none)."""
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)
    for key, state in checkpoint.get("callbacks", {}).items():
        if key.split("{")[0] == "ExactResume":
            return dict(state)
    return {}


__all__ = ["ExactResume", "ResumableLoader", "checkpoint_run_info", "find_last_checkpoint", "rng_states", "set_csv_history_aside",
           "set_rng_states"]
