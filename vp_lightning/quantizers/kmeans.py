"""k-means for fitting a codebook to latents: k-means++ init, Lloyd iterations, distributed-aware.

Under ``torch.distributed`` each rank holds its own share of the latents. The k-means++ init runs on rank 0 and
is broadcast; every Lloyd iteration all-reduces the per-cluster counts, sums and sums of squares, so all ranks
compute the same centroids (they are broadcast from rank 0 once more at the end, against any floating-point
divergence). Every rank must call :func:`kmeans` (it is a collective); a rank may hold no latents, except rank 0
when it has to seed.

Assignments use :mod:`vp_lightning.quantizers.knn` (a kd-tree over the centroids on CPU at low ``d``, chunked
``cdist`` otherwise), so memory stays bounded and low-dimensional fits are fast.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from vp_lightning.quantizers.knn import Backend, nearest


@dataclass
class KMeansResult:
    """Outcome of :func:`kmeans`.

    Attributes:
        centroids: ``(k, d)`` float32.
        counts: ``(k,)`` int64 number of latents (over all ranks) nearest to each centroid.
        mse: mean squared distance of a latent to its nearest centroid.
        mean_distance: mean Euclidean distance of a latent to its nearest centroid (the quantization error
            ``||q(z) - z||`` of the VP-VAE eta diagnostic).
        iterations: Lloyd iterations run.
    """

    centroids: Tensor
    counts: Tensor
    mse: float
    mean_distance: float
    iterations: int


def distributed_active(distributed: bool | None = None) -> bool:
    """Whether to synchronise over ranks: ``None`` = yes iff a process group with more than one rank exists."""
    available = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed and not available:
        raise RuntimeError("distributed=True needs an initialised torch.distributed process group")
    return available if distributed is None else bool(distributed)


def kmeans_plus_plus(x: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): each new centre drawn with probability ∝ D(x)^2.

    Args:
        x: ``(n, d)`` points, ``n >= 1``. With fewer distinct points than ``k`` the surplus centres duplicate
            points (Lloyd's empty-cluster splitting separates them later).
        k: number of centres.
        generator: random source (the global one when ``None``).
    Returns:
        ``(k, d)`` centres, rows of ``x``.
    """
    n = x.shape[0]
    if n == 0:
        raise ValueError("k-means++ needs at least one point")
    xd = x.double()
    chosen = torch.empty(k, dtype=torch.long)
    draws = torch.rand(k, generator=generator, dtype=torch.float64)
    chosen[0] = min(int(draws[0].item() * n), n - 1)
    d2 = (xd - xd[chosen[0]]).square().sum(1)  # (n,) squared distance to the nearest chosen centre
    for i in range(1, k):
        cum = d2.cumsum(0)
        total = cum[-1].item()
        if total <= 0.0:  # every point coincides with a chosen centre: any point will do
            pick = min(int(draws[i].item() * n), n - 1)
        else:
            target = torch.full((1,), draws[i].item() * total, dtype=torch.float64, device=cum.device)
            pick = min(int(torch.searchsorted(cum, target, right=True).item()), n - 1)
        chosen[i] = pick
        d2 = torch.minimum(d2, (xd - xd[pick]).square().sum(1))
    return x[chosen.to(x.device)].float().clone()


def split_empty_clusters(centroids: Tensor, counts: Tensor, variances: Tensor) -> tuple[Tensor, int]:
    """Re-seed each empty cluster by splitting the currently largest one.

    The largest cluster's centre ``c`` becomes ``c - δ`` and the empty one ``c + δ`` with ``δ = σ / 4`` (``σ`` the
    per-dimension standard deviation of the largest cluster), so the next assignment divides its points. The
    rule is deterministic, so all ranks, which hold the same reduced statistics, split identically.

    Args:
        centroids: ``(k, d)``; modified copy returned.
        counts: ``(k,)`` cluster sizes.
        variances: ``(k, d)`` per-cluster variances.
    Returns:
        ``(centroids, number_of_clusters_split)``.
    """
    centroids = centroids.clone()
    sizes = counts.double().clone()
    variances = variances.clone()
    empty = torch.nonzero(counts == 0).flatten().tolist()
    for j in empty:
        big = int(sizes.argmax())
        if sizes[big] <= 1:  # nothing left to split
            break
        delta = variances[big].clamp_min(0).sqrt() / 4
        delta = torch.where(delta > 0, delta, torch.full_like(delta, 1e-6))
        centroids[j] = centroids[big] + delta
        centroids[big] = centroids[big] - delta
        sizes[big] /= 2
        sizes[j] = sizes[big]
        variances[j] = variances[big]
    return centroids, len(empty)


def _cluster_stats(x: Tensor, centroids: Tensor, backend: Backend) -> tuple[Tensor, Tensor]:
    """Assign points; returns packed local statistics ``[sums (k*d) | sumsq (k*d) | counts (k) | sq_err, dist, n]``
    (float64, one all-reduce) and the assignment."""
    k, d = centroids.shape
    dist_, idx = nearest(x, centroids, backend)  # (n,), (n,)
    xd = x.double()
    stats = torch.zeros(2 * k * d + k + 3, dtype=torch.float64, device=x.device)
    stats[: k * d] = torch.zeros(k, d, dtype=torch.float64, device=x.device).index_add_(0, idx, xd).flatten()
    stats[k * d : 2 * k * d] = (
        torch.zeros(k, d, dtype=torch.float64, device=x.device).index_add_(0, idx, xd * xd).flatten()
    )
    stats[2 * k * d : 2 * k * d + k] = torch.bincount(idx, minlength=k).double()
    dd = dist_.double()
    stats[-3] = dd.square().sum()
    stats[-2] = dd.sum()
    stats[-1] = x.shape[0]
    return stats, idx


