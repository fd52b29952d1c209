"""Finite Scalar Quantization (Mentzer et al. 2023), wrapping ``vector_quantize_pytorch.FSQ``."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from vector_quantize_pytorch import FSQ as _LibFSQ

from vp_lightning.quantizers.base import QuantizerOutput, no_autocast


class FSQ(nn.Module):
    """FSQ over ``len(levels)`` dimensions; K = prod(levels).

    Args:
        levels: levels L_i per dimension, e.g. ``[8, 5, 5, 5]`` for K = 1000.
        symmetric: symmetry-preserving bound (library ``preserve_symmetry``), as in the paper's FSQ baseline.
        noise_rate: per-element probability of replacing rounding by uniform noise in training (library
            ``noise_dropout``); needs ``symmetric=True``. The paper's baseline uses 0.5.
    """

    def __init__(self, levels: list[int], symmetric: bool = False, noise_rate: float = 0.0):
        super().__init__()
        levels = [int(level) for level in levels]
        if len(levels) == 0 or any(level < 2 for level in levels):
            raise ValueError(f"FSQ levels must be a non-empty list of integers >= 2, got {levels}")
        if any(level == 2 for level in levels) and not symmetric:
            raise ValueError(f"FSQ levels {levels} contain 2: set symmetric=True (asymmetric bound needs L >= 3)")
        if not 0.0 <= noise_rate <= 1.0:
            raise ValueError(f"FSQ noise_rate must lie in [0, 1], got {noise_rate}")
        if noise_rate > 0 and not symmetric:
            raise ValueError("FSQ noise_rate > 0 needs symmetric=True (noise injection is defined on that grid)")
        self.levels = levels
        self.dim = len(levels)
        self.codebook_size = math.prod(levels)
        self.fsq = _LibFSQ(levels=levels, preserve_symmetry=symmetric, noise_dropout=noise_rate)

    def forward(self, z: Tensor) -> QuantizerOutput:
        """z: (..., d) -> quantized (..., d) in [-1, 1], indices (...,)."""
        if z.shape[-1] != self.dim:
            raise ValueError(f"FSQ with levels {self.levels} expects last dim {self.dim}, got {tuple(z.shape)}")
        with no_autocast(z.device.type):
            zf = z.float().reshape(1, -1, self.dim)  # (1, n, d): the library treats ndim >= 4 as images
            quantized, indices = self.fsq(zf)
        return QuantizerOutput(
            quantized=quantized.reshape(z.shape),
            indices=indices.reshape(z.shape[:-1]).long(),
            loss=torch.zeros((), device=z.device),
        )

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        flat = indices.reshape(1, -1).long()
        return self.fsq.indices_to_codes(flat).reshape(*indices.shape, self.dim)
