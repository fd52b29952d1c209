"""Callbacks: token-usage logging, reconstruction samples, run summary (and codebook fitting for VP)."""

from vp_lightning.callbacks.audio_samples import AudioSamples
from vp_lightning.callbacks.codebook_fit import CodebookFitting
from vp_lightning.callbacks.consistency import RankConsistencyCheck
from vp_lightning.callbacks.image_samples import ReconstructionGrid
from vp_lightning.callbacks.summary import RunSummary
from vp_lightning.callbacks.token_usage import TokenUsageMonitor

__all__ = ["AudioSamples", "CodebookFitting", "RankConsistencyCheck", "ReconstructionGrid", "RunSummary", "TokenUsageMonitor"]
