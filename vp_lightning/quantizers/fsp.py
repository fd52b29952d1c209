"""FSP, Finite Scalar Perturbation (VP-VAE paper): FSQ's per-dimension grid, trained with matched uniform noise.

Each scalar of the bottleneck ``a`` is bounded to ``u = g(a) in (0, 1)`` by a CDF-shaped activation ``g``. The
code is the centre of one of ``L`` equal cells, ``q = (l + 1/2) / L`` (the Lloyd-Max points of a uniform source,
unlike FSQ whose grid reaches the interval ends). In training, each element is either that centre
(straight-through) or a perturbed ``u' = u + ε``, ``ε ~ U(-η/2L, η/2L)``: with ``η = 1`` the noise has exactly
the width of the rounding error. A moment loss keeps ``g(a)`` near uniform so every level is used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from vp_lightning.quantizers.base import QuantizerOutput, fp32, mixed_radix, mixed_radix_digits, no_autocast

ACTIVATIONS = ("tanh", "sigmoid", "normal", "laplace")
DECODER_INPUTS = ("affine", "inverse")

# Variance of the pre-activation for which g(a) is exactly uniform: g is then the CDF of a's distribution.
# tanh: (tanh(a) + 1)/2 = sigmoid(2a) is the CDF of a logistic with scale 1/2; sigmoid: logistic, scale 1;
# normal: Φ; laplace: Laplace(0, 1) CDF.
TARGET_VARIANCE = {"tanh": math.pi**2 / 12, "sigmoid": math.pi**2 / 3, "normal": 1.0, "laplace": 2.0}


def bound(a: Tensor, activation: str) -> Tensor:
    """``u = g(a)`` in ``[0, 1]`` (step 1)."""
    if activation == "tanh":
        return (torch.tanh(a) + 1) / 2
    if activation == "sigmoid":
        return torch.sigmoid(a)
    if activation == "normal":
        return 0.5 * (1 + torch.erf(a / math.sqrt(2)))
    if activation == "laplace":
        # Two branches evaluated on |a| so neither exp overflows.
        half_tail = 0.5 * torch.exp(-a.abs())
        return torch.where(a < 0, half_tail, 1 - half_tail)
    raise ValueError(f"unknown FSP activation {activation!r}; choose one of {ACTIVATIONS}")


def unbound(u: Tensor, activation: str) -> Tensor:
    """``g^{-1}(u)`` for ``u`` in ``(0, 1)``: the inverse of :func:`bound`."""
    if activation == "tanh":
        return torch.atanh(2 * u - 1)
    if activation == "sigmoid":
        return torch.logit(u)
    if activation == "normal":
        return math.sqrt(2) * torch.erfinv(2 * u - 1)
    if activation == "laplace":
        return torch.where(u < 0.5, torch.log(2 * u), -torch.log(2 - 2 * u))
    raise ValueError(f"unknown FSP activation {activation!r}; choose one of {ACTIVATIONS}")


def level_index(u: Tensor, levels: Tensor) -> Tensor:
    """Cell of ``u`` in ``[0, 1]``: ``clamp(floor(L·u), 0, L-1)`` per dimension (step 2); int64."""
    return torch.clamp(torch.floor(u * levels), min=0).long().minimum(levels.long() - 1)


def centroid(level: Tensor, levels: Tensor) -> Tensor:
    """Cell centre ``(l + 1/2) / L``."""
    return (level.float() + 0.5) / levels


def perturb(u: Tensor, noise: Tensor, eta: float, levels: Tensor) -> tuple[Tensor, Tensor]:
    """Uniform perturbation with a support check (step 3).

    Args:
        u: ``(..., d)`` bounded values.
        noise: ``(..., d)`` draws from ``U[0, 1)``; ``ε = (noise - 1/2)·η/L``.
        eta: perturbation scale η.
        levels: ``(d,)`` levels L.
    Returns:
        ``(value, accepted)``: ``u + ε`` where ``0 < u + ε < 1`` and ``u`` elsewhere; the bool acceptance mask.
    """
    proposal = u + (noise - 0.5) * eta / levels
    accepted = (proposal > 0) & (proposal < 1)
    return torch.where(accepted, proposal, u), accepted


def decoder_value(v: Tensor, mode: str, activation: str, eps: float = 1e-6) -> Tensor:
    """What the decoder receives (step 5): ``(v - 1/2)·√12`` (``"affine"``) or ``g^{-1}(v)`` (``"inverse"``)."""
    if mode == "affine":
        return (v - 0.5) * math.sqrt(12)
    if mode == "inverse":
        return unbound(v.clamp(eps, 1 - eps), activation)
    raise ValueError(f"unknown FSP decoder_input {mode!r}; choose one of {DECODER_INPUTS}")


def moment_loss(a: Tensor, target_variance: float, weights: tuple[float, float]) -> tuple[Tensor, Tensor, Tensor]:
    """``λ1·mean_j(μ_j²) + λ2·mean_j((σ²_j - σ²_g)²)`` over the tokens of ``a``: ``(n, d)``.

    Batch statistics per dimension ``j`` (population variance). Shared by FSP and VP (``σ²_g = 1`` there).

    Returns:
        ``(loss, mean_term, variance_term)``, the last two unweighted.
    """
    mean = a.mean(dim=0)  # (d,)
    var = a.var(dim=0, correction=0) if a.shape[0] > 0 else torch.zeros_like(mean)
    mean_term = mean.square().mean()
    var_term = (var - target_variance).square().mean()
    return weights[0] * mean_term + weights[1] * var_term, mean_term, var_term


class FSP(nn.Module):
    """Finite Scalar Perturbation over ``len(levels)`` dimensions; K = prod(levels).

    Args:
        levels: levels L_i per dimension, each >= 2, e.g. ``[8, 5, 5, 5]`` (K = 1000).
        eta: perturbation scale η > 0 (1 = the width of a cell; the parameter an η sweep varies).
        quantize_rate: per-element probability, in training, of using the quantized centre instead of the
            perturbed value.
        activation: bound ``g``: ``"tanh"``, ``"sigmoid"``, ``"normal"`` (Φ) or ``"laplace"`` (Laplace CDF).
        decoder_input: ``"affine"`` (``(v - 1/2)·√12``, zero mean and unit variance for uniform ``v``) or
            ``"inverse"`` (``g^{-1}(v)``).
        norm_weights: ``(λ1, λ2)`` of the moment loss; ``(0, 0)`` disables it.
        eps: margin keeping ``u`` and ``g^{-1}`` inputs off the interval ends.
    """

    def __init__(
        self,
        levels: Sequence[int],
        eta: float = 1.0,
        quantize_rate: float = 0.5,
        activation: str = "tanh",
        decoder_input: str = "affine",
        norm_weights: tuple[float, float] = (0.1, 0.07),
        eps: float = 1e-6,
    ):
        super().__init__()
        levels = [int(level) for level in levels]
        if len(levels) == 0 or any(level < 2 for level in levels):
            raise ValueError(f"FSP levels must be a non-empty list of integers >= 2, got {levels}")
        if not eta > 0:
            raise ValueError(f"FSP eta must be > 0, got {eta}")
        if not 0.0 <= quantize_rate <= 1.0:
            raise ValueError(f"FSP quantize_rate must lie in [0, 1], got {quantize_rate}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown FSP activation {activation!r}; choose one of {ACTIVATIONS}")
        if decoder_input not in DECODER_INPUTS:
            raise ValueError(f"unknown FSP decoder_input {decoder_input!r}; choose one of {DECODER_INPUTS}")
        if len(norm_weights) != 2 or min(norm_weights) < 0:
            raise ValueError(f"FSP norm_weights must be two non-negative numbers, got {norm_weights}")
        self.levels = levels
        self.dim = len(levels)
        self.codebook_size = math.prod(levels)
        self.eta = float(eta)
        self.quantize_rate = float(quantize_rate)
        self.activation = activation
        self.decoder_input = decoder_input
        self.norm_weights = (float(norm_weights[0]), float(norm_weights[1]))
        self.eps = float(eps)
        self.register_buffer("_levels", torch.tensor(levels, dtype=torch.float32), persistent=False)

    def forward(self, z: Tensor) -> QuantizerOutput:
        """z: (..., d) pre-activation -> decoder values (..., d), tokens (...,)."""
        if z.shape[-1] != self.dim:
            raise ValueError(f"FSP with levels {self.levels} expects last dim {self.dim}, got {tuple(z.shape)}")
        with no_autocast(z.device.type):
            a = fp32(z)  # (..., d)
            u = bound(a, self.activation)
            level = level_index(u, self._levels)  # (..., d); u = 1 falls in the last cell
            # Written as q + (u - sg(u)) so the value is exactly the centre (indices_to_codes matches bitwise)
            # while the gradient is the identity in u.
            q_ste = centroid(level, self._levels) + (u - u.detach())
            metrics: dict[str, Tensor] = {}
            if self.training:
                perturbed, accepted = perturb(u, torch.rand_like(u), self.eta, self._levels)
                use_centre = torch.rand_like(u) < self.quantize_rate
                value = torch.where(use_centre, q_ste, perturbed)
                metrics["accept_rate"] = accepted.float().mean()
            else:
                value = q_ste
            loss, _, _ = moment_loss(
                a.reshape(-1, self.dim), TARGET_VARIANCE[self.activation], self.norm_weights
            )
            metrics["norm_loss"] = loss.detach()
            quantized = decoder_value(value, self.decoder_input, self.activation, self.eps)
            indices = mixed_radix(level, self._levels.long())
        return QuantizerOutput(quantized=quantized, indices=indices, loss=loss, metrics=metrics)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """(...,) tokens -> (..., d) decoder values of the cell centres."""
        level = mixed_radix_digits(indices, self._levels.long())
        return decoder_value(centroid(level, self._levels), self.decoder_input, self.activation, self.eps)


__all__ = ["ACTIVATIONS", "DECODER_INPUTS", "FSP", "TARGET_VARIANCE", "bound", "centroid", "decoder_value",
           "level_index", "moment_loss", "perturb", "unbound"]
