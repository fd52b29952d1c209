"""The contract every quantizer follows (see the package README / docs)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@dataclass
class QuantizerOutput:
    """What every quantizer's ``forward`` returns.

    Attributes:
        quantized: ``(..., d)`` values the decoder receives; the gradient reaches the input ``z``.
        indices: ``(...,)`` int64 tokens in ``[0, codebook_size)``.
        loss: scalar auxiliary loss to add to the training loss (``0.`` where there is none).
        metrics: scalars worth logging (``accept_rate``, ``commitment``, ``norm_loss`` ...).
    """

    quantized: Tensor
    indices: Tensor
    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


@runtime_checkable
class Quantizer(Protocol):
    """Structural type of a quantizer: an ``nn.Module`` with these members."""

    dim: int
    codebook_size: int

    def __call__(self, z: Tensor) -> QuantizerOutput: ...

    def indices_to_codes(self, indices: Tensor) -> Tensor: ...


def fp32(z: Tensor) -> Tensor:
    """Quantizers compute in float32, also under bf16/fp16 autocast (bf16 rounds integers)."""
    return z.float()


def no_autocast(device_type: str):
    """Context that disables autocast for the quantizer's own math."""
    return torch.autocast(device_type=device_type, enabled=False)


def mixed_radix(level_indices: Tensor, levels: Tensor) -> Tensor:
    """Tokens from per-dimension level indices, first dimension least significant.

    Args:
        level_indices: ``(..., d)`` integers with ``0 <= level_indices[..., i] < levels[i]``.
        levels: ``(d,)`` integer levels.
    Returns:
        ``(...,)`` int64 tokens in ``[0, prod(levels))``.
    """
    basis = torch.cumprod(torch.cat([levels.new_ones(1), levels[:-1]]), dim=0)
    return (level_indices.long() * basis.long()).sum(-1)


def mixed_radix_digits(indices: Tensor, levels: Tensor) -> Tensor:
    """Inverse of :func:`mixed_radix`: ``(...,)`` tokens to ``(..., d)`` level indices."""
    basis = torch.cumprod(torch.cat([levels.new_ones(1), levels[:-1]]), dim=0).long()
    return (indices.long().unsqueeze(-1) // basis) % levels.long()
