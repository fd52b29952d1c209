"""Decode-time kernels for activation-sparse linear layers (one token at a time).

With one input row, a linear layer is a matrix-vector product whose cost is reading the weight. An input channel
j that is dropped (``|x_j| <= theta_j``) multiplies weight column ``W[:, j]`` by zero, so that column need never
be read. Reading columns of the row-major (d_out, d_in) weight is strided, so these kernels work on the
transposed weight ``W^T`` (d_in, d_out) stored contiguously, where the column of channel j is the contiguous row
``W^T[j]``; the product is then ``y = sum over kept j of x_j * W^T[j] (+ bias)``.

CPU (:func:`gather_gemv`): ``torch.embedding_bag`` in ``"sum"`` mode with the kept channel indices as one bag and
the kept activations as per-sample weights computes exactly that sum in one fused call, reading only the kept
rows and never materialising them. Measured at d_out=4096, d_in=14336 on one thread of an AVX-512 Xeon, it
beat (a) ``index_select`` of the kept rows followed by a vector-matrix product (the gathered copy costs more than
it saves: 4-5x slower than dense), (b) the same in L2-sized chunks into a reused buffer (no faster than dense
at 50 % sparsity) and (c) ``torch.compile`` of the gather-multiply-sum (tens of times slower). Visiting the kept
rows in four interleaved streams instead of in index order keeps more memory requests in flight and is
measurably faster, mostly in bfloat16. The reduced-precision gather is faster than the dense product already
at low sparsity (for bfloat16 even without sparsity, as torch's dense bfloat16 matrix-vector product on CPU is
slow); in float32 the gather only pays off above about 40 % dropped channels, so :func:`sparse_decode_linear`
falls back to the masked dense product above the per-dtype kept fraction in :data:`CPU_GATHER_MAX_DENSITY`.

CUDA (:func:`triton_masked_gemv`): a small Triton kernel computes the masked product straight from ``x``, the
thresholds and ``W^T``: every program owns a block of outputs, walks the input channels in tiles, evaluates the
keep mask in registers and loads only the kept rows of its ``W^T`` tile (masked loads issue no memory traffic
for dropped rows). It needs no index list, hence no host synchronisation. It has not been run on a GPU: the
machine this was written on has none. Its arithmetic is checked against the reference under Triton's CPU
interpreter (``TRITON_INTERPRET=1``) by the tests; block sizes are untuned. Without Triton, CUDA tensors take
the gather path.

Memory: the layer keeps ``W^T`` besides ``W``, i.e. one extra copy of every sparsified weight, unless the weight
parameter itself is stored transposed (see ``SparseLinear.store_weight_transposed``), in which case ``W^T`` is
a free view.
"""

from __future__ import annotations

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
# (medians at d_out=4096, d_in=14336, one thread): above it the masked dense product is used instead.
CPU_GATHER_MAX_DENSITY: dict[torch.dtype, float] = {
    torch.float32: 0.6,
    torch.float16: 0.85,
    torch.bfloat16: 1.0,
}
# Interleave the kept rows into this many streams when there are at least GATHER_INTERLEAVE_MIN of them.
GATHER_STREAMS = 4
GATHER_INTERLEAVE_MIN = 256


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
    if streams <= 1 or n < max(GATHER_INTERLEAVE_MIN, streams):
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
                weight_t_ptr + rows[:, None] * d_out + cols[None, :],
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

    Accumulates in float32. Not run on a GPU so far (see the module docstring); without Triton it raises.

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


def sparse_decode_linear(
    x: Tensor, threshold: Tensor, weight_t: Tensor, bias: Tensor | None = None, weight: Tensor | None = None
) -> Tensor:
    """Activation-sparse linear layer for one token: ``F.linear(x * (|x| > threshold), W, bias)``.

    Dispatch: CUDA tensors with Triton available use :func:`triton_masked_gemv`; otherwise the kept channels are
    listed and :func:`gather_gemv` reads only their rows of ``weight_t``, except on CPU when the kept fraction
    exceeds :data:`CPU_GATHER_MAX_DENSITY` for the dtype, where the masked dense product is faster.

    Args:
        x: (..., d_in) input holding exactly one row (``x.numel() == d_in``), same dtype and device as the weight.
        threshold: (d_in,) thresholds on ``|x|``.
        weight_t: (d_in, d_out) contiguous transposed weight.
        bias: optional (d_out,) bias.
        weight: the (d_out, d_in) weight for the dense fallback (default: the view ``weight_t.t()``).

    Returns:
        (..., d_out) output, equal to the reference product up to floating-point summation order.
    """
    d_in, d_out = weight_t.shape
    if x.numel() != d_in:
        raise ValueError(f"sparse_decode_linear takes one row of {d_in} features, got shape {tuple(x.shape)}")
    out_shape = (*x.shape[:-1], d_out)
    row = x.reshape(-1)
    if row.is_cuda and triton is not None:
        return triton_masked_gemv(row, threshold, weight_t, bias).view(out_shape)
    keep = row.abs() > threshold
    idx = torch.nonzero(keep).view(-1)
    if row.device.type == "cpu" and idx.numel() > CPU_GATHER_MAX_DENSITY.get(row.dtype, 1.0) * d_in:
        dense = weight if weight is not None else weight_t.t()
        return F.linear(row * keep, dense, bias).view(out_shape)
    return gather_gemv(row, idx, weight_t, bias).view(out_shape)
