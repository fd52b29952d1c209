"""VP (VP-VAE quantizer): the MH math on hand values, the contract, backend agreement and codebook lifecycle."""

import math

import pytest
import torch

from vp_lightning.quantizers.vp import VectorPerturbation, mh_accept, mh_log_alpha, uniform_ball


def _tiny(**kwargs):
    kwargs = {"dim": 4, "codebook_size": 64, **kwargs}
    return VectorPerturbation(**kwargs)


# -- pure functions ------------------------------------------------------------------------------------------------
def test_uniform_ball_hand_values():
    direction = torch.tensor([[3.0, 4.0], [0.0, -2.0]])
    rho = torch.tensor([1.0, 0.25])  # d = 2: radius factor rho^(1/2)
    radius = torch.tensor([2.0, 4.0])
    torch.testing.assert_close(uniform_ball(direction, rho, radius), torch.tensor([[1.2, 1.6], [0.0, -2.0]]))


def test_uniform_ball_is_uniform_in_volume():
    torch.manual_seed(0)
    n, d = 200_000, 3
    u = uniform_ball(torch.randn(n, d), torch.rand(n), torch.full((n,), 2.0))
    norms = u.norm(dim=-1)
    assert norms.max() <= 2.0 + 1e-6
    assert (norms <= 1.0).float().mean().item() == pytest.approx(0.5**d, abs=0.005)  # volume ratio (1/2)^3
    assert u.mean(0).abs().max() < 0.01


def test_mh_log_alpha_hand_values():
    one = torch.tensor([1.0])
    # d · (log e + log 1 - log 1 - log 1) = 3
    assert mh_log_alpha(3, torch.tensor([math.e]), one, one, one).item() == pytest.approx(3.0)
    # symmetric swap of D_k and D_M cancels
    assert mh_log_alpha(2, one, 2 * one, 2 * one, one).item() == pytest.approx(0.0)
    # moving into a denser region (smaller D_k(z')) raises α: d · log(2/1) with the D_M terms equal
    assert mh_log_alpha(4, 2 * one, one, one, one).item() == pytest.approx(4 * math.log(2))
    # zero distances are clamped, not -inf/nan
    assert torch.isfinite(mh_log_alpha(4, torch.zeros(1), one, torch.zeros(1), one)).all()


def test_mh_accept_requires_both_conditions():
    log_alpha = torch.tensor([0.0, 0.0, -1.0, 5.0])
    log_u = torch.tensor([-0.5, -0.5, -0.5, -0.1])
    step = torch.tensor([1.0, 2.0, 1.0, 1.0])
    reverse = torch.tensor([1.5, 1.5, 1.5, 1.0])  # row 1: the reverse ball does not reach back
    assert mh_accept(log_alpha, log_u, step, reverse).tolist() == [True, False, False, True]


