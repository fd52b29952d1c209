"""Matplotlib panels comparing token utilization across runs (used by the HTML report).

Colours: one hue per quantizer (VQ-VAE red, SimVQ orange, FSQ purple, FSP green, VP-VAE blue); runs of the same
quantizer get shades of that hue ordered by eta (darker = larger), so a sweep over eta reads as a gradient.
"""

from __future__ import annotations

import io
import re
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from vp_lightning.tracking.runs import USAGE_KEYS, RunData, format_number  # noqa: E402

COLORMAPS = {"VQ-VAE": "Reds", "SimVQ": "Oranges", "FSQ": "Purples", "FSP": "Greens", "VP-VAE": "Blues"}
USAGE_TITLES = {
    "val/codebook/cvu": "CVU (perplexity / K)",
    "val/codebook/perplexity": "perplexity (effective codes)",
    "val/codebook/utilization": "utilization (share of codes used)",
    "val/codebook/dead_codes": "dead codes",
}
STYLE = {
    "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8,
    "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3,
    "font.family": "DejaVu Sans",  # bundled with matplotlib: the same text metrics everywhere
}


def run_colors(runs: list[RunData]) -> dict[str, Any]:
    """A colour per run label: the quantizer's hue, shaded by eta (or by order) within the quantizer."""
    colors: dict[str, Any] = {}
    by_quantizer: dict[str, list[RunData]] = {}
    for run in runs:
        by_quantizer.setdefault(run.quantizer.name, []).append(run)
    others = plt.get_cmap("Greys")
    for name, group in by_quantizer.items():
        cmap = plt.get_cmap(COLORMAPS.get(name, "Greys")) if name in COLORMAPS else others
        group = sorted(group, key=lambda r: (r.quantizer.eta if r.quantizer.eta is not None else 0.0, r.label))
        shades = [0.75] if len(group) == 1 else np.linspace(0.45, 0.95, len(group))
        for run, shade in zip(group, shades, strict=True):
            colors[run.label] = cmap(float(shade))
    return colors


def describe(run: RunData) -> str:
    """``VP-VAE η=0.5`` / ``FSP η=1 (quantize_rate 0.5)``: the quantizer and its perturbation settings."""
    parts = [run.quantizer.name]
    if run.quantizer.eta is not None:
        parts.append(f"η={format_number(run.quantizer.eta)}")
    extra = run.quantizer.extra()
    if extra:
        parts.append(f"({extra})")
    return " ".join(parts)


def legend_labels(runs: list[RunData]) -> dict[str, str]:
    """Legend text per run label: the description, plus the run's own label where descriptions repeat (seeds)."""
    texts = [describe(run) for run in runs]
    return {
        run.label: text if texts.count(text) == 1 else f"{text} · {run.label}" for run, text in zip(runs, texts, strict=True)
    }


def figure_svg(fig: Figure, prefix: str) -> str:
    """The figure as an inline ``<svg>`` element (no XML prolog).

    Matplotlib names elements ``figure_1``, ``axes_1``, glyph ``DejaVuSans-..`` in every figure; with several
    figures in one page those ids would collide, so each id and every reference to it gets ``prefix``.
    """
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight")  # text as paths: renders the same without the font
    plt.close(fig)
    svg = buffer.getvalue()
    svg = svg[svg.find("<svg"):]
    svg = re.sub(r'(\sid=")([^"]+")', rf"\g<1>{prefix}-\g<2>", svg)
    return re.sub(r"(href=\"#|url\(#)", rf"\g<1>{prefix}-", svg)


def usage_over_training(runs: list[RunData], colors: dict[str, Any]) -> Figure:
    """2 x 2 panels: CVU, perplexity, utilization and dead codes at every validation, one line per run."""
    names = legend_labels(runs)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(2, 2, figsize=(11, 6.2), sharex=True)
        for ax, key in zip(axes.flat, USAGE_KEYS, strict=True):
            for run in runs:
                steps, values = run.series(key)
                if steps:
                    ax.plot(steps, values, marker="o", ms=3, lw=1.6, color=colors[run.label], label=names[run.label])
            ax.set_title(USAGE_TITLES[key], loc="left")
            if key in ("val/codebook/cvu", "val/codebook/utilization"):
                ax.set_ylim(0, 1.02)
        for ax in axes[1]:
            ax.set_xlabel("training step")
        handles, labels = axes.flat[0].get_legend_handles_labels()
        if handles:
            fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(3, len(labels)),
                       frameon=False)
        fig.tight_layout()
    return fig


