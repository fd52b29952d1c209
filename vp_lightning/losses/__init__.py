"""Reconstruction losses: named raw terms plus weights; the model sums them in one place."""

from vp_lightning.losses.audio import AudioReconstructionLoss
from vp_lightning.losses.base import ReconstructionLoss
from vp_lightning.losses.image import ImageReconstructionLoss
from vp_lightning.losses.perceptual import LPIPS, MissingWeightsError

__all__ = ["AudioReconstructionLoss", "ImageReconstructionLoss", "LPIPS", "MissingWeightsError", "ReconstructionLoss"]
