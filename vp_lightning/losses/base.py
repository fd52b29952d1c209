"""Contract of reconstruction losses: named raw terms plus their weights, summed in one place (the model)."""

from __future__ import annotations

from torch import Tensor, nn


class ReconstructionLoss(nn.Module):
    """Base class. Subclasses set ``self.weights`` (term name -> weight, from config) and return raw terms.

    ``forward(x_hat, x, mask=None)`` returns ``{name: scalar}`` for every term whose weight is non-zero; the
    model multiplies by ``self.weights[name]``, sums, and logs each raw term as ``<stage>/loss/<name>``.
    ``mask`` (broadcastable to ``x``, 1 = real sample) marks padding in variable-length batches.
    """

    weights: dict[str, float]

    def forward(self, x_hat: Tensor, x: Tensor, mask: Tensor | None = None) -> dict[str, Tensor]:
        raise NotImplementedError
