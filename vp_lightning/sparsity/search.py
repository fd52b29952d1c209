"""Across-block allocation: a budget-preserving evolutionary search (and a random-search baseline).

A genome holds an integer level per decoder block; block b runs at sparsity ``target + step * level[b]``.
Every block of a Llama-family model has the same number of projection weights, so ``sum(level) == 0`` keeps the
parameter-weighted average exactly at the target. Mutations are paired moves (+1 on one block, -1 on another),
so no genome ever leaves the budget.

Selection is elitist with multi-stage racing: ``offspring`` mutants of the parent are scored on the first
(smallest) token budget, the best ``survivors[0]`` are re-scored on the next budget, and so on; the parent
competes in the last stage and is replaced only by a strictly better offspring. Fitness is the mean per-token
KL(dense || sparse) of next-token distributions on the fitness pool (or the sparse model's NLL).

The search state (parent, RNG, histories, evaluation counts) is a plain dict, so the Lightning job can put it in
its checkpoints and a killed search resumes exactly. With several processes the offspring of a stage are split
across ranks, each rank scores its share, the fitness values are gathered, and the selection runs identically
on every rank from the shared seeded RNG.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from vp_lightning.sparsity.errors import SparsityConfigError

Genome = tuple[int, ...]
# (genomes, stage) -> fitness of each genome on that stage's tokens (lower is better)
ScoreFn = Callable[[Sequence[Genome], int], list[float]]
GatherFn = Callable[[Any], list[Any]]


@dataclass
class SearchConfig:
    """Settings of the across-block search.

    Args:
        generations: generations of each search (one training epoch each).
        offspring: mutants scored per generation on the first stage.
        stage_tokens: token budget of every racing stage (increasing); a stage scores the first
            ``ceil(tokens / sequence_length)`` sequences of the fitness pool.
        survivors: offspring kept after every stage but the last (one entry per stage except the last, which keeps
            the single best); the parent joins the last stage.
        step: block-sparsity step of one level.
        max_sparsity: highest block sparsity a genome may use (also capped by the in-block greedy tables).
        max_moves: a mutation applies 1 to ``max_moves`` paired moves (uniformly drawn).
        fitness: ``kl`` (mean KL(dense || sparse) per token) or ``nll`` (mean NLL of the sparse model, i.e. log
            perplexity).
        seed: seed of the search's RNG (shared by every rank).
        random_baseline: also run a random search with the same number of fitness evaluations (same racing,
            offspring drawn as random budget-preserving genomes instead of mutants of the parent).
        random_moves: paired moves of a random genome's random walk from the uniform allocation (None: 2 per
            block).
    """

    generations: int = 40
    offspring: int = 16
    stage_tokens: list[int] = field(default_factory=lambda: [512, 2048])
    survivors: list[int] = field(default_factory=lambda: [4])
    step: float = 0.025
    max_sparsity: float = 0.9
    max_moves: int = 3
    fitness: str = "kl"
    seed: int = 0
    random_baseline: bool = False
    random_moves: int | None = None

    def __post_init__(self) -> None:
        if self.generations < 1 or self.offspring < 1:
            raise SparsityConfigError("search: generations and offspring must be at least 1")
        if not self.stage_tokens or any(b <= a for a, b in zip(self.stage_tokens, self.stage_tokens[1:], strict=False)):
            raise SparsityConfigError(f"search: stage_tokens must be increasing, got {self.stage_tokens}")
        if len(self.survivors) != len(self.stage_tokens) - 1:
            raise SparsityConfigError(
                f"search: survivors needs one entry per stage but the last ({len(self.stage_tokens) - 1}), "
                f"got {self.survivors}"
            )
        counts = [self.offspring, *self.survivors]
        if any(b < 1 or b > a for a, b in zip(counts, counts[1:], strict=False)):
            raise SparsityConfigError(f"search: survivors must shrink from offspring={self.offspring}, got {self.survivors}")
        if self.fitness not in ("kl", "nll"):
            raise SparsityConfigError(f"search: fitness must be 'kl' or 'nll', got {self.fitness!r}")
        if not 0 < self.step < 1 or self.max_moves < 1:
            raise SparsityConfigError("search: step must lie in (0, 1) and max_moves be at least 1")

    def evaluations_per_generation(self) -> int:
        """Fitness evaluations (genome x stage) of one generation, the parent's excluded."""
        return self.offspring + sum(self.survivors)