def final_usage_bars(runs: list[RunData], colors: dict[str, Any]) -> Figure:
    """Horizontal bars of the final CVU and perplexity per run (perplexity against the run's K)."""
    with plt.rc_context(STYLE):
        height = max(1.8, 0.38 * len(runs) + 1.0)
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, height), sharey=True)
        y = np.arange(len(runs))
        names = legend_labels(runs)
        labels = [names[run.label] for run in runs]
        for ax, key, title in ((left, "val/codebook/cvu", "final CVU"), (right, "val/codebook/perplexity",
                                                                       "final perplexity (of K codes)")):
            values = [run.final(key) for run in runs]
            bars = ax.barh(y, [v or 0.0 for v in values], color=[colors[r.label] for r in runs], height=0.7)
            for bar, value in zip(bars, values, strict=True):
                ax.annotate(format_number(value, 3), (bar.get_width(), bar.get_y() + bar.get_height() / 2),
                            xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
            ax.set_title(title, loc="left")
            ax.grid(axis="y", visible=False)
        for i, run in enumerate(runs):
            if run.quantizer.codebook_size:
                right.plot([run.quantizer.codebook_size] * 2, [i - 0.4, i + 0.4], color="0.35", lw=1.2, ls=":")
        left.set_xlim(0, 1.12)
        right.set_xlim(0, max([r.quantizer.codebook_size or 0 for r in runs] +
                              [r.final("val/codebook/perplexity") or 0 for r in runs] + [1]) * 1.12)
        left.set_yticks(y, labels)
        left.invert_yaxis()
        fig.tight_layout()
    return fig


def code_frequencies(runs: list[RunData], colors: dict[str, Any]) -> Figure | None:
    """Sorted code frequencies of each run's last validation (log scale) against the uniform 1/K line."""
    curves = []
    for run in runs:
        found = run.token_counts()
        if found is not None and found[1].sum() > 0:
            curves.append((run, found[0], found[1]))
    if not curves:
        return None
    names = legend_labels(runs)
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(11, 3.6))
        for run, step, counts in curves:
            freq = np.sort(counts / counts.sum())[::-1]
            freq = freq[freq > 0]
            rank = np.arange(1, len(freq) + 1) / len(counts)  # share of the codebook, so different K align
            ax.plot(rank, freq * len(counts), lw=1.6, color=colors[run.label],
                    label=f"{names[run.label]} (step {step})")
        ax.axhline(1.0, color="0.3", ls="--", lw=1, label="uniform use")
        ax.set_yscale("log")
        ax.set_xlim(0, 1)
        ax.set_xlabel("codes sorted by frequency (share of the codebook)")
        ax.set_ylabel("frequency × K")
        ax.set_title("how evenly the codes are used at the last validation (flat at 1 = every code equally)",
                     loc="left")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        fig.tight_layout()
    return fig


def parallel_axes(runs: list[RunData]) -> list[tuple[str, str, Any]]:
    """The axes of the parallel-coordinates panel: ``(title, kind, getter)`` for the values the runs have."""
    audio = any(run.modality == "audio" for run in runs)
    quality = [("PESQ", "val/pesq"), ("STOI", "val/stoi")] if audio else [("PSNR", "val/psnr"), ("SSIM", "val/ssim")]
    axes: list[tuple[str, str, Any]] = []
    if any(run.quantizer.eta is not None for run in runs):
        axes.append(("η", "param", lambda r: r.quantizer.eta))
    for key, title in (("quantize_rate", "quantize rate"), ("noise_rate", "noise rate")):
        values = {run.quantizer.init_args.get(key) for run in runs} - {None}
        if len(values) >= 2:  # an axis only for a setting the runs actually vary
            axes.append((title, "param", lambda r, k=key: r.quantizer.init_args.get(k)))
    axes.append(("rec. loss", "metric", lambda r: r.final("val/loss/rec")))
    for title, key in quality:
        axes.append((title, "metric", lambda r, k=key: r.final(k)))
    axes.append(("CVU", "metric", lambda r: r.final("val/codebook/cvu")))
    return [a for a in axes if any(a[2](run) is not None for run in runs)]


def parallel_coordinates(runs: list[RunData], colors: dict[str, Any]) -> Figure:
    """Parallel coordinates: eta (and other perturbation settings) → reconstruction → quality → CVU, one line per run.

    Each axis is scaled to the runs' range; a run without a value on an axis (VQ/FSQ have no eta) sits on the
    ``n/a`` mark below it.
    """
    axes = parallel_axes(runs)
    names = legend_labels(runs)
    missing = -0.16  # where runs without a value sit, below the axis
    with plt.rc_context({**STYLE, "axes.grid": False}):
        fig, ax = plt.subplots(figsize=(11, 4.2))
        columns = []
        for title, _, get in axes:
            values = [get(run) for run in runs]
            present = [v for v in values if v is not None]
            low, high = (min(present), max(present)) if present else (0.0, 1.0)
            span = high - low if high > low else 1.0
            scaled = [(missing if v is None else (v - low) / span if high > low else 0.5) for v in values]
            columns.append((title, low, high, scaled, any(v is None for v in values)))
        x = np.arange(len(columns))
        for i, run in enumerate(runs):
            ax.plot(x, [c[3][i] for c in columns], color=colors[run.label], lw=2.0, marker="o", ms=4,
                    label=names[run.label], alpha=0.9)
        for j, (title, low, high, _, has_missing) in enumerate(columns):
            ax.axvline(j, color="0.25", lw=1)
            ax.text(j, 1.06, title, ha="center", va="bottom", fontsize=10, fontweight="bold")
            ax.text(j + 0.03, 1.0, format_number(high, 3), ha="left", va="center", fontsize=8, color="0.3")
            ax.text(j + 0.03, 0.0, format_number(low, 3), ha="left", va="center", fontsize=8, color="0.3")
            if has_missing:
                ax.text(j + 0.03, missing, "n/a", ha="left", va="center", fontsize=8, color="0.45", style="italic")
        ax.set_xlim(-0.2, len(columns) - 0.45)  # room for the last axis' value labels
        ax.set_ylim(missing - 0.06, 1.15)
        ax.axis("off")
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
        fig.tight_layout()
    return fig
