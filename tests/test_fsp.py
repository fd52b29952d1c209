"""FSP: the per-scalar math on hand-computed values, then the module's contract and training behaviour."""

import math

import pytest
import torch

from vp_lightning.quantizers.fsp import (
    ACTIVATIONS,
    FSP,
    TARGET_VARIANCE,
    bound,
    centroid,
    decoder_value,
    level_index,
    moment_loss,
    perturb,
    unbound,
)


# -- pure functions ------------------------------------------------------------------------------------------------
def test_bound_hand_values():
    a = torch.tensor([0.0, -math.log(2), math.log(2)])
    for activation in ACTIVATIONS:
        assert bound(a[:1], activation).item() == pytest.approx(0.5)
    # Laplace CDF: 0.5·e^a below 0, 1 - 0.5·e^{-a} above.
    torch.testing.assert_close(bound(a, "laplace"), torch.tensor([0.5, 0.25, 0.75]))
    # (tanh(a) + 1)/2 = sigmoid(2a)
    torch.testing.assert_close(bound(a, "tanh"), torch.sigmoid(2 * a))
    assert bound(torch.tensor([1.0]), "normal").item() == pytest.approx(0.841344746, abs=1e-6)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_unbound_inverts_bound(activation):
    a = torch.linspace(-3, 3, 13)
    torch.testing.assert_close(unbound(bound(a, activation), activation), a, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_target_variance_makes_bound_uniform(activation):
    # g is the CDF of the target distribution, so a = g^{-1}(U) has exactly the target variance.
    u = (torch.arange(200_000, dtype=torch.float64) + 0.5) / 200_000
    a = unbound(u, activation)
    assert a.var().item() == pytest.approx(TARGET_VARIANCE[activation], rel=0.01)


def test_level_index_and_centroid_hand_values():
    levels = torch.tensor([4.0])
    u = torch.tensor([[0.0], [0.24], [0.25], [0.99], [1.0]])
    assert level_index(u, levels).flatten().tolist() == [0, 0, 1, 3, 3]
    torch.testing.assert_close(centroid(torch.tensor([[0], [3]]), levels), torch.tensor([[0.125], [0.875]]))


def test_level_index_per_dimension_levels():
    levels = torch.tensor([2.0, 5.0])
    assert level_index(torch.tensor([0.7, 0.7]), levels).tolist() == [1, 3]


def test_perturb_support_check_hand_values():
    levels = torch.tensor([4.0])  # η/L = 0.25: ε = (noise - 1/2)/4 in [-0.125, 0.125]
    u = torch.tensor([[0.5], [0.01], [0.99], [0.2]])
    noise = torch.tensor([[1.0], [0.0], [1.0], [0.5]])
    value, accepted = perturb(u, noise, 1.0, levels)
    torch.testing.assert_close(value, torch.tensor([[0.625], [0.01], [0.99], [0.2]]))
    assert accepted.flatten().tolist() == [True, False, False, True]
    value, _ = perturb(u[:1], noise[:1], 2.0, levels)  # η doubles the width
    assert value.item() == pytest.approx(0.75)


def test_decoder_value_hand_values():
    v = torch.tensor([0.5, 1.0, 0.0])
    torch.testing.assert_close(decoder_value(v, "affine", "tanh"), torch.tensor([0.0, math.sqrt(3), -math.sqrt(3)]))
    assert decoder_value(torch.tensor([0.5]), "inverse", "sigmoid").item() == pytest.approx(0.0)
    assert torch.isfinite(decoder_value(torch.tensor([0.0, 1.0]), "inverse", "normal")).all()


def test_moment_loss_hand_values():
    a = torch.tensor([[1.0, 0.0], [3.0, 0.0]])  # means (2, 0), population variances (1, 0)
    loss, mean_term, var_term = moment_loss(a, 1.0, (0.1, 0.07))
    assert mean_term.item() == pytest.approx(2.0)  # (4 + 0) / 2
    assert var_term.item() == pytest.approx(0.5)  # (0 + 1) / 2
    assert loss.item() == pytest.approx(0.1 * 2.0 + 0.07 * 0.5)


# -- constructor ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(levels=[8, 1]), "levels"),
        (dict(levels=[]), "levels"),
        (dict(levels=[8, 5], eta=0.0), "eta"),
        (dict(levels=[8, 5], quantize_rate=1.5), "quantize_rate"),
        (dict(levels=[8, 5], decoder_input="x"), "affine"),
        (dict(levels=[8, 5], norm_weights=(0.1, -1.0)), "norm_weights"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FSP(**kwargs)


def test_unknown_activation_lists_valid_ones():
    with pytest.raises(ValueError, match="tanh.*sigmoid.*normal.*laplace"):
        FSP([8, 5], activation="relu")


def test_codebook_size_and_dim():
    q = FSP([8, 5, 5, 5])
    assert (q.dim, q.codebook_size) == (4, 1000)


# -- module --------------------------------------------------------------------------------------------------------
def _pre_activation_for(u, activation="tanh"):
    return unbound(torch.tensor(u), activation)


def test_tokens_are_mixed_radix_of_levels():
    q = FSP([4, 3]).eval()
    # u = (0.3, 0.9) -> levels (1, 2) -> token 1 + 4·2 = 9
    out = q(_pre_activation_for([[0.3, 0.9]]))
    assert out.indices.tolist() == [9]
    torch.testing.assert_close(out.quantized, decoder_value(torch.tensor([[0.375, 5 / 6]]), "affine", "tanh"))


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("decoder_input", ["affine", "inverse"])
def test_eval_round_trip_is_exact(activation, decoder_input):
    torch.manual_seed(0)
    q = FSP([8, 5, 5, 5], activation=activation, decoder_input=decoder_input).eval()
    out = q(torch.randn(3, 7, 4) * 2)
    assert torch.equal(q.indices_to_codes(out.indices), out.quantized)
    assert out.indices.shape == (3, 7) and out.indices.dtype == torch.int64
    assert 0 <= int(out.indices.min()) and int(out.indices.max()) < 1000


def test_all_codes_reachable():
    q = FSP([3, 2]).eval()
    u = torch.cartesian_prod(torch.tensor([1 / 6, 0.5, 5 / 6]), torch.tensor([0.25, 0.75]))
    assert sorted(q(unbound(u, "tanh")).indices.tolist()) == list(range(6))


def test_training_with_quantize_rate_one_equals_eval():
    torch.manual_seed(0)
    q = FSP([8, 5, 5, 5], quantize_rate=1.0)
    z = torch.randn(64, 4)
    train_out = q.train()(z)
    eval_out = q.eval()(z)
    torch.testing.assert_close(train_out.quantized, eval_out.quantized)
    assert torch.equal(train_out.indices, eval_out.indices)


def test_perturbation_width_matches_quantization_error():
    # With η = 1 and quantize_rate 0, accepted noise is U(-1/2L, 1/2L): variance 1/(12 L²), as the rounding error.
    torch.manual_seed(0)
    levels = [8]
    q = FSP(levels, quantize_rate=0.0, decoder_input="affine").train()
    u = torch.rand(100_000, 1) * 0.8 + 0.1  # away from the ends, where every proposal is accepted
    a = unbound(u, "tanh")
    value = q(a).quantized / math.sqrt(12) + 0.5
    err = value - bound(a, "tanh")
    assert err.abs().max().item() <= 1 / 16 + 1e-5
    assert err.var().item() == pytest.approx(1 / (12 * 64), rel=0.03)


def test_accept_rate_metric_counts_support_rejections():
    torch.manual_seed(0)
    q = FSP([4], eta=1.0, quantize_rate=0.0).train()
    # u = 0.01: proposals below 0 (half of them, roughly) are rejected; u = 0.5: all accepted.
    near_edge = q(_pre_activation_for([[0.01]] * 20_000)).metrics["accept_rate"].item()
    centre = q(_pre_activation_for([[0.5]] * 1000)).metrics["accept_rate"].item()
    assert centre == 1.0
    assert near_edge == pytest.approx(0.5 + 0.01 / 0.25, abs=0.02)  # accepted iff ε > -0.01, ε ~ U(±0.125)


def test_gradient_is_identity_through_bound_and_affine():
    q = FSP([8, 5], norm_weights=(0.0, 0.0)).train()
    z = torch.randn(32, 2, requires_grad=True)
    q(z).quantized.sum().backward()
    # d/da [(g(a) + const - 1/2)·√12] = √12 · g'(a) with g' = (1 - tanh²)/2 for tanh
    expected = math.sqrt(12) * (1 - torch.tanh(z.detach()) ** 2) / 2
    torch.testing.assert_close(z.grad, expected)


def test_moment_loss_goes_into_output_loss():
    q = FSP([8, 5], norm_weights=(1.0, 0.0))
    z = torch.full((10, 2), 2.0)
    out = q(z)
    assert out.loss.item() == pytest.approx(4.0)
    assert out.metrics["norm_loss"].item() == pytest.approx(4.0)


def test_fp32_under_bf16_autocast():
    q = FSP([8, 5, 5, 5]).eval()
    z = torch.randn(64, 4)
    expected = q(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(z.bfloat16())
    assert out.quantized.dtype == torch.float32
    assert torch.equal(out.indices, q(z.bfloat16().float()).indices)
    assert (out.indices == expected.indices).float().mean() > 0.9  # bf16 input rounding moves few tokens


def test_wrong_last_dim_is_reported():
    with pytest.raises(ValueError, match="last dim 4"):
        FSP([8, 5, 5, 5])(torch.randn(3, 5))
