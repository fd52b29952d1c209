"""Callbacks: token-usage logging, reconstruction samples, run summary (and codebook fitting for VP)."""

from vp_lightning.callbacks.consistency import RankConsistencyCheck
from vp_lightning.callbacks.image_samples import ReconstructionGrid
from vp_lightning.callbacks.summary import RunSummary
from vp_lightning.callbacks.token_usage import TokenUsageMonitor

__all__ = ["RankConsistencyCheck", "ReconstructionGrid", "RunSummary", "TokenUsageMonitor"]
