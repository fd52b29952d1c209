"""Plain nn.Module encoders/decoders (no Lightning here)."""

from vp_lightning.networks.audio import AudioDecoder, AudioEncoder, tiny_audio_codec
from vp_lightning.networks.image import ImageDecoder, ImageEncoder, tiny_image_autoencoder

__all__ = ["AudioDecoder", "AudioEncoder", "ImageDecoder", "ImageEncoder", "tiny_audio_codec", "tiny_image_autoencoder"]
