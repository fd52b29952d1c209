"""Text pools for calibration, fitness and evaluation, as token sequences.

Documents are split into pools as whole documents (never overlapping windows), deterministically from a
seed, so the calibration, fitness and evaluation pools share no text. Each pool is tokenised as one stream
(documents joined by a blank line) and cut into fixed-length sequences; when a pool holds more sequences than
requested, evenly spaced ones are taken so every part of the pool is represented.

Sources: the Python documentation topics shipped with CPython (``pydoc_data.topics``, the default), local
``.txt`` files (one document per file), ``.jsonl`` files (one document per line, from a text field), or a
Hugging Face ``datasets`` dataset saved on disk with ``save_to_disk`` (one document per row).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from vp_lightning.sparsity.errors import SparsityConfigError, SparsityInputMissingError
from vp_lightning.sparsity.loading import load_tokenizer

POOLS = ("calibration", "fitness", "evaluation")
PYDOC_SOURCE = "pydoc_data.topics"


def load_documents(sources: Sequence[str] | None = None, text_field: str = "text") -> list[tuple[str, str]]:
    """Read documents as (key, text) pairs.

    Args:
        sources: paths (``.txt``, ``.jsonl``, or a ``datasets`` directory saved with ``save_to_disk``);
            None or ``["pydoc_data.topics"]`` for CPython's documentation topics.
        text_field: field holding the text in jsonl records and dataset rows.

    Returns:
        Documents with unique keys, in a deterministic order.
    """
    if not sources or list(sources) == [PYDOC_SOURCE]:
        from pydoc_data.topics import topics

        return [(key, topics[key]) for key in sorted(topics)]
    documents: list[tuple[str, str]] = []
    for source in sources:
        path = Path(source).expanduser()
        if path.is_dir():
            documents += _dataset_documents(path, text_field)
        elif path.suffix == ".txt":
            documents.append((str(path), path.read_text(encoding="utf-8")))
        elif path.suffix == ".jsonl":
            with path.open(encoding="utf-8") as handle:
                for line_number, line in enumerate(handle):
                    if line.strip():
                        record = json.loads(line)
                        if text_field not in record:
                            raise SparsityConfigError(f"{path}:{line_number + 1} has no field {text_field!r} (text_field)")
                        documents.append((f"{path}:{line_number}", record[text_field]))
        elif not path.exists():
            raise SparsityInputMissingError(f"text source {path} does not exist")
        else:
            raise SparsityConfigError(f"unsupported text source {path}: use .txt, .jsonl or a datasets directory")
    return [(key, text) for key, text in documents if text.strip()]


def _dataset_documents(path: Path, text_field: str) -> list[tuple[str, str]]:
    try:
        import datasets
    except ModuleNotFoundError as error:
        raise SparsityInputMissingError(f"{path} is a directory; reading it needs `pip install datasets`") from error
    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        data = datasets.concatenate_datasets([data[split] for split in sorted(data)])
    if text_field not in data.column_names:
        raise SparsityConfigError(f"dataset {path} has no column {text_field!r}; columns: {data.column_names}")
    return [(f"{path}:{i}", text) for i, text in enumerate(data[text_field])]


def split_documents(
    documents: Sequence[tuple[str, str]], fractions: dict[str, float], seed: int = 0
) -> dict[str, list[tuple[str, str]]]:
    """Assign whole documents to pools, aiming at the given fractions of characters.

    Documents are shuffled by a seeded RNG (from their sorted keys) and each goes to the pool currently
    furthest below its share, so the split depends only on the keys, texts and seed.

    Args:
        documents: (key, text) pairs with unique keys.
        fractions: pool name -> fraction of the characters (must sum to 1).
        seed: shuffling seed.

    Returns:
        pool name -> its documents.
    """
    if abs(sum(fractions.values()) - 1.0) > 1e-6 or any(f <= 0 for f in fractions.values()):
        raise SparsityConfigError(f"pool fractions must be positive and sum to 1, got {fractions}")
    if len(documents) < len(fractions):
        raise SparsityConfigError(f"{len(documents)} documents cannot fill {len(fractions)} disjoint pools")
    ordered = sorted(documents)
    random.Random(seed).shuffle(ordered)
    total = sum(len(text) for _, text in ordered)
    pools: dict[str, list[tuple[str, str]]] = {name: [] for name in fractions}
    filled = dict.fromkeys(fractions, 0)
    for key, text in ordered:
        # an empty pool always takes the next document, so every pool gets at least one
        empty = [name for name in fractions if not pools[name]]
        target = empty[0] if empty else min(fractions, key=lambda n: filled[n] / total - fractions[n])
        pools[target].append((key, text))
        filled[target] += len(text)
    return pools


def tokenize_pool(
    documents: Sequence[tuple[str, str]], tokenizer: Any, sequence_length: int, max_sequences: int | None
) -> Tensor:
    """Tokenise a pool as one stream and cut it into sequences.

    Returns:
        (N, sequence_length) int64 token ids; N = min(available, max_sequences), evenly spaced when capped.
    """
    stream: list[int] = []
    for _, text in documents:
        stream += tokenizer.encode(text + "\n\n")
    available = len(stream) // sequence_length
    if available == 0:
        raise SparsityConfigError(f"a pool has {len(stream)} tokens, fewer than one sequence of {sequence_length}")
    ids = torch.tensor(stream[: available * sequence_length], dtype=torch.long).view(available, sequence_length)
    if max_sequences is not None and max_sequences < available:
        ids = ids[torch.linspace(0, available - 1, max_sequences).round().long()]
    return ids


def fingerprint(ids: Tensor) -> str:
    """Short content hash of a token tensor (used to tell whether saved results match the data)."""
    return hashlib.sha1(ids.cpu().numpy().tobytes()).hexdigest()[:16]


class _Sequences(Dataset):
    def __init__(self, ids: Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, index: int) -> Tensor:
        return self.ids[index]


class ShardSampler(DistributedSampler):
    """Rank r takes sequences r, r + world, r + 2 world, ...: no padding and no duplicates.

    The default distributed sampler repeats samples to even out the shards, which would count some calibration
    sequences twice; statistics summed over ranks must equal single-process statistics exactly.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, len(self.dataset), self.num_replicas))


