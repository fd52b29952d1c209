"""Token usage of a codebook: perplexity, CVU, utilization and dead codes from summed counts."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


def usage_statistics(counts: Tensor, nominal_size: int | None = None) -> dict[str, Tensor]:
    """Usage figures from a histogram of token counts.

    Args:
        counts: ``(k,)`` non-negative counts over the whole evaluation set.
        nominal_size: the nominal K when it differs from ``len(counts)`` (FSQ levels [8,5,5,5] give 1000 for 1024).
    Returns:
        ``perplexity = exp(H)`` with natural-log entropy H (p = 0 terms skipped), ``cvu = perplexity / k``,
        ``utilization`` (fraction of codes used at least once), ``dead_codes`` (codes never used), ``tokens``
        (total count) and, when ``nominal_size`` is given, ``cvu_nominal``.
    """
    counts = counts.double()
    k = counts.numel()
    total = counts.sum()
    p = counts / total.clamp_min(1)
    used = counts > 0
    entropy = -(p[used] * p[used].log()).sum()
    perplexity = entropy.exp() if total > 0 else torch.zeros((), dtype=torch.float64)
    stats = {
        "perplexity": perplexity,
        "cvu": perplexity / k,
        "utilization": used.double().mean(),
        "dead_codes": (~used).sum().double(),
        "tokens": total,
    }
    if nominal_size is not None and nominal_size != k:
        stats["cvu_nominal"] = perplexity / nominal_size
    return {name: value.float() for name, value in stats.items()}


class TokenUsage(Metric):
    """Histogram of tokens with a summed ``(codebook_size,)`` int64 state (exact across DDP ranks).

    Args:
        codebook_size: number of distinct tokens K.
        nominal_size: optional nominal K for ``cvu_nominal``.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, codebook_size: int, nominal_size: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if codebook_size < 1:
            raise ValueError(f"codebook_size must be positive, got {codebook_size}")
        self.codebook_size = codebook_size
        self.nominal_size = nominal_size
        self.add_state("counts", default=torch.zeros(codebook_size, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, indices: Tensor, mask: Tensor | None = None) -> None:
        """indices: any shape of int tokens; mask: same shape, True where the token is real (not padding)."""
        indices = indices.reshape(-1)
        if mask is not None:
            indices = indices[mask.reshape(-1).bool()]
        if indices.numel() and (indices.min() < 0 or indices.max() >= self.codebook_size):
            raise ValueError(
                f"token indices must lie in [0, {self.codebook_size}), got [{int(indices.min())}, {int(indices.max())}]"
            )
        self.counts += torch.bincount(indices.long(), minlength=self.codebook_size)

    def compute(self) -> dict[str, Tensor]:
        # inside compute() the state is the all-reduced one; keep a copy, torchmetrics restores the local state after
        self.synced_counts = self.counts.detach().clone()
        return usage_statistics(self.counts, self.nominal_size)
