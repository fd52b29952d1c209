"""Quantizers: one file, one module, one interface (:class:`QuantizerOutput`).

``TINY_FACTORIES`` lists every registered quantizer with a small instance for tests; the shared contract test
runs over all of them, so a new quantizer only has to add its line here.
"""

from collections.abc import Callable

from torch import nn

from vp_lightning.quantizers.base import Quantizer, QuantizerOutput
from vp_lightning.quantizers.fsp import FSP
from vp_lightning.quantizers.fsq import FSQ
from vp_lightning.quantizers.vp import VectorPerturbation
from vp_lightning.quantizers.vq import SimVQ, VectorQuantizer

__all__ = ["FSP", "FSQ", "Quantizer", "QuantizerOutput", "SimVQ", "VectorPerturbation", "VectorQuantizer", "TINY_FACTORIES"]

TINY_FACTORIES: dict[str, Callable[[], nn.Module]] = {
    "vq": lambda: VectorQuantizer(dim=4, codebook_size=64),
    "simvq": lambda: SimVQ(dim=4, codebook_size=64),
    "fsq": lambda: FSQ(levels=[8, 5, 5, 5]),
    "fsq_symmetric_noise": lambda: FSQ(levels=[8, 5, 5, 5], symmetric=True, noise_rate=0.5),
    "fsp": lambda: FSP(levels=[8, 5, 5, 5]),
    "fsp_normal": lambda: FSP(levels=[7, 5, 5], activation="normal", decoder_input="inverse"),
    "vp": lambda: VectorPerturbation(dim=4, codebook_size=64),
    "vp_no_mh_torch": lambda: VectorPerturbation(dim=3, codebook_size=32, use_mh=False, knn_backend="torch"),
}
