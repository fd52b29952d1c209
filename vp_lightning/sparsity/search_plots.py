"""Figures of the allocation search: fitness per generation and the per-block sparsity profile."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vp_lightning.sparsity.search import AllocationSearch, block_sparsities

_COLORS = {"evolutionary": "#1f77b4", "random": "#ff7f0e"}


def plot_search(searches: Sequence[AllocationSearch], target: float, step: float, output_dir: Path,
                fitness: str = "kl") -> dict[str, Path]:
    """Write ``search-fitness-<target>.png`` and ``search-profile-<target>.png``; returns them by name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output_dir.mkdir(parents=True, exist_ok=True)
    label = "KL(dense || sparse) per token" if fitness == "kl" else "NLL per token"
    paths = {"fitness": output_dir / f"search-fitness-{target:.2f}.png",
             "profile": output_dir / f"search-profile-{target:.2f}.png"}

    fig, ax = plt.subplots(figsize=(6.5, 3.6), constrained_layout=True)
    for search in searches:
        if not search.history:
            continue
        evaluations = []
        total = 0
        for record in search.history:
            total += record.evaluations
            evaluations.append(total)
        best = [record.best_fitness for record in search.history]
        start = search.history[0].parent_fitness_before
        ax.step([0, *evaluations], [start, *best], where="post", color=_COLORS[search.mode],
                label=f"{search.mode} (best {best[-1]:.4f})")
    ax.set_xlabel("fitness evaluations")
    ax.set_ylabel(f"best {label}")
    ax.set_title(f"Block allocation search at sparsity {target:.2f} (fitness pool)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(paths["fitness"], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 3.6), constrained_layout=True)
    width = 0.8 / max(len(searches), 1)
    for i, search in enumerate(searches):
        values = block_sparsities(search.parent, target, step)
        positions = [b + (i - (len(searches) - 1) / 2) * width for b in range(len(values))]
        ax.bar(positions, values, width=width, color=_COLORS[search.mode], label=search.mode)
    ax.axhline(target, color="black", linestyle="--", linewidth=1, label=f"uniform {target:.2f}")
    everything = [v for search in searches for v in block_sparsities(search.parent, target, step)] + [target]
    ax.set_ylim(max(0.0, min(everything) - 2 * step), max(everything) + 3 * step)  # room for the legend
    ax.set_xlabel("decoder block")
    ax.set_ylabel("block sparsity")
    ax.set_title("Per-block sparsity of the best allocation found")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper center", ncol=len(searches) + 1, framealpha=0.9)
    fig.savefig(paths["profile"], dpi=120)
    plt.close(fig)
    return paths
