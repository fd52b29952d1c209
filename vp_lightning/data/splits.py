"""What the file-based DataModules share: per-stage split set-up, loaders with distributed samplers that never pad
an evaluation, and bad-input counts.

A subclass says how to build a split's dataset (:meth:`SplitDataModule._build`), which splits share one dataset
(:meth:`SplitDataModule._key`), how to build its embedded default data and how to name a split in messages; the
loaders, samplers and checks live here once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from vp_lightning.data.bad_input import merge_counts

Split = Literal["train", "val", "test"]
_NEEDED: dict[str | None, tuple[Split, ...]] = {
    "fit": ("train", "val"),
    "validate": ("val",),
    "test": ("test",),
    "predict": ("test",),
    None: ("train", "val", "test"),
}
_STAGE_OF: dict[Split, str] = {"train": "fit", "val": "validate", "test": "test"}


class DatasetLayoutError(ValueError):
    """The dataset root or a split is missing, laid out wrongly, or empty."""


class UnpaddedDistributedSampler(DistributedSampler):
    """Shard a dataset over ranks without padding: rank r gets indices r, r + world_size, r + 2 * world_size, ...

    torch's :class:`~torch.utils.data.DistributedSampler` pads the index list by repeating samples until it divides
    by the world size, so an evaluation that sums per-sample statistics (token counts, code usage) would count the
    repeated samples twice. Here every index appears on exactly one rank; ranks may get one sample fewer than
    others. Being a ``DistributedSampler`` subclass, Lightning keeps it instead of inserting its own.

    Args:
        dataset: Any sized dataset.
        num_replicas: World size (default: from ``torch.distributed``).
        rank: This rank (default: from ``torch.distributed``).
    """

    def __init__(self, dataset: Dataset, num_replicas: int | None = None, rank: int | None = None) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, len(self.dataset), self.num_replicas))


def distributed_world() -> tuple[int, int]:
    """``(world_size, rank)`` of the initialised process group, ``(1, 0)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class SplitDataModule(L.LightningDataModule):
    """Base of the file-based DataModules (train / val / test splits of files on disk).

    Subclasses set in ``__init__``: ``root``, ``batch_size``, ``eval_batch_size``, ``num_workers``, ``pin_memory``,
    ``persistent_workers``, ``seed`` and ``_datasets = {}``, and implement :meth:`_key`, :meth:`_build`,
    :meth:`_embedded_root` and :meth:`_describe`.
    """

    collate_fn: Callable[[list[Any]], Any] | None = None

    @property
    def embedded(self) -> bool:
        return self.root is None or self.root == "embedded"

    def prepare_data(self) -> None:
        """Build the embedded data once (on one process per node)."""
        if self.embedded:
            self._embedded_root()

    def setup(self, stage: str | None = None) -> None:
        """Find, scan and index the splits that ``stage`` needs (all of them for ``None``)."""
        for split in _NEEDED[stage]:
            key = self._key(split)
            if key not in self._datasets:
                self._datasets[key] = self._build(split)

    def train_dataloader(self) -> DataLoader:
        dataset = self._dataset("train")
        world, rank = distributed_world()
        sampler = (
            DistributedSampler(dataset, world, rank, shuffle=True, seed=self.seed, drop_last=True) if world > 1 else None
        )
        if len(dataset) // world < self.batch_size:
            raise DatasetLayoutError(
                f"{self._describe('train', len(dataset))}, fewer than batch_size={self.batch_size} per process on "
                f"{world} process(es); with drop_last every epoch would be empty. Lower batch_size."
            )
        return self._loader(dataset, sampler, self.batch_size, shuffle=sampler is None, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    @property
    def bad_input_counts(self) -> dict[str, int]:
        """Skipped/converted counts summed over the splits set up so far (keys as in
        :meth:`~vp_lightning.data.BadInputTally.counts`). Failures found while loading are included from every
        worker of this process."""
        return merge_counts(ds.bad_input_counts() for ds in self._datasets.values())

    # -------------------------------------------------------------------------------------------- for subclasses
    def _key(self, split: Split) -> Any:
        """Identity of a split's dataset: splits with the same key (often val and test) share one dataset."""
        raise NotImplementedError

    def _build(self, split: Split) -> Dataset:
        """Find, scan and index one split."""
        raise NotImplementedError

    def _embedded_root(self) -> Path:
        """Build (once) and return the embedded default dataset."""
        raise NotImplementedError

    def _describe(self, split: Split, count: int) -> str:
        """``"The <split> ... has <count> usable <items>"`` for error messages."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------------------------
    def _dataset(self, split: Split) -> Dataset:
        key = self._key(split)
        if key not in self._datasets:
            raise RuntimeError(f"Call setup({_STAGE_OF[split]!r}) before requesting the {split} dataloader.")
        return self._datasets[key]

    def _eval_loader(self, split: Split) -> DataLoader:
        dataset = self._dataset(split)
        world, rank = distributed_world()
        if len(dataset) < world:
            raise DatasetLayoutError(f"{self._describe(split, len(dataset))}, fewer than the {world} processes.")
        sampler = UnpaddedDistributedSampler(dataset, world, rank) if world > 1 else None
        return self._loader(dataset, sampler, self.eval_batch_size, shuffle=False, drop_last=False)

    def _loader(self, dataset: Dataset, sampler: Any, batch_size: int, shuffle: bool, drop_last: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            sampler=sampler,
            drop_last=drop_last,
            collate_fn=type(self).collate_fn,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers and self.num_workers > 0,
        )
