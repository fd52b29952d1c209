"""torchmetrics for tokenizers: token usage and reconstruction quality."""

from vp_lightning.metrics.audio import AudioQuality
from vp_lightning.metrics.image import ImageQuality
from vp_lightning.metrics.token_usage import TokenUsage, usage_statistics

__all__ = ["AudioQuality", "ImageQuality", "TokenUsage", "usage_statistics"]
