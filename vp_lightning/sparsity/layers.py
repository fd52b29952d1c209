"""Sparse linear layer and module swapping.

``SparseLinear`` keeps input channel j iff ``|x_j| > theta_j`` and multiplies only the kept channels with the
weight. The reference path below computes the masked product densely (exact same numbers as a kernel that
skips the dropped weight columns); it also counts how many input channels it dropped, so the realised
sparsity on any text can be measured.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vp_lightning.sparsity.errors import SparsityConfigError
from vp_lightning.sparsity.kernels import DensityGate, sparse_decode_linear
from vp_lightning.sparsity.plan import SparsityPlan


class SparseLinear(nn.Module):
    """``nn.Linear`` whose input channels are dropped below a per-channel threshold.

    Args:
        weight: (d_out, d_in) weight (shared with the linear layer it replaces, not copied).
        bias: optional (d_out,) bias.
        threshold: (d_in,) thresholds theta_j on |x_j|.

    Attributes:
        enabled: when False the layer is exactly the dense linear layer.
        track_sparsity: when True, ``dropped`` / ``seen`` count dropped and total input channels.
        dense_prefix: number of leading positions (second-to-last axis of the input) left dense; only
            meaningful for full-sequence forwards, not for cached one-token decoding.
        fast_decode: when True (default), a one-token input (one row of d_in features) that needs no gradient,
            no counting and no dense prefix takes :func:`~vp_lightning.sparsity.kernels.sparse_decode_linear`,
            which reads only the kept columns of the weight; False forces the reference path. Both give the same
            output up to floating-point summation order.

    Memory: the fast path reads the transposed weight ``W^T`` (d_in, d_out). Unless the weight parameter is
    stored transposed (:meth:`store_weight_transposed`, no extra memory), a contiguous copy of ``W^T`` is made
    on the first one-token forward and kept as a plain attribute (never in the state dict): one extra copy of
    the weight per layer. It is rebuilt when the weight changes (another tensor, dtype or device, or an in-place
    update visible to autograd's version counter); after writes through ``weight.data`` call
    :meth:`clear_weight_cache`.
    """

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, threshold: Tensor) -> None:
        super().__init__()
        if threshold.shape != (weight.shape[1],):
            raise ValueError(
                f"threshold must have shape ({weight.shape[1]},) = (in_features,), got {tuple(threshold.shape)}"
            )
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0]
        self.weight = weight
        self.bias = bias
        self.register_buffer("threshold", threshold.detach().float().to(weight.device).clone())
        self.register_buffer("dropped", torch.zeros((), dtype=torch.long, device=weight.device), persistent=False)
        self.register_buffer("seen", torch.zeros((), dtype=torch.long, device=weight.device), persistent=False)
        self.enabled = True
        self.track_sparsity = False
        self.dense_prefix = 0
        self.fast_decode = True
        self._weight_t: Tensor | None = None
        self._weight_t_key: tuple | None = None
        self._gate = DensityGate()

    @classmethod
    def from_linear(cls, linear: nn.Linear, threshold: Tensor) -> SparseLinear:
        """Wrap the parameters of ``linear`` (no copy) with the given thresholds."""
        return cls(linear.weight, linear.bias, threshold)

    def keep_mask(self, x: Tensor) -> Tensor:
        """Boolean (..., d_in) mask of the kept input channels of ``x`` (..., d_in)."""
        keep = x.abs() > self.threshold
        if self.dense_prefix > 0 and keep.dim() >= 2:
            keep[..., : self.dense_prefix, :] = True
        return keep

    def weight_t(self) -> Tensor:
        """The contiguous (d_in, d_out) transposed weight read by the fast path (a view or a cached copy)."""
        weight = self.weight
        version = -1 if weight.is_inference() else weight._version  # inference tensors have no version counter
        key = (weight.data_ptr(), version, weight.dtype, weight.device, weight.shape)
        if self._weight_t is not None and self._weight_t_key == key:
            return self._weight_t
        self._weight_t = None  # free a stale copy before building the new one
        transposed = weight.detach().t()
        self._weight_t = transposed if transposed.is_contiguous() else transposed.contiguous()
        self._weight_t_key = key
        return self._weight_t

    def clear_weight_cache(self) -> None:
        """Drop the cached transposed weight (it is rebuilt on the next one-token forward)."""
        self._weight_t = None
        self._weight_t_key = None

    def store_weight_transposed(self) -> None:
        """Re-lay the weight parameter in place as the transposed view of a contiguous (d_in, d_out) tensor.

        The parameter object (shared with the replaced ``nn.Linear``), its shape and values stay the same; only
        its strides change, so the fast path reads ``W^T`` without a second copy and the cache is dropped.
        Dense products accept the transposed layout, but code that needs a contiguous weight (e.g. writing it
        with safetensors) must call ``.contiguous()`` on it.
        """
        with torch.no_grad():
            self.weight.data = self.weight.detach().t().contiguous().t()
        self.clear_weight_cache()

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> SparseLinear:
        # .to(), .cuda(), .half(), ...: the cached copy would keep the old dtype/device
        self.clear_weight_cache()
        return super()._apply(fn, recurse)

    def _use_fast_path(self, x: Tensor, weight: Tensor) -> bool:
        """One token, same dtype/device as the weight, no counting, no dense prefix, no gradient needed."""
        if not self.fast_decode or self.track_sparsity or x.numel() != self.in_features:
            return False
        if x.shape[-1] != self.in_features or (self.dense_prefix > 0 and x.dim() >= 2):
            return False
        if x.dtype != weight.dtype or x.device != weight.device:
            return False
        if torch.is_grad_enabled():
            bias = self.bias
            return not (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
        return True

    def forward(self, x: Tensor) -> Tensor:
        # x: (..., d_in) -> (..., d_out)
        if not self.enabled:
            return F.linear(x, self.weight, self.bias)
        weight = self.weight
        if self._use_fast_path(x, weight):
            return sparse_decode_linear(x, self.threshold, self.weight_t(), self.bias, weight, self._gate)
        keep = self.keep_mask(x)
        if self.track_sparsity:
            counted = keep
            if self.dense_prefix > 0 and keep.dim() >= 2:
                counted = keep[..., self.dense_prefix :, :]
            self.dropped += counted.numel() - counted.sum()
            self.seen += counted.numel()
        return F.linear(x * keep, self.weight, self.bias)

    def reset_counters(self) -> None:
        self.dropped.zero_()
        self.seen.zero_()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def sparse_layers(model: nn.Module) -> Iterator[tuple[str, SparseLinear]]:
    """All ``SparseLinear`` modules of ``model`` with their qualified names."""
    for name, module in model.named_modules():
        if isinstance(module, SparseLinear):
            yield name, module


def _set_child(model: nn.Module, name: str, child: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, child)


def sparsify(model: nn.Module, plan: SparsityPlan) -> nn.Module:
    """Swap every ``nn.Linear`` named in ``plan`` for a :class:`SparseLinear` (in place).

    Layers that are already ``SparseLinear`` get the plan's thresholds and are enabled, so applying another
    plan to a sparsified model only swaps threshold vectors.

    Args:
        model: the model (e.g. a Hugging Face causal LM).
        plan: the sparsity plan; its layer names must exist in ``model``.

    Returns:
        ``model`` itself.
    """
    for name, layer in plan.layers.items():
        try:
            module = model.get_submodule(name)
        except AttributeError as error:
            raise SparsityConfigError(
                f"the plan names {name!r}, which this model does not have; was the plan calibrated for "
                f"{plan.model!r}?"
            ) from error
        if isinstance(module, SparseLinear):
            if module.threshold.shape != layer.threshold.shape:
                raise ValueError(f"{name}: plan threshold has shape {tuple(layer.threshold.shape)}, "
                                 f"layer expects ({module.in_features},)")
            module.threshold.copy_(layer.threshold)
            module.enabled = True
        elif isinstance(module, nn.Linear):
            _set_child(model, name, SparseLinear.from_linear(module, layer.threshold))
        else:
            raise TypeError(f"{name} is a {type(module).__name__}, expected nn.Linear")
    return model


def set_sparsity_enabled(model: nn.Module, enabled: bool, names: set[str] | None = None) -> None:
    """Enable or disable (dense) the sparse layers of ``model``, optionally only those in ``names``."""
    for name, layer in sparse_layers(model):
        if names is None or name in names:
            layer.enabled = enabled


def set_threshold(model: nn.Module, name: str, threshold: Tensor) -> None:
    """Replace the threshold vector of the sparse layer ``name``."""
    layer = model.get_submodule(name)
    if not isinstance(layer, SparseLinear):
        raise TypeError(f"{name} is not a SparseLinear; call sparsify(model, plan) first")
    layer.threshold.copy_(threshold)


def realised_sparsity(model: nn.Module) -> float:
    """Parameter-weighted fraction of input channels dropped since the counters were last reset.

    Every channel of a projection stands for one weight column, so a projection counts with weight d_out.
    """
    dropped = 0.0
    seen = 0.0
    for _, layer in sparse_layers(model):
        dropped += float(layer.dropped) * layer.out_features
        seen += float(layer.seen) * layer.out_features
    return dropped / seen if seen else 0.0
