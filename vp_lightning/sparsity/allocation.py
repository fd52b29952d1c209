"""From calibration results to plans: block sparsities, projection sparsities, alpha, thresholds.

A plan is assembled from three choices:
* the sparsity of every block (a :class:`BlockAllocation`; uniform for now, an across-block search plugs in
  here by returning its own list);
* how a block's sparsity is split over its projections (all equal, or the in-block greedy table);
* the alpha of every projection (fixed, or chosen per projection by :class:`AlphaSelection`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from vp_lightning.sparsity.errors import SparsityConfigError
from vp_lightning.sparsity.greedy import GreedyTable
from vp_lightning.sparsity.loading import ProjectionSite
from vp_lightning.sparsity.plan import LayerPlan, SparsityPlan
from vp_lightning.sparsity.statistics import ScoreStatistics

AlphaRule = Callable[[str, float], float]


class BlockAllocation:
    """Assigns a sparsity to every decoder block for a model-wide target."""

    name = "base"

    def block_sparsities(self, target: float, block_params: Sequence[int]) -> list[float]:
        """Sparsity of every block.

        Args:
            target: model-wide parameter-weighted target sparsity.
            block_params: weight parameters of the sparsified projections of every block.

        Returns:
            One sparsity per block whose parameter-weighted average is ``target``.
        """
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable identity of the allocation (part of the key of saved results)."""
        return {"name": self.name}


class UniformAllocation(BlockAllocation):
    """Every block at the target sparsity."""

    name = "uniform"

    def block_sparsities(self, target: float, block_params: Sequence[int]) -> list[float]:
        return [float(target)] * len(block_params)


class FixedAllocation(BlockAllocation):
    """Block sparsities given explicitly (e.g. found by a search); checked against the target.

    Args:
        sparsities: one sparsity per block.
        tolerance: allowed gap between their parameter-weighted average and the target.
    """

    name = "fixed"

    def __init__(self, sparsities: Sequence[float], tolerance: float = 1e-6) -> None:
        self.sparsities = [float(s) for s in sparsities]
        self.tolerance = tolerance

    def block_sparsities(self, target: float, block_params: Sequence[int]) -> list[float]:
        if len(self.sparsities) != len(block_params):
            raise SparsityConfigError(f"FixedAllocation has {len(self.sparsities)} sparsities for {len(block_params)} blocks")
        average = sum(s * p for s, p in zip(self.sparsities, block_params, strict=True)) / sum(block_params)
        if abs(average - target) > self.tolerance:
            raise SparsityConfigError(f"FixedAllocation averages {average:.6f}, not the target {target}")
        return list(self.sparsities)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "sparsities": self.sparsities}


def fixed_alpha(alpha: float) -> AlphaRule:
    """The same alpha for every projection (0 = TEAL, 1 = WINA)."""
    return lambda _name, _sparsity: alpha


def block_parameter_counts(sites: Sequence[ProjectionSite]) -> list[int]:
    """Weight parameters of the sparsified projections of every block."""
    counts: dict[int, int] = {}
    for site in sites:
        counts[site.block] = counts.get(site.block, 0) + site.params
    return [counts[b] for b in sorted(counts)]


def build_plan(
    stats: ScoreStatistics,
    sites: Sequence[ProjectionSite],
    block_sparsities: Sequence[float],
    alpha_rule: AlphaRule,
    tables: dict[int, GreedyTable] | None,
    model_name: str,
    target_sparsity: float,
    metadata: dict[str, Any] | None = None,
) -> SparsityPlan:
    """Assemble a plan with thresholds from the calibration histograms.

    Args:
        stats: calibration statistics.
        sites: the projections to include.
        block_sparsities: sparsity of every block.
        alpha_rule: (module name, projection sparsity) -> alpha on the calibrated grid.
        tables: in-block greedy tables per block; None spreads a block's sparsity equally.
        model_name: recorded in the plan.
        target_sparsity: recorded in the plan.
        metadata: recorded in the plan.

    Returns:
        The plan.
    """
    layers = {}
    for site in sites:
        block_sparsity = block_sparsities[site.block]
        sparsity = tables[site.block].at(block_sparsity)[site.name] if tables is not None else block_sparsity
        alpha = alpha_rule(site.name, sparsity)
        tau, threshold = stats.threshold(site.name, alpha, sparsity)
        layers[site.name] = LayerPlan(
            block=site.block,
            projection=site.projection,
            alpha=alpha,
            sparsity=sparsity,
            tau=tau,
            threshold=threshold,
            params=site.params,
        )
    return SparsityPlan(model=model_name, target_sparsity=target_sparsity, layers=layers, metadata=metadata or {})
