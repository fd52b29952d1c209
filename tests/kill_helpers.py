"""Starting a CLI run in a subprocess, waiting until a test callback in it signals, and killing it with SIGKILL."""

import os
import signal
import subprocess
import time
from pathlib import Path


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
