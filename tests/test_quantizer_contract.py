"""The one contract every registered quantizer satisfies (vp_lightning.quantizers.TINY_FACTORIES)."""

import pytest
import torch

from vp_lightning.quantizers import TINY_FACTORIES, QuantizerOutput

NAMES = sorted(TINY_FACTORIES)


def _fitted(name):
    torch.manual_seed(0)
    q = TINY_FACTORIES[name]()
    if hasattr(q, "fit_codebook"):  # codebook-free quantizers get real tokens only after a fit
        q.fit_codebook(torch.randn(50 * q.codebook_size, q.dim))
    return q


@pytest.mark.parametrize("name", NAMES)
def test_shapes_types_and_index_range(name):
    q = _fitted(name)
    z = torch.randn(2, 3, 5, q.dim)
    for training in (True, False):
        q.train(training)
        out = q(z)
        assert isinstance(out, QuantizerOutput)
        assert out.quantized.shape == z.shape
        assert out.indices.shape == z.shape[:-1] and out.indices.dtype == torch.int64
        assert int(out.indices.min()) >= 0 and int(out.indices.max()) < q.codebook_size
        assert out.loss.ndim == 0 and torch.isfinite(out.loss)
        assert all(v.numel() == 1 for v in out.metrics.values())


@pytest.mark.parametrize("name", NAMES)
def test_eval_indices_to_codes_round_trip(name):
    q = _fitted(name).eval()
    out = q(torch.randn(4, 7, q.dim))
    torch.testing.assert_close(q.indices_to_codes(out.indices), out.quantized, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_eval_is_deterministic_and_uses_several_codes(name):
    q = _fitted(name).eval()
    z = torch.randn(256, q.dim)
    a, b = q(z), q(z)
    assert torch.equal(a.indices, b.indices)
    assert a.indices.unique().numel() > 4


@pytest.mark.parametrize("name", NAMES)
def test_gradient_reaches_input(name):
    q = _fitted(name).train()
    z = torch.randn(3, 8, q.dim, requires_grad=True)
    out = q(z)
    (out.quantized.square().sum() + out.loss).backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_fp32_under_bf16_autocast(name):
    q = _fitted(name).eval()
    z = torch.randn(64, q.dim)
    expected = q(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(z)
    assert out.quantized.dtype == torch.float32
    assert torch.equal(out.indices, expected.indices)


def test_codebook_sizes_match_levels():
    from vp_lightning.quantizers import FSQ

    assert FSQ([8, 5, 5, 5]).codebook_size == 1000
    assert FSQ([8, 8, 8, 6, 5]).codebook_size == 15360


@pytest.mark.parametrize("levels", [[8, 1, 5], [], [2, 5]])
def test_fsq_rejects_bad_levels(levels):
    from vp_lightning.quantizers import FSQ

    with pytest.raises(ValueError, match="levels"):
        FSQ(levels)
