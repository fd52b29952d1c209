"""Cost of one training forward + backward of the quantizer alone: VP (each kNN backend), FSP and FSQ.

For each setting (K, d, tokens per step) every quantizer runs a few training steps on fresh N(0, I) latents
(``out.quantized.sum() + out.loss`` backpropagated to the latents) and the table reports the median and the mean
milliseconds per step (the mean includes the kd-tree's occasional rebuilds), the VP accept rate, the speed-up of
the kd-tree over brute force measured in this process, and the speed-up over the public VP-VAE example code's
VP module (exact brute-force top-k), whose median timings on the same 2-core CPU are listed in ``REFERENCE_MS``.

    python benchmarks/bench_vp.py            # the three paper-scale settings, all quantizers
    python benchmarks/bench_vp.py --quick    # smoke run: fewer steps, brute force only at K=1024
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

from vp_lightning.quantizers.fsp import FSP
from vp_lightning.quantizers.vp import VectorPerturbation

# (K, d, tokens per step) and the FSQ/FSP levels of the paper for that K.
SETTINGS = [(1024, 4, 2048), (1024, 4, 8192), (16384, 5, 8192)]
LEVELS = {1024: [8, 5, 5, 5], 16384: [8, 8, 8, 6, 5]}
# Median ms per training forward + backward of the public example code's VP module on the same CPUs.
REFERENCE_MS = {(1024, 4, 2048): 863.0, (1024, 4, 8192): 3300.0, (16384, 5, 8192): 76000.0}


def make_fsq(levels: list[int]) -> torch.nn.Module:
    try:
        from vp_lightning.quantizers.fsq import FSQ
    except ImportError:  # the project's wrapper is the library module plus the shared output type
        from vector_quantize_pytorch import FSQ as LibFSQ

        lib = LibFSQ(levels=levels)

        class FSQ(torch.nn.Module):  # noqa: N801 - mirrors the project's class name
            def __init__(self, levels):
                super().__init__()
                self.fsq = lib

            def forward(self, z):
                q, _ = self.fsq(z.unsqueeze(0))
                return type("Out", (), {"quantized": q[0], "loss": torch.zeros(())})

    return FSQ(levels)


def time_steps(
    quantizer: torch.nn.Module, tokens: int, dim: int, steps: int, budget_s: float
) -> tuple[list[float], list[float]]:
    """Runs up to ``steps`` timed steps after one warm-up (stopping early past ``budget_s`` seconds).

    Returns:
        (milliseconds per timed step, accept rate per step or empty).
    """
    quantizer.train()
    times, accepts = [], []
    start = time.perf_counter()
    for i in range(steps + 1):
        z = torch.randn(tokens, dim, requires_grad=True)
        t0 = time.perf_counter()
        out = quantizer(z)
        (out.quantized.sum() + out.loss).backward()
        elapsed = (time.perf_counter() - t0) * 1e3
        metrics = getattr(out, "metrics", {}) or {}
        if i == 0 and steps > 0 and time.perf_counter() - start < budget_s:
            continue  # warm-up: first tree build, allocator
        times.append(elapsed)
        if "accept_rate" in metrics:
            accepts.append(float(metrics["accept_rate"]))
        if time.perf_counter() - start > budget_s:
            break
    return times, accepts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 steps, brute force only at K=1024")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    parser.add_argument("--budget", type=float, default=120.0, help="seconds per measurement before stopping early")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = 3 if args.quick else args.steps
    torch.manual_seed(0)

    print(f"CPU threads: torch {torch.get_num_threads()}, cores {os.cpu_count()}, "
          f"load average {os.getloadavg()[0]:.2f}")
    header = f"{'K':>6} {'d':>2} {'tokens':>6}  {'quantizer':<11} {'median ms':>10} {'mean ms':>9} " \
             f"{'steps':>5} {'accept':>6} {'kdtree/torch':>12} {'vs example':>10}"
    print(header)
    print("-" * len(header))
    for k, d, tokens in SETTINGS:
        candidates: dict[str, Callable[[], torch.nn.Module]] = {
            "vp-kdtree": lambda: VectorPerturbation(d, k, knn_backend="kdtree"),
            "vp-torch": lambda: VectorPerturbation(d, k, knn_backend="torch"),
            "fsp": lambda: FSP(LEVELS[k]),
            "fsq": lambda: make_fsq(LEVELS[k]),
        }
        if args.quick and k > 1024:
            candidates.pop("vp-torch")
        medians: dict[str, float] = {}
        for name, factory in candidates.items():
            times, accepts = time_steps(factory(), tokens, d, steps, args.budget)
            medians[name] = statistics.median(times)
            accept = f"{statistics.mean(accepts):.3f}" if accepts else "-"
            ratio = "-"
            if name == "vp-torch" and "vp-kdtree" in medians:
                ratio = f"{medians['vp-torch'] / medians['vp-kdtree']:.1f}x"
            versus = f"{REFERENCE_MS[(k, d, tokens)] / medians[name]:.1f}x" if name.startswith("vp") else "-"
            print(f"{k:>6} {d:>2} {tokens:>6}  {name:<11} {medians[name]:>10.1f} {statistics.mean(times):>9.1f} "
                  f"{len(times):>5} {accept:>6} {ratio:>12} {versus:>10}", flush=True)


if __name__ == "__main__":
    main()
