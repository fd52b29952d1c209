"""Fitness of block allocations on the fitness pool, with what does not change between offspring cached.

Two caches make one offspring evaluation much cheaper than a forward pass of the dense and the sparse model:

* **dense next-token log-probabilities** of the fitness sequences are computed once (stored in float16: the KL
  weighs each token by its dense probability, and log-probabilities near 0 keep ~1e-3 absolute precision);
* **the parent's hidden states entering every block**: an offspring differs from its parent in a few blocks
  only, so the blocks before the first changed one produce exactly the parent's hidden states and are skipped.

:attr:`FitnessEvaluator.blocks_run` and :attr:`FitnessEvaluator.blocks_full` count the block forwards executed
and the block forwards an uncached evaluation would have run (dense reference pass included), so the saving is
reported, not estimated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vp_lightning.sparsity.layers import set_sparsity_enabled, set_threshold
from vp_lightning.sparsity.reference import capture_block_io, run_block
from vp_lightning.sparsity.search import Genome

# (block, level) -> {module name: threshold vector} of that block's projections
ThresholdTable = Callable[[int, int], dict[str, Tensor]]


@dataclass
class _Batch:
    ids: Tensor  # (b, n)
    dense_log_probs: Tensor  # (b, n-1, v) float16
    block_kwargs: dict[str, Any]
    hidden0: Tensor  # (b, n, d) embeddings entering block 0


class FitnessEvaluator:
    """Mean per-token KL(dense || sparse) (or NLL) of genomes on fixed fitness sequences.

    Args:
        model: the causal LM, already sparsified (its :class:`SparseLinear` layers are driven here).
        blocks: its decoder blocks.
        final_norm: the norm between the last block and the LM head.
        thresholds: (block, level) -> threshold vectors of the block's projections (called once per pair).
        names: module names of the sparsified projections of every block.
        sequences: (N, n) fitness token ids (the largest stage's share of this rank, or all of them).
        batch_size: sequences per forward pass.
        fitness: ``kl`` or ``nll``.
    """

    def __init__(
        self,
        model: nn.Module,
        blocks: nn.ModuleList,
        final_norm: nn.Module,
        thresholds: ThresholdTable,
        names: dict[int, list[str]],
        sequences: Tensor,
        batch_size: int,
        fitness: str = "kl",
    ) -> None:
        self.model = model
        self.blocks = blocks
        self.final_norm = final_norm
        self.head = model.get_output_embeddings()
        self._thresholds_of = thresholds
        self._threshold_cache: dict[tuple[int, int], dict[str, Tensor]] = {}
        self.fitness = fitness
        self.batch_size = batch_size
        self.device = next(model.parameters()).device
        self.names_of_block = names
        self.batches: list[_Batch] = []
        self.num_sequences = sequences.shape[0]
        self.sequence_tokens = sequences.shape[1] - 1  # next-token predictions per sequence
        self.blocks_run = 0
        self.blocks_full = 0
        self._parent: Genome | None = None
        self._parent_hidden: list[list[Tensor]] = []  # per batch, per block: hidden state entering the block
        self.parent_sums: list[float] = []  # per-sequence fitness sums of the parent
        self._prepare(sequences)

    # ---------------------------------------------------------------------------------- caches
    @torch.no_grad()
    def _prepare(self, sequences: Tensor) -> None:
        set_sparsity_enabled(self.model, False)
        for start in range(0, sequences.shape[0], self.batch_size):
            ids = sequences[start : start + self.batch_size].to(self.device)
            reference = capture_block_io(self.model, self.blocks, ids)
            logits = self.head(self.final_norm(reference.hidden[-1]))
            log_probs = F.log_softmax(logits[:, :-1].float(), dim=-1).to(torch.float16)
            self.batches.append(_Batch(ids, log_probs, reference.block_kwargs, reference.hidden[0]))
        set_sparsity_enabled(self.model, True, {n for names in self.names_of_block.values() for n in names})

    def _apply(self, genome: Genome) -> None:
        """Set every block's thresholds for ``genome`` (small copies; nothing else may have to be trusted)."""
        for b, level in enumerate(genome):
            if (b, level) not in self._threshold_cache:
                self._threshold_cache[(b, level)] = self._thresholds_of(b, level)
            for name, threshold in self._threshold_cache[(b, level)].items():
                set_threshold(self.model, name, threshold)

    def _batch_range(self, sequences: int) -> range:
        if sequences % self.batch_size and sequences != self.num_sequences:
            raise ValueError(f"stage sequence count {sequences} is not a multiple of the batch size {self.batch_size}")
        return range(0, -(-min(sequences, self.num_sequences) // self.batch_size))

    def _score_logits(self, hidden: Tensor, batch: _Batch) -> Tensor:
        """(b,) summed per-token fitness of every sequence of the batch."""
        log_q = F.log_softmax(self.head(self.final_norm(hidden))[:, :-1].float(), dim=-1)
        if self.fitness == "nll":
            return -log_q.gather(-1, batch.ids[:, 1:, None]).squeeze(-1).sum(-1)
        log_p = batch.dense_log_probs.float()
        return (log_p.exp() * (log_p - log_q)).sum(-1).sum(-1)

    @torch.no_grad()
    def set_parent(self, genome: Genome) -> list[float]:
        """Install ``genome`` as the parent: cache its block inputs; returns its per-sequence fitness sums."""
        set_sparsity_enabled(self.model, True, {n for names in self.names_of_block.values() for n in names})
        self._apply(genome)
        self._parent = genome
        self._parent_hidden = []
        sums: list[float] = []
        for batch in self.batches:
            hidden = batch.hidden0
            states = []
            for block in self.blocks:
                states.append(hidden)
                hidden = run_block(block, hidden, batch.block_kwargs)
            self.blocks_run += len(self.blocks)
            self.blocks_full += 2 * len(self.blocks)
            self._parent_hidden.append(states)
            sums.extend(self._score_logits(hidden, batch).tolist())
        self.parent_sums = sums
        return sums

    def fitness_of_sums(self, sums: Sequence[float], sequences: int) -> float:
        """Mean per-token fitness over the first ``sequences`` sequences from per-sequence sums."""
        count = min(sequences, len(sums))
        return float(sum(sums[:count]) / (count * self.sequence_tokens))

    @torch.no_grad()
    def score(self, genome: Genome, sequences: int, first_sequence: int = 0) -> list[float]:
        """Per-sequence fitness sums of ``genome`` on sequences [first_sequence, sequences).

        Blocks before the first one where ``genome`` differs from the parent are not run: their output is
        the cached parent hidden state.
        """
        if self._parent is None:
            raise RuntimeError("set_parent() first")
        changed = [b for b, (g, p) in enumerate(zip(genome, self._parent, strict=True)) if g != p]
        # the parent's own genome still runs its last block, from the cached input of that block
        first = changed[0] if changed else len(self.blocks) - 1
        self._apply(genome)
        sums: list[float] = []
        for index in self._batch_range(sequences):
            if index * self.batch_size < first_sequence:
                continue
            batch = self.batches[index]
            hidden = self._parent_hidden[index][first]
            for b in range(first, len(self.blocks)):
                hidden = run_block(self.blocks[b], hidden, batch.block_kwargs)
            self.blocks_run += len(self.blocks) - first
            self.blocks_full += 2 * len(self.blocks)
            sums.extend(self._score_logits(hidden, batch).tolist())
        return sums

    @property
    def parent(self) -> Genome | None:
        return self._parent

    @property
    def saving(self) -> float:
        """Fraction of block forwards the caches avoided so far."""
        return 1.0 - self.blocks_run / self.blocks_full if self.blocks_full else 0.0
