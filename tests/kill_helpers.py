"""Starting a CLI run in a subprocess, holding it at a known step, and killing it there with SIGKILL.

The training subprocesses load :class:`HoldAtStep` by class path (``kill_helpers.HoldAtStep``), so ``tests/`` must be
on their ``PYTHONPATH``.
"""

import os
import signal
import subprocess
import time
from pathlib import Path

import lightning as L


class HoldAtStep(L.Callback):
    """After the training batch that brings the global step to ``step``, writes ``marker`` and waits (to be killed).

    The checkpoint of that step, if any is due at the end of the epoch or after validation, is not written yet.
    """

    def __init__(self, step: int, marker: str):
        self.step, self.marker = step, marker

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            Path(self.marker).write_text(str(self.step))
            time.sleep(600)


def run_until_marker_then_sigkill(command: list[str], cwd: Path, env: dict[str, str], marker: Path,
                                  timeout: float = 300) -> int:
    """Run ``command`` until ``marker`` exists (written by a holding callback), SIGKILL it; returns its exit code."""
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + timeout
        while not marker.exists():
            assert proc.poll() is None, "the run ended before reaching the point where it is killed"
            assert time.time() < deadline, "the run did not reach the point where it is killed in time"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode
