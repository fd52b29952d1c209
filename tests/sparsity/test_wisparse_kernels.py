"""One-token fast path of SparseLinear (reads only kept weight columns) against the dense reference path."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vp_lightning.sparsity import SparseLinear, kernels, sparsify
from vp_lightning.sparsity import layers as layers_module
from vp_lightning.sparsity.allocation import build_plan, fixed_alpha
from vp_lightning.sparsity.layers import sparse_layers
from vp_lightning.sparsity.loading import LLAMA_LAYOUT, projection_sites, tiny_llama
from vp_lightning.sparsity.scores import LogBins
from vp_lightning.sparsity.statistics import ScoreStatistics, collect_statistics


def _layer(d_in: int, d_out: int, bias: bool, dtype: torch.dtype, seed: int = 0) -> SparseLinear:
    gen = torch.Generator().manual_seed(seed)
    linear = nn.Linear(d_in, d_out, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(d_out, d_in, generator=gen))
        if bias:
            linear.bias.copy_(torch.randn(d_out, generator=gen))
    linear = linear.to(dtype).requires_grad_(False)
    return SparseLinear.from_linear(linear, torch.rand(d_in, generator=gen) * 1.5)


def _reference(layer: SparseLinear, x: torch.Tensor) -> torch.Tensor:
    layer.fast_decode = False
    try:
        return layer(x)
    finally:
        layer.fast_decode = True


def _assert_close(fast: torch.Tensor, ref: torch.Tensor) -> None:
    assert fast.shape == ref.shape and fast.dtype == ref.dtype
    if ref.dtype == torch.float32:
        torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    else:  # both round to bfloat16 after summing in different orders: a few units in the last place
        scale = float(ref.float().abs().max()) + 1.0
        torch.testing.assert_close(fast.float(), ref.float(), rtol=2e-2, atol=2e-2 * scale)


@pytest.fixture
def counting(monkeypatch):
    """Counts calls of the fast path from SparseLinear.forward."""
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        return kernels.sparse_decode_linear(*args, **kwargs)

    monkeypatch.setattr(layers_module, "sparse_decode_linear", wrapped)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(48,), (1, 48), (1, 1, 48)])
def test_fast_path_matches_reference(dtype, bias, shape, counting):
    layer = _layer(48, 40, bias, dtype)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        x = torch.randn(shape, generator=gen).to(dtype)
        _assert_close(layer(x), _reference(layer, x))
    assert len(counting) == 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gather_and_dense_fallback_at_every_density(dtype, monkeypatch):
    layer = _layer(64, 24, True, dtype, seed=2)
    x = torch.randn(64, generator=torch.Generator().manual_seed(3)).to(dtype)
    for quantile in (0.0, 0.1, 0.3, 0.5, 0.7, 0.95):
        layer.threshold.fill_(float(torch.quantile(x.abs().float(), quantile)))
        ref = _reference(layer, x)
        for limit in (0.0, 1.0):  # 0: always the masked dense product, 1: always the gather
            monkeypatch.setitem(kernels.CPU_GATHER_MAX_DENSITY, dtype, limit)
            _assert_close(layer(x), ref)


def test_gather_gemv_reads_only_listed_rows():
    weight_t = torch.randn(10, 6)
    x = torch.randn(10)
    idx = torch.tensor([7, 2, 5])
    weight_t[[0, 1, 3, 4, 6, 8, 9]] = float("nan")  # rows that must never be read
    expected = x[idx] @ weight_t[idx]
    torch.testing.assert_close(kernels.gather_gemv(x, idx, weight_t), expected)
    big = torch.randn(60, 2048)  # rows of 8 KB: visited in interleaved streams
    xb = torch.randn(60)
    for many in (torch.arange(0, 60, 3), torch.arange(0, 51, 3), torch.tensor([4, 9])):
        order = kernels._interleave(many, 4)
        assert torch.equal(order.sort().values, many)
        torch.testing.assert_close(kernels.gather_gemv(xb, many, big), xb[many] @ big[many], rtol=1e-5, atol=1e-4)
    assert torch.equal(kernels._interleave(torch.arange(8), 4), torch.tensor([0, 2, 4, 6, 1, 3, 5, 7]))


def test_density_gate_switches_between_gather_and_dense(monkeypatch):
    layer = _layer(40, 16, False, torch.float32, seed=13)
    x = torch.randn(1, 1, 40, generator=torch.Generator().manual_seed(14))
    sparse, dense = torch.full((40,), float(x.abs().median()) + 1e-6), torch.full((40,), -1.0)
    calls = []
    gather = kernels.gather_gemv
    monkeypatch.setattr(kernels, "gather_gemv", lambda *a: calls.append(1) or gather(*a))
    layer.threshold.copy_(sparse)
    _assert_close(layer(x), _reference(layer, x))
    assert (len(calls), layer._gate.dense) == (1, False)
    layer.threshold.copy_(dense)  # nothing dropped: the masked dense product is faster in float32
    _assert_close(layer(x), _reference(layer, x))
    assert (len(calls), layer._gate.dense) == (1, True)
    for _ in range(layer._gate.recheck - 1):  # not counted again before `recheck` calls ...
        _assert_close(layer(x), _reference(layer, x))
    assert (len(calls), layer._gate.dense) == (1, True)
    layer.threshold.data.copy_(sparse)  # (a write through .data: the version counter does not see it)
    _assert_close(layer(x), _reference(layer, x))  # ... then counted: back to the gather
    assert (len(calls), layer._gate.dense) == (2, False)
    layer.threshold.copy_(dense)
    _assert_close(layer(x), _reference(layer, x))
    assert layer._gate.dense
    layer.threshold.copy_(sparse)  # ... and at once after an in-place change of the thresholds
    _assert_close(layer(x), _reference(layer, x))
    assert (len(calls), layer._gate.dense) == (3, False)



@pytest.mark.parametrize("bias", [True, False])
def test_all_dropped_and_none_dropped(bias):
    layer = _layer(32, 16, bias, torch.float32, seed=4)
    x = torch.randn(1, 1, 32, generator=torch.Generator().manual_seed(5))
    layer.threshold.fill_(float("inf"))
    expected = layer.bias.expand(1, 1, 16) if bias else torch.zeros(1, 1, 16)
    assert torch.equal(layer(x), expected)
    assert torch.equal(_reference(layer, x), expected)
    layer.threshold.fill_(-1.0)
    dense = F.linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(layer(x), dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_reference(layer, x), dense)


def test_other_inputs_take_the_reference_path(counting):
    layer = _layer(16, 8, True, torch.float32, seed=6)
    layer(torch.randn(2, 16))  # two rows
    layer(torch.randn(1, 3, 16))  # three tokens
    layer.track_sparsity = True
    layer(torch.randn(1, 1, 16))
    assert (int(layer.seen), len(counting)) == (16, 0)  # counted, so by the reference path
    layer.track_sparsity = False
    layer.dense_prefix = 1
    x = torch.randn(1, 1, 16)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))  # the prefix position is dense
    layer.dense_prefix = 0
    layer.weight.requires_grad_(True)
    layer(x).sum().backward()  # gradients flow through the reference path
    assert layer.weight.grad is not None and len(counting) == 0
    with torch.no_grad():
        layer(x)
    layer.enabled = False
    layer(x)
    assert len(counting) == 1


def test_cache_follows_dtype_and_in_place_updates_and_stays_out_of_state_dict():
    layer = _layer(24, 12, True, torch.float32, seed=7)
    x = torch.randn(1, 24, generator=torch.Generator().manual_seed(8))
    _assert_close(layer(x), _reference(layer, x))
    first = layer.weight_t()
    assert first.dtype == torch.float32 and first.is_contiguous() and first.data_ptr() != layer.weight.data_ptr()
    assert layer.weight_t() is first  # built once
    assert set(layer.state_dict()) == {"weight", "bias", "threshold"}

    layer.to(torch.bfloat16)
    assert layer._weight_t is None  # dropped by .to()
    xb = x.to(torch.bfloat16)
    _assert_close(layer(xb), _reference(layer, xb))
    assert layer.weight_t().dtype == torch.bfloat16
    torch.testing.assert_close(layer.weight_t(), layer.weight.t(), rtol=0, atol=0)

    with torch.no_grad():
        layer.weight.mul_(2.0)  # in place: same pointer, new version
    torch.testing.assert_close(layer.weight_t(), layer.weight.t(), rtol=0, atol=0)
    _assert_close(layer(xb), _reference(layer, xb))

    layer.weight.data = layer.weight.data.float()  # a new tensor behind the parameter
    layer.bias.data = layer.bias.data.float()
    _assert_close(layer(x), _reference(layer, x))
    assert layer.weight_t().dtype == torch.float32


def test_fast_path_under_inference_mode():
    with torch.inference_mode():
        layer = _layer(24, 12, True, torch.float32, seed=12).to(torch.bfloat16)  # inference-mode weights
        x = torch.randn(1, 1, 24).to(torch.bfloat16)
        _assert_close(layer(x), _reference(layer, x))
    _assert_close(layer(x), _reference(layer, x))


def test_store_weight_transposed_needs_no_copy():
    linear = nn.Linear(20, 30).requires_grad_(False)
    layer = SparseLinear.from_linear(linear, torch.full((20,), 0.5))
    x = torch.randn(1, 1, 20, generator=torch.Generator().manual_seed(9))
    before = _reference(layer, x)
    layer.store_weight_transposed()
    assert layer.weight is linear.weight  # still the shared parameter
    assert layer.weight_t().data_ptr() == layer.weight.data_ptr()  # a view, no second copy
    torch.testing.assert_close(_reference(layer, x), before)
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
    layer.to(torch.bfloat16)  # keeps the transposed strides
    assert layer.weight_t().data_ptr() == layer.weight.data_ptr()


@pytest.mark.skipif(not kernels.triton_available(), reason="triton is not installed")
def test_triton_kernel_under_the_cpu_interpreter():
    # The CUDA kernel's arithmetic, run by Triton's interpreter on CPU tensors (a fresh process: the interpreter
    # is chosen when the kernel is decorated, at import).
    script = textwrap.dedent(
        """
        import torch, torch.nn.functional as F
        from vp_lightning.sparsity import kernels
        gen = torch.Generator().manual_seed(0)
        for dtype in (torch.float32, torch.bfloat16):
            for bias in (True, False):
                for threshold in (torch.rand(300, generator=gen), torch.full((300,), float("inf"))):
                    w = torch.randn(70, 300, generator=gen).to(dtype)
                    b = torch.randn(70, generator=gen).to(dtype) if bias else None
                    x = torch.randn(300, generator=gen).to(dtype)
                    y = kernels.triton_masked_gemv(x, threshold, w.t().contiguous(), b, block_k=64, block_n=32)
                    masked = (x * (x.abs() > threshold)).double()
                    exact = F.linear(masked, w.double(), None if b is None else b.double())
                    tol = 1e-4 if dtype == torch.float32 else 1e-2 * (float(exact.abs().max()) + 1)
                    assert y.dtype == dtype and y.shape == (70,)
                    assert float((y.double() - exact).abs().max()) <= tol, (dtype, bias)
        print("ok")
        """
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def _sparse_tiny_llama():
    model = tiny_llama()
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(10))
    sites = projection_sites(model, LLAMA_LAYOUT)
    stats = ScoreStatistics.for_model(model, sites, [0.0], LogBins(num_bins=512))
    collect_statistics(model, stats, [ids])
    sparsify(model, build_plan(stats, sites, [0.5, 0.5], fixed_alpha(0.0), None, "tiny", 0.5))
    return model


def test_tiny_llama_greedy_decode_is_unchanged(counting):
    model = _sparse_tiny_llama()
    prompt = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(11))

    def generate(fast: bool) -> torch.Tensor:
        for _, layer in sparse_layers(model):
            layer.fast_decode = fast
        with torch.no_grad():
            return model.generate(
                prompt, do_sample=False, max_new_tokens=8, min_new_tokens=8, use_cache=True, pad_token_id=0
            )

    reference = generate(False)
    assert not counting
    fast = generate(True)
    layers = sum(1 for _ in sparse_layers(model))
    assert len(counting) == 7 * layers  # every projection of every cached decoding step after the prompt
    assert fast.shape == (1, 20)
    assert torch.equal(fast, reference)