@dataclass(frozen=True)
class LevelBounds:
    """Inclusive level range of every block."""

    low: tuple[int, ...]
    high: tuple[int, ...]

    @classmethod
    def for_target(cls, target: float, step: float, max_sparsity: Sequence[float]) -> LevelBounds:
        """Levels keeping every block sparsity in [0, max_sparsity[b]] for the given target."""
        eps = 1e-9
        low, high = [], []
        for cap in max_sparsity:
            if target > cap + eps:
                raise SparsityConfigError(f"target sparsity {target} is above a block's reachable sparsity {cap:.3f}")
            low.append(-int(math.floor(target / step + eps)))
            high.append(int(math.floor((cap - target) / step + eps)))
        return cls(tuple(low), tuple(high))

    def contains(self, genome: Genome) -> bool:
        return all(lo <= g <= hi for g, lo, hi in zip(genome, self.low, self.high, strict=True))


def block_sparsities(genome: Genome, target: float, step: float) -> list[float]:
    """Sparsity of every block of ``genome``."""
    return [max(0.0, target + step * level) for level in genome]


def paired_move(genome: list[int], rng: random.Random, bounds: LevelBounds) -> bool:
    """Raise one block by a level and lower another (in place); False when no move is possible."""
    up = [b for b, g in enumerate(genome) if g < bounds.high[b]]
    down = [b for b, g in enumerate(genome) if g > bounds.low[b]]
    if not up or not down or (len(up) == 1 and up == down):
        return False
    i = rng.choice(up)
    j = rng.choice([b for b in down if b != i])
    genome[i] += 1
    genome[j] -= 1
    return True


def mutate(parent: Genome, rng: random.Random, bounds: LevelBounds, max_moves: int) -> Genome:
    """A mutant of ``parent``: 1..max_moves paired moves, never equal to the parent (when avoidable)."""
    for _ in range(100):
        child = list(parent)
        for _ in range(rng.randint(1, max_moves)):
            paired_move(child, rng, bounds)
        if tuple(child) != parent:
            return tuple(child)
    return tuple(child)


def random_genome(num_blocks: int, rng: random.Random, bounds: LevelBounds, moves: int) -> Genome:
    """A random budget-preserving genome: a random walk of paired moves from the uniform allocation."""
    genome = [0] * num_blocks
    for _ in range(moves):
        paired_move(genome, rng, bounds)
    return tuple(genome)


@dataclass
class GenerationRecord:
    """What one generation did (kept in the search state and logged)."""

    generation: int
    best_fitness: float
    parent_fitness_before: float
    improved: bool
    evaluations: int
    tokens_scored: int
    seconds: float
    stage_best: list[float]


