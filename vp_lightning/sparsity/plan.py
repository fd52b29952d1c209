"""Sparsity plans: which projections are sparsified, with which alpha, sparsity and threshold vector.

On disk a plan is two files side by side: ``<name>.json`` (structure, human readable) and
``<name>.safetensors`` (one float32 threshold vector per projection, keyed by module name).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vp_lightning.sparsity.errors import SparsityConfigError, SparsityInputMissingError

PLAN_FORMAT = "vp-lightning/wisparse-plan"
PLAN_VERSION = 1


@dataclass
class LayerPlan:
    """Sparsification of one linear projection.

    Attributes:
        block: index of the decoder block.
        projection: short projection name inside the block (e.g. ``self_attn.q_proj``).
        alpha: exponent of the column norm in the score.
        sparsity: calibrated fraction of input channels dropped.
        tau: score threshold (keep iff ``|x_j| * ||W[:, j]||^alpha > tau``).
        threshold: (d_in,) float32 folded per-channel threshold on |x_j|.
        params: number of weight parameters (d_out * d_in), used for parameter-weighted sparsity.
    """

    block: int
    projection: str
    alpha: float
    sparsity: float
    tau: float
    threshold: Tensor
    params: int


@dataclass
class SparsityPlan:
    """Per-projection activation-sparsity settings for one model.

    Attributes:
        model: identifier of the model the plan was calibrated for (path, id or embedded file name).
        target_sparsity: parameter-weighted sparsity the plan was built for.
        layers: module name (e.g. ``model.layers.3.mlp.down_proj``) -> settings.
        metadata: free-form JSON-serialisable details (method, allocation, alpha rule, ...).
    """

    model: str
    target_sparsity: float
    layers: dict[str, LayerPlan]
    metadata: dict[str, Any] = field(default_factory=dict)

    def parameter_weighted_sparsity(self) -> float:
        """Calibrated sparsity averaged over projections, weighted by their parameter counts."""
        total = sum(layer.params for layer in self.layers.values())
        return sum(layer.sparsity * layer.params for layer in self.layers.values()) / max(total, 1)

    def block_sparsities(self) -> list[float]:
        """Parameter-weighted calibrated sparsity of every block, in block order."""
        blocks: dict[int, list[LayerPlan]] = {}
        for layer in self.layers.values():
            blocks.setdefault(layer.block, []).append(layer)
        return [
            sum(p.sparsity * p.params for p in blocks[b]) / sum(p.params for p in blocks[b]) for b in sorted(blocks)
        ]


def _plan_paths(path: str | Path) -> tuple[Path, Path]:
    path = Path(path)
    if path.suffix == ".safetensors":
        path = path.with_suffix(".json")
    elif path.suffix != ".json":
        path = path / "plan.json"
    return path, path.with_suffix(".safetensors")


def save_plan(plan: SparsityPlan, path: str | Path) -> Path:
    """Write a plan as JSON + safetensors.

    Args:
        plan: the plan to write.
        path: ``<name>.json`` (the thresholds go to ``<name>.safetensors``) or a directory (``plan.json`` inside).

    Returns:
        Path of the JSON file.
    """
    from safetensors.torch import save_file

    json_path, tensor_path = _plan_paths(path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    layers = {
        name: {
            "block": layer.block,
            "projection": layer.projection,
            "alpha": layer.alpha,
            "sparsity": layer.sparsity,
            "tau": layer.tau,
            "params": layer.params,
            "in_features": int(layer.threshold.numel()),
        }
        for name, layer in plan.layers.items()
    }
    document = {
        "format": PLAN_FORMAT,
        "version": PLAN_VERSION,
        "model": plan.model,
        "target_sparsity": plan.target_sparsity,
        "parameter_weighted_sparsity": plan.parameter_weighted_sparsity(),
        "thresholds_file": tensor_path.name,
        "metadata": plan.metadata,
        "layers": layers,
    }
    tensors = {name: layer.threshold.detach().float().cpu().contiguous() for name, layer in plan.layers.items()}
    save_file(tensors, str(tensor_path))
    json_path.write_text(json.dumps(document, indent=1, allow_nan=True) + "\n")
    return json_path


def load_plan(path: str | Path) -> SparsityPlan:
    """Read a plan written by :func:`save_plan`.

    Args:
        path: the plan's JSON file, its safetensors file, or the directory holding ``plan.json``.

    Returns:
        The plan, with threshold vectors as float32 CPU tensors.
    """
    from safetensors.torch import load_file

    json_path, _ = _plan_paths(path)
    if not json_path.is_file():
        raise SparsityInputMissingError(f"no sparsity plan at {json_path} (expected a file written by save_plan)")
    document = json.loads(json_path.read_text())
    if document.get("format") != PLAN_FORMAT:
        raise SparsityConfigError(f"{json_path} is not a sparsity plan (format={document.get('format')!r})")
    if document.get("version") != PLAN_VERSION:
        raise SparsityConfigError(f"{json_path} has plan version {document.get('version')}, this code reads {PLAN_VERSION}")
    tensor_path = json_path.parent / document["thresholds_file"]
    thresholds = load_file(str(tensor_path))
    layers = {}
    for name, entry in document["layers"].items():
        if name not in thresholds:
            raise ValueError(f"{tensor_path} has no threshold vector for {name}")
        layers[name] = LayerPlan(
            block=int(entry["block"]),
            projection=str(entry["projection"]),
            alpha=float(entry["alpha"]),
            sparsity=float(entry["sparsity"]),
            tau=float(entry["tau"]),
            threshold=thresholds[name],
            params=int(entry["params"]),
        )
    return SparsityPlan(
        model=document["model"],
        target_sparsity=float(document["target_sparsity"]),
        layers=layers,
        metadata=document.get("metadata", {}),
    )


def plans_equal(a: SparsityPlan, b: SparsityPlan) -> bool:
    """True when two plans hold the same settings and bit-identical threshold vectors."""
    if (a.model, a.target_sparsity, a.metadata) != (b.model, b.target_sparsity, b.metadata):
        return False
    if a.layers.keys() != b.layers.keys():
        return False
    for name, x in a.layers.items():
        y = b.layers[name]
        scalars_x = (x.block, x.projection, x.alpha, x.sparsity, x.params)
        scalars_y = (y.block, y.projection, y.alpha, y.sparsity, y.params)
        same_tau = x.tau == y.tau or (math.isnan(x.tau) and math.isnan(y.tau))
        if scalars_x != scalars_y or not same_tau or not torch.equal(x.threshold.float(), y.threshold.float()):
            return False
    return True