def _unpack(stats: Tensor, k: int, d: int) -> tuple[Tensor, Tensor, Tensor, float, float]:
    sums = stats[: k * d].view(k, d)
    sumsq = stats[k * d : 2 * k * d].view(k, d)
    counts = stats[2 * k * d : 2 * k * d + k]
    n = max(stats[-1].item(), 1.0)
    return sums, sumsq, counts, stats[-3].item() / n, stats[-2].item() / n


def kmeans(
    x: Tensor,
    k: int,
    max_iter: int = 200,
    tol: float = 1e-3,
    init: Tensor | None = None,
    distributed: bool | None = None,
    backend: Backend = "auto",
    init_sample_size: int | None = None,
    generator: torch.Generator | None = None,
    progress: Callable[[int, float], None] | None = None,
    progress_bar: bool = False,
) -> KMeansResult:
    """Fit ``k`` centroids to ``x`` (this rank's share of the data when distributed).

    Args:
        x: ``(n, d)`` latents on this rank.
        k: number of centroids (the codebook size K).
        max_iter: maximum Lloyd iterations.
        tol: stop when the mean squared error improves by less than this fraction between iterations.
        init: optional ``(k, d)`` starting centroids (e.g. the previous codebook, or identical values on every
            rank for reproducible tests); k-means++ on rank 0 when ``None``.
        distributed: synchronise over ranks (``None`` = whenever a multi-rank process group is initialised).
        backend: kNN backend of the assignment step (see :mod:`vp_lightning.quantizers.knn`).
        init_sample_size: k-means++ runs on a random subset of at most this many of rank 0's latents
            (default ``20 * k``): seeding costs ``k`` passes over them.
        generator: random source for seeding (the global one when ``None``).
        progress: called as ``progress(iteration, mse)`` after each Lloyd iteration.
        progress_bar: show a tqdm bar (rank 0 only).
    Returns:
        :class:`KMeansResult`; identical centroids on every rank.
    """
    if x.ndim != 2:
        raise ValueError(f"kmeans expects latents of shape (n, d), got {tuple(x.shape)}")
    if k < 1 or max_iter < 0 or tol < 0:
        raise ValueError(f"need k >= 1, max_iter >= 0, tol >= 0; got k={k}, max_iter={max_iter}, tol={tol}")
    x = x.detach().float()
    d = x.shape[1]
    sync = distributed_active(distributed)
    rank = dist.get_rank() if sync else 0
    # [latents on all ranks, latents on rank 0]: checked collectively so every rank raises, none hangs
    counts = torch.tensor([float(x.shape[0]), float(x.shape[0]) if rank == 0 else 0.0], dtype=torch.float64,
                          device=x.device)
    if sync:
        dist.all_reduce(counts)
    total, on_rank0 = int(counts[0].item()), int(counts[1].item())
    if total < k:
        raise ValueError(f"k-means with k={k} centroids needs at least {k} latents, got {total}")
    if init is None and on_rank0 == 0:
        raise ValueError("k-means++ seeding runs on rank 0, which holds no latents; pass `init` or give it data")

    centroids = _initial_centroids(x, k, init, rank, sync, init_sample_size, generator)
    bar = _progress_bar(max_iter) if progress_bar and rank == 0 else None
    prev_mse = float("inf")
    iterations = 0
    for iterations in range(1, max_iter + 1):
        stats, _ = _cluster_stats(x, centroids, backend)
        if sync:
            dist.all_reduce(stats)
        sums, sumsq, counts, mse, _ = _unpack(stats, k, d)
        safe = counts.clamp_min(1).unsqueeze(1)
        means = sums / safe
        variances = sumsq / safe - means.square()
        centroids = torch.where(counts.unsqueeze(1) > 0, means, centroids.double()).float()
        centroids, n_split = split_empty_clusters(centroids, counts, variances.float())
        if progress is not None:
            progress(iterations, mse)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(mse=f"{mse:.4g}")
        converged = n_split == 0 and math.isfinite(prev_mse) and prev_mse - mse <= tol * prev_mse
        prev_mse = mse
        if converged:
            break
    if bar is not None:
        bar.close()
    if sync:
        dist.broadcast(centroids, src=0)
    stats, _ = _cluster_stats(x, centroids, backend)
    if sync:
        dist.all_reduce(stats)
    _, _, counts, mse, mean_distance = _unpack(stats, k, d)
    return KMeansResult(centroids, counts.round().long(), mse, mean_distance, iterations)


def _initial_centroids(
    x: Tensor,
    k: int,
    init: Tensor | None,
    rank: int,
    sync: bool,
    init_sample_size: int | None,
    generator: torch.Generator | None,
) -> Tensor:
    if init is not None:
        if tuple(init.shape) != (k, x.shape[1]):
            raise ValueError(f"init must have shape ({k}, {x.shape[1]}), got {tuple(init.shape)}")
        centroids = init.detach().float().to(x.device).clone()
    elif rank == 0:
        limit = init_sample_size if init_sample_size is not None else 20 * k
        sample = x
        if x.shape[0] > limit:
            sample = x[torch.randperm(x.shape[0], generator=generator)[:limit].to(x.device)]
        centroids = kmeans_plus_plus(sample, k, generator)
    else:
        centroids = x.new_empty(k, x.shape[1])
    if sync:
        dist.broadcast(centroids, src=0)
    return centroids


def _progress_bar(total: int):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: progress is then only reported through the callback
        return None
    return tqdm(total=total, desc="k-means", leave=False)


__all__ = ["KMeansResult", "distributed_active", "kmeans", "kmeans_plus_plus", "split_empty_clusters"]
