"""Exact k-nearest-neighbour search, the hot path of vector perturbation.

Two backends return the same answer (sorted Euclidean distances and the indices of the k nearest points):

* ``"torch"``: brute force, ``torch.cdist`` + ``topk`` over chunks of queries, each distance block bounded to
  ``max_chunk_bytes`` (256 MiB by default). The selected neighbours' distances are then recomputed directly from
  the coordinates, so they do not carry the cancellation error of the matrix-product form of ``cdist``. This is
  the path for GPUs and for high ``d``.
* ``"kdtree"``: ``scipy.spatial.cKDTree`` built on the points (queries run on all cores, ``workers=-1``). In the
  low dimensions of a tokenizer bottleneck (d <= 8) a tree query costs ~``k log n`` instead of ``n``, which
  makes it one to two orders of magnitude faster than brute force on CPU.

``"auto"`` picks ``"kdtree"`` for CPU tensors with ``d <= 8`` and ``"torch"`` otherwise.

**Changing point sets and the staleness rule.** Vector perturbation searches a FIFO queue whose rows are
overwritten a few at a time (about 1 % of a batch per step), and rebuilding a tree over 10^5-10^6 rows every step
would cost more than the search. So the tree is built on a snapshot and the owner of the points reports every
overwritten row with :meth:`NearestNeighbors.mark_rows_written`. A search then stays **exact**: tree hits on
overwritten rows are discarded (queries that lost neighbours that way are searched again, deeper), and the
overwritten rows' current values are searched by brute force and merged in. Staleness therefore never changes a
result, only the cost; the tree is rebuilt before a search once the expected number of stale rows among a
query's ``k`` tree neighbours, ``k * stale_rows / rows``, exceeds ``max_stale_neighbors`` [0.1]. For the paper's
setting (``rows = K * M`` with ``M`` neighbours searched) that means a rebuild after about ``0.1 * K``
overwritten rows, e.g. every ~5 steps at K = 1024 and 2048 tokens per step with 1 % pushed.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from scipy.spatial import cKDTree
from scipy.spatial.distance import cdist as np_cdist
from torch import Tensor

Backend = Literal["auto", "kdtree", "torch"]
BACKENDS = ("auto", "kdtree", "torch")
KDTREE_MAX_DIM = 8
DEFAULT_MAX_CHUNK_BYTES = 256 * 2**20


def resolve_backend(backend: str, device: torch.device, dim: int) -> str:
    """``"auto"`` -> ``"kdtree"`` on CPU with ``dim <= 8``, else ``"torch"``; other names pass through."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown kNN backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        return "kdtree" if device.type == "cpu" and dim <= KDTREE_MAX_DIM else "torch"
    return backend


