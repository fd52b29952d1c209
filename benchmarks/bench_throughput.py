"""Training throughput (images/s) of the quickstart tokenizer with each quantizer.

Builds the model exactly as `vp-lightning fit --config conf/quickstart/image-fsq.yaml` does, swaps the quantizer
through the CLI (a second --config), and times full optimisation steps (forward, backward, Adam step) on a fixed
batch. Prints medians of repeated steps and the ratio to FSQ measured in the same process.

    python benchmarks/bench_throughput.py [--steps 20] [--batch-size 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "conf" / "quickstart" / "image-fsq.yaml"
QUANTIZERS = {
    "fsq": ROOT / "conf" / "quantizer" / "fsq-1000.yaml",
    "vq": ROOT / "conf" / "quantizer" / "vq-1024.yaml",
    "fsp": ROOT / "conf" / "quantizer" / "fsp-1000.yaml",
    "vp": ROOT / "conf" / "quantizer" / "vp-1024.yaml",
}


def build_model(quantizer_config: Path):
    from vp_lightning.cli import VPLightningCLI

    args = ["--config", str(CONFIG), "--config", str(quantizer_config), "--trainer.logger=false",
            "--trainer.callbacks=[]", "--trainer.enable_checkpointing=false"]
    cli = VPLightningCLI(args=args, run=False)
    model = cli.model
    model.configure_model()
    return model, cli.datamodule


def time_steps(model, x: torch.Tensor, steps: int, warmup: int = 3) -> list[float]:
    optimizer = model.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    model.train()
    model.log = lambda *a, **k: None  # outside a Trainer: logging is a no-op
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = model._shared_step(x, "train")["loss"]
        loss.backward()
        optimizer.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quantizers", nargs="+", default=list(QUANTIZERS))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for name in args.quantizers:
        path = QUANTIZERS[name]
        if not path.exists():
            print(f"skip {name}: {path.relative_to(ROOT)} not found", file=sys.stderr)
            continue
        model, dm = build_model(path)
        dm.setup("fit")
        loader = dm.train_dataloader()
        x = next(iter(loader))
        x = x[0] if isinstance(x, (list, tuple)) else x
        x = x["x"] if isinstance(x, dict) else x
        x = x[: args.batch_size]
        times = time_steps(model, x, args.steps)
        med = statistics.median(times)
        rows.append((name, len(x), med, len(x) / med))
    base = next((r[3] for r in rows if r[0] == "fsq"), rows[0][3])
    print(f"quickstart model ({CONFIG.relative_to(ROOT)}), {tuple(x.shape[1:])} images, "
          f"{args.threads} threads, median of {args.steps} steps")
    print(f"{'quantizer':<10} {'batch':>5} {'ms/step':>9} {'images/s':>9} {'vs fsq':>7}")
    for name, batch, med, ips in rows:
        print(f"{name:<10} {batch:>5} {med * 1e3:>9.1f} {ips:>9.1f} {ips / base:>7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
