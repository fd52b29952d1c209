"""Weight-aware activation scores, log-spaced score histograms and thresholds.

Score of input channel j of a linear projection with weight W (d_out, d_in) for one token x (d_in,):

    s_j = |x_j| * ||W[:, j]||_2 ** alpha

alpha = 0 is magnitude-only (TEAL), alpha = 1 is WINA's rule. A channel is kept iff s_j > tau; since the column
norm does not depend on the token, this folds into a per-channel threshold on |x_j|:
``theta_j = tau / ||W[:, j]||_2 ** alpha``.

Scores are summarised by histograms with log-spaced bins over a fixed range, so histograms from different
batches or ranks merge exactly by summation. Axis letters: n tokens, d input channels (d_in), a alphas,
k bins (including the two outer bins).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

DEFAULT_ALPHA_GRID: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)


def column_norms(weight: Tensor) -> Tensor:
    """L2 norm of every input column of a linear weight.

    Args:
        weight: (d_out, d_in) weight of an ``nn.Linear``.

    Returns:
        (d_in,) float32 norms ``||W[:, j]||_2``.
    """
    return torch.linalg.vector_norm(weight.detach().float(), dim=0)


def channel_scores(x: Tensor, col_norm: Tensor, alpha: float) -> Tensor:
    """Weight-aware score ``|x_j| * ||W[:, j]||^alpha`` of every input channel.

    Args:
        x: (..., d) activations entering the projection.
        col_norm: (d,) column norms of the projection weight.
        alpha: exponent of the column norm (0 = magnitude only).

    Returns:
        (..., d) float32 scores.
    """
    return x.float().abs() * col_norm.float().pow(alpha)


def fold_threshold(tau: float, col_norm: Tensor, alpha: float) -> Tensor:
    """Per-channel threshold on |x_j| equivalent to the score threshold ``tau``.

    ``|x_j| * n_j^alpha > tau  <=>  |x_j| > tau / n_j^alpha`` for n_j > 0. A zero column (n_j = 0) contributes
    nothing to the output, so its threshold is +inf for alpha > 0 (always skipped).

    Args:
        tau: score threshold of the projection.
        col_norm: (d,) column norms.
        alpha: exponent used for the scores.

    Returns:
        (d,) float32 thresholds ``theta_j``.
    """
    # float64 keeps the division from moving a threshold across an activation value that sits on the boundary.
    theta = tau / col_norm.double().pow(alpha)
    # 0 / 0 (zero column at sparsity 0) would be NaN, which drops the channel; keep it like any other channel.
    return torch.nan_to_num(theta, nan=0.0, posinf=math.inf).float()


@dataclass(frozen=True)
class LogBins:
    """Log-spaced histogram bins over non-negative scores.

    Bin 0 holds scores below ``low`` (including exact zeros), bins 1..num_bins split [low, high) evenly in
    log space, bin num_bins + 1 holds scores >= ``high``.

    Args:
        low: lowest finite bin edge (> 0).
        high: highest finite bin edge.
        num_bins: number of finite bins.
    """

    low: float = 1e-9
    high: float = 1e6
    num_bins: int = 2048

    def __post_init__(self) -> None:
        if not (0 < self.low < self.high):
            raise ValueError(f"LogBins needs 0 < low < high, got low={self.low}, high={self.high}")
        if self.num_bins < 1:
            raise ValueError(f"LogBins needs num_bins >= 1, got {self.num_bins}")

    @property
    def size(self) -> int:
        """Number of bins including the under- and overflow bins."""
        return self.num_bins + 2

    @property
    def log_low(self) -> float:
        return math.log(self.low)

    @property
    def log_width(self) -> float:
        """Width of a finite bin in natural-log units."""
        return (math.log(self.high) - math.log(self.low)) / self.num_bins

    def index_from_log(self, log_score: Tensor) -> Tensor:
        """Bin index of scores given as natural logs (``-inf`` for zero scores).

        Args:
            log_score: (...) natural log of scores.

        Returns:
            (...) int64 bin indices in [0, num_bins + 1].
        """
        position = (log_score.float() - self.log_low) / self.log_width + 1.0
        return position_to_index(position, self).long()

    def lower_edge(self, index: int) -> float:
        """Lower edge of finite bin ``index`` (1-based)."""
        return math.exp(self.log_low + (index - 1) * self.log_width)


def position_to_index(position: Tensor, bins: LogBins) -> Tensor:
    """Bin index from a 1-based fractional bin position (in place on ``position``).

    Clamping to [0, num_bins + 1] first makes truncation equal to floor and sends -inf (zero scores) to the
    underflow bin and huge scores to the overflow bin.
    """
    return position.clamp_(0.0, float(bins.num_bins + 1)).to(torch.int32)


def score_histograms(
    x: Tensor,
    log_col_norm: Tensor,
    alphas: Tensor,
    bins: LogBins,
    chunk_elements: int = 1 << 22,
    base: Tensor | None = None,
) -> Tensor:
    """Histograms of the scores of every alpha for a batch of activations.

    Args:
        x: (..., d) activations.
        log_col_norm: (d,) natural log of the column norms.
        alphas: (a,) alpha values.
        bins: bin layout.
        chunk_elements: bound on n * d per step, to keep the (a, n, d) position tensor small.
        base: optional precomputed :func:`log_positions` of x (projections sharing an input share it).

    Returns:
        (a, k) int64 counts with k = bins.size; each row sums to the number of elements of x.
    """
    d = x.shape[-1]
    if base is None:
        base = log_positions(x, bins)
    base = base.reshape(-1, d)  # (n, d)
    num_alphas = alphas.numel()
    # Adding alpha * log n_j in log space gives the score; dividing by the bin width up front turns it into a
    # shift of the bin position, so every alpha costs one add, one clamp and one cast.
    shift = (alphas.float()[:, None] * log_col_norm.float()[None, :]) / bins.log_width  # (a, d)
    # a zero column has log norm -inf; with alpha = 0 its factor is 0^0 = 1, not 0 * -inf = NaN
    shift = torch.where(alphas.float()[:, None] == 0, torch.zeros_like(shift), shift) + 1.0
    counts = torch.zeros(num_alphas, bins.size, dtype=torch.long, device=x.device)
    step = max(1, chunk_elements // d)
    for start in range(0, base.shape[0], step):
        position = base[None, start : start + step] + shift[:, None, :]  # (a, n, d)
        index = position_to_index(position, bins)
        for i in range(num_alphas):
            counts[i] += torch.bincount(index[i].flatten(), minlength=bins.size)
    return counts


def log_positions(x: Tensor, bins: LogBins) -> Tensor:
    """(..., d) 0-based fractional bin positions of |x| alone (before the column-norm factor)."""
    return (torch.log(x.detach().float().abs()) - bins.log_low) / bins.log_width


def histogram_quantile(counts: Tensor, sparsity: float, bins: LogBins) -> float:
    """Score threshold tau that drops a fraction ``sparsity`` of the histogrammed scores.

    The mass inside the bin that contains the quantile is taken as uniform in log space, so tau interpolates
    geometrically between the bin edges.

    Args:
        counts: (k,) histogram with k = bins.size.
        sparsity: fraction of scores to drop, in [0, 1].
        bins: bin layout used to build ``counts``.

    Returns:
        tau (keep a channel iff its score > tau); 0.0 for sparsity 0 so that every non-zero activation is kept.
    """
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must lie in [0, 1], got {sparsity}")
    counts = counts.double().cpu()
    total = float(counts.sum())
    if total == 0:
        raise ValueError("cannot take a quantile of an empty histogram (no calibration tokens were seen)")
    if sparsity == 0.0:
        return 0.0
    wanted = sparsity * total
    cumulative = torch.cumsum(counts, 0)
    index = int(torch.searchsorted(cumulative, torch.tensor([wanted], dtype=torch.float64)).item())
    index = min(index, bins.size - 1)
    if index == 0:
        return bins.low
    if index == bins.size - 1:
        return bins.high
    before = float(cumulative[index - 1])
    fraction = (wanted - before) / float(counts[index])
    return math.exp(bins.log_low + (index - 1 + fraction) * bins.log_width)


def relative_output_errors(x: Tensor, weight: Tensor, thresholds: Tensor, chunk_rows: int = 1 << 14) -> Tensor:
    """Relative output error ``||W x - W (x * m)||^2 / ||W x||^2`` for several threshold vectors.

    Args:
        x: (n, d) activations entering the projection.
        weight: (d_out, d) projection weight.
        thresholds: (c, d) candidate per-channel thresholds; m keeps channel j iff |x_j| > theta_j.
        chunk_rows: bound on the rows (candidates x tokens) multiplied at once.

    Returns:
        (c,) float32 errors, summed over all n tokens before dividing.
    """
    x = x.float()
    w = weight.float()
    n, d = x.shape
    # ||W v||^2 = v^T (W^T W) v: with the Gram matrix a wide projection (d_out > d) costs d^2 per row, not d_out d
    gram = w.T @ w if w.shape[0] > d else None

    def energy(rows: Tensor) -> Tensor:  # (r, d) -> (r,) squared output norms
        if gram is None:
            return (rows @ w.T).square().sum(-1)
        return ((rows @ gram) * rows).sum(-1)

    dense_energy = energy(x).sum().clamp_min(torch.finfo(torch.float32).tiny)
    per_chunk = max(1, chunk_rows // n)
    errors = []
    for start in range(0, thresholds.shape[0], per_chunk):
        theta = thresholds[start : start + per_chunk].float()  # (c', d)
        dropped = x[None] * (x.abs()[None] <= theta[:, None, :])  # (c', n, d): exactly the part of x the mask removes
        errors.append(energy(dropped.reshape(-1, d)).view(theta.shape[0], n).sum(-1) / dense_energy)
    return torch.cat(errors)
