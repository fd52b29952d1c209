"""k-means: hand-checkable fits, empty-cluster splitting, and identical results across gloo ranks."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vp_lightning.quantizers.kmeans import kmeans, kmeans_plus_plus, split_empty_clusters

SQUARE = torch.tensor([[0.0, 0.0], [0.0, 1.0], [10.0, 0.0], [10.0, 1.0]])


def _sorted_rows(t):
    return t[torch.argsort(t[:, 0] * 1000 + t[:, 1])]


@pytest.mark.parametrize("backend", ["kdtree", "torch"])
def test_two_pairs_hand_checked(backend):
    torch.manual_seed(0)
    result = kmeans(SQUARE, 2, backend=backend)
    torch.testing.assert_close(_sorted_rows(result.centroids), torch.tensor([[0.0, 0.5], [10.0, 0.5]]))
    assert result.counts.tolist() == [2, 2]
    assert result.mse == pytest.approx(0.25)
    assert result.mean_distance == pytest.approx(0.5)


def test_one_lloyd_step_from_given_init():
    # init (0, 0), (0, 1): the first assignment puts (10, 0) with (0, 0) and (10, 1) with (0, 1),
    # so after one step the centroids are (5, 0) and (5, 1).
    result = kmeans(SQUARE, 2, max_iter=1, init=SQUARE[:2])
    torch.testing.assert_close(result.centroids, torch.tensor([[5.0, 0.0], [5.0, 1.0]]))
    assert result.iterations == 1
    assert result.mse == pytest.approx(25.0)


def test_kmeans_plus_plus_picks_distinct_points_and_tolerates_duplicates():
    g = torch.Generator().manual_seed(0)
    centres = kmeans_plus_plus(SQUARE, 4, generator=g)
    assert _sorted_rows(centres).tolist() == _sorted_rows(SQUARE).tolist()
    dup = torch.zeros(5, 2)
    assert kmeans_plus_plus(dup, 3, generator=g).abs().sum() == 0  # fewer distinct points than centres


def test_split_empty_clusters_hand_values():
    centroids = torch.tensor([[0.0, 0.0], [5.0, 5.0]])
    counts = torch.tensor([0.0, 10.0])
    variances = torch.tensor([[0.0, 0.0], [4.0, 1.0]])  # σ = (2, 1), δ = σ/4 = (0.5, 0.25)
    new, n_split = split_empty_clusters(centroids, counts, variances)
    assert n_split == 1
    torch.testing.assert_close(new, torch.tensor([[5.5, 5.25], [4.5, 4.75]]))


def test_empty_clusters_are_reseeded_during_lloyd():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(200, 2, generator=g) * 0.1 + c for c in (torch.tensor([0.0, 0.0]), torch.tensor([5.0, 5.0]))])
    init = torch.tensor([[0.0, 0.0], [100.0, 100.0], [100.0, 100.0], [5.0, 5.0]])  # two centres far from all data
    result = kmeans(x, 4, init=init)
    assert (result.counts > 0).all()
    assert result.centroids.abs().max() < 10


def test_tolerance_stops_early_and_progress_is_reported():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 3, generator=g)
    seen = []
    result = kmeans(x, 16, max_iter=200, tol=1e-3, generator=g, progress=lambda i, mse: seen.append((i, mse)))
    assert 1 < result.iterations < 200
    assert [i for i, _ in seen] == list(range(1, result.iterations + 1))
    assert all(b <= a * (1 + 1e-9) for (_, a), (_, b) in zip(seen, seen[1:], strict=False))  # Lloyd never increases the MSE


def test_backends_agree():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3000, 4, generator=g)
    init = x[:32].clone()
    a = kmeans(x, 32, init=init, backend="kdtree")
    b = kmeans(x, 32, init=init, backend="torch")
    torch.testing.assert_close(a.centroids, b.centroids, atol=1e-5, rtol=0)


def test_errors_are_clear():
    with pytest.raises(ValueError, match="at least 5 latents"):
        kmeans(torch.randn(4, 2), 5)
    with pytest.raises(ValueError, match=r"\(n, d\)"):
        kmeans(torch.randn(4), 2)
    with pytest.raises(ValueError, match="init must have shape"):
        kmeans(torch.randn(10, 2), 2, init=torch.zeros(3, 2))


# -- distributed: 2 gloo ranks holding halves == 1 process holding all ------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data():
    g = torch.Generator().manual_seed(7)
    return torch.randn(1200, 3, generator=g), torch.randn(24, 3, generator=g)


def _rank_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x, init = _data()
        half = x[rank::world]  # different data on each rank
        with_init = kmeans(half, 24, init=init)
        torch.manual_seed(100 + rank)  # different random state per rank: the init must still agree
        seeded = kmeans(half, 24)
        empty_rank1 = kmeans(x if rank == 0 else x[:0], 24, init=init)  # a rank without latents takes part
        torch.save(
            {
                "init": with_init.centroids,
                "counts": with_init.counts,
                "mse": with_init.mse,
                "pp": seeded.centroids,
                "empty": empty_rank1.centroids,
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process(tmp_path):
    mp.spawn(_rank_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    x, init = _data()
    single = kmeans(x, 24, init=init)
    assert torch.equal(r0["init"], r1["init"]) and torch.equal(r0["pp"], r1["pp"])
    torch.testing.assert_close(r0["init"], single.centroids, atol=1e-5, rtol=0)
    assert torch.equal(r0["counts"], single.counts)
    assert r0["mse"] == pytest.approx(single.mse, rel=1e-6)
    assert torch.equal(r0["empty"], r1["empty"])
    torch.testing.assert_close(r0["empty"], single.centroids, atol=1e-5, rtol=0)
