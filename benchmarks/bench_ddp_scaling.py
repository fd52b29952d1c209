"""Step time of 1 vs 2 DDP processes at the same per-process batch (weak scaling), FSQ and VP.

Runs the real command line (`vp-lightning fit` on the quickstart configs, CPU, gloo) in a subprocess per setting and
times training steps from inside with a small callback: the time between the starts of consecutive steps (data
loading, forward, backward, gradient all-reduce, optimizer step), median over the steps after a warm-up. Perfect weak
scaling keeps the step time constant while the global batch doubles; the throughput column is images/s over all
processes. On a machine with fewer free cores than processes the 2-process numbers measure contention, so the load
average is printed next to them.

    python benchmarks/bench_ddp_scaling.py [--steps 30] [--warmup 5] [--batch-size 16] [--resolution 32]
                                           [--threads 1] [--quantizers fsq vp]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"fsq": "image-fsq.yaml", "vp": "image-vpvae.yaml", "fsp": "image-fsp.yaml", "vq": "image-vqvae.yaml"}


class StepTimer(L.Callback):
    """Writes the start time of every training step (rank 0) to ``out`` as JSON at the end of training."""

    def __init__(self, out: str):
        self.out = out
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.starts.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module):
        self.starts.append(time.perf_counter())
        if trainer.is_global_zero:
            Path(self.out).write_text(json.dumps(self.starts))


def step_times(quantizer: str, devices: int, args: argparse.Namespace, folder: Path) -> list[float]:
    out = folder / f"{quantizer}-{devices}.json"
    timer = json.dumps({"class_path": "bench_ddp_scaling.StepTimer", "init_args": {"out": str(out)}})
    # only the timer: no validation, checkpoints, loggers, codebook fits or sample grids in the timed loop
    cmd = [sys.executable, "-m", "vp_lightning", "fit", "--config", str(ROOT / "conf" / "quickstart" / CONFIGS[quantizer]),
           f"--trainer.callbacks=[{timer}]", "--trainer.logger=false", "--trainer.enable_checkpointing=false",
           "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
           f"--trainer.max_steps={args.warmup + args.steps}", f"--trainer.devices={devices}",
           f"--trainer.strategy={'ddp' if devices > 1 else 'auto'}", f"--data.init_args.batch_size={args.batch_size}",
           f"--data.init_args.resolution={args.resolution}", "--data.init_args.num_workers=0"]
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": str(args.threads),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    starts = json.loads(out.read_text())
    return [b - a for a, b in zip(starts, starts[1:], strict=False)][args.warmup:]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per setting")
    parser.add_argument("--warmup", type=int, default=5, help="untimed first steps")
    parser.add_argument("--batch-size", type=int, default=16, help="per-process batch")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per process (OMP_NUM_THREADS)")
    parser.add_argument("--quantizers", nargs="+", default=["fsq", "vp"], choices=sorted(CONFIGS))
    args = parser.parse_args(argv)
    print(f"per-process batch {args.batch_size}, {args.resolution} px, {args.threads} thread(s) per process, "
          f"median of {args.steps} steps after {args.warmup} warm-up; CPU cores: {os.cpu_count()}")
    print(f"{'quantizer':>9} {'procs':>5} {'step ms':>8} {'img/s':>7} {'weak-scaling eff.':>17} {'load avg (1 min)':>16}")
    with tempfile.TemporaryDirectory() as tmp:
        for quantizer in args.quantizers:
            base = None
            for devices in (1, 2):
                times = step_times(quantizer, devices, args, Path(tmp))
                median = statistics.median(times)
                base = base or median
                load = os.getloadavg()[0]
                print(f"{quantizer:>9} {devices:>5} {1e3 * median:8.1f} {devices * args.batch_size / median:7.1f} "
                      f"{base / median:17.2f} {load:16.2f}", flush=True)


if __name__ == "__main__":
    main()