# -- construction and buffers --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(eta=0.0), "eta"),
        (dict(k=100), "k must lie"),
        (dict(push_prob=2.0), "push_prob"),
        (dict(knn_backend="faiss"), "kdtree"),
        (dict(cluster_size_rate=0.01), "M"),
        (dict(norm_weights=(1.0, -1.0)), "norm_weights"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _tiny(**kwargs)


def test_queue_and_codebook_are_checkpointed_buffers():
    q = _tiny()
    assert q.num_neighbors == 64 and q.queue.shape == (64 * 64, 4)
    state = q.state_dict()
    for name in ("queue", "queue_ptr", "codebook", "codebook_fitted", "codebook_frozen", "accepted_norm_ema"):
        assert name in state
    other = _tiny()
    q.train()(torch.randn(500, 4))
    q.push(torch.ones(3, 4))
    other.load_state_dict(q.state_dict())
    assert torch.equal(other.queue, q.queue) and int(other.queue_ptr) == int(q.queue_ptr)


def test_push_is_fifo_with_wraparound():
    q = VectorPerturbation(dim=1, codebook_size=2, cluster_size_rate=2, k=1)  # M = 2, queue of 4 rows
    q.push(torch.tensor([[1.0], [2.0], [3.0]]))
    q.push(torch.tensor([[4.0], [5.0]]))
    assert q.queue.flatten().tolist() == [5.0, 2.0, 3.0, 4.0] and int(q.queue_ptr) == 1
    q.push(torch.arange(10.0, 16.0).unsqueeze(1))  # more than the queue: the newest 4 survive
    assert sorted(q.queue.flatten().tolist()) == [12.0, 13.0, 14.0, 15.0] and int(q.queue_ptr) == 1


def test_training_pushes_about_push_prob():
    torch.manual_seed(0)
    q = _tiny(push_prob=0.1).train()
    q(torch.full((2000, 4), 7.0))
    pushed = (q.queue == 7.0).all(dim=1).sum().item()
    assert pushed == int(q.queue_ptr) and 150 < pushed < 250


# -- forward contract ----------------------------------------------------------------------------------------------
def test_shapes_index_range_and_metrics():
    torch.manual_seed(0)
    q = _tiny()
    z = torch.randn(2, 3, 5, 4)
    for training in (True, False):
        out = q.train(training)(z)
        assert out.quantized.shape == z.shape and out.indices.shape == (2, 3, 5)
        assert out.indices.dtype == torch.int64 and 0 <= int(out.indices.min()) and int(out.indices.max()) < 64
        assert out.loss.ndim == 0 and torch.isfinite(out.loss)
        assert all(v.numel() == 1 for v in out.metrics.values())
    train_metrics = q.train()(z).metrics
    assert set(train_metrics) == {"accept_rate", "perturbation_norm", "radius", "norm_loss"}


def test_eval_is_nearest_centroid_and_round_trips_exactly():
    torch.manual_seed(0)
    q = _tiny()
    q.fit_codebook(torch.randn(3200, 4))
    q.eval()
    z = torch.randn(4, 7, 4)
    out = q(z)
    assert torch.equal(q.indices_to_codes(out.indices), out.quantized)
    brute = torch.cdist(z.reshape(-1, 4), q.codebook).argmin(dim=1)
    assert torch.equal(out.indices.flatten(), brute)


def test_gradient_is_exactly_the_identity():
    torch.manual_seed(0)
    q = _tiny(norm_weights=(0.0, 0.0))
    z = torch.randn(3, 8, 4, requires_grad=True)
    w = torch.randn(3, 8, 4)
    for training in (True, False):
        z.grad = None
        (q.train(training)(z).quantized * w).sum().backward()
        assert torch.equal(z.grad, w)


def test_perturbation_applied_only_when_accepted():
    torch.manual_seed(0)
    q = _tiny()
    z = torch.randn(500, 4)
    out = q.train()(z)
    moved = (out.quantized - z).norm(dim=-1) > 0
    assert moved.float().mean().item() == pytest.approx(out.metrics["accept_rate"].item())


def test_use_mh_false_accepts_everything():
    torch.manual_seed(0)
    out = _tiny(use_mh=False).train()(torch.randn(300, 4))
    assert out.metrics["accept_rate"].item() == 1.0


def test_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    q = _tiny()
    q.fit_codebook(torch.randn(3200, 4))
    z = torch.randn(64, 4)
    for training in (True, False):
        q.train(training)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = q(z.bfloat16())
        assert out.quantized.dtype == torch.float32
    q.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(q(z).indices, q.eval()(z).indices)


def test_radius_is_eta_times_mth_neighbour_distance():
    torch.manual_seed(0)
    q = _tiny(eta=0.5)
    z = torch.randn(50, 4)
    dist_m = torch.cdist(z, q.queue).sort(dim=1).values[:, 63]
    out = q.train()(z)
    assert out.metrics["radius"].item() == pytest.approx(0.5 * dist_m.mean().item(), rel=1e-5)
    assert ((out.quantized - z).norm(dim=-1) <= 0.5 * dist_m + 1e-5).all()


def test_mh_keeps_latents_on_the_distribution():
    # z and the queue both ~ N(0, I): MH targets the queue's density, so the perturbed cloud keeps unit
    # variance, while always-accept (uniform noise in the ball) inflates it.
    torch.manual_seed(0)
    z = torch.randn(4000, 2)
    common = dict(dim=2, codebook_size=64, push_prob=0.0, norm_weights=(0.0, 0.0))
    with_mh = VectorPerturbation(**common, eta=2.0).train()(z).quantized
    torch.manual_seed(0)
    z = torch.randn(4000, 2)
    without = VectorPerturbation(**common, eta=2.0, use_mh=False).train()(z).quantized
    assert with_mh.var(0).mean().item() == pytest.approx(1.0, abs=0.07)
    assert without.var(0).mean().item() > with_mh.var(0).mean().item() + 0.03


# -- backends and staleness ----------------------------------------------------------------------------------------
def _run(backend, steps=5, **kwargs):
    """Training steps from a fixed seed; returns the module and per step (queue distances, output, accept mask)."""
    torch.manual_seed(123)
    q = VectorPerturbation(dim=3, codebook_size=128, push_prob=0.2, knn_backend=backend, **kwargs).train()
    records = []
    for _ in range(steps):
        z = torch.randn(400, 3) * 0.8
        dist = q.queue_distances(z)  # consumes no random numbers
        out = q(z)
        accepted = (out.quantized - z).norm(dim=-1) > 0
        records.append((dist, out, accepted))
    return q, records


def test_kdtree_and_torch_backends_give_the_same_decisions():
    # 20 % pushed per step: the kd-tree is searched while many queue rows are newer than it (stale), and it is
    # also rebuilt in between; distances agree to 1e-5 and every accept decision is identical.
    q_tree, tree = _run("kdtree")
    q_torch, brute = _run("torch")
    assert q_tree._queue_knn.num_builds >= 2
    for (d_tree, o_tree, a_tree), (d_brute, o_brute, a_brute) in zip(tree, brute, strict=True):
        torch.testing.assert_close(d_tree, d_brute, atol=1e-5, rtol=0)
        assert torch.equal(a_tree, a_brute)
        torch.testing.assert_close(o_tree.quantized, o_brute.quantized, atol=1e-5, rtol=0)
        assert o_tree.metrics["accept_rate"] == o_brute.metrics["accept_rate"]
    assert torch.equal(q_tree.queue, q_torch.queue)


@pytest.mark.parametrize("max_stale", [0.0, float("inf")])
def test_staleness_rule_does_not_change_acceptance(max_stale):
    # Rebuilding after every change and never rebuilding give the same statistics as the default rule.
    _, default = _run("kdtree")
    q, other = _run("kdtree", max_stale_neighbors=max_stale)
    assert q._queue_knn.num_builds == (1 if max_stale == float("inf") else 5)
    for (_, a, _), (_, b, _) in zip(default, other, strict=True):
        assert torch.equal(a.quantized, b.quantized)


def test_queue_replaced_behind_the_module_is_detected():
    torch.manual_seed(0)
    q = _tiny(knn_backend="kdtree")
    z = torch.randn(20, 4)
    q.queue_distances(z)
    with torch.no_grad():
        q.queue.copy_(torch.randn_like(q.queue))  # what DDP's buffer broadcast or load_state_dict do
    expected = torch.cdist(z, q.queue).sort(dim=1).values[:, :64]
    torch.testing.assert_close(q.queue_distances(z), expected, atol=1e-5, rtol=0)


# -- codebook lifecycle and diagnostic -----------------------------------------------------------------------------
def test_fit_codebook_finds_separated_clusters():
    torch.manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0], [5.0, 5.0]])
    latents = (centres.repeat(100, 1) + 0.05 * torch.randn(400, 2)).reshape(20, 20, 2)
    q = VectorPerturbation(dim=2, codebook_size=4)
    assert not bool(q.codebook_fitted)
    assert q.fit_codebook(latents) is None
    assert bool(q.codebook_fitted) and not bool(q.codebook_frozen)
    found = q.codebook[torch.cdist(centres, q.codebook).argmin(dim=1)]
    torch.testing.assert_close(found, centres, atol=0.05, rtol=0)
    assert q.last_fit is not None and q.last_fit.mean_distance < 0.1
    assert q.quantization_error(latents) == pytest.approx(q.last_fit.mean_distance, rel=1e-5)


