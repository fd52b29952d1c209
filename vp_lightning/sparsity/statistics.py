"""Calibration statistics: score histograms of every (block, projection) for every alpha on a grid.

Collected with forward pre-hooks on the projections' inputs. All counts are integers, so histograms from
different batches or ranks merge exactly by summation (one all-reduce).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vp_lightning.sparsity.errors import SparsityConfigError
from vp_lightning.sparsity.loading import ProjectionSite
from vp_lightning.sparsity.scores import (
    LogBins,
    column_norms,
    fold_threshold,
    histogram_quantile,
    log_positions,
    score_histograms,
)


class ScoreStatistics:
    """Histograms of ``|x_j| * ||W[:, j]||^alpha`` per projection and alpha.

    Args:
        sites: the sparsified projections.
        col_norms: module name -> (d_in,) column norms of its weight.
        alphas: the alpha grid.
        bins: histogram bin layout (fixed, so histograms merge exactly).
    """

    def __init__(
        self,
        sites: Sequence[ProjectionSite],
        col_norms: dict[str, Tensor],
        alphas: Sequence[float],
        bins: LogBins,
    ) -> None:
        self.sites = {site.name: site for site in sites}
        self.alphas = [float(a) for a in alphas]
        self.bins = bins
        self.col_norms = {name: col_norms[name].float() for name in self.sites}
        self._log_col_norms = {name: torch.log(norm) for name, norm in self.col_norms.items()}
        self._alpha_tensor = torch.tensor(self.alphas)
        self.counts = {
            name: torch.zeros(len(self.alphas), bins.size, dtype=torch.long, device=norm.device)
            for name, norm in self.col_norms.items()
        }
        self._shared: tuple[Tensor, Tensor] | None = None

    @classmethod
    def for_model(
        cls, model: nn.Module, sites: Sequence[ProjectionSite], alphas: Sequence[float], bins: LogBins
    ) -> ScoreStatistics:
        """Empty statistics with the column norms of ``model``'s projection weights."""
        norms = {site.name: column_norms(model.get_submodule(site.name).weight) for site in sites}
        return cls(sites, norms, alphas, bins)

    def alpha_index(self, alpha: float) -> int:
        for i, a in enumerate(self.alphas):
            if abs(a - alpha) < 1e-9:
                return i
        raise SparsityConfigError(f"alpha={alpha} is not on the calibrated grid {self.alphas}")

    def update(self, name: str, x: Tensor) -> None:
        """Add the scores of activations ``x`` (..., d_in) entering projection ``name``."""
        log_norm = self._log_col_norms[name]
        if log_norm.device != x.device:
            log_norm = self._log_col_norms[name] = log_norm.to(x.device)
            self.counts[name] = self.counts[name].to(x.device)
        # q/k/v (and gate/up) receive the same input tensor: its log-magnitude positions are computed once
        if self._shared is None or self._shared[0] is not x:
            self._shared = (x, log_positions(x, self.bins))
        base = self._shared[1]
        self.counts[name] += score_histograms(x, log_norm, self._alpha_tensor.to(x.device), self.bins, base=base)

    def tokens(self) -> int:
        """Number of token rows histogrammed (per projection)."""
        name, site = next(iter(self.sites.items()))
        return int(self.counts[name][0].sum()) // site.in_features

    @contextmanager
    def hooks(self, model: nn.Module) -> Iterator[None]:
        """Record the inputs of every projection while the context is open."""
        handles = []
        for name in self.sites:
            module = model.get_submodule(name)

            def hook(_module: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
                self.update(name, args[0])

            handles.append(module.register_forward_pre_hook(hook))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self._shared = None

    def merge_(self, other: ScoreStatistics) -> ScoreStatistics:
        """Add another collector's counts (same sites, alphas and bins) into this one."""
        if other.alphas != self.alphas or other.bins != self.bins or other.sites.keys() != self.sites.keys():
            raise ValueError("can only merge statistics with the same sites, alpha grid and bins")
        for name in self.counts:
            self.counts[name] += other.counts[name].to(self.counts[name].device)
        return self

    def all_reduce_(self, reduce_sum: Callable[[Tensor], Tensor]) -> ScoreStatistics:
        """Sum the counts over ranks with one collective.

        Args:
            reduce_sum: all-reduce-with-sum of a tensor (e.g. ``trainer.strategy.reduce(t, reduce_op="sum")``).
        """
        names = list(self.counts)
        flat = torch.cat([self.counts[name].flatten() for name in names])
        flat = reduce_sum(flat)
        size = len(self.alphas) * self.bins.size
        for i, name in enumerate(names):
            self.counts[name] = flat[i * size : (i + 1) * size].view(len(self.alphas), self.bins.size).clone()
        return self

    def tau(self, name: str, alpha: float, sparsity: float) -> float:
        """Score threshold dropping a fraction ``sparsity`` of the calibration scores of ``name``."""
        return histogram_quantile(self.counts[name][self.alpha_index(alpha)], sparsity, self.bins)

    def threshold(self, name: str, alpha: float, sparsity: float) -> tuple[float, Tensor]:
        """(tau, folded per-channel threshold vector (d_in,)) for ``name`` at ``alpha`` and ``sparsity``."""
        tau = self.tau(name, alpha, sparsity)
        return tau, fold_threshold(tau, self.col_norms[name].cpu(), alpha)

    def save(self, path: str | Path, key: dict[str, Any] | None = None) -> None:
        """Write ``<path>.safetensors`` (counts, column norms) and ``<path>.json`` (layout, key)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for name in self.sites:
            tensors[f"counts/{name}"] = self.counts[name].cpu().contiguous()
            tensors[f"col_norm/{name}"] = self.col_norms[name].cpu().contiguous()
        save_file(tensors, str(path.with_suffix(".safetensors")))
        meta = {
            "alphas": self.alphas,
            "bins": {"low": self.bins.low, "high": self.bins.high, "num_bins": self.bins.num_bins},
            "sites": [vars(site) for site in self.sites.values()],
            "tokens": self.tokens(),
            "key": key or {},
        }
        path.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> tuple[ScoreStatistics, dict[str, Any]]:
        """Read statistics written by :meth:`save`; returns (statistics, key)."""
        from safetensors.torch import load_file

        path = Path(path)
        meta = json.loads(path.with_suffix(".json").read_text())
        tensors = load_file(str(path.with_suffix(".safetensors")))
        sites = [ProjectionSite(**site) for site in meta["sites"]]
        norms = {site.name: tensors[f"col_norm/{site.name}"] for site in sites}
        stats = cls(sites, norms, meta["alphas"], LogBins(**meta["bins"]))
        for site in sites:
            stats.counts[site.name] = tensors[f"counts/{site.name}"]
        return stats, meta["key"]


@torch.no_grad()
def collect_statistics(
    model: nn.Module,
    stats: ScoreStatistics,
    batches: Iterator[Tensor] | Sequence[Tensor],
    reduce_sum: Callable[[Tensor], Tensor] | None = None,
) -> ScoreStatistics:
    """Run ``model`` on token batches (b, n) and accumulate ``stats``; optionally all-reduce at the end."""
    with stats.hooks(model):
        for input_ids in batches:
            model(input_ids=input_ids, use_cache=False)
    if reduce_sum is not None:
        stats.all_reduce_(reduce_sum)
    return stats