class WiSparseTextData(L.LightningDataModule):
    """Calibration / fitness / evaluation token pools; the training loader yields calibration batches.

    Args:
        tokenizer: ``"bytes"`` (UTF-8 bytes, for tests), a ``.gguf`` file, a model directory or cached id;
            None for the embedded SmolLM2 tokenizer.
        gguf_file: GGUF file name inside a model directory.
        sources: text sources (see :func:`load_documents`); None for ``pydoc_data.topics``.
        text_field: field with the text in jsonl records / dataset rows.
        fractions: share of characters per pool (calibration, fitness, evaluation).
        seed: seed of the document split.
        sequence_length: tokens per sequence.
        calibration_sequences: cap on calibration sequences (None = all).
        fitness_sequences: cap on fitness sequences (None = all).
        evaluation_sequences: cap on evaluation sequences (None = all).
        batch_size: calibration sequences per batch (per rank).
    """

    def __init__(
        self,
        tokenizer: str | None = None,
        gguf_file: str | None = None,
        sources: list[str] | None = None,
        text_field: str = "text",
        fractions: dict[str, float] | None = None,
        seed: int = 0,
        sequence_length: int = 256,
        calibration_sequences: int | None = 32,
        fitness_sequences: int | None = 16,
        evaluation_sequences: int | None = 16,
        batch_size: int = 4,
    ) -> None:
        super().__init__()
        self.tokenizer_name = tokenizer
        self.gguf_file = gguf_file
        self.sources = sources
        self.text_field = text_field
        self.fractions = fractions or {"calibration": 0.5, "fitness": 0.2, "evaluation": 0.3}
        if set(self.fractions) != set(POOLS):
            raise SparsityConfigError(f"fractions must name exactly the pools {POOLS}, got {sorted(self.fractions)}")
        self.seed = seed
        self.sequence_length = sequence_length
        self.limits = {
            "calibration": calibration_sequences,
            "fitness": fitness_sequences,
            "evaluation": evaluation_sequences,
        }
        self.batch_size = batch_size
        self._pools: dict[str, Tensor] = {}
        self._documents: dict[str, list[str]] = {}

    def setup(self, stage: str | None = None) -> None:
        if self._pools:
            return
        tokenizer = load_tokenizer(self.tokenizer_name, self.gguf_file)
        split = split_documents(load_documents(self.sources, self.text_field), self.fractions, self.seed)
        for name, documents in split.items():
            self._documents[name] = [key for key, _ in documents]
            self._pools[name] = tokenize_pool(documents, tokenizer, self.sequence_length, self.limits[name])

    def pool(self, name: str) -> Tensor:
        """(N, sequence_length) token ids of pool ``name`` (calibration, fitness or evaluation)."""
        if name not in POOLS:
            raise KeyError(f"unknown pool {name!r}; pools are {POOLS}")
        if not self._pools:
            self.setup()
        return self._pools[name]

    def pool_documents(self, name: str) -> list[str]:
        """Keys of the documents in pool ``name``."""
        self.pool(name)
        return self._documents[name]

    def pool_fingerprint(self, name: str) -> str:
        return fingerprint(self.pool(name))

    def train_dataloader(self) -> DataLoader:
        dataset = _Sequences(self.pool("calibration"))
        sampler = None
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            sampler = ShardSampler(dataset, num_replicas=trainer.world_size, rank=trainer.global_rank)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, sampler=sampler)