def query_chunk_rows(num_points: int, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES) -> int:
    """Queries per chunk so that one float32 ``(rows, num_points)`` distance block fits in ``max_chunk_bytes``."""
    return max(1, max_chunk_bytes // (4 * max(1, num_points)))


def brute_force_knn(
    queries: Tensor, points: Tensor, k: int, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES
) -> tuple[Tensor, Tensor]:
    """Exact kNN by chunked ``cdist`` + ``topk`` (float32).

    Args:
        queries: ``(n, d)``.
        points: ``(p, d)`` with ``p >= k``.
        k: number of neighbours.
        max_chunk_bytes: bound on one ``(chunk, p)`` float32 distance block.
    Returns:
        ``(dist, idx)``, both ``(n, k)``, sorted by increasing distance; ``idx`` int64 rows of ``points``.
    """
    queries, points = queries.float(), points.float()
    n, p = queries.shape[0], points.shape[0]
    if k > p:
        raise ValueError(f"asked for {k} neighbours among {p} points")
    dist = queries.new_empty(n, k)
    idx = torch.empty(n, k, dtype=torch.long, device=queries.device)
    step = query_chunk_rows(p, max_chunk_bytes)
    points_sq = points.square().sum(1).unsqueeze(0)  # (1, p)
    points_t = points.t().contiguous()  # (d, p)
    for start in range(0, n, step):
        q = queries[start : start + step]  # (c, d)
        # Rank by ||p||² - 2 q·p (the squared distance minus the per-row constant ||q||²): one fused matrix
        # product, no square root; its ~1e-6 cancellation error only matters between near-tied neighbours.
        block = torch.addmm(points_sq, q, points_t, alpha=-2)  # (c, p)
        _, nn_idx = block.topk(k, dim=1, largest=False, sorted=False)
        # Recompute the chosen neighbours' distances exactly, then sort them.
        exact = (q.unsqueeze(1) - points[nn_idx]).norm(dim=-1)  # (c, k)
        exact, order = exact.sort(dim=1)
        dist[start : start + step] = exact
        idx[start : start + step] = nn_idx.gather(1, order)
    return dist, idx


class NearestNeighbors:
    """Exact kNN of queries against a point set that changes by row overwrites (see the module docstring).

    The object holds only a search cache (the tree and which rows changed since it was built), never the
    points: each :meth:`search` receives the current points. Whoever overwrites rows must call
    :meth:`mark_rows_written`; whoever replaces the points wholesale (a new codebook, a loaded checkpoint) must
    call :meth:`reset`.

    Args:
        backend: ``"auto"``, ``"kdtree"`` or ``"torch"``.
        max_stale_neighbors: rebuild the tree once ``k * stale_rows / rows`` exceeds this (cost only: results are
            exact at any staleness). ``0`` rebuilds after every change.
        max_chunk_bytes: memory bound of one brute-force distance block.
    """

    def __init__(
        self,
        backend: Backend = "auto",
        max_stale_neighbors: float = 0.1,
        max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
    ):
        if backend not in BACKENDS:
            raise ValueError(f"unknown kNN backend {backend!r}; choose one of {BACKENDS}")
        if max_stale_neighbors < 0:
            raise ValueError(f"max_stale_neighbors must be >= 0, got {max_stale_neighbors}")
        self.backend = backend
        self.max_stale_neighbors = float(max_stale_neighbors)
        self.max_chunk_bytes = int(max_chunk_bytes)
        self.num_builds = 0  # how often a tree was built; for tests and benchmarks
        self.reset()

    def reset(self) -> None:
        """Forget the cached tree (the points were replaced wholesale)."""
        self._tree: cKDTree | None = None
        self._stale: np.ndarray | None = None  # (p,) bool: row overwritten since the tree was built
        self._num_stale = 0

    def mark_rows_written(self, rows: Tensor | np.ndarray) -> None:
        """Record that these point rows now hold new values."""
        if self._stale is None:
            return
        rows = rows.detach().cpu().numpy() if isinstance(rows, Tensor) else np.asarray(rows)
        self._stale[rows] = True
        self._num_stale = int(self._stale.sum())

    def search(self, queries: Tensor, points: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Exact k nearest ``points`` of each query.

        Args:
            queries: ``(n, d)`` float.
            points: ``(p, d)`` float, ``p >= k``; rows changed since the last call must have been reported.
            k: number of neighbours.
        Returns:
            ``(dist, idx)``, both ``(n, k)`` on ``queries.device``: float32 distances sorted increasingly and the
            int64 row indices of the neighbours.
        """
        if queries.ndim != 2 or points.ndim != 2 or queries.shape[1] != points.shape[1]:
            raise ValueError(f"expected queries (n, d) and points (p, d), got {tuple(queries.shape)}, {tuple(points.shape)}")
        if not 1 <= k <= points.shape[0]:
            raise ValueError(f"k must lie in [1, {points.shape[0]}] (the number of points), got {k}")
        backend = resolve_backend(self.backend, points.device, points.shape[1])
        if backend == "torch" or queries.shape[0] == 0:
            return brute_force_knn(queries, points, k, self.max_chunk_bytes)
        dist, idx = self._tree_search(queries.detach().cpu().double().numpy(), points.detach().cpu(), k)
        # dtype conversion in numpy: cheaper than a torch kernel for these small arrays
        return (
            torch.from_numpy(dist.astype(np.float32)).to(queries.device),
            torch.from_numpy(idx).to(queries.device),
        )

    # -- kd-tree path ------------------------------------------------------------------------------------------
    def _needs_rebuild(self, num_points: int, k: int) -> bool:
        if self._tree is None or self._stale is None or self._stale.shape[0] != num_points:
            return True
        return k * self._num_stale / num_points > self.max_stale_neighbors

    def _build(self, points: np.ndarray) -> None:
        self._tree = cKDTree(points, leafsize=16, balanced_tree=False, compact_nodes=False)
        self._stale = np.zeros(points.shape[0], dtype=bool)
        self._num_stale = 0
        self.num_builds += 1

    def _tree_search(self, queries: np.ndarray, points: Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        points_np = points.float().numpy()
        if self._needs_rebuild(points_np.shape[0], k):
            self._build(points_np)
        assert self._tree is not None and self._stale is not None
        dist, idx = _tree_query(self._tree, queries, k)  # (n, k)
        if self._num_stale == 0:
            return dist, idx
        fresh = np.flatnonzero(self._stale)  # (f,) rows whose tree entry is outdated
        fresh_dist = _exact_cdist(queries, points_np[fresh], self.max_chunk_bytes)  # (n, f) current values
        bad = self._stale[idx]  # (n, k) hits on outdated entries
        # Only queries that lost a hit, or that a current value of an outdated row comes closer to than the
        # k-th hit, change; typically a few percent of them.
        need = np.flatnonzero(bad.any(axis=1) | (fresh_dist < dist[:, -1:]).any(axis=1))
        if need.size == 0:
            return dist, idx
        d_need, i_need = self._valid_hits(queries[need], dist[need], idx[need], bad[need], k)
        cand_d = np.concatenate([d_need, fresh_dist[need]], axis=1)  # (r, k + f)
        cand_i = np.concatenate([i_need, np.broadcast_to(fresh, (need.size, fresh.size))], axis=1)
        order = np.argsort(cand_d, axis=1, kind="stable")[:, :k]
        dist[need] = np.take_along_axis(cand_d, order, 1)
        idx[need] = np.take_along_axis(cand_i, order, 1)
        return dist, idx

    def _valid_hits(
        self, queries: np.ndarray, dist: np.ndarray, idx: np.ndarray, bad: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest tree entries that are not outdated (inf-padded only if fewer exist)."""
        assert self._tree is not None and self._stale is not None
        n_points = self._stale.shape[0]
        dist = np.where(bad, np.inf, dist)
        idx = idx.copy()
        rows = np.flatnonzero(bad.any(axis=1))
        extra = int(bad.sum(axis=1).max()) if rows.size else 0
        while rows.size:
            # Search deeper for queries that lost hits; doubling the depth terminates (at most all rows).
            depth = min(k + extra, n_points)
            d2, i2 = _tree_query(self._tree, queries[rows], depth)  # (r, depth)
            valid = ~self._stale[i2]
            enough = (valid.sum(axis=1) >= k) | (depth == n_points)
            done = rows[enough]
            if done.size:
                d_ok = np.where(valid[enough], d2[enough], np.inf)
                order = np.argsort(d_ok, axis=1, kind="stable")[:, :k]
                dist[done] = np.take_along_axis(d_ok, order, 1)
                idx[done] = np.take_along_axis(i2[enough], order, 1)
            rows = rows[~enough]
            extra *= 2
        return dist, idx


def _tree_query(tree: cKDTree, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``cKDTree.query`` that always returns ``(n, k)`` arrays (scipy squeezes ``k=1``)."""
    n = len(queries)
    # Threads pay off only for enough queries: starting them costs about as much as ~200 queries.
    workers = -1 if n >= 512 else 1
    # Queries in Z-order visit the tree's nodes in a cache-friendly sequence: about 2x less CPU time for
    # 10^6-row trees, for ~2 ms of sorting per 10^4 queries.
    order = morton_order(queries) if n >= 1024 else None
    dist, idx = tree.query(queries if order is None else queries[order], k=[k] if k == 1 else k, workers=workers)
    dist, idx = dist.reshape(n, k), idx.reshape(n, k).astype(np.int64, copy=False)
    if order is not None:
        back = np.empty_like(order)
        back[order] = np.arange(n)
        dist, idx = dist[back], idx[back]
    return dist, idx


def morton_order(points: np.ndarray) -> np.ndarray:
    """Permutation sorting ``(n, d)`` points along a Z-order (Morton) curve over their bounding box."""
    n, d = points.shape
    bits = max(1, min(10, 63 // d))
    lo, hi = points.min(axis=0), points.max(axis=0)
    cells = ((points - lo) / np.maximum(hi - lo, 1e-12) * (2**bits - 1)).astype(np.uint64)  # (n, d)
    code = np.zeros(n, dtype=np.uint64)
    for b in range(bits):
        for j in range(d):
            code |= ((cells[:, j] >> np.uint64(b)) & np.uint64(1)) << np.uint64(b * d + j)
    return np.argsort(code, kind="stable")


def _exact_cdist(queries: np.ndarray, points: np.ndarray, max_chunk_bytes: int) -> np.ndarray:
    """Float64 Euclidean distances ``(n, f)``, computed per chunk of queries to bound memory."""
    out = np.empty((queries.shape[0], points.shape[0]), dtype=np.float64)
    step = max(1, max_chunk_bytes // (8 * max(1, points.shape[0])))
    for start in range(0, queries.shape[0], step):
        out[start : start + step] = np_cdist(queries[start : start + step], points.astype(np.float64))
    return out


def nearest(queries: Tensor, points: Tensor, backend: Backend = "auto") -> tuple[Tensor, Tensor]:
    """One-off nearest point of each query (no cache): ``(dist (n,), idx (n,))``."""
    dist, idx = NearestNeighbors(backend).search(queries, points, 1)
    return dist[:, 0], idx[:, 0]


__all__ = [
    "BACKENDS", "NearestNeighbors", "brute_force_knn", "morton_order", "nearest", "query_chunk_rows", "resolve_backend"
]