class AllocationSearch:
    """Elitist multi-stage racing over budget-preserving genomes.

    Args:
        config: search settings.
        num_blocks: decoder blocks.
        bounds: level range of every block.
        stage_sequences: fitness sequences scored at every stage (cumulative, increasing).
        sequence_tokens: scored tokens per fitness sequence.
        mode: ``evolutionary`` (mutants of the parent) or ``random`` (random genomes, same racing).
    """

    def __init__(
        self,
        config: SearchConfig,
        num_blocks: int,
        bounds: LevelBounds,
        stage_sequences: Sequence[int],
        sequence_tokens: int,
        mode: str = "evolutionary",
    ) -> None:
        if mode not in ("evolutionary", "random"):
            raise SparsityConfigError(f"search mode must be 'evolutionary' or 'random', got {mode!r}")
        self.config = config
        self.num_blocks = num_blocks
        self.bounds = bounds
        self.stage_sequences = list(stage_sequences)
        self.sequence_tokens = sequence_tokens
        self.mode = mode
        # the random baseline draws from its own stream, so adding it never changes the evolutionary result
        self.rng = random.Random(config.seed if mode == "evolutionary" else config.seed + 1_000_003)
        self.parent: Genome = tuple([0] * num_blocks)
        self.parent_fitness: list[float] | None = None  # per stage
        self.history: list[GenerationRecord] = []
        self.evaluations = 0
        self.tokens_scored = 0

    # ------------------------------------------------------------------------------------------ state
    @property
    def generation(self) -> int:
        return len(self.history)

    @property
    def done(self) -> bool:
        return self.generation >= self.config.generations

    def state_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "parent": list(self.parent),
            "parent_fitness": self.parent_fitness,
            "history": [asdict(r) for r in self.history],
            "evaluations": self.evaluations,
            "tokens_scored": self.tokens_scored,
            "rng": _rng_state_to_json(self.rng.getstate()),
            "config": asdict(self.config),
            "bounds": [list(self.bounds.low), list(self.bounds.high)],
            "stage_sequences": self.stage_sequences,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["mode"] != self.mode or state["config"] != asdict(self.config):
            raise SparsityConfigError(
                "the checkpoint's search was run with other settings; start a new run instead of resuming it"
            )
        self.parent = tuple(int(g) for g in state["parent"])
        self.parent_fitness = state["parent_fitness"]
        self.history = [GenerationRecord(**r) for r in state["history"]]
        self.evaluations = int(state["evaluations"])
        self.tokens_scored = int(state["tokens_scored"])
        self.rng.setstate(_rng_state_from_json(state["rng"]))

    # ------------------------------------------------------------------------------------ one generation
    def _candidates(self) -> list[Genome]:
        if self.mode == "evolutionary":
            return [mutate(self.parent, self.rng, self.bounds, self.config.max_moves)
                    for _ in range(self.config.offspring)]
        moves = self.config.random_moves if self.config.random_moves is not None else 2 * self.num_blocks
        return [random_genome(self.num_blocks, self.rng, self.bounds, moves) for _ in range(self.config.offspring)]

    def step(self, score: ScoreFn, score_parent: Callable[[Genome], list[float]]) -> GenerationRecord:
        """Run one generation.

        Args:
            score: fitness of genomes at a stage (the caller splits them across ranks and gathers).
            score_parent: fitness of a genome at every stage (used for the initial parent only).

        Returns:
            The generation's record (also appended to ``history``).
        """
        start = time.perf_counter()
        evaluations_before, tokens_before = self.evaluations, self.tokens_scored
        if self.parent_fitness is None:
            self.parent_fitness = [float(f) for f in score_parent(self.parent)]
        before = self.parent_fitness[-1]
        pool = self._candidates()
        stage_best = []
        fitness: list[float] = []
        for stage in range(len(self.stage_sequences)):
            fitness = [float(f) for f in score(pool, stage)]
            self.evaluations += len(pool)
            self.tokens_scored += len(pool) * self.stage_sequences[stage] * self.sequence_tokens
            order = sorted(range(len(pool)), key=lambda i: (fitness[i], i))
            stage_best.append(fitness[order[0]])
            if stage < len(self.stage_sequences) - 1:
                keep = self.config.survivors[stage]
                pool = [pool[i] for i in order[:keep]]
        best = min(range(len(pool)), key=lambda i: (fitness[i], i))
        improved = fitness[best] < self.parent_fitness[-1]
        if improved:
            self.parent = pool[best]
            # the new parent's fitness on the earlier (smaller) stages is not needed again: the parent only
            # competes in the last stage
            self.parent_fitness = [math.nan] * (len(self.stage_sequences) - 1) + [fitness[best]]
        record = GenerationRecord(
            generation=self.generation,
            best_fitness=self.parent_fitness[-1],
            parent_fitness_before=before,
            improved=improved,
            evaluations=self.evaluations - evaluations_before,
            tokens_scored=self.tokens_scored - tokens_before,
            seconds=time.perf_counter() - start,
            stage_best=stage_best,
        )
        self.history.append(record)
        return record


def split_work(items: Sequence[Any], rank: int, world: int, work: Callable[[list[Any]], list[Any]],
               gather: GatherFn) -> list[Any]:
    """Process ``items`` split round-robin across ranks; every rank gets every result, in order."""
    mine = list(range(rank, len(items), world))
    values = work([items[i] for i in mine]) if mine else []
    merged: dict[int, Any] = {}
    for part in gather(list(zip(mine, values, strict=True))):
        merged.update({int(i): v for i, v in part})
    if len(merged) != len(items):
        raise RuntimeError(f"gathered {len(merged)} results for {len(items)} items")
    return [merged[i] for i in range(len(items))]


def _rng_state_to_json(state: tuple[Any, ...]) -> list[Any]:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _rng_state_from_json(state: list[Any]) -> tuple[Any, ...]:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
