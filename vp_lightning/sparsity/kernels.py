"""Decode-time kernels for activation-sparse linear layers (one token at a time).

With one input row, a linear layer is a matrix-vector product whose cost is reading the weight. An input channel
j that is dropped (``|x_j| <= theta_j``) multiplies weight column ``W[:, j]`` by zero, so that column need never
be read. Reading columns of the row-major (d_out, d_in) weight is strided, so these kernels work on the
transposed weight ``W^T`` (d_in, d_out) stored contiguously, where the column of channel j is the contiguous row
``W^T[j]``; the product is then ``y = sum over kept j of x_j * W^T[j] (+ bias)``.

CPU (:func:`gather_gemv`): ``torch.embedding_bag`` in ``"sum"`` mode with the kept channel indices as one bag and
the kept activations as per-sample weights computes exactly that sum in one fused call, reading only the kept
rows and never materialising them. Measured at d_out=4096, d_in=14336 on one thread of an AVX-512 Xeon, it beat
(a) ``index_select`` of the kept rows followed by a vector-matrix product (the gathered copy costs more than it
saves: 4-5x slower than dense), (b) the same in L2-sized chunks into a reused buffer (slower than the fused
call) and (c) ``torch.compile`` of the gather-multiply-sum (tens of times slower than dense). Visiting the kept
rows in four interleaved streams instead of in index order keeps more memory requests in flight and is slightly
faster for long rows (8 KB and more). With the weights coming from memory, the gather reads about 7-9 GB/s on
one core, against about 15 GB/s for the dense float32 product (MKL) but only about 6 GB/s for torch's dense
bfloat16 product on CPU. So the bfloat16 gather is faster than the dense product even without sparsity, float16
above about 25 % dropped channels, float32 only above about 45 % (about 1.1x at 50 %);
:func:`sparse_decode_linear` uses the masked dense product when the kept fraction exceeds
:data:`CPU_GATHER_MAX_DENSITY` for the dtype.

CUDA (:func:`triton_masked_gemv`): a small Triton kernel computes the masked product straight from ``x``, the
thresholds and ``W^T``: every program owns a block of outputs, walks the input channels in tiles, evaluates the
keep mask in registers and loads only the kept rows of its ``W^T`` tile (a masked load does not fetch the dropped
rows). It needs no index list, hence no host synchronisation. It has not been run on a GPU so far, and neither
its speed nor its block sizes are measured; its arithmetic is checked against the reference under Triton's CPU
interpreter (``TRITON_INTERPRET=1``) by the tests. Without Triton, CUDA tensors take the gather path.

Memory: the layer keeps ``W^T`` besides ``W``, i.e. one extra copy of every sparsified weight, unless the weight
parameter itself is stored transposed (see ``SparseLinear.store_weight_transposed``), in which case ``W^T`` is
a free view.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # Triton ships with CUDA builds of torch; the CPU path never needs it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None
    tl = None

# Largest fraction of kept input channels at which the CPU gather beats the dense product, per weight dtype
# (medians at d_out=4096, d_in=14336, one thread, weights read from memory): above it the masked dense product
# is used instead. Other dtypes always gather.
CPU_GATHER_MAX_DENSITY: dict[torch.dtype, float] = {
    torch.float32: 0.55,
    torch.float16: 0.8,
    torch.bfloat16: 1.0,
}
# Visit the kept rows in this many interleaved streams when rows are at least GATHER_INTERLEAVE_ROW_BYTES long
# (measured: faster for 8-16 KB rows, slightly slower for the 2-6 KB rows of a 135M model).
GATHER_STREAMS = 4
GATHER_INTERLEAVE_ROW_BYTES = 8192


def triton_available() -> bool:
    """True when Triton is importable (the fused kernel still needs CUDA tensors, or ``TRITON_INTERPRET=1``)."""
    return triton is not None


def keep_indices(x: Tensor, threshold: Tensor) -> Tensor:
    """Indices (int64, ascending) of the kept channels of a one-row input: ``|x_j| > threshold_j``.

    Args:
        x: (d_in,) activations.
        threshold: (d_in,) thresholds (any float dtype; compared after type promotion, as in ``SparseLinear``).
    """
    return torch.nonzero(x.abs() > threshold).view(-1)


def _interleave(idx: Tensor, streams: int) -> Tensor:
    """Reorder ``idx`` as ``a0, b0, c0, d0, a1, b1, ...`` for ``streams`` equal consecutive parts a, b, c, d."""
    n = idx.numel()
    if streams <= 1 or n < 2 * streams:
        return idx
    body = n - n % streams
    order = idx[:body].view(streams, -1).t().reshape(-1)
    return torch.cat((order, idx[body:])) if body < n else order


_OFFSETS: dict[torch.device, Tensor] = {}


def _zero_offsets(device: torch.device) -> Tensor:
    offsets = _OFFSETS.get(device)
    if offsets is None:
        offsets = _OFFSETS[device] = torch.zeros(1, dtype=torch.long, device=device)
    return offsets


def gather_gemv(x: Tensor, idx: Tensor, weight_t: Tensor, bias: Tensor | None = None) -> Tensor:
    """``y = x[idx] @ weight_t[idx] + bias``, reading only the rows ``idx`` of ``weight_t``.

    Args:
        x: (d_in,) activations, same dtype as ``weight_t``.
        idx: (k,) int64 indices of the kept channels (any order; k may be 0).
        weight_t: (d_in, d_out) contiguous transposed weight.
        bias: optional (d_out,) bias.

    Returns:
        (d_out,) output in the dtype of ``weight_t``.
    """
    if idx.numel() == 0:
        y = weight_t.new_zeros(weight_t.shape[1])
    else:
        if weight_t.shape[1] * weight_t.element_size() >= GATHER_INTERLEAVE_ROW_BYTES:
            idx = _interleave(idx, GATHER_STREAMS)
        # aten call without F.embedding_bag's argument checks; one bag starting at offset 0, mode 0 = sum
        offsets = _zero_offsets(idx.device)
        y = torch.embedding_bag(weight_t, idx, offsets, False, 0, False, x.index_select(0, idx))[0].view(-1)
    if bias is not None:
        y = y.add_(bias)
    return y


if triton is not None:

    @triton.jit
    def _masked_gemv_kernel(
        x_ptr,
        threshold_ptr,
        weight_t_ptr,
        bias_ptr,
        y_ptr,
        d_in,
        d_out,
        HAS_BIAS: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        # one program: outputs [pid * BLOCK_N, (pid + 1) * BLOCK_N), all input channels in tiles of BLOCK_K
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < d_out
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, d_in, BLOCK_K):
            rows = k0 + tl.arange(0, BLOCK_K)
            row_ok = rows < d_in
            x = tl.load(x_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
            theta = tl.load(threshold_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
            keep = (tl.abs(x) > theta) & row_ok
            # dropped rows are masked out of the load: their weights are never read
            w = tl.load(
                weight_t_ptr + rows.to(tl.int64)[:, None] * d_out + cols[None, :],  # int64: no overflow past 2^31
                mask=keep[:, None] & col_ok[None, :],
                other=0.0,
            )
            acc += tl.sum(w.to(tl.float32) * tl.where(keep, x, 0.0)[:, None], axis=0)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + cols, acc.to(y_ptr.dtype.element_ty), mask=col_ok)


def triton_masked_gemv(
    x: Tensor, threshold: Tensor, weight_t: Tensor, bias: Tensor | None = None, block_k: int = 128, block_n: int = 32
) -> Tensor:
    """Fused masked GEMV ``y = (x * (|x| > threshold)) @ weight_t + bias`` as one Triton kernel.

    Accumulates in float32. Not run on a GPU so far, only under Triton's CPU interpreter (see the module
    docstring); without Triton it raises.

    Args:
        x: (d_in,) activations, same dtype and device as ``weight_t``.
        threshold: (d_in,) thresholds.
        weight_t: (d_in, d_out) contiguous transposed weight.
        bias: optional (d_out,) bias.
        block_k: input channels per tile (power of two).
        block_n: outputs per program (power of two).

    Returns:
        (d_out,) output in the dtype of ``weight_t``.
    """
    if triton is None:
        raise RuntimeError("triton_masked_gemv needs Triton; use gather_gemv instead")
    d_in, d_out = weight_t.shape
    x = x.reshape(-1).contiguous()
    threshold = threshold.to(device=x.device, dtype=torch.float32).contiguous()
    weight_t = weight_t.contiguous()
    y = torch.empty(d_out, dtype=weight_t.dtype, device=weight_t.device)
    grid = (triton.cdiv(d_out, block_n),)
    with torch.cuda.device(y.device) if y.is_cuda else contextlib.nullcontext():  # launch on the tensors' GPU
        _masked_gemv_kernel[grid](
            x,
            threshold,
            weight_t,
            bias if bias is not None else y,  # unused when HAS_BIAS is False
            y,
            d_in,
            d_out,
            HAS_BIAS=bias is not None,
            BLOCK_K=block_k,
            BLOCK_N=block_n,
        )
    return y


@dataclass
class DensityGate:
    """Per-layer memory of whether the CPU gather pays off for the layer's one-token inputs.

    Deciding needs the number of kept channels, i.e. one more tensor operation, and at decode time every
    operation on a small layer costs time comparable to its product. The gather lists the kept channels anyway,
    so it re-decides for free; once the masked dense product is chosen, the count is taken again only every
    ``recheck`` calls, or at once when the threshold vector was changed in place (its version counter moved).
    The choice only affects speed: both products give the reference result.

    Attributes:
        recheck: calls between two counts while the dense product is chosen.
        dense: whether the masked dense product is currently chosen.
        calls: one-token calls since the dense product was chosen.
        threshold_version: version counter of the threshold vector at the last count.
    """

    recheck: int = 32
    dense: bool = False
    calls: int = 0
    threshold_version: int = -1


def sparse_decode_linear(
    x: Tensor,
    threshold: Tensor,
    weight_t: Tensor,
    bias: Tensor | None = None,
    weight: Tensor | None = None,
    gate: DensityGate | None = None,
) -> Tensor:
    """Activation-sparse linear layer for one token: ``F.linear(x * (|x| > threshold), W, bias)``.

    Dispatch: CUDA tensors with Triton available use :func:`triton_masked_gemv`; otherwise the kept channels are
    listed and :func:`gather_gemv` reads only their rows of ``weight_t``, except on CPU when the kept fraction
    exceeds :data:`CPU_GATHER_MAX_DENSITY` for the dtype, where the masked dense product (the reference
    computation) is faster.

    Args:
        x: (..., d_in) input holding exactly one row (``x.numel() == d_in``), same dtype and device as the weight.
        threshold: (d_in,) thresholds on ``|x|``.
        weight_t: (d_in, d_out) contiguous transposed weight.
        bias: optional (d_out,) bias.
        weight: the (d_out, d_in) weight for the dense product (default: the view ``weight_t.t()``).
        gate: the calling layer's :class:`DensityGate`, to skip counting kept channels on most calls while the
            dense product is chosen; None counts on every call.

    Returns:
        (..., d_out) output, equal to the reference product up to floating-point summation order.
    """
    d_in, d_out = weight_t.shape
    if x.numel() != d_in:
        raise ValueError(f"sparse_decode_linear takes one row of {d_in} features, got shape {tuple(x.shape)}")
    if x.is_cuda and triton is not None:
        return triton_masked_gemv(x, threshold, weight_t, bias).view(*x.shape[:-1], d_out)
    keep = x.abs() > threshold
    limit = CPU_GATHER_MAX_DENSITY.get(x.dtype, 1.0) if x.device.type == "cpu" else 1.0
    version = -1 if gate is None or threshold.is_inference() else threshold._version
    if limit < 1.0 and gate is not None and gate.dense and version == gate.threshold_version:
        gate.calls += 1
        if gate.calls % gate.recheck:
            return F.linear(x * keep, weight if weight is not None else weight_t.t(), bias)
    idx = keep.view(-1).nonzero().view(-1)
    if limit < 1.0:
        dense = idx.numel() > limit * d_in
        if gate is not None:
            if dense != gate.dense:
                gate.dense, gate.calls = dense, 0
            gate.threshold_version = version
        if dense:
            return F.linear(x * keep, weight if weight is not None else weight_t.t(), bias)
    return gather_gemv(x.reshape(-1), idx, weight_t, bias).view(*x.shape[:-1], d_out)
