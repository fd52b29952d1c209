"""WiSparse: weight-aware activation sparsity for causal language models.

Public API:
* :func:`sparsify` swaps a model's projections for :class:`SparseLinear` layers following a plan;
* :func:`load_plan` / :func:`save_plan` read and write plans (JSON + safetensors);
* :class:`WiSparseCalibration` (LightningModule) and :class:`WiSparseTextData` (LightningDataModule) run the
  calibration, allocation and evaluation pipeline under ``trainer.fit``.
"""

from vp_lightning.sparsity.allocation import BlockAllocation, FixedAllocation, UniformAllocation, build_plan
from vp_lightning.sparsity.calibration import WiSparseCalibration
from vp_lightning.sparsity.data import WiSparseTextData
from vp_lightning.sparsity.layers import SparseLinear, realised_sparsity, set_sparsity_enabled, sparsify
from vp_lightning.sparsity.loading import ProjectionLayout, load_causal_lm, load_tokenizer
from vp_lightning.sparsity.plan import LayerPlan, SparsityPlan, load_plan, save_plan

__all__ = [
    "BlockAllocation",
    "FixedAllocation",
    "LayerPlan",
    "ProjectionLayout",
    "SparseLinear",
    "SparsityPlan",
    "UniformAllocation",
    "WiSparseCalibration",
    "WiSparseTextData",
    "build_plan",
    "load_causal_lm",
    "load_plan",
    "load_tokenizer",
    "realised_sparsity",
    "save_plan",
    "set_sparsity_enabled",
    "sparsify",
]
