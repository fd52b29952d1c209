"""Reading finished (or running) runs from disk: ``config.yaml``, ``metrics.csv`` and token-usage counts.

A *run folder* is what one ``vp-lightning fit`` writes (the CSV logger's folder): ``config.yaml`` (the resolved
config), ``metrics.csv`` (one row per logging call, empty cells for keys not logged in that call) and
``token_usage/val_stepXXXXXXX.counts.pt`` (summed token counts of each validation). A *sweep folder* (written by
``vp-lightning sweep``) holds ``sweep.json`` listing its runs and their folders.
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vp_lightning.errors import UserError

#: Display names of the project's quantizers, keyed by class name.
QUANTIZER_NAMES = {
    "VectorQuantizer": "VQ-VAE",
    "SimVQ": "SimVQ",
    "FSQ": "FSQ",
    "FSP": "FSP",
    "VectorPerturbation": "VP-VAE",
}

#: Order in tables and legends: the baselines first, the perturbation quantizers last (as in the paper's Table 1).
QUANTIZER_ORDER = ["VQ-VAE", "SimVQ", "FSQ", "FSP", "VP-VAE"]

#: The token-usage keys logged once per validation.
USAGE_KEYS = ("val/codebook/cvu", "val/codebook/perplexity", "val/codebook/utilization", "val/codebook/dead_codes")

#: Quality keys by modality, in table order.
IMAGE_QUALITY_KEYS = ("val/psnr", "val/ssim", "val/lpips")
AUDIO_QUALITY_KEYS = ("val/pesq", "val/stoi", "val/si_snr", "val/mel_distance")

_COUNTS_FILE = re.compile(r"^val_step(\d+)\.counts\.pt$")


@dataclass
class QuantizerInfo:
    """What a run's config says about its quantizer.

    Attributes:
        name: display name (``VP-VAE``, ``FSQ`` ...), the class name for unknown quantizers.
        class_path: the config's ``class_path``.
        codebook_size: K (for FSQ/FSP the product of the levels); ``None`` when the config does not say.
        eta: the perturbation scale (FSP, VP); ``None`` for quantizers without one.
        init_args: the quantizer's ``init_args`` as written in the config.
    """

    name: str
    class_path: str
    codebook_size: int | None
    eta: float | None
    init_args: dict[str, Any] = field(default_factory=dict)

    def extra(self) -> str:
        """The sweep-relevant settings besides eta, e.g. ``noise_rate 0.5`` or ``quantize_rate 0.5``."""
        args, parts = self.init_args, []
        if "quantize_rate" in args:
            parts.append(f"quantize_rate {format_number(args['quantize_rate'])}")
        if args.get("noise_rate"):
            parts.append(f"noise_rate {format_number(args['noise_rate'])}")
        elif args.get("symmetric"):
            parts.append("symmetric")
        if args.get("use_mh") is False:
            parts.append("no MH")
        return ", ".join(parts)


def quantizer_info(config: dict[str, Any]) -> QuantizerInfo:
    """Reads the quantizer of a resolved tokenizer config (``model.init_args.quantizer``).

    Args:
        config: a resolved LightningCLI config as saved in ``config.yaml``.
    Returns:
        A :class:`QuantizerInfo`; name ``"?"`` when the config has no quantizer (e.g. a WiSparse job).
    """
    quantizer = ((config.get("model") or {}).get("init_args") or {}).get("quantizer")
    if not isinstance(quantizer, dict) or "class_path" not in quantizer:
        return QuantizerInfo("?", "", None, None)
    class_path = str(quantizer["class_path"])
    init_args = dict(quantizer.get("init_args") or {})
    class_name = class_path.rsplit(".", 1)[-1]
    size = init_args.get("codebook_size")
    if size is None and init_args.get("levels"):
        size = math.prod(int(level) for level in init_args["levels"])
    eta = init_args.get("eta")
    return QuantizerInfo(
        name=QUANTIZER_NAMES.get(class_name, class_name),
        class_path=class_path,
        codebook_size=int(size) if size is not None else None,
        eta=float(eta) if eta is not None else None,
        init_args=init_args,
    )


def format_number(value: Any, digits: int = 4) -> str:
    """Short human form of a number: integers without decimals, others with ``digits`` significant digits."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)
        if float(value).is_integer() and abs(value) < 1e6:
            return str(int(value))
        return f"{value:.{digits}g}"
    return str(value)


