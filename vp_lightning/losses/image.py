"""Image reconstruction loss: named L1 / L2 / LPIPS terms with weights from config."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from vp_lightning.losses.base import ReconstructionLoss
from vp_lightning.losses.perceptual import LPIPS


class ImageReconstructionLoss(ReconstructionLoss):
    """``l1 * |x̂ - x| + l2 * (x̂ - x)² + lpips * LPIPS(x̂, x)`` (paper: L1 + LPIPS, no GAN).

    Args:
        l1: weight of the mean absolute error.
        l2: weight of the mean squared error.
        lpips: weight of the LPIPS term (0 disables it and never loads weights).
        lpips_net: LPIPS trunk, ``"alex"`` or ``"vgg"``.
        lpips_weights: ``"hub"`` (torch hub cache), a file path, or ``"random"`` (tests only).
    """

    def __init__(
        self, l1: float = 1.0, l2: float = 0.0, lpips: float = 0.0, lpips_net: str = "alex", lpips_weights: str = "hub"
    ):
        super().__init__()
        for name, weight in {"l1": l1, "l2": l2, "lpips": lpips}.items():
            if weight < 0:
                raise ValueError(f"loss weight {name} must be >= 0, got {weight}")
        self.weights = {name: w for name, w in {"l1": l1, "l2": l2, "lpips": lpips}.items() if w > 0}
        if not self.weights:
            raise ValueError("ImageReconstructionLoss needs at least one positive weight (l1, l2 or lpips)")
        self.perceptual = LPIPS(lpips_net, lpips_weights) if lpips > 0 else None

    def forward(self, x_hat: Tensor, x: Tensor, mask: Tensor | None = None) -> dict[str, Tensor]:
        terms: dict[str, Tensor] = {}
        if "l1" in self.weights:
            terms["l1"] = F.l1_loss(x_hat, x)
        if "l2" in self.weights:
            terms["l2"] = F.mse_loss(x_hat, x)
        if self.perceptual is not None:
            terms["lpips"] = self.perceptual(x_hat, x).mean()
        return terms
