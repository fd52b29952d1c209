"""Plain nn.Module encoders/decoders (no Lightning here)."""

from vp_lightning.networks.image import ImageDecoder, ImageEncoder, tiny_image_autoencoder

__all__ = ["ImageDecoder", "ImageEncoder", "tiny_image_autoencoder"]
