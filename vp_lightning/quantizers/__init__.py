"""Quantizers: one file, one module, one interface (:class:`QuantizerOutput`).

``TINY_FACTORIES`` lists every registered quantizer with a small instance for tests; the shared contract test
runs over all of them, so a new quantizer only has to add its line here.
"""

from collections.abc import Callable

from torch import nn

from vp_lightning.quantizers.base import Quantizer, QuantizerOutput
from vp_lightning.quantizers.fsq import FSQ
from vp_lightning.quantizers.vq import SimVQ, VectorQuantizer

__all__ = ["FSQ", "Quantizer", "QuantizerOutput", "SimVQ", "VectorQuantizer", "TINY_FACTORIES"]

TINY_FACTORIES: dict[str, Callable[[], nn.Module]] = {
    "vq": lambda: VectorQuantizer(dim=4, codebook_size=64),
    "simvq": lambda: SimVQ(dim=4, codebook_size=64),
    "fsq": lambda: FSQ(levels=[8, 5, 5, 5]),
    "fsq_symmetric_noise": lambda: FSQ(levels=[8, 5, 5, 5], symmetric=True, noise_rate=0.5),
}