def test_training_tokens_follow_the_current_codebook():
    q = VectorPerturbation(dim=2, codebook_size=2, cluster_size_rate=2, k=1)
    q.set_codebook(torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
    out = q.train()(torch.tensor([[0.1, 0.0], [9.0, 9.5]]))
    assert out.indices.tolist() == [0, 1]
    q.set_codebook(torch.tensor([[10.0, 10.0], [0.0, 0.0]]))  # the cached search tree must follow
    assert q.train()(torch.tensor([[0.1, 0.0]])).indices.tolist() == [1]


def test_frozen_codebook_is_kept_by_monitoring_fits():
    torch.manual_seed(0)
    q = _tiny()
    assert q.fit_codebook_from_queue() is True
    q.fit_codebook(torch.randn(3200, 4), freeze=True)
    frozen = q.codebook.clone()
    assert q.fit_codebook_from_queue() is False
    assert torch.equal(q.codebook, frozen)
    q.unfreeze_codebook()
    assert q.fit_codebook_from_queue() is True and not torch.equal(q.codebook, frozen)


def test_eta_matching_ratio_hand_values():
    q = VectorPerturbation(dim=2, codebook_size=2, cluster_size_rate=2, k=1)
    q.set_codebook(torch.tensor([[0.0, 0.0], [10.0, 0.0]]))
    q.accepted_norm_ema.fill_(0.5 * 0.01)
    q.accepted_norm_weight.fill_(0.01)  # bias-corrected mean accepted norm 0.5
    latents = torch.tensor([[1.0, 0.0], [10.0, 2.0]])  # errors 1 and 2: mean 1.5
    assert q.accepted_perturbation_norm() == pytest.approx(0.5)
    assert q.eta_matching_ratio(latents) == pytest.approx(3.0)


def test_accepted_norm_running_mean_tracks_training():
    torch.manual_seed(0)
    q = _tiny(accepted_norm_decay=0.0)  # decay 0: the mean of the last step only
    assert math.isnan(q.accepted_perturbation_norm())
    z = torch.randn(400, 4)
    out = q.train()(z)
    norms = (out.quantized - z).norm(dim=-1)
    assert q.accepted_perturbation_norm() == pytest.approx(norms[norms > 0].mean().item(), rel=1e-5)


def test_wrong_last_dim_is_reported():
    with pytest.raises(ValueError, match="last dim 4"):
        _tiny()(torch.randn(3, 5))
