"""Batch-1 decoding speed of WiSparse activation sparsity: sparse fast path against the dense product.

Table ``gemv``: one matrix-vector product of a random (d_out, d_in) = (4096, 14336) weight (the shape of a
7-8B model's MLP down projection) with a Gaussian input, thresholds chosen so that exactly the given fraction of
the input channels is dropped. Paths:

* ``dense``: ``F.linear(x, W)``, the baseline of every speed-up;
* ``reference``: ``SparseLinear``'s masked dense product (``fast_decode=False``), what the layer computed before;
* ``gather``: :func:`vp_lightning.sparsity.kernels.gather_gemv` alone (list kept channels, read their rows of W^T);
* ``fast path``: ``SparseLinear`` with its one-token fast path (gather, or the masked dense product where that
  is faster for the dtype, see ``CPU_GATHER_MAX_DENSITY``).

``GB/s`` counts only the weight bytes the product needs, (1 - sparsity) * |W|, over the median time. Between
timed runs ``--flush-mb`` MB are written so that every run reads its weights from memory, as in decoding, and not
from a cache warmed by the run before it.

Table ``decode``: greedy generation with KV cache by the embedded SmolLM2-135M (every projection of every block
sparsified with one TEAL-style threshold per projection), dense against each sparsity. Plans come from
``--plans DIR`` (``teal-0.25.json``, ... written by ``save_plan``) or are calibrated here: per projection the
sparsity-quantile of |x| over a few hundred tokens of the Python documentation shipped with the interpreter
(``pydoc_data.topics``), alpha = 0. Tokens/s = new tokens / wall time of ``generate`` (prompt included).
``realised`` is the parameter-weighted fraction of dropped channels over prompt and generated tokens, measured
by one extra generation on the counting reference path, and ``same tokens`` is how many of the new tokens the
fast path chose identically to that reference generation before the first difference. The two paths differ by
floating-point summation order only (about 1e-6 relative on one step's float32 logits; in bfloat16 each layer's
output may also round the other way), but a hard threshold turns such a difference into a flipped channel now and
then, and over many steps greedy decoding may then part ways.

All timings are medians over repeats run in interleaved rounds (every setting once per round), so a change of
background load hits all settings alike; speed-ups are against the dense run of the same process.

    python benchmarks/bench_wisparse_decode.py                    # both tables
    python benchmarks/bench_wisparse_decode.py --quick            # smoke run (seconds)
    python benchmarks/bench_wisparse_decode.py --tables gemv --dtypes float32 bfloat16
    python benchmarks/bench_wisparse_decode.py --tables decode --new-tokens 64 --plans plans/
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vp_lightning.sparsity import SparseLinear, SparsityPlan, load_plan, sparsify
from vp_lightning.sparsity.kernels import gather_gemv, keep_indices
from vp_lightning.sparsity.layers import realised_sparsity, set_sparsity_enabled, sparse_layers
from vp_lightning.sparsity.loading import layout_for, parse_dtype, projection_sites
from vp_lightning.sparsity.plan import LayerPlan

SPARSITIES = [0.0, 0.25, 0.4, 0.5]


def interleaved_medians(
    runs: dict[str, Callable[[], object]],
    repeats: int,
    prepare: dict[str, Callable[[], None]] | None = None,
    warmup: int = 1,
) -> dict[str, float]:
    """Median wall seconds of every run, timed once per round for ``repeats`` rounds after warm-up rounds.

    ``prepare[name]``, if given, runs untimed right before ``runs[name]`` (e.g. to switch thresholds).
    """
    prepare = prepare or {}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(warmup + repeats):
        for name, run in runs.items():
            if name in prepare:
                prepare[name]()
            start = time.perf_counter()
            run()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def exact_thresholds(x: Tensor, sparsity: float) -> Tensor:
    """Per-channel thresholds dropping exactly the ``round(sparsity * d_in)`` smallest |x_j| (ties included).

    A dropped channel gets ``theta_j = |x_j|`` (``|x_j| > theta_j`` is false), a kept one ``theta_j = -1``.
    """
    magnitude = x.abs().float().reshape(-1)
    thresholds = torch.full_like(magnitude, -1.0)
    dropped = magnitude.argsort()[: round(sparsity * magnitude.numel())]
    thresholds[dropped] = magnitude[dropped]
    return thresholds


def gemv_table(
    d_out: int, d_in: int, dtype: torch.dtype, sparsities: list[float], repeats: int, flush_mb: int
) -> None:
    """Prints the GEMV table: dense, reference, gather and fast path at every sparsity (see the module doc)."""
    gen = torch.Generator().manual_seed(0)
    linear = nn.Linear(d_in, d_out, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(d_out, d_in, generator=gen) / d_in**0.5)
    linear = linear.to(dtype).requires_grad_(False)
    x = torch.randn(1, 1, d_in, generator=gen).to(dtype)
    row = x.view(-1)
    # one fast and one reference layer sharing the weight (the fast one builds the W^T copy); their thresholds
    # are switched untimed, which also makes the fast layer count the kept channels again on its next call
    fast = SparseLinear.from_linear(linear, torch.zeros(d_in))
    reference = SparseLinear.from_linear(linear, torch.zeros(d_in))
    reference.fast_decode = False
    thresholds = {s: exact_thresholds(x, s) for s in sparsities}

    # Written between timed runs so that no run finds weight rows left in the cache by the run before it (in
    # decoding, every layer's weights come from memory).
    flush = torch.zeros(flush_mb * 2**18)

    def use(s: float | None) -> Callable[[], None]:
        def apply() -> None:
            flush.add_(1.0)
            if s is not None:
                fast.threshold.copy_(thresholds[s])
                reference.threshold.copy_(thresholds[s])
        return apply

    runs: dict[str, Callable[[], object]] = {"dense": lambda: F.linear(x, linear.weight)}
    prepare: dict[str, Callable[[], None]] = {"dense": use(None)}
    for s in sparsities:
        use(s)()
        dropped = 1.0 - keep_indices(row, fast.threshold).numel() / d_in
        assert abs(dropped - s) < 1.0 / d_in, (s, dropped)
        torch.testing.assert_close(fast(x).float(), reference(x).float(), rtol=2e-2, atol=2e-2)
        for path in ("reference", "gather", "fast path"):
            prepare[f"{path} {s}"] = use(s)
        runs[f"reference {s}"] = lambda: reference(x)
        runs[f"gather {s}"] = lambda: gather_gemv(row, keep_indices(row, fast.threshold), fast.weight_t())
        runs[f"fast path {s}"] = lambda: fast(x)
    with torch.no_grad():
        medians = interleaved_medians(runs, repeats, prepare)
    weight_bytes = d_out * d_in * linear.weight.element_size()
    dense = medians["dense"]
    print(f"\nGEMV d_out={d_out} d_in={d_in} {str(dtype).removeprefix('torch.')}, batch 1, "
          f"{torch.get_num_threads()} thread(s), median of {repeats}")
    print("| sparsity | path | median µs | speed-up vs dense | GB/s |")
    print("|---:|:---|---:|---:|---:|")
    print(f"| - | dense | {dense * 1e6:.0f} | 1.00 | {weight_bytes / dense / 1e9:.1f} |")
    for s in sparsities:
        for path in ("reference", "gather", "fast path"):
            t = medians[f"{path} {s}"]
            print(f"| {s:.2f} | {path} | {t * 1e6:.0f} | {dense / t:.2f} | {(1 - s) * weight_bytes / t / 1e9:.1f} |")


def calibration_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def calibrate_teal_plans(
    model: nn.Module, ids: Tensor, sparsities: list[float], name: str
) -> dict[float, SparsityPlan]:
    """One threshold per projection: the sparsity-quantile of |x| over the calibration tokens (alpha = 0)."""
    sites = projection_sites(model, layout_for(model))
    inputs: dict[str, list[Tensor]] = {site.name: [] for site in sites}
    handles = []
    for site in sites:
        def hook(module: nn.Module, args: tuple[Tensor, ...], site_name: str = site.name) -> None:
            inputs[site_name].append(args[0].detach().abs().float().reshape(-1, args[0].shape[-1]))

        handles.append(model.get_submodule(site.name).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()
    plans = {}
    for s in sparsities:
        layers = {}
        for site in sites:
            values = torch.cat(inputs[site.name]).reshape(-1)
            tau = float(torch.quantile(values, s)) if s > 0 else -1.0
            layers[site.name] = LayerPlan(
                block=site.block, projection=site.projection, alpha=0.0, sparsity=s, tau=tau,
                threshold=torch.full((site.in_features,), tau), params=site.params,
            )
        plans[s] = SparsityPlan(model=name, target_sparsity=s, layers=layers,
                                metadata={"method": "teal", "calibration_tokens": int(ids.numel())})
    return plans


def decode_table(args: argparse.Namespace, sparsities: list[float]) -> None:
    from vp_lightning.sparsity.loading import load_causal_lm, load_tokenizer

    start = time.perf_counter()
    model, name = load_causal_lm(None, None, args.decode_dtype, None)
    tokenizer = load_tokenizer(None, None)
    tokens = tokenizer.encode(calibration_text())
    prompt = torch.tensor([tokens[: args.prompt_tokens]])
    calibration = torch.tensor([tokens[5000 : 5000 + args.calib_tokens]])
    if args.plans:
        plans = {}
        for s in sparsities:
            path = Path(args.plans) / f"teal-{s:.2f}.json"
            plans[s] = load_plan(path)
        source = f"plans from {args.plans}"
    else:
        plans = calibrate_teal_plans(model, calibration, sparsities, name)
        source = f"TEAL thresholds calibrated on {calibration.numel()} tokens of pydoc_data.topics"
    print(f"\nloaded {name} and built plans in {time.perf_counter() - start:.1f} s ({source})")
    sparsify(model, plans[sparsities[0]])
    pad = model.generation_config.eos_token_id
    pad = pad[0] if isinstance(pad, list) else pad

    def generate() -> Tensor:
        with torch.no_grad():
            return model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, use_cache=True,
                                  max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=pad)

    def switch(s: float | None) -> Callable[[], None]:
        def apply() -> None:
            if s is None:
                set_sparsity_enabled(model, False)
            else:
                sparsify(model, plans[s])  # swaps threshold vectors and enables the layers
        return apply

    names = {"dense": None} | {f"{s}": s for s in sparsities}
    outputs: dict[str, Tensor] = {}
    runs = {name: lambda name=name: outputs.__setitem__(name, generate()) for name in names}
    medians = interleaved_medians(runs, args.repeats, {name: switch(s) for name, s in names.items()})
    realised, same = {}, {}
    for s in sparsities:
        switch(s)()
        for _, layer in sparse_layers(model):
            layer.track_sparsity = True
            layer.reset_counters()
        counted_tokens = generate()
        realised[s] = realised_sparsity(model)
        fast_new, counted_new = outputs[f"{s}"][0, prompt.shape[1]:], counted_tokens[0, prompt.shape[1]:]
        differ = (fast_new != counted_new).nonzero()
        same[s] = int(differ[0]) if len(differ) else int(fast_new.numel())
        for _, layer in sparse_layers(model):
            layer.track_sparsity = False
    dense = args.new_tokens / medians["dense"]
    print(f"greedy decoding of {name} ({args.decode_dtype}), prompt {prompt.shape[1]} tokens, "
          f"{args.new_tokens} new tokens, {torch.get_num_threads()} thread(s), median of {args.repeats}")
    print("| sparsity | tokens/s | speed-up vs dense | realised | same tokens |")
    print("|---:|---:|---:|---:|---:|")
    print(f"| dense | {dense:.1f} | 1.00 | - | - |")
    for s in sparsities:
        rate = args.new_tokens / medians[f"{s}"]
        print(f"| {s:.2f} | {rate:.1f} | {rate / dense:.2f} | {realised[s]:.3f} | {same[s]}/{args.new_tokens} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: few repeats, small decode, float32 only")
    parser.add_argument("--tables", nargs="+", choices=["gemv", "decode"], default=["gemv", "decode"])
    parser.add_argument("--sparsities", type=float, nargs="+", default=SPARSITIES)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: batch-1 decoding on a shared small machine)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default: 15 gemv, 3 decode)")
    parser.add_argument("--d-out", type=int, default=4096)
    parser.add_argument("--d-in", type=int, default=14336)
    parser.add_argument("--flush-mb", type=int, default=512,
                        help="MB written between GEMV runs to evict the weights from the caches (0: off)")
    parser.add_argument("--dtypes", nargs="+", default=["float32"], help="GEMV weight dtypes, e.g. float32 bfloat16")
    parser.add_argument("--decode-dtype", default="float32", help="weight dtype of the decoded model")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--calib-tokens", type=int, default=512, help="tokens for the TEAL thresholds")
    parser.add_argument("--plans", default=None, help="directory of saved plans teal-<sparsity>.json to use instead")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sparsities = args.sparsities
    if args.quick:
        args.dtypes = ["float32"]
        args.new_tokens = min(args.new_tokens, 8)
        args.calib_tokens = min(args.calib_tokens, 128)
        sparsities = [s for s in sparsities if s in (0.0, 0.5)] or sparsities[:1]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.2f}")
    if "gemv" in args.tables:
        repeats = args.repeats or (5 if args.quick else 15)
        for dtype in args.dtypes:
            gemv_table(args.d_out, args.d_in, parse_dtype(dtype), sparsities, repeats, args.flush_mb)
    if "decode" in args.tables:
        args.repeats = args.repeats or (1 if args.quick else 3)
        decode_table(args, sparsities)
    print(f"\nload average after the run: {os.getloadavg()[0]:.2f} (other programs on the machine slow every "
          "setting alike within a round, but the absolute numbers move)")


if __name__ == "__main__":
    main()
