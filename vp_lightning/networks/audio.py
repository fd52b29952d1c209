"""1-D convolutional audio codec: a strided-conv encoder and a transposed-conv decoder.

The layout follows the SoundStream / EnCodec / DAC family: each stage is three dilated residual units (dilations
1, 3, 9) followed by a strided convolution (encoder) or preceded by a transposed convolution (decoder). The hop
size, i.e. the number of samples per token, is the product of the strides.

Lengths are exact: the encoder right-pads its input with zeros to a multiple of the hop, so ``T`` samples give
``n = ceil(T / hop)`` tokens, and the decoder returns exactly ``n * hop`` samples. The model crops the decoder output
back to ``T``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm as _weight_norm

ACTIVATIONS = ("elu", "snake")


class Snake(nn.Module):
    """Snake activation ``x + sin²(αx) / α`` with a learned per-channel α (periodic inductive bias for audio)."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        # the small constant keeps 1/α finite if α is driven to zero
        return x + torch.sin(self.alpha * x).pow(2) / (self.alpha + 1e-9)


def _activation(name: str, channels: int) -> nn.Module:
    if name == "elu":
        return nn.ELU()
    if name == "snake":
        return Snake(channels)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


def _init(conv: nn.Module, fan_in: float, gain: float = 1.0) -> nn.Module:
    """Variance-preserving weights, zero biases.

    PyTorch's default conv init shrinks the signal's variance about threefold per layer while the biases add
    constants, so after the ~20 convolutions of an encoder the features barely depend on the (quiet, std ~0.1)
    waveform: every latent falls into the same quantizer cell and training starts collapsed.
    """
    nn.init.normal_(conv.weight, 0.0, gain / math.sqrt(fan_in))
    nn.init.zeros_(conv.bias)
    return conv


def _conv(cin: int, cout: int, kernel: int, *, stride: int = 1, dilation: int = 1, padding: int | None = None,
          weight_norm: bool = True, gain: float = 1.0) -> nn.Module:
    if padding is None:  # "same" length for stride 1
        padding = dilation * (kernel - 1) // 2
    conv = _init(nn.Conv1d(cin, cout, kernel, stride=stride, dilation=dilation, padding=padding), cin * kernel, gain)
    return _weight_norm(conv) if weight_norm else conv


def _conv_transpose(cin: int, cout: int, stride: int, weight_norm: bool) -> nn.Module:
    # kernel 2s, padding ceil(s/2), output_padding s % 2  =>  L_out = L_in * s exactly, for odd and even s
    conv = nn.ConvTranspose1d(cin, cout, 2 * stride, stride=stride, padding=math.ceil(stride / 2),
                              output_padding=stride % 2)
    _init(conv, cin * 2 * stride / stride)  # each output sample sees cin * kernel / stride inputs
    return _weight_norm(conv) if weight_norm else conv


def _strided_conv(cin: int, cout: int, stride: int, weight_norm: bool) -> nn.Module:
    # kernel 2s, padding ceil(s/2)  =>  L_out = L_in / s exactly when L_in is a multiple of s
    return _conv(cin, cout, 2 * stride, stride=stride, padding=math.ceil(stride / 2), weight_norm=weight_norm)


class ResidualUnit(nn.Module):
    """``x + conv1x1(act(conv7_dilated(act(x))))``; keeps channels and length."""

    def __init__(self, channels: int, dilation: int, activation: str = "elu", weight_norm: bool = True):
        super().__init__()
        self.block = nn.Sequential(
            _activation(activation, channels),
            _conv(channels, channels, 7, dilation=dilation, weight_norm=weight_norm),
            _activation(activation, channels),
            _conv(channels, channels, 1, weight_norm=weight_norm),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x)


def _residual_stack(channels: int, dilations: Sequence[int], activation: str, weight_norm: bool) -> list[nn.Module]:
    return [ResidualUnit(channels, d, activation, weight_norm) for d in dilations]


def _widths(channels: int, n_stages: int, max_channels: int | None) -> list[int]:
    """Channel width before each stage and after the last: doubles at every stride, capped at ``max_channels``."""
    cap = max_channels or 2**31
    return [min(channels * 2**i, cap) for i in range(n_stages + 1)]


def _check_strides(strides: Sequence[int]) -> list[int]:
    strides = [int(s) for s in strides]
    if not strides or any(s < 1 for s in strides):
        raise ValueError(f"strides must be a non-empty list of positive integers, got {strides}")
    return strides


