"""Exact kNN: hand-checked distances, backend agreement, and exactness of the kd-tree under staleness."""

import numpy as np
import pytest
import torch

from vp_lightning.quantizers.knn import (
    NearestNeighbors,
    brute_force_knn,
    morton_order,
    nearest,
    query_chunk_rows,
    resolve_backend,
)


def _naive(queries, points, k):
    d = (queries[:, None, :] - points[None, :, :]).norm(dim=-1)
    return d.sort(dim=1)


def test_hand_checked_line():
    points = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    queries = torch.tensor([[0.4], [2.9]])
    for backend in ("torch", "kdtree"):
        dist, idx = NearestNeighbors(backend).search(queries, points, 3)
        torch.testing.assert_close(dist, torch.tensor([[0.4, 0.6, 1.6], [0.1, 0.9, 1.9]]))
        assert idx.tolist() == [[0, 1, 2], [3, 2, 1]]


@pytest.mark.parametrize("backend", ["torch", "kdtree"])
def test_matches_naive_sort(backend):
    g = torch.Generator().manual_seed(0)
    points, queries = torch.randn(500, 3, generator=g), torch.randn(40, 3, generator=g)
    dist, idx = NearestNeighbors(backend).search(queries, points, 10)
    ref_d, ref_i = _naive(queries, points, 10)
    torch.testing.assert_close(dist, ref_d[:, :10], atol=1e-5, rtol=0)
    assert torch.equal(idx, ref_i[:, :10])


def test_chunking_does_not_change_results():
    g = torch.Generator().manual_seed(1)
    points, queries = torch.randn(300, 4, generator=g), torch.randn(50, 4, generator=g)
    assert query_chunk_rows(300, 4 * 300 * 7) == 7
    full = brute_force_knn(queries, points, 5)
    chunked = brute_force_knn(queries, points, 5, max_chunk_bytes=4 * 300 * 7)
    assert torch.equal(full[0], chunked[0]) and torch.equal(full[1], chunked[1])


def test_morton_order_hand_checked():
    square = np.array([[1.0, 1.0], [0.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    assert morton_order(square).tolist() == [3, 2, 1, 0]  # Z: (0,0), (1,0), (0,1), (1,1)


def test_backends_agree_to_1e5():
    # 1500 queries: the kd-tree path sorts them along a Z-order curve and must restore their order.
    g = torch.Generator().manual_seed(2)
    points, queries = torch.randn(20_000, 5, generator=g), torch.randn(1500, 5, generator=g)
    d_tree, i_tree = NearestNeighbors("kdtree").search(queries, points, 80)
    d_torch, i_torch = NearestNeighbors("torch").search(queries, points, 80)
    torch.testing.assert_close(d_tree, d_torch, atol=1e-5, rtol=0)
    assert (i_tree == i_torch).float().mean() > 0.999  # only exact ties may swap


def test_k_equal_one_and_nearest_helper():
    points = torch.tensor([[0.0, 0.0], [5.0, 5.0]])
    dist, idx = nearest(torch.tensor([[4.0, 4.0], [0.0, 1.0]]), points, "kdtree")
    assert idx.tolist() == [1, 0]
    torch.testing.assert_close(dist, torch.tensor([2**0.5, 1.0]))


def _stale_setup(max_stale, seed=3, n_points=4000, d=3):
    g = torch.Generator().manual_seed(seed)
    points = torch.randn(n_points, d, generator=g)
    index = NearestNeighbors("kdtree", max_stale_neighbors=max_stale)
    index.search(torch.randn(5, d, generator=g), points, 8)  # builds the tree
    return g, points, index


@pytest.mark.parametrize("max_stale", [0.0, 0.5, float("inf")])
def test_kdtree_stays_exact_after_overwrites(max_stale):
    g, points, index = _stale_setup(max_stale)
    for _ in range(4):
        rows = torch.randint(0, points.shape[0], (60,), generator=g)
        points[rows] = torch.randn(60, 3, generator=g) * 0.5  # new values crowd the centre
        index.mark_rows_written(rows)
        queries = torch.randn(200, 3, generator=g) * 0.5
        dist, idx = index.search(queries, points, 16)
        ref_d, ref_i = _naive(queries, points, 16)
        torch.testing.assert_close(dist, ref_d[:, :16], atol=1e-5, rtol=0)
        assert torch.equal(idx, ref_i[:, :16])


def test_stale_rows_among_all_neighbours_are_replaced_by_deeper_hits():
    # Overwrite a query's whole neighbourhood with far-away values: every tree hit is stale.
    g, points, index = _stale_setup(float("inf"))
    query = torch.zeros(1, 3)
    _, idx = index.search(query, points, 50)
    rows = idx[0]
    points[rows] = 100.0 + torch.randn(50, 3, generator=g)
    index.mark_rows_written(rows)
    dist, got = index.search(query, points, 20)
    ref_d, ref_i = _naive(query, points, 20)
    torch.testing.assert_close(dist, ref_d[:, :20], atol=1e-5, rtol=0)
    assert torch.equal(got, ref_i[:, :20])
    assert index.num_builds == 1


def test_rebuild_rule_counts_expected_stale_neighbours():
    # 4000 rows, k = 8: rebuild once 8 · stale / 4000 > 0.1, i.e. after more than 50 stale rows.
    g, points, index = _stale_setup(0.1)
    assert index.num_builds == 1
    index.mark_rows_written(torch.arange(50))
    index.search(torch.randn(5, 3), points, 8)
    assert index.num_builds == 1
    index.mark_rows_written(torch.arange(50, 51))
    index.search(torch.randn(5, 3), points, 8)
    assert index.num_builds == 2
    index.mark_rows_written(torch.arange(10))
    index.reset()
    index.search(torch.randn(5, 3), points, 8)
    assert index.num_builds == 3


def test_point_count_change_rebuilds():
    index = NearestNeighbors("kdtree")
    index.search(torch.zeros(1, 2), torch.randn(10, 2), 3)
    dist, _ = index.search(torch.zeros(1, 2), torch.ones(4, 2), 2)
    torch.testing.assert_close(dist, torch.full((1, 2), 2**0.5))


def test_resolve_backend_and_errors():
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu, 4) == "kdtree"
    assert resolve_backend("auto", cpu, 16) == "torch"
    assert resolve_backend("torch", cpu, 4) == "torch"
    with pytest.raises(ValueError, match="kdtree"):
        NearestNeighbors("faiss")
    with pytest.raises(ValueError, match="k must lie"):
        NearestNeighbors().search(torch.zeros(1, 2), torch.zeros(3, 2), 4)
    with pytest.raises(ValueError, match=r"\(n, d\)"):
        NearestNeighbors().search(torch.zeros(1, 3), torch.zeros(3, 2), 1)


def test_numpy_rows_accepted_by_mark():
    g, points, index = _stale_setup(float("inf"))
    index.mark_rows_written(np.array([1, 2, 3]))
    points[[1, 2, 3]] = 0.0
    dist, _ = index.search(torch.zeros(1, 3), points, 3)
    assert dist.max().item() == 0.0
