"""Cost of one training forward + backward of the quantizer alone: VP (each kNN backend), FSP and FSQ.

For each setting (K, d, tokens per step) every quantizer runs a few training steps on fresh N(0, I) latents
(``out.quantized.sum() + out.loss`` backpropagated to the latents) and the table reports the median and the mean
milliseconds per step (the mean includes the kd-tree's occasional rebuilds), the VP accept rate, the speed-up of
the kd-tree over brute force measured in this process, and the speed-up over the public VP-VAE example code's
VP module (exact brute-force top-k), whose median timings on the same 2-core CPU are listed in ``REFERENCE_MS``.
``cpu ms`` is the process CPU time (all threads) per step: unlike wall-clock time it hardly changes when other
programs load the machine, and on an idle machine wall time is about ``cpu ms / threads``.

    python benchmarks/bench_vp.py            # the three paper-scale settings, all quantizers
    python benchmarks/bench_vp.py --quick    # smoke run: fewer steps, brute force only at K=1024
    python benchmarks/bench_vp.py --settings 1024,4,2048 --quantizers vp-kdtree vp-torch
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

from vp_lightning.quantizers.fsp import FSP
from vp_lightning.quantizers.fsq import FSQ
from vp_lightning.quantizers.vp import VectorPerturbation

# (K, d, tokens per step) and the FSQ/FSP levels of the paper for that K.
SETTINGS = [(1024, 4, 2048), (1024, 4, 8192), (16384, 5, 8192)]
LEVELS = {1024: [8, 5, 5, 5], 16384: [8, 8, 8, 6, 5]}
# Median ms per training forward + backward of the public example code's VP module on the same CPUs.
REFERENCE_MS = {(1024, 4, 2048): 863.0, (1024, 4, 8192): 3300.0, (16384, 5, 8192): 76000.0}


def time_steps(
    quantizer: torch.nn.Module, tokens: int, dim: int, steps: int, budget_s: float
) -> tuple[list[float], list[float], list[float]]:
    """Runs up to ``steps`` timed steps after one warm-up (stopping early past ``budget_s`` seconds).

    Returns:
        (wall-clock ms per timed step, process CPU ms per timed step, accept rate per step or empty).
    """
    quantizer.train()
    wall, cpu, accepts = [], [], []
    start = time.perf_counter()
    for i in range(steps + 1):
        z = torch.randn(tokens, dim, requires_grad=True)
        t0, c0 = time.perf_counter(), time.process_time()
        out = quantizer(z)
        (out.quantized.sum() + out.loss).backward()
        elapsed, used = (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3
        if i == 0 and steps > 0 and time.perf_counter() - start < budget_s:
            continue  # warm-up: first tree build, allocator
        wall.append(elapsed)
        cpu.append(used)
        if "accept_rate" in out.metrics:
            accepts.append(float(out.metrics["accept_rate"]))
        if time.perf_counter() - start > budget_s:
            break
    return wall, cpu, accepts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 steps, brute force only at K=1024")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    parser.add_argument("--budget", type=float, default=120.0, help="seconds per measurement before stopping early")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--settings", nargs="*", default=None, metavar="K,d,tokens",
                        help="subset of settings, e.g. 1024,4,2048 (default: all three)")
    parser.add_argument("--quantizers", nargs="*", default=None, choices=["vp-kdtree", "vp-torch", "fsp", "fsq"],
                        help="subset of quantizers (default: all)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = 3 if args.quick else args.steps
    torch.manual_seed(0)

    print(f"CPU threads: torch {torch.get_num_threads()}, cores {os.cpu_count()}, "
          f"load average {os.getloadavg()[0]:.2f}")
    header = (f"{'K':>6} {'d':>2} {'tokens':>6}  {'quantizer':<10} {'median ms':>10} {'mean ms':>9} {'cpu ms':>8} "
              f"{'steps':>5} {'accept':>6} {'torch/kdtree':>12} {'vs example':>10}")
    print(header)
    print("-" * len(header))
    settings = SETTINGS
    if args.settings:
        settings = [tuple(int(v) for v in item.split(",")) for item in args.settings]
        unknown = [item for item in settings if item not in REFERENCE_MS]
        if unknown:
            parser.error(f"unknown settings {unknown}; choose among {SETTINGS}")
    for k, d, tokens in settings:
        candidates: dict[str, Callable[[], torch.nn.Module]] = {
            "vp-kdtree": lambda k=k, d=d: VectorPerturbation(d, k, knn_backend="kdtree"),
            "vp-torch": lambda k=k, d=d: VectorPerturbation(d, k, knn_backend="torch"),
            "fsp": lambda k=k: FSP(LEVELS[k]),
            "fsq": lambda k=k: FSQ(LEVELS[k]),
        }
        if args.quick and k > 1024:
            candidates.pop("vp-torch")
        if args.quantizers:
            candidates = {name: f for name, f in candidates.items() if name in args.quantizers}
        medians: dict[str, float] = {}
        for name, factory in candidates.items():
            wall, cpu, accepts = time_steps(factory(), tokens, d, steps, args.budget)
            medians[name] = statistics.median(wall)
            accept = f"{statistics.mean(accepts):.3f}" if accepts else "-"
            ratio = "-"
            if name == "vp-torch" and "vp-kdtree" in medians:
                ratio = f"{medians['vp-torch'] / medians['vp-kdtree']:.1f}x"
            versus = f"{REFERENCE_MS[(k, d, tokens)] / medians[name]:.1f}x" if name.startswith("vp") else "-"
            print(f"{k:>6} {d:>2} {tokens:>6}  {name:<10} {medians[name]:>10.1f} {statistics.mean(wall):>9.1f} "
                  f"{statistics.median(cpu):>8.1f} {len(wall):>5} {accept:>6} {ratio:>12} {versus:>10}", flush=True)
    print(f"load average after the run: {os.getloadavg()[0]:.2f} (wall-clock times grow with other load; "
          "cpu ms = process CPU time summed over threads)")


if __name__ == "__main__":
    main()
