"""In-block greedy sparsity allocation (TEAL-style).

Every projection of a block starts dense. Each step raises the sparsity of the one projection that adds the
least block-output error; the step of projection p is ``step / share_p`` (share_p = its fraction of the
block's weight parameters), so every step raises the block's parameter-weighted sparsity by exactly ``step``.
The result is a table from block sparsity (multiples of ``step``) to per-projection sparsities; every column
is non-decreasing because projections only ever move up.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from vp_lightning.sparsity.errors import SparsityConfigError

_EPS = 1e-9


@dataclass
class GreedyTable:
    """Per-projection sparsities for every reachable block sparsity of one block.

    Attributes:
        step: block-sparsity increment between rows.
        projections: module names of the block's projections (columns).
        sparsities: row l holds the projection sparsities at block sparsity ``l * step``.
        errors: block-output error of every row (as returned by the ``evaluate`` callback; the calibration job
            uses the mean over tokens of the squared error relative to the token's squared dense output norm).
    """

    step: float
    projections: list[str]
    sparsities: list[list[float]]
    errors: list[float]

    @property
    def max_sparsity(self) -> float:
        """Largest block sparsity in the table."""
        return (len(self.sparsities) - 1) * self.step

    def at(self, block_sparsity: float) -> dict[str, float]:
        """Projection sparsities at ``block_sparsity``, interpolated linearly between rows.

        Linear interpolation keeps the parameter-weighted average exactly at ``block_sparsity`` and the
        columns monotone.
        """
        if block_sparsity < -_EPS or block_sparsity > self.max_sparsity + _EPS:
            raise SparsityConfigError(
                f"block sparsity {block_sparsity:.4f} is outside the greedy table [0, {self.max_sparsity:.4f}]; "
                "raise greedy_max_sparsity"
            )
        position = min(max(block_sparsity / self.step, 0.0), len(self.sparsities) - 1)
        low = min(int(math.floor(position + _EPS)), len(self.sparsities) - 1)
        high = min(low + 1, len(self.sparsities) - 1)
        weight = max(position - low, 0.0)
        return {
            name: (1 - weight) * self.sparsities[low][p] + weight * self.sparsities[high][p]
            for p, name in enumerate(self.projections)
        }

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "projections": self.projections, "sparsities": self.sparsities,
                "errors": self.errors}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GreedyTable:
        return cls(step=float(data["step"]), projections=list(data["projections"]),
                   sparsities=[list(map(float, row)) for row in data["sparsities"]],
                   errors=[float(e) for e in data["errors"]])


def greedy_table(
    evaluate: Callable[[Sequence[float]], float],
    projections: Sequence[str],
    params: Sequence[int],
    step: float = 0.025,
    max_sparsity: float = 0.9,
    max_projection_sparsity: float = 0.99,
    on_step: Callable[[int], None] | None = None,
) -> GreedyTable:
    """Build the greedy table of one block.

    Args:
        evaluate: block-output error for a vector of projection sparsities (in ``projections`` order).
        projections: module names of the block's projections.
        params: weight parameter count of each projection.
        step: block-sparsity increment per greedy step.
        max_sparsity: stop once the block reaches this sparsity.
        max_projection_sparsity: no projection may exceed this sparsity (a projection whose next step would
            exceed it is no longer a candidate, e.g. small k/v projections with grouped-query attention).
        on_step: called with the level after every step (progress reporting).

    Returns:
        The table; it stops early when no projection can take another step.
    """
    if not 0 < step <= max_sparsity <= 1:
        raise SparsityConfigError(f"need 0 < step <= max_sparsity <= 1, got step={step}, max_sparsity={max_sparsity}")
    total = float(sum(params))
    increments = [step * total / p for p in params]
    current = [0.0] * len(projections)
    rows = [list(current)]
    errors = [float(evaluate(current))]
    levels = int(math.floor(max_sparsity / step + _EPS))
    for level in range(1, levels + 1):
        best: tuple[float, list[float]] | None = None
        for p, increment in enumerate(increments):
            if current[p] + increment > max_projection_sparsity + _EPS:
                continue
            candidate = list(current)
            candidate[p] += increment
            error = float(evaluate(candidate))
            if best is None or error < best[0]:
                best = (error, candidate)
        if best is None:
            break
        current = best[1]
        rows.append(list(current))
        errors.append(best[0])
        if on_step is not None:
            on_step(level)
    return GreedyTable(step=step, projections=list(projections), sparsities=rows, errors=errors)
