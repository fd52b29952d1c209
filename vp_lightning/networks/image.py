"""VQGAN-style convolutional encoder/decoder for images (Esser et al. 2021), sizes from config."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=min(32, channels) if channels % min(32, channels) == 0 else 1, num_channels=channels)


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, dropout: float = 0.0):
        super().__init__()
        self.block = nn.Sequential(
            _norm(in_ch), nn.SiLU(), nn.Conv2d(in_ch, out_ch, 3, padding=1),
            _norm(out_ch), nn.SiLU(), nn.Dropout(dropout), nn.Conv2d(out_ch, out_ch, 3, padding=1),
        )
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + self.block(x)


class AttnBlock(nn.Module):
    """Single-head self-attention over spatial positions (used at the lowest resolution only)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)  # each (b, hw, c)
        out = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad keeps h/2 exactly, as in VQGAN


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _check_sizes(ch: int, ch_mult: list[int], num_res_blocks: int) -> None:
    if ch < 1 or not ch_mult or any(m < 1 for m in ch_mult) or num_res_blocks < 0:
        raise ValueError(f"invalid network size: ch={ch}, ch_mult={ch_mult}, num_res_blocks={num_res_blocks}")


class ImageEncoder(nn.Module):
    """(b, in_channels, H, W) -> (b, out_channels, H/f, W/f) with f = 2^(len(ch_mult)-1).

    Args:
        in_channels: image channels.
        ch: base width; level i has ``ch * ch_mult[i]`` channels.
        ch_mult: width multipliers per resolution level (VQGAN f=8: ``[1, 2, 2, 4]``).
        num_res_blocks: ResNet blocks per level.
        attn: self-attention at the lowest resolution.
        out_channels: channels C handed to the bottleneck projection.
        dropout: dropout inside ResNet blocks.
    """

    def __init__(
        self,
        in_channels: int = 3,
        ch: int = 128,
        ch_mult: list[int] = (1, 2, 2, 4),
        num_res_blocks: int = 2,
        attn: bool = True,
        out_channels: int = 256,
        dropout: float = 0.0,
    ):
        super().__init__()
        ch_mult = list(ch_mult)
        _check_sizes(ch, ch_mult, num_res_blocks)
        self.out_channels = out_channels
        self.downsample_factor = 2 ** (len(ch_mult) - 1)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ch, 3, padding=1)]
        width = ch
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                layers.append(ResnetBlock(width, ch * mult, dropout))
                width = ch * mult
            if level < len(ch_mult) - 1:
                layers.append(Downsample(width))
        layers += [ResnetBlock(width, width, dropout)]
        layers += [AttnBlock(width)] if attn else []
        layers += [ResnetBlock(width, width, dropout), _norm(width), nn.SiLU(), nn.Conv2d(width, out_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        f = self.downsample_factor
        if x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(f"image size {tuple(x.shape[-2:])} must be divisible by the downsampling factor {f}")
        return self.net(x)


class ImageDecoder(nn.Module):
    """(b, in_channels, h, w) -> (b, out_channels, h*f, w*f); mirror of :class:`ImageEncoder`."""

    def __init__(
        self,
        out_channels: int = 3,
        ch: int = 128,
        ch_mult: list[int] = (1, 2, 2, 4),
        num_res_blocks: int = 2,
        attn: bool = True,
        in_channels: int = 256,
        dropout: float = 0.0,
    ):
        super().__init__()
        ch_mult = list(ch_mult)
        _check_sizes(ch, ch_mult, num_res_blocks)
        self.in_channels = in_channels
        width = ch * ch_mult[-1]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, padding=1), ResnetBlock(width, width, dropout)]
        layers += [AttnBlock(width)] if attn else []
        layers += [ResnetBlock(width, width, dropout)]
        for level in reversed(range(len(ch_mult))):
            for _ in range(num_res_blocks + 1):
                layers.append(ResnetBlock(width, ch * ch_mult[level], dropout))
                width = ch * ch_mult[level]
            if level > 0:
                layers.append(Upsample(width))
        layers += [_norm(width), nn.SiLU(), nn.Conv2d(width, out_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, h: Tensor) -> Tensor:
        return self.net(h)


def tiny_image_autoencoder(channels: int = 8) -> tuple[ImageEncoder, ImageDecoder]:
    """A very small encoder/decoder pair (f = 4) for tests."""
    kwargs = dict(ch=channels, ch_mult=[1, 2, 2], num_res_blocks=1, attn=False)
    return ImageEncoder(out_channels=2 * channels, **kwargs), ImageDecoder(in_channels=2 * channels, **kwargs)