class AudioEncoder(nn.Module):
    """Waveform ``(b, in_ch, T)`` -> features ``(b, out_channels, n)`` with ``n = ceil(T / hop_length)``.

    Args:
        channels: width of the first stage; doubles after every stride (capped at ``max_channels``).
        strides: downsampling factor of each stage; ``hop_length = prod(strides)`` samples per token.
        out_channels: feature channels at the bottleneck (``C``); defaults to the last stage's width.
        in_channels: waveform channels (1 for mono).
        dilations: dilations of the residual units in every stage.
        activation: ``"elu"`` or ``"snake"``.
        weight_norm: weight-normalise every convolution.
        max_channels: cap on the stage width (keeps paper-scale configs from growing past e.g. 512).
    """

    def __init__(
        self,
        channels: int = 32,
        strides: Sequence[int] = (2, 4, 5, 8),
        out_channels: int | None = None,
        in_channels: int = 1,
        dilations: Sequence[int] = (1, 3, 9),
        activation: str = "elu",
        weight_norm: bool = True,
        max_channels: int | None = None,
    ):
        super().__init__()
        self.strides = _check_strides(strides)
        self.hop_length = math.prod(self.strides)
        widths = _widths(channels, len(self.strides), max_channels)
        self.out_channels = out_channels or widths[-1]
        self.in_channels = in_channels
        layers: list[nn.Module] = [_conv(in_channels, widths[0], 7, weight_norm=weight_norm)]
        for stride, cin, cout in zip(self.strides, widths[:-1], widths[1:], strict=True):
            layers += _residual_stack(cin, dilations, activation, weight_norm)
            layers += [_activation(activation, cin), _strided_conv(cin, cout, stride, weight_norm)]
        layers += [_activation(activation, widths[-1]), _conv(widths[-1], self.out_channels, 3, weight_norm=weight_norm)]
        self.net = nn.Sequential(*layers)

    def num_tokens(self, num_samples: int) -> int:
        """Tokens produced for ``num_samples`` input samples."""
        return -(-num_samples // self.hop_length)

    def token_mask(self, mask: Tensor) -> Tensor:
        """Sample mask ``(b, 1, T)`` (1 = real) -> token mask ``(b, n)`` bool: a token is real if any of its
        ``hop_length`` samples is real (padding added by the encoder counts as not real)."""
        b, t = mask.shape[0], mask.shape[-1]
        n = self.num_tokens(t)
        padded = F.pad(mask.reshape(b, t).float(), (0, n * self.hop_length - t))
        return padded.reshape(b, n, self.hop_length).amax(-1) > 0

    def forward(self, x: Tensor) -> Tensor:
        # b batch, T samples, n tokens, C out_channels
        if x.dim() != 3 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected a waveform of shape (b, {self.in_channels}, T), got {tuple(x.shape)}")
        pad = self.num_tokens(x.shape[-1]) * self.hop_length - x.shape[-1]
        return self.net(F.pad(x, (0, pad)))  # (b, C, n)


class AudioDecoder(nn.Module):
    """Features ``(b, in_channels, n)`` -> waveform ``(b, out_ch, n * hop_length)`` in ``[-1, 1]`` (tanh output).

    Args:
        in_channels: feature channels at the bottleneck (``C'``); defaults to the widest stage's width.
        channels: width of the last (full-rate) stage; mirrors the encoder's ``channels``.
        strides: the **encoder's** strides in encoder order; the decoder upsamples by them in reverse, so an
            encoder/decoder pair shares one list in config.
        out_channels: waveform channels (1 for mono).
        dilations, activation, weight_norm, max_channels: as in :class:`AudioEncoder`.
        tanh: squash the output into ``[-1, 1]`` like the input waveform.
    """

    def __init__(
        self,
        channels: int = 32,
        strides: Sequence[int] = (2, 4, 5, 8),
        in_channels: int | None = None,
        out_channels: int = 1,
        dilations: Sequence[int] = (1, 3, 9),
        activation: str = "elu",
        weight_norm: bool = True,
        max_channels: int | None = None,
        tanh: bool = True,
    ):
        super().__init__()
        self.strides = _check_strides(strides)
        self.hop_length = math.prod(self.strides)
        widths = _widths(channels, len(self.strides), max_channels)
        self.in_channels = in_channels or widths[-1]
        self.out_channels = out_channels
        layers: list[nn.Module] = [_conv(self.in_channels, widths[-1], 7, weight_norm=weight_norm)]
        for stride, cin, cout in zip(reversed(self.strides), widths[::-1][:-1], widths[::-1][1:], strict=True):
            layers += [_activation(activation, cin), _conv_transpose(cin, cout, stride, weight_norm)]
            layers += _residual_stack(cout, dilations, activation, weight_norm)
        # a quiet start (output std ~0.1 like speech) keeps the tanh in its linear range
        layers += [_activation(activation, widths[0]),
                   _conv(widths[0], out_channels, 7, weight_norm=weight_norm, gain=0.1)]
        if tanh:
            layers.append(nn.Tanh())
        self.net = nn.Sequential(*layers)

    def forward(self, h: Tensor) -> Tensor:
        # b batch, n tokens, T = n * hop samples
        if h.dim() != 3 or h.shape[1] != self.in_channels:
            raise ValueError(f"expected features of shape (b, {self.in_channels}, n), got {tuple(h.shape)}")
        return self.net(h)  # (b, out_ch, n * hop)


def tiny_audio_codec(strides: Sequence[int] = (4, 5, 8), channels: int = 8) -> tuple[AudioEncoder, AudioDecoder]:
    """A small (~0.2 M parameters at the defaults) encoder/decoder pair, hop 160, for tests and CPU smoke runs."""
    return (AudioEncoder(channels=channels, strides=strides, weight_norm=False),
            AudioDecoder(channels=channels, strides=strides, weight_norm=False))
