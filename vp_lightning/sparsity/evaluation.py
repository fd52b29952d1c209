"""One evaluation harness for dense and sparse variants of a causal LM.

Convention (stated in every results table): every position of every evaluation sequence is sparsified unless a
dense prefix is configured; perplexity and KL(dense || sparse) average over every next-token prediction of every
sequence (n - 1 per sequence of n tokens); realised sparsity is the parameter-weighted fraction of weight
columns skipped (each dropped input channel of a projection skips one weight column of d_out parameters),
counted on the same positions that are sparsified.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vp_lightning.sparsity.layers import SparseLinear, set_sparsity_enabled, sparse_layers, sparsify
from vp_lightning.sparsity.plan import SparsityPlan


@dataclass
class Variant:
    """One configuration to evaluate.

    Attributes:
        method: short method name (``dense``, ``teal``, ``alpha1``, ``wisparse-alpha``, ...).
        description: one-line description for the results table.
        plan: the sparsity plan, None for the dense model.
    """

    method: str
    description: str
    plan: SparsityPlan | None


@dataclass
class EvalResult:
    """Metrics of one variant on the evaluation pool."""

    method: str
    description: str
    target: float
    calibrated: float
    realised: float
    perplexity: float
    kl: float
    tokens: int


def convention(num_sequences: int, sequence_length: int, dense_prefix: int) -> str:
    """The evaluation convention as one sentence for the results table."""
    positions = "all positions" if dense_prefix == 0 else f"positions >= {dense_prefix} (dense prefix {dense_prefix})"
    return (
        f"Evaluation pool: {num_sequences} sequences x {sequence_length} tokens, disjoint from the calibration and "
        f"fitness pools. Sparsified: {positions} of every sequence. Perplexity and KL(dense || sparse) are averaged "
        f"over all {sequence_length - 1} next-token predictions per sequence. Realised sparsity: parameter-weighted "
        "fraction of weight columns skipped on the sparsified positions."
    )


def _token_nll(logits: Tensor, input_ids: Tensor) -> tuple[Tensor, Tensor]:
    """(b, n-1) next-token negative log-likelihoods and (b, n-1, v) log-probabilities."""
    log_probs = F.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -log_probs.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return nll, log_probs


@torch.no_grad()
def evaluate_variants(
    model: nn.Module,
    sequences: Tensor,
    variants: Sequence[Variant],
    batch_size: int = 2,
    dense_prefix: int = 0,
    reduce_sum: Callable[[Tensor], Tensor] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> list[EvalResult]:
    """Perplexity, KL to the dense model and realised sparsity of every variant.

    The dense model runs once per batch and every variant is compared against it on the same batch.

    Args:
        model: the causal LM (sparsified in place as needed; left with its sparse layers disabled).
        sequences: (N, n) token ids of this rank's share of the evaluation pool.
        variants: variants to evaluate; the dense model is always evaluated too (as a ``dense`` row if listed).
        batch_size: sequences per forward pass.
        dense_prefix: leading positions left dense.
        reduce_sum: all-reduce-with-sum across ranks (None for a single process).
        on_batch: progress callback with the number of sequences done.

    Returns:
        One :class:`EvalResult` per variant, in order.
    """
    plans = [v.plan for v in variants if v.plan is not None]
    for plan in plans:
        sparsify(model, plan)
    layers: list[SparseLinear] = [layer for _, layer in sparse_layers(model)]
    for layer in layers:
        layer.dense_prefix = dense_prefix
    device = next(model.parameters()).device
    # per variant: nll sum, kl sum, scored tokens, weighted dropped, weighted seen
    totals = torch.zeros(len(variants), 5, dtype=torch.float64)
    for start in range(0, sequences.shape[0], batch_size):
        input_ids = sequences[start : start + batch_size].to(device)
        set_sparsity_enabled(model, False)
        dense_nll, dense_log_probs = _token_nll(model(input_ids=input_ids, use_cache=False).logits, input_ids)
        for i, variant in enumerate(variants):
            if variant.plan is None:
                totals[i, 0] += dense_nll.double().sum().cpu()
                totals[i, 2] += dense_nll.numel()
                continue
            sparsify(model, variant.plan)
            for layer in layers:
                layer.reset_counters()
                layer.track_sparsity = True
            nll, log_probs = _token_nll(model(input_ids=input_ids, use_cache=False).logits, input_ids)
            kl = (dense_log_probs.exp() * (dense_log_probs - log_probs)).sum(-1)  # (b, n-1)
            totals[i, 0] += nll.double().sum().cpu()
            totals[i, 1] += kl.double().sum().cpu()
            totals[i, 2] += nll.numel()
            totals[i, 3] += sum(float(layer.dropped) * layer.out_features for layer in layers)
            totals[i, 4] += sum(float(layer.seen) * layer.out_features for layer in layers)
        if on_batch is not None:
            on_batch(min(start + batch_size, sequences.shape[0]))
    for layer in layers:
        layer.track_sparsity = False
        layer.dense_prefix = 0
    set_sparsity_enabled(model, False)
    if reduce_sum is not None:
        totals = reduce_sum(totals.to(device)).cpu()
    results = []
    for i, variant in enumerate(variants):
        nll_sum, kl_sum, tokens, dropped, seen = totals[i].tolist()
        results.append(
            EvalResult(
                method=variant.method,
                description=variant.description,
                target=variant.plan.target_sparsity if variant.plan is not None else 0.0,
                calibrated=variant.plan.parameter_weighted_sparsity() if variant.plan is not None else 0.0,
                realised=dropped / seen if seen else 0.0,
                perplexity=float(torch.tensor(nll_sum / max(tokens, 1)).exp()),
                kl=kl_sum / max(tokens, 1),
                tokens=int(tokens),
            )
        )
    return results


_COLUMNS = [
    ("method", "method", "{}"),
    ("target", "target", "{:.2f}"),
    ("calibrated", "calibrated", "{:.4f}"),
    ("realised", "realised (eval)", "{:.4f}"),
    ("perplexity", "perplexity", "{:.3f}"),
    ("kl", "KL(dense||sparse)", "{:.4f}"),
    ("description", "details", "{}"),
]


def results_markdown(results: Sequence[EvalResult], header: str) -> str:
    """The results as a markdown table preceded by ``header`` (the convention and model)."""
    lines = [header, "", "| " + " | ".join(title for _, title, _ in _COLUMNS) + " |"]
    lines.append("|" + "|".join("---" for _ in _COLUMNS) + "|")
    for row in results:
        values = asdict(row)
        lines.append("| " + " | ".join(fmt.format(values[key]) for key, _, fmt in _COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def results_csv(results: Sequence[EvalResult]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(asdict(results[0]).keys()))
    writer.writeheader()
    for row in results:
        writer.writerow(asdict(row))
    return buffer.getvalue()


def results_json(results: Sequence[EvalResult], header: str) -> str:
    return json.dumps({"convention": header, "results": [asdict(r) for r in results]}, indent=1) + "\n"
