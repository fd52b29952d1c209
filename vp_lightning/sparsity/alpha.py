"""Choosing the score exponent alpha per (block, projection).

For each projection and each sparsity on a small grid, every alpha of the calibration grid is tried: the
threshold comes from the calibration histogram, and the relative output error
``||W x - W (x * m)||^2 / ||W x||^2`` is measured on the reference tokens. The alpha with the smallest error
wins; at sparsities between grid points the nearest grid point's choice is used.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from vp_lightning.sparsity.reference import BlockReference, capture_inputs, run_block
from vp_lightning.sparsity.scores import relative_output_errors
from vp_lightning.sparsity.statistics import ScoreStatistics


@dataclass
class AlphaSelection:
    """Relative output errors for every (alpha, sparsity) of every projection.

    Attributes:
        alphas: the alpha grid (rows of every error table).
        sparsities: the sparsity grid (columns).
        errors: module name -> (len(alphas), len(sparsities)) relative output errors.
    """

    alphas: list[float]
    sparsities: list[float]
    errors: dict[str, Tensor]

    def _column(self, sparsity: float) -> int:
        distances = [abs(s - sparsity) for s in self.sparsities]
        return distances.index(min(distances))

    def best_alpha(self, name: str, sparsity: float) -> float:
        """Alpha with the smallest error for ``name`` at the grid sparsity nearest to ``sparsity``."""
        column = self.errors[name][:, self._column(sparsity)]
        return self.alphas[int(torch.argmin(column))]

    def error(self, name: str, alpha: float, sparsity: float) -> float:
        row = min(range(len(self.alphas)), key=lambda i: abs(self.alphas[i] - alpha))
        return float(self.errors[name][row, self._column(sparsity)])

    def to_json(self) -> dict[str, Any]:
        return {
            "alphas": self.alphas,
            "sparsities": self.sparsities,
            "errors": {name: err.tolist() for name, err in self.errors.items()},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AlphaSelection:
        return cls(
            alphas=[float(a) for a in data["alphas"]],
            sparsities=[float(s) for s in data["sparsities"]],
            errors={name: torch.tensor(err) for name, err in data["errors"].items()},
        )


def _spread_rows(x: Tensor, max_rows: int) -> Tensor:
    """At most ``max_rows`` rows of x (n, d), evenly spaced so every reference sequence contributes."""
    if x.shape[0] <= max_rows:
        return x
    index = torch.linspace(0, x.shape[0] - 1, max_rows, device=x.device).round().long()
    return x[index]


@torch.no_grad()
def block_alpha_errors(
    block: nn.Module,
    block_index: int,
    names: dict[str, str],
    stats: ScoreStatistics,
    reference: BlockReference,
    sparsities: Sequence[float],
    max_tokens: int,
) -> dict[str, Tensor]:
    """Relative output errors of every projection of one block for all (alpha, sparsity).

    Args:
        block: the decoder block (dense: any sparse layers in it must be disabled).
        block_index: its index.
        names: projection name inside the block -> full module name.
        stats: calibration statistics (thresholds).
        reference: dense block inputs.
        sparsities: sparsity grid.
        max_tokens: cap on the tokens used per projection.

    Returns:
        full module name -> (a, s) errors.
    """
    modules = {names[p]: block.get_submodule(p) for p in names}
    with capture_inputs(modules) as inputs:
        run_block(block, reference.block_input(block_index), reference.block_kwargs)
    errors = {}
    for name, module in modules.items():
        x = _spread_rows(inputs[name].reshape(-1, module.in_features), max_tokens)  # (n, d_in)
        thresholds = torch.stack(
            [stats.threshold(name, a, s)[1] for a in stats.alphas for s in sparsities]
        ).to(x.device)  # (a * s, d_in)
        err = relative_output_errors(x, module.weight, thresholds)
        errors[name] = err.view(len(stats.alphas), len(sparsities)).cpu()
    return errors