def format_duration(seconds: float | None) -> str:
    """``42s``, ``3m05s`` or ``2h07m``; ``–`` for None."""
    if seconds is None:
        return "–"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _to_float(text: str) -> float | None:
    if text is None or text == "":
        return None
    try:
        return float(text)
    except ValueError:
        return None


def read_metrics_csv(path: str | Path) -> list[dict[str, float]]:
    """Rows of a Lightning ``metrics.csv`` as dicts holding only the cells that have a value.

    Args:
        path: the CSV file. A file that is still being written (a partial last line) is read up to its last
            complete row.
    Returns:
        One dict per row, ``{"step": ..., "epoch": ..., key: value}``; keys with empty cells are left out.
    """
    path = Path(path)
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]  # drop a partial row of a file being written
    rows = []
    for raw in csv.DictReader(text.splitlines()):
        row = {key: value for key, value in ((k, _to_float(v)) for k, v in raw.items() if k) if value is not None}
        if row:
            rows.append(row)
    return rows


def metric_series(rows: list[dict[str, float]], key: str) -> tuple[list[float], list[float]]:
    """``(steps, values)`` of every row that logged ``key`` (in file order)."""
    steps, values = [], []
    for row in rows:
        if key in row:
            steps.append(row.get("step", float(len(steps))))
            values.append(row[key])
    return steps, values


def summary_metrics(rows: list[dict[str, float]]) -> dict[str, float]:
    """The last logged value of every key, like a W&B run summary."""
    summary: dict[str, float] = {}
    for row in rows:
        summary.update(row)
    return summary


def latest_token_counts(run_dir: str | Path) -> tuple[int, Any] | None:
    """``(step, counts)`` of the last validation's token counts (``token_usage/val_step*.counts.pt``), or None."""
    folder = Path(run_dir) / "token_usage"
    found = []
    if folder.is_dir():
        for path in folder.iterdir():
            match = _COUNTS_FILE.match(path.name)
            if match:
                found.append((int(match.group(1)), path))
    if not found:
        return None
    import torch

    step, path = max(found)
    counts = torch.load(path, map_location="cpu", weights_only=True)
    return step, counts.double().numpy()


@dataclass
class RunData:
    """One run read from disk.

    Attributes:
        path: the run folder.
        label: a short name for legends and tables.
        config: the resolved config (empty when ``config.yaml`` is missing).
        rows: parsed ``metrics.csv`` rows (see :func:`read_metrics_csv`).
        quantizer: what the config says about the quantizer.
        parameters: the sweep parameters of this run (empty for runs not launched by a sweep).
        status: the sweep runner's status (``finished``, ``failed``, ``stopped`` ...) or None.
        wall_time: seconds, when a sweep recorded it.
    """

    path: Path
    label: str
    config: dict[str, Any]
    rows: list[dict[str, float]]
    quantizer: QuantizerInfo
    parameters: dict[str, Any] = field(default_factory=dict)
    status: str | None = None
    wall_time: float | None = None

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """``(steps, values)`` of ``key``."""
        return metric_series(self.rows, key)

    def final(self, key: str) -> float | None:
        """The last logged value of ``key`` or None."""
        _, values = self.series(key)
        return values[-1] if values else None

    @property
    def summary(self) -> dict[str, float]:
        return summary_metrics(self.rows)

    @property
    def modality(self) -> str:
        """``audio`` when the run logged audio quality metrics, else ``image``."""
        keys = set().union(*self.rows) if self.rows else set()
        return "audio" if any(k in keys for k in AUDIO_QUALITY_KEYS) else "image"

    @property
    def last_step(self) -> int | None:
        steps = [row["step"] for row in self.rows if "step" in row]
        return int(max(steps)) if steps else None

    def token_counts(self):
        """``(step, counts)`` of the final validation's token histogram or None."""
        return latest_token_counts(self.path)


