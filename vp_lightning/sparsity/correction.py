"""Threshold correction for the sparse model's own activations.

Thresholds are quantiles of the dense model's activations. Once earlier projections are sparsified, the inputs of
later ones shift (typically towards smaller magnitudes), so the sparse model drops more than planned — about
2 percentage points at 50 % on SmolLM2 with uniform allocation. One fixed-point step fixes most of it: run the
sparse model on a few calibration sequences, measure each projection's realised sparsity r_p, and re-take its
threshold at the quantile ``s_p - (r_p - s_p)`` of the same calibration histogram (same alpha).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
from torch import Tensor, nn

from vp_lightning.sparsity.layers import set_sparsity_enabled, sparse_layers, sparsify
from vp_lightning.sparsity.plan import SparsityPlan
from vp_lightning.sparsity.statistics import ScoreStatistics


@torch.no_grad()
def measure_layer_sparsity(
    model: nn.Module,
    plan: SparsityPlan,
    sequences: Tensor,
    batch_size: int = 2,
    reduce_sum: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, float]:
    """Realised drop fraction of every projection of ``plan`` when the sparse model runs on ``sequences`` (N, n)."""
    sparsify(model, plan)
    layers = {name: layer for name, layer in sparse_layers(model) if name in plan.layers}
    for layer in layers.values():
        layer.reset_counters()
        layer.track_sparsity = True
    device = next(model.parameters()).device
    for start in range(0, sequences.shape[0], batch_size):
        model(input_ids=sequences[start : start + batch_size].to(device), use_cache=False)
    counts = torch.stack([torch.stack([layer.dropped, layer.seen]) for layer in layers.values()]).double()
    for layer in layers.values():
        layer.track_sparsity = False
    set_sparsity_enabled(model, False)
    if reduce_sum is not None:
        counts = reduce_sum(counts)
    return {name: float(c[0] / c[1]) if c[1] > 0 else 0.0 for name, c in zip(layers, counts, strict=True)}


def correct_thresholds(
    model: nn.Module,
    plan: SparsityPlan,
    stats: ScoreStatistics,
    sequences: Tensor,
    iterations: int = 1,
    batch_size: int = 2,
    reduce_sum: Callable[[Tensor], Tensor] | None = None,
) -> SparsityPlan:
    """A copy of ``plan`` whose thresholds realise its sparsities in the sparse model.

    Args:
        model: the causal LM.
        plan: plan built from dense-model quantiles.
        stats: the calibration statistics the plan came from.
        sequences: (N, n) calibration token ids (this rank's share).
        iterations: fixed-point steps.
        batch_size: sequences per forward pass.
        reduce_sum: all-reduce-with-sum across ranks (None for one process).

    Returns:
        The corrected plan (layer sparsities unchanged; tau and thresholds moved; the quantile actually used is
        recorded in ``metadata["threshold_quantiles"]``).
    """
    quantiles = {name: layer.sparsity for name, layer in plan.layers.items()}
    current = plan
    for _ in range(iterations):
        realised = measure_layer_sparsity(model, current, sequences, batch_size, reduce_sum)
        layers = {}
        for name, layer in plan.layers.items():
            # a projection at sparsity 0 stays exactly dense
            if layer.sparsity > 0:
                quantiles[name] = min(max(quantiles[name] + layer.sparsity - realised[name], 0.0), 0.999)
            tau, threshold = stats.threshold(name, layer.alpha, quantiles[name])
            layers[name] = replace(layer, tau=tau, threshold=threshold)
        metadata = {**plan.metadata, "threshold_correction": {"sequences": int(sequences.shape[0]),
                                                               "iterations": iterations},
                    "threshold_quantiles": dict(quantiles)}
        current = replace(plan, layers=layers, metadata=metadata)
    return current
