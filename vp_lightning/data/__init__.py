"""DataModules that read datasets already on disk, with embedded real-data defaults and bad-input accounting."""

from vp_lightning.data.bad_input import (
    BadInputTally,
    SharedSkipFlags,
    SkippingFileDataset,
    TooManyBadFilesError,
)
from vp_lightning.data.embedded_audio import EspeakNotFoundError, build_embedded_librispeech
from vp_lightning.data.embedded_images import build_embedded_photos
from vp_lightning.data.image import (
    DatasetLayoutError,
    ImageFiles,
    ImageNetDataModule,
    UnpaddedDistributedSampler,
)
from vp_lightning.data.librispeech import LibriSpeechDataModule

__all__ = [
    "BadInputTally",
    "DatasetLayoutError",
    "EspeakNotFoundError",
    "LibriSpeechDataModule",
    "build_embedded_librispeech",
    "ImageFiles",
    "ImageNetDataModule",
    "SharedSkipFlags",
    "SkippingFileDataset",
    "TooManyBadFilesError",
    "UnpaddedDistributedSampler",
    "build_embedded_photos",
]
