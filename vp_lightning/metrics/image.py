"""Image quality of reconstructions: PSNR, SSIM and (optionally) LPIPS, averaged per image across ranks."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from vp_lightning.losses.perceptual import LPIPS


class ImageQuality(Metric):
    """Mean per-image PSNR (dB), SSIM and LPIPS of reconstructions of images in [-1, 1].

    States are sums over images plus a count (``dist_reduce_fx="sum"``), so a 2-process run reports the mean over
    exactly the same images as a 1-process run.

    Args:
        lpips: also compute LPIPS (needs trunk weights, see ``lpips_weights``).
        lpips_net: ``"alex"`` or ``"vgg"``.
        lpips_weights: ``"hub"``, a file path, or ``"random"`` (tests only).
    """

    full_state_update = False

    def __init__(self, lpips: bool = False, lpips_net: str = "alex", lpips_weights: str = "hub", **kwargs):
        super().__init__(**kwargs)
        self.perceptual = LPIPS(lpips_net, lpips_weights) if lpips else None
        names = ["psnr", "ssim"] + (["lpips"] if lpips else [])
        self.names = names
        for name in names:
            self.add_state(f"sum_{name}", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, x_hat: Tensor, x: Tensor, mask: Tensor | None = None) -> None:
        """x_hat, x: (b, c, h, w) in [-1, 1]. ``mask`` is accepted for interface symmetry and must be None."""
        if mask is not None:
            raise ValueError("ImageQuality does not support masks (images are not padded)")
        x_hat = x_hat.float().clamp(-1, 1)
        x = x.float()
        psnr = peak_signal_noise_ratio(x_hat, x, data_range=(-1.0, 1.0), reduction="none", dim=(1, 2, 3))
        ssim = structural_similarity_index_measure(x_hat, x, data_range=(-1.0, 1.0), reduction="none")
        self.sum_psnr += psnr.double().sum()
        self.sum_ssim += ssim.double().sum()
        if self.perceptual is not None:
            self.sum_lpips += self.perceptual(x_hat, x).double().sum()
        self.count += x.shape[0]

    def compute(self) -> dict[str, Tensor]:
        count = self.count.clamp_min(1).double()
        return {name: (getattr(self, f"sum_{name}") / count).float() for name in self.names}
