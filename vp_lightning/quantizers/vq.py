"""VQ-VAE baselines wrapped from ``vector-quantize-pytorch``: :class:`VectorQuantizer` (EMA) and :class:`SimVQ`."""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor, nn
from vector_quantize_pytorch import SimVQ as _LibSimVQ
from vector_quantize_pytorch import VectorQuantize

from vp_lightning.quantizers.base import QuantizerOutput, no_autocast


def _world_synced() -> bool:
    # The library caches its own ``is_distributed()`` the first time it is asked; if that happens before the
    # process group starts, codebooks silently drift apart across ranks. We decide here, at construction time,
    # which is why the model builds quantizers in ``configure_model()`` (after the process group exists).
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _as_tokens(z: Tensor) -> Tensor:
    """(..., d) -> (1, n, d): the library treats ndim >= 4 as channel-first images, so flatten first."""
    return z.reshape(1, -1, z.shape[-1])


class VectorQuantizer(nn.Module):
    """Classic VQ with an EMA codebook (van den Oord et al. 2017), wrapping ``VectorQuantize``.

    Args:
        dim: latent dimension d.
        codebook_size: K.
        decay: EMA decay of the codebook statistics.
        commitment_weight: weight of ``||z - sg(q)||²`` in ``QuantizerOutput.loss``.
        kmeans_init: initialise the codebook with k-means on the first batch.
        threshold_ema_dead_code: replace codes whose EMA count falls below this (0 = never, so collapse shows).
        use_cosine_sim: cosine instead of Euclidean distance.
        sync_codebook: all-reduce the EMA statistics across ranks; ``None`` = decide from the running process group.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        decay: float = 0.99,
        commitment_weight: float = 0.25,
        kmeans_init: bool = False,
        threshold_ema_dead_code: int = 0,
        use_cosine_sim: bool = False,
        sync_codebook: bool | None = None,
    ):
        super().__init__()
        if dim < 1 or codebook_size < 2:
            raise ValueError(f"VectorQuantizer needs dim >= 1 and codebook_size >= 2, got dim={dim}, K={codebook_size}")
        self.dim = dim
        self.codebook_size = codebook_size
        self.sync_codebook = _world_synced() if sync_codebook is None else sync_codebook
        self.vq = VectorQuantize(
            dim=dim,
            codebook_size=codebook_size,
            decay=decay,
            commitment_weight=commitment_weight,
            kmeans_init=kmeans_init,
            threshold_ema_dead_code=threshold_ema_dead_code,
            use_cosine_sim=use_cosine_sim,
            rotation_trick=False,  # plain straight-through estimator, as in the VQ-VAE baseline
            sync_codebook=self.sync_codebook,
        )

    @property
    def codebook(self) -> Tensor:
        """(K, d) current code vectors."""
        return self.vq.codebook

    def forward(self, z: Tensor) -> QuantizerOutput:
        """z: (..., d) -> quantized (..., d), indices (...,)."""
        with no_autocast(z.device.type):
            zf = _as_tokens(z.float())
            quantized, indices, commitment = self.vq(zf)
        commitment = commitment.sum()
        return QuantizerOutput(
            quantized=quantized.reshape(z.shape),
            indices=indices.reshape(z.shape[:-1]).long(),
            loss=commitment,
            metrics={"commitment": commitment.detach()},
        )

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        return self.codebook[indices.long()]


class SimVQ(nn.Module):
    """SimVQ (Zhu et al. 2024): a frozen random codebook through a learned linear map, wrapping the library.

    Args:
        dim: latent dimension d.
        codebook_size: K.
        commitment_weight: total weight of the commitment terms in ``QuantizerOutput.loss``.
        rotation_trick: propagate gradients with the rotation trick (library default) instead of straight-through.
    """

    def __init__(self, dim: int, codebook_size: int, commitment_weight: float = 1.0, rotation_trick: bool = True):
        super().__init__()
        if dim < 1 or codebook_size < 2:
            raise ValueError(f"SimVQ needs dim >= 1 and codebook_size >= 2, got dim={dim}, K={codebook_size}")
        self.dim = dim
        self.codebook_size = codebook_size
        self.vq = _LibSimVQ(
            dim=dim, codebook_size=codebook_size, commitment_weight=commitment_weight, rotation_trick=rotation_trick
        )

    def forward(self, z: Tensor) -> QuantizerOutput:
        with no_autocast(z.device.type):
            zf = _as_tokens(z.float())
            quantized, indices, commitment = self.vq(zf)
        commitment = commitment.sum()
        return QuantizerOutput(
            quantized=quantized.reshape(z.shape),
            indices=indices.reshape(z.shape[:-1]).long(),
            loss=commitment,
            metrics={"commitment": commitment.detach()},
        )

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        return self.vq.codebook[indices.long()]