def default_label(run_dir: Path) -> str:
    """``<logger name>/<version>`` for a run folder: what tells runs apart in a legend."""
    return f"{run_dir.parent.name}/{run_dir.name}" if run_dir.parent.name else run_dir.name


def load_run(run_dir: str | Path, label: str | None = None, **extra: Any) -> RunData:
    """Reads one run folder.

    Args:
        run_dir: a folder with ``metrics.csv`` and/or ``config.yaml``.
        label: legend/table name (default: ``<logger name>/<version>``).
        extra: ``parameters``, ``status`` or ``wall_time`` recorded by a sweep.
    Returns:
        The :class:`RunData`.
    Raises:
        UserError: when the folder holds neither file.
    """
    run_dir = Path(run_dir)
    config_file, metrics_file = run_dir / "config.yaml", run_dir / "metrics.csv"
    if not config_file.is_file() and not metrics_file.is_file():
        raise UserError(f"{run_dir} is not a run folder: it has neither config.yaml nor metrics.csv")
    config = {}
    if config_file.is_file():
        config = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
    return RunData(
        path=run_dir,
        label=label or default_label(run_dir),
        config=config,
        rows=read_metrics_csv(metrics_file),
        quantizer=quantizer_info(config),
        **extra,
    )


def is_run_dir(path: Path) -> bool:
    return (path / "metrics.csv").is_file() or (path / "config.yaml").is_file()


def _runs_of_sweep(sweep_dir: Path) -> list[RunData]:
    record = json.loads((sweep_dir / "sweep.json").read_text(encoding="utf-8"))
    runs = []
    for run in record.get("runs", []):
        # the runner's own layout first (survives moving the sweep folder), then the recorded path
        candidates = [sweep_dir / "runs" / str(run.get("id")), Path(run.get("run_dir") or sweep_dir / "-")]
        folder = next((c for c in candidates if is_run_dir(c)), None)
        if folder is None:
            continue  # a run that died before its logger created anything
        runs.append(
            load_run(
                folder,
                label=run.get("name") or run["id"],
                parameters=run.get("parameters", {}),
                status=run.get("status"),
                wall_time=run.get("wall_time"),
            )
        )
    return runs


def find_runs(paths: list[str | Path]) -> list[RunData]:
    """Runs under the given paths: run folders, sweep folders (``sweep.json``) or folders that contain runs.

    Args:
        paths: any mix of run folders, sweep folders and parent folders (searched recursively for
            ``metrics.csv``; ``wandb`` and ``checkpoints`` folders are skipped).
    Returns:
        The runs in argument order (sweeps in launch order, searched folders sorted by path), without duplicates.
    Raises:
        UserError: when a path does not exist or no run is found.
    """
    runs: list[RunData] = []
    seen: set[Path] = set()

    def add(run: RunData) -> None:
        key = run.path.resolve()
        if key not in seen:
            seen.add(key)
            runs.append(run)

    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise UserError(f"{path} does not exist")
        if (path / "sweep.json").is_file():
            for run in _runs_of_sweep(path):
                add(run)
        elif is_run_dir(path):
            add(load_run(path))
        else:
            found = sorted(
                p.parent for p in path.rglob("metrics.csv")
                if not {"wandb", "checkpoints"} & set(p.relative_to(path).parts)
            )
            for folder in found:
                add(load_run(folder))
    if not runs:
        raise UserError(f"no runs found under {', '.join(str(p) for p in paths)} (looked for metrics.csv / sweep.json)")
    return runs


def sort_runs(runs: list[RunData]) -> list[RunData]:
    """Runs grouped by quantizer (paper order), then by K and eta."""

    def key(run: RunData):
        name = run.quantizer.name
        order = QUANTIZER_ORDER.index(name) if name in QUANTIZER_ORDER else len(QUANTIZER_ORDER)
        return (order, name, run.quantizer.codebook_size or 0, run.quantizer.eta or 0.0, run.label)

    return sorted(runs, key=key)
