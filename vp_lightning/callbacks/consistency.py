"""Checks that quantizer state which must agree across DDP ranks really does (VQ codebooks, fitted codebooks)."""

from __future__ import annotations

import fnmatch
import hashlib
import json

import lightning as L
import torch
import torch.distributed as dist

from vp_lightning.callbacks.token_usage import run_dir


def state_fingerprints(module: torch.nn.Module, exclude: list[str]) -> dict[str, str]:
    """SHA-1 of every state-dict tensor of ``module`` whose name matches none of the ``exclude`` patterns."""
    prints = {}
    for name, tensor in module.state_dict().items():
        if any(fnmatch.fnmatch(name, pattern) for pattern in exclude):
            continue
        data = tensor.detach().cpu().contiguous()
        prints[name] = hashlib.sha1(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"").hexdigest()
    return prints


class RankConsistencyCheck(L.Callback):
    """After training (and every ``every_n_steps`` if > 0) compares the quantizer's state across ranks.

    State that is legitimately per-rank is skipped: names a quantizer lists in its ``per_rank_state`` attribute (the VP
    queue, its pointer and running statistics) and names matching ``exclude``. On rank 0 the result is written to
    ``rank_consistency.json`` in the run folder.

    Args:
        exclude: fnmatch patterns of state names that may differ across ranks.
        every_n_steps: also check during training (0 = only at the end).
        on_mismatch: ``"raise"`` (stop with an error naming the tensors) or ``"warn"``.
    """

    def __init__(self, exclude: list[str] = (), every_n_steps: int = 0, on_mismatch: str = "raise"):
        super().__init__()
        if on_mismatch not in ("raise", "warn"):
            raise ValueError(f"on_mismatch must be 'raise' or 'warn', got {on_mismatch!r}")
        self.exclude = list(exclude)
        self.every_n_steps = every_n_steps
        self.on_mismatch = on_mismatch
        self.last_result: dict | None = None

    def check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        quantizer = pl_module.quantizer
        exclude = self.exclude + [f"*{name}" for name in getattr(quantizer, "per_rank_state", ())]
        local = state_fingerprints(quantizer, exclude)
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        gathered = [local]
        if world > 1:
            gathered = [None] * world
            dist.all_gather_object(gathered, local)
        mismatched = sorted(name for name in local if len({g.get(name) for g in gathered}) > 1)
        result = {"step": trainer.global_step, "world_size": world, "checked": sorted(local), "mismatched": mismatched}
        self.last_result = result
        if trainer.is_global_zero:
            folder = run_dir(trainer)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "rank_consistency.json").write_text(json.dumps(result, indent=2))
        if mismatched:
            message = f"quantizer state differs across {world} ranks at step {trainer.global_step}: {mismatched}"
            if self.on_mismatch == "raise":
                raise RuntimeError(message)
            L.pytorch.utilities.rank_zero_warn(message)
        return result

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps > 0 and trainer.global_step % self.every_n_steps == 0:
            self.check(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.check(trainer, pl_module)
