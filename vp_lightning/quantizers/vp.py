"""VP, Vector Perturbation: the VP-VAE quantizer (arXiv 2602.17133).

No codebook exists during training. Each latent ``z`` is instead moved by a random perturbation whose size is
that of the error a K-entry codebook would make, drawn so that perturbed latents stay on the latent
distribution:

1. kNN of ``z`` in a FIFO queue ``S`` of ``K·M`` recent latents (``M = round(cluster_size_rate·d)``): ``D_k(z)``
   and ``D_M(z)``, the distances to the k-th and M-th neighbours. A K-cell partition of ``S`` holds ``M``
   latents per cell, so the ball of radius ``D_M`` holds about ``1/K`` of the mass.
2. Proposal ``z' = z + u``, ``u`` uniform in the d-ball of radius ``R(z) = η·D_M(z)``.
3. One Metropolis-Hastings step towards the kNN density ``π(z) ∝ D_k(z)^{-d}``:
   ``log α = d·(log D_k(z) + log D_M(z) - log D_k(z') - log D_M(z'))`` (the ``D_M`` terms are the ball
   proposal's asymmetry), accepted iff ``log U < log α`` and ``||u|| <= η·D_M(z')`` (the reverse move exists).
4. Output ``z + sg(u·accept)``: the gradient with respect to ``z`` is exactly the identity.
5. About ``push_prob`` of the latents enter the queue after the perturbation; a moment loss keeps ``z`` near
   zero mean and unit variance per dimension.

The codebook used for tokens is fitted explicitly by k-means (:meth:`VectorPerturbation.fit_codebook`, or
:meth:`~VectorPerturbation.fit_codebook_from_queue` for a cheap monitoring fit), typically by
:class:`vp_lightning.callbacks.CodebookFitting`; evaluation maps each latent to its nearest centroid.

Distributed training: the queue is a buffer of each rank's module. With DDP's default ``broadcast_buffers=True``
rank 0's buffers (queue, codebook, running statistics) are copied to all ranks before every forward, so every
rank perturbs against rank 0's queue (filled by rank 0's latents only). With ``broadcast_buffers=False`` each
rank keeps a queue of its own latents. Either way the kNN search stays exact: a queue changed behind the
module's back (a broadcast, a loaded checkpoint) is detected and its search tree rebuilt. Codebook fits always
combine all ranks' latents.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from vp_lightning.quantizers.base import QuantizerOutput, fp32, no_autocast
from vp_lightning.quantizers.fsp import moment_loss
from vp_lightning.quantizers.kmeans import KMeansResult, distributed_active, kmeans
from vp_lightning.quantizers.knn import BACKENDS, Backend, NearestNeighbors

LOG_EPS = 1e-12


# -- the math, as small pure functions ----------------------------------------------------------------------------
def uniform_ball(direction: Tensor, rho: Tensor, radius: Tensor) -> Tensor:
    """Points uniform in d-balls: ``radius · rho^(1/d) · direction/||direction||``.

    Args:
        direction: ``(n, d)`` standard normal draws (any non-zero vectors).
        rho: ``(n,)`` draws from ``U[0, 1]``.
        radius: ``(n,)`` ball radii.
    Returns:
        ``(n, d)`` offsets.
    """
    d = direction.shape[-1]
    unit = direction / direction.norm(dim=-1, keepdim=True).clamp_min(LOG_EPS)
    return unit * (radius * rho.pow(1.0 / d)).unsqueeze(-1)


def mh_log_alpha(dim: int, dk: Tensor, dm: Tensor, dk_new: Tensor, dm_new: Tensor) -> Tensor:
    """``log α = d·(log D_k(z) + log D_M(z) - log D_k(z') - log D_M(z'))`` with distances clamped at 1e-12."""

    def log(x: Tensor) -> Tensor:
        return x.clamp_min(LOG_EPS).log()

    return dim * (log(dk) + log(dm) - log(dk_new) - log(dm_new))


def mh_accept(log_alpha: Tensor, log_u: Tensor, step_norm: Tensor, reverse_radius: Tensor) -> Tensor:
    """Metropolis-Hastings decision: ``log U < log α`` and the reverse move lies in the reverse ball."""
    return (log_u < log_alpha) & (step_norm <= reverse_radius)


class Draws(NamedTuple):
    """The random numbers of one training forward, drawn up front in a fixed order so that every kNN backend
    (and the ``use_mh`` switch) sees the same randomness."""

    direction: Tensor  # (n, d) standard normal
    rho: Tensor  # (n,) U[0, 1), radial quantile
    log_u: Tensor  # (n,) log U[0, 1), MH threshold
    push: Tensor  # (n,) bool, enters the queue


def draw(n: int, d: int, push_prob: float, device: torch.device) -> Draws:
    return Draws(
        direction=torch.randn(n, d, device=device),
        rho=torch.rand(n, device=device),
        log_u=torch.rand(n, device=device).clamp_min(1e-30).log(),
        push=torch.rand(n, device=device) < push_prob,
    )


class VectorPerturbation(nn.Module):
    """The VP-VAE quantizer (see the module docstring).

    Args:
        dim: latent dimension d.
        codebook_size: K, the number of codes of the fitted codebook.
        eta: perturbation scale η > 0: radius ``η·D_M`` (the parameter an η sweep varies).
        cluster_size_rate: ``M = round(cluster_size_rate·d)`` latents per code; the queue holds ``K·M``.
        k: neighbour rank of the density estimate ``π(z) ∝ D_k(z)^{-d}``, ``1 <= k <= M``.
        push_prob: probability that a training latent enters the queue.
        use_mh: ``False`` accepts every proposal (uniform noise in the ball; the paper's "w/o MH" ablation).
        norm_weights: ``(λ1, λ2)`` of the moment loss (target variance 1); ``(0, 0)`` is "w/o L_norm".
        knn_backend: ``"auto"``, ``"kdtree"`` or ``"torch"`` (see :mod:`vp_lightning.quantizers.knn`).
        max_stale_neighbors: kd-tree rebuild threshold (cost only; results are exact regardless).
        kmeans_max_iter: Lloyd iterations of a codebook fit.
        kmeans_tol: relative MSE improvement below which a codebook fit stops.
        accepted_norm_decay: decay per training step of the running mean of accepted perturbation norms
            (``0.99`` ≈ the last 100 steps), used by :meth:`eta_matching_ratio`.

    Metrics (training): ``accept_rate``; ``perturbation_norm``, the mean norm of the applied perturbation over
    all tokens (0 for rejected proposals); ``radius``, the mean ``R(z)``; ``norm_loss`` (also in eval).

    Buffers (all saved in checkpoints): ``queue`` ``(K·M, d)``, ``queue_ptr`` (next row to write),
    ``codebook`` ``(K, d)``, ``codebook_fitted`` and ``codebook_frozen`` flags, ``accepted_norm_ema`` and
    ``accepted_norm_weight`` (the bias-corrected running mean is their ratio).
    """

    # Legitimately different on each DDP rank (each rank perturbs with its own recent latents); skipped by
    # RankConsistencyCheck. The fitted codebook is not in this list: it must agree everywhere.
    per_rank_state = ("queue", "queue_ptr", "accepted_norm_ema", "accepted_norm_weight")

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        eta: float = 1.0,
        cluster_size_rate: float = 16,
        k: int = 8,
        push_prob: float = 0.01,
        use_mh: bool = True,
        norm_weights: tuple[float, float] = (0.1, 0.07),
        knn_backend: Backend = "auto",
        max_stale_neighbors: float = 0.1,
        kmeans_max_iter: int = 200,
        kmeans_tol: float = 1e-3,
        accepted_norm_decay: float = 0.99,
    ):
        super().__init__()
        num_neighbors = int(round(cluster_size_rate * dim))
        _check_args(dim, codebook_size, eta, num_neighbors, k, push_prob, norm_weights, knn_backend, accepted_norm_decay)
        self.dim = int(dim)
        self.codebook_size = int(codebook_size)
        self.eta = float(eta)
        self.num_neighbors = num_neighbors  # M
        self.k = int(k)
        self.push_prob = float(push_prob)
        self.use_mh = bool(use_mh)
        self.norm_weights = (float(norm_weights[0]), float(norm_weights[1]))
        self.knn_backend = knn_backend
        self.kmeans_max_iter = int(kmeans_max_iter)
        self.kmeans_tol = float(kmeans_tol)
        self.accepted_norm_decay = float(accepted_norm_decay)
        self.register_buffer("queue", torch.randn(self.codebook_size * num_neighbors, self.dim))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("codebook", torch.randn(self.codebook_size, self.dim))
        self.register_buffer("codebook_fitted", torch.zeros((), dtype=torch.bool))
        self.register_buffer("codebook_frozen", torch.zeros((), dtype=torch.bool))
        self.register_buffer("accepted_norm_ema", torch.zeros((), dtype=torch.float64))
        self.register_buffer("accepted_norm_weight", torch.zeros((), dtype=torch.float64))
        self.last_fit: KMeansResult | None = None  # details of the latest codebook fit
        self._queue_knn = NearestNeighbors(knn_backend, max_stale_neighbors)
        self._codebook_knn = NearestNeighbors(knn_backend)
        self._queue_seen: tuple[int, int] | None = None  # (data_ptr, version) after our own last write
        self._codebook_seen: tuple[int, int] | None = None

    # -- forward ------------------------------------------------------------------------------------------------
    def forward(self, z: Tensor) -> QuantizerOutput:
        """z: (..., d) -> perturbed (train) or nearest-centroid (eval) values (..., d), tokens (...,)."""
        if z.shape[-1] != self.dim:
            raise ValueError(f"VectorPerturbation(dim={self.dim}) expects last dim {self.dim}, got {tuple(z.shape)}")
        with no_autocast(z.device.type):
            flat = fp32(z).reshape(-1, self.dim)  # (n, d)
            if self.training:
                quantized, indices, metrics = self._train_forward(flat)
            else:
                indices = self.nearest_code(flat.detach())
                # c + (z - sg(z)): value exactly the centroid, gradient the identity (straight-through).
                quantized = self.codebook[indices] + (flat - flat.detach())
                metrics = {}
            loss, _, _ = moment_loss(flat, 1.0, self.norm_weights)
            metrics["norm_loss"] = loss.detach()
        return QuantizerOutput(
            quantized=quantized.reshape(z.shape), indices=indices.reshape(z.shape[:-1]), loss=loss, metrics=metrics
        )

    def _train_forward(self, flat: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """flat: (n, d) -> (z + sg(u·accept), tokens from the current codebook, metrics)."""
        latents = flat.detach()
        draws = draw(latents.shape[0], self.dim, self.push_prob, latents.device)
        with torch.no_grad():
            step, accept, radius = self.perturbation(latents, draws)
            applied = step * accept.unsqueeze(-1)  # (n, d)
            norms = applied.norm(dim=-1)  # (n,)
            self._update_accepted_norm(norms, accept)
            self.push(latents[draws.push])
            indices = self.nearest_code(latents)
        metrics = {
            "accept_rate": accept.float().mean(),
            "perturbation_norm": norms.mean(),
            "radius": radius.mean(),
        }
        return flat + applied, indices, metrics

    @torch.no_grad()
    def perturbation(self, latents: Tensor, draws: Draws) -> tuple[Tensor, Tensor, Tensor]:
        """One MH step per latent against the current queue.

        Args:
            latents: ``(n, d)`` float32.
            draws: random numbers from :func:`draw`.
        Returns:
            ``(step (n, d), accept (n,) bool, radius (n,))``: the proposed offset ``u``, the decision and ``R(z)``.
        """
        k, m = self.k, self.num_neighbors
        dist = self.queue_distances(latents)  # (n, M) sorted
        radius = self.eta * dist[:, m - 1]
        step = uniform_ball(draws.direction, draws.rho, radius)  # (n, d)
        if not self.use_mh:
            return step, torch.ones_like(radius, dtype=torch.bool), radius
        dist_new = self.queue_distances(latents + step)  # (n, M)
        log_alpha = mh_log_alpha(self.dim, dist[:, k - 1], dist[:, m - 1], dist_new[:, k - 1], dist_new[:, m - 1])
        accept = mh_accept(log_alpha, draws.log_u, step.norm(dim=-1), self.eta * dist_new[:, m - 1])
        return step, accept, radius

    # -- queue --------------------------------------------------------------------------------------------------
    def queue_distances(self, queries: Tensor) -> Tensor:
        """``(n, d)`` -> ``(n, M)`` sorted distances to the M nearest queue rows (exact)."""
        if _fingerprint(self.queue) != self._queue_seen:  # changed behind our back (broadcast, load, user)
            self._queue_knn.reset()
            self._queue_seen = _fingerprint(self.queue)
        return self._queue_knn.search(queries, self.queue, self.num_neighbors)[0]

    @torch.no_grad()
    def push(self, latents: Tensor) -> None:
        """Write ``(m, d)`` latents into the FIFO queue at the write pointer (the newest ``K·M`` if more)."""
        size = self.queue.shape[0]
        latents = latents.detach().to(self.queue)[-size:]
        m = latents.shape[0]
        if m == 0:
            return
        self._sync_queue_cache()
        rows = (int(self.queue_ptr) + torch.arange(m, device=self.queue.device)) % size
        self.queue[rows] = latents
        self.queue_ptr.fill_((int(self.queue_ptr) + m) % size)
        self._queue_knn.mark_rows_written(rows)
        self._queue_seen = _fingerprint(self.queue)

    def _sync_queue_cache(self) -> None:
        if _fingerprint(self.queue) != self._queue_seen:
            self._queue_knn.reset()

    def _update_accepted_norm(self, norms: Tensor, accept: Tensor) -> None:
        if not bool(accept.any()):
            return
        decay = self.accepted_norm_decay
        batch_mean = norms[accept].double().mean()
        self.accepted_norm_ema.mul_(decay).add_((1 - decay) * batch_mean)
        self.accepted_norm_weight.mul_(decay).add_(1 - decay)

    # -- codebook -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def nearest_code(self, latents: Tensor) -> Tensor:
        """``(n, d)`` -> ``(n,)`` int64 index of the nearest codebook row."""
        if _fingerprint(self.codebook) != self._codebook_seen:
            self._codebook_knn.reset()
            self._codebook_seen = _fingerprint(self.codebook)
        return self._codebook_knn.search(latents.float(), self.codebook, 1)[1][:, 0]

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """(...,) tokens -> (..., d) codebook rows."""
        return self.codebook[indices.long()]

    @torch.no_grad()
    def set_codebook(self, codebook: Tensor, frozen: bool = False) -> None:
        """Install a ``(K, d)`` codebook (marks it fitted; ``frozen`` protects it from monitoring fits)."""
        if tuple(codebook.shape) != tuple(self.codebook.shape):
            raise ValueError(f"codebook must have shape {tuple(self.codebook.shape)}, got {tuple(codebook.shape)}")
        self.codebook.copy_(codebook)
        self.codebook_fitted.fill_(True)
        self.codebook_frozen.fill_(frozen)

    def freeze_codebook(self) -> None:
        """Mark the codebook final: :meth:`fit_codebook_from_queue` leaves it alone from now on."""
        self.codebook_frozen.fill_(True)

    def unfreeze_codebook(self) -> None:
        """Allow monitoring fits again (e.g. when training resumes from a final checkpoint)."""
        self.codebook_frozen.fill_(False)

    @torch.no_grad()
    def fit_codebook(
        self,
        latents: Tensor,
        warm_start: bool = False,
        freeze: bool = False,
        distributed: bool | None = None,
        progress_bar: bool = False,
    ) -> None:
        """Fit the K-entry codebook to latents by k-means (a collective under ``torch.distributed``).

        Every rank calls it with its own latents; all end with the same codebook. Details of the fit (MSE, mean
        quantization error, cluster sizes) are kept in :attr:`last_fit`.

        Args:
            latents: ``(..., d)`` encoder latents (flattened to ``(N, d)``); at least K over all ranks.
            warm_start: start Lloyd from the current codebook (if fitted) instead of k-means++.
            freeze: mark the result final (see :meth:`freeze_codebook`).
            distributed: synchronise over ranks (``None`` = whenever a multi-rank process group exists).
            progress_bar: show k-means progress.
        """
        flat = latents.detach().float().reshape(-1, self.dim).to(self.codebook.device)
        init = self.codebook if warm_start and bool(self.codebook_fitted) else None
        result = kmeans(
            flat,
            self.codebook_size,
            max_iter=self.kmeans_max_iter,
            tol=self.kmeans_tol,
            init=init,
            distributed=distributed,
            backend=self.knn_backend,
            progress_bar=progress_bar,
        )
        self.set_codebook(result.centroids, frozen=freeze)
        self.last_fit = result

    def fit_codebook_from_queue(self, distributed: bool | None = None, progress_bar: bool = False) -> bool:
        """Monitoring fit on the queue (warm-started from the previous fit); skipped for a frozen codebook.

        Returns:
            whether a fit ran.
        """
        if bool(self.codebook_frozen):
            return False
        self.fit_codebook(self.queue, warm_start=True, distributed=distributed, progress_bar=progress_bar)
        return True

    # -- diagnostics --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def quantization_error(self, latents: Tensor, distributed: bool | None = None) -> float:
        """Mean ``||c(z) - z||`` of latents ``(..., d)`` to their nearest codebook row (averaged over ranks)."""
        flat = latents.detach().float().reshape(-1, self.dim).to(self.codebook.device)
        err = (self.codebook[self.nearest_code(flat)] - flat).norm(dim=-1)
        totals = torch.stack([err.double().sum(), torch.tensor(float(err.numel()), dtype=torch.float64)])
        if distributed_active(distributed):
            torch.distributed.all_reduce(totals)
        return (totals[0] / totals[1].clamp_min(1)).item()

    def accepted_perturbation_norm(self) -> float:
        """Running mean (see ``accepted_norm_decay``) of accepted perturbation norms; NaN before training."""
        weight = float(self.accepted_norm_weight)
        return float(self.accepted_norm_ema) / weight if weight > 0 else float("nan")

    def eta_matching_ratio(self, latents: Tensor, distributed: bool | None = None) -> float:
        """``mean ||q(z) - z|| / mean accepted ||u||``: ≈ 1 when η matches the fitted codebook's real error.

        The natural x-axis of an η sweep. Uses the current codebook (fit it first) and this rank's running mean
        of accepted perturbation norms (rank 0's under DDP's default buffer broadcast).
        """
        return self.quantization_error(latents, distributed) / self.accepted_perturbation_norm()

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, codebook_size={self.codebook_size}, eta={self.eta}, M={self.num_neighbors}, "
            f"k={self.k}, push_prob={self.push_prob}, use_mh={self.use_mh}, knn_backend={self.knn_backend!r}"
        )


def _fingerprint(t: Tensor) -> tuple[int, int]:
    """Identity + in-place version of a tensor: changes whenever its storage is replaced or written."""
    return t.data_ptr(), t._version


def _check_args(dim, codebook_size, eta, num_neighbors, k, push_prob, norm_weights, knn_backend, decay) -> None:
    if dim < 1 or codebook_size < 1:
        raise ValueError(f"VectorPerturbation needs dim >= 1 and codebook_size >= 1, got {dim}, {codebook_size}")
    if not eta > 0:
        raise ValueError(f"VectorPerturbation eta must be > 0, got {eta}")
    if num_neighbors < 1:
        raise ValueError(f"cluster_size_rate * dim must round to at least 1 (M), got M = {num_neighbors}")
    if not 1 <= k <= num_neighbors:
        raise ValueError(f"k must lie in [1, M = {num_neighbors}] (M = round(cluster_size_rate * dim)), got {k}")
    if not 0.0 <= push_prob <= 1.0:
        raise ValueError(f"push_prob must lie in [0, 1], got {push_prob}")
    if len(norm_weights) != 2 or min(norm_weights) < 0:
        raise ValueError(f"norm_weights must be two non-negative numbers, got {norm_weights}")
    if knn_backend not in BACKENDS:
        raise ValueError(f"unknown knn_backend {knn_backend!r}; choose one of {BACKENDS}")
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"accepted_norm_decay must lie in [0, 1), got {decay}")


__all__ = ["Draws", "VectorPerturbation", "draw", "mh_accept", "mh_log_alpha", "uniform_ball"]
