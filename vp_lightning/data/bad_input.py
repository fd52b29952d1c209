"""Accounting for broken input files, shared by the image and audio DataModules.

Real datasets contain a few broken files (truncated downloads, zero-length files, unreadable permissions). A
DataModule handles them in two places:

* at ``setup()``, a cheap scan in the main process records every file it must skip and every file it will
  convert (grayscale to RGB, 44.1 kHz to 16 kHz, ...) in a :class:`BadInputTally`; this is where the
  ``max_bad_fraction`` threshold raises :class:`TooManyBadFilesError`, naming the files, before any training;
* in ``__getitem__``, a file that still fails to decode is replaced by another sample and marked in a
  :class:`SharedSkipFlags`, whose shared-memory storage makes marks from DataLoader worker processes visible to
  the main process (workers cannot update a Python counter the main process sees). :class:`SkippingFileDataset`
  implements this for any dataset with one file per sample.

Counts use flat keys so a callback can log them directly, e.g. ``data/skipped_files``.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

#: Reasons a file is skipped. ``corrupt`` covers every decoder error that is not one of the others.
SKIP_REASONS: tuple[str, ...] = ("missing", "empty", "unreadable", "truncated", "corrupt")

#: How many file names an error message lists.
MAX_NAMED_FILES = 10


class TooManyBadFilesError(RuntimeError):
    """More files were skipped than ``max_bad_fraction`` allows; the message names the files."""


def skip_reason(path: str | os.PathLike, error: BaseException) -> str:
    """Classify why a file could not be read.

    Args:
        path: The file that failed.
        error: The exception raised while opening or decoding it.

    Returns:
        One of :data:`SKIP_REASONS`.
    """
    if isinstance(error, FileNotFoundError) or not os.path.exists(path):
        return "missing"
    if isinstance(error, PermissionError) or not os.access(path, os.R_OK):
        return "unreadable"
    if os.path.getsize(path) == 0:
        return "empty"
    if "truncated" in str(error).lower():
        return "truncated"
    return "corrupt"


@dataclass
class BadInputTally:
    """Files scanned, skipped (with reason) and converted in one split.

    Args:
        name: What was scanned, used in messages (e.g. ``"train images"``).
    """

    name: str
    scanned: int = 0
    skipped: dict[str, list[str]] = field(default_factory=dict)
    converted: Counter[str] = field(default_factory=Counter)

    def skip(self, path: str | os.PathLike, reason: str) -> None:
        """Record a file that will not be used."""
        self.skipped.setdefault(reason, []).append(os.fspath(path))

    def convert(self, kind: str) -> None:
        """Record a file that is used after a conversion (``kind`` e.g. ``converted/grayscale``, ``upscaled``)."""
        self.converted[kind] += 1

    @property
    def skipped_files(self) -> list[str]:
        return [p for paths in self.skipped.values() for p in paths]

    @property
    def num_skipped(self) -> int:
        return sum(len(paths) for paths in self.skipped.values())

    @property
    def bad_fraction(self) -> float:
        return self.num_skipped / self.scanned if self.scanned else 0.0

    def counts(self) -> dict[str, int]:
        """Flat counts: ``scanned_files``, ``skipped_files``, ``skipped/<reason>`` and each conversion kind."""
        out = {"scanned_files": self.scanned, "skipped_files": self.num_skipped}
        out.update({f"skipped/{reason}": len(paths) for reason, paths in sorted(self.skipped.items())})
        out.update(sorted(self.converted.items()))
        return out

    def summary(self) -> str:
        """One log line, e.g. ``train images: 1000 scanned, 2 skipped (truncated: 1, empty: 1), 3 converted/...``."""
        line = f"{self.name}: {self.scanned} scanned, {self.num_skipped} skipped"
        if self.skipped:
            line += " (" + ", ".join(f"{r}: {len(p)}" for r, p in sorted(self.skipped.items())) + ")"
        if self.converted:
            line += ", " + ", ".join(f"{n} {kind}" for kind, n in sorted(self.converted.items()))
        return line

    def check(self, max_bad_fraction: float, extra_skipped: Sequence[str] = ()) -> None:
        """Raise if the skipped fraction exceeds ``max_bad_fraction``.

        Args:
            max_bad_fraction: Largest tolerated fraction of skipped files, in [0, 1].
            extra_skipped: Files skipped after the scan (e.g. failures found while loading).

        Raises:
            TooManyBadFilesError: Naming up to :data:`MAX_NAMED_FILES` of the skipped files.
        """
        files = self.skipped_files + [f for f in extra_skipped if f not in set(self.skipped_files)]
        if not self.scanned or len(files) / self.scanned <= max_bad_fraction:
            return
        raise TooManyBadFilesError(
            too_many_bad_files_message(self.name, files, self.scanned, max_bad_fraction)
        )


def too_many_bad_files_message(name: str, files: Sequence[str], total: int, max_bad_fraction: float) -> str:
    """The error text for :class:`TooManyBadFilesError`."""
    named = "\n  ".join(files[:MAX_NAMED_FILES])
    more = f"\n  ... and {len(files) - MAX_NAMED_FILES} more" if len(files) > MAX_NAMED_FILES else ""
    return (
        f"{len(files)} of {total} {name} could not be read ({len(files) / total:.1%} > max_bad_fraction="
        f"{max_bad_fraction:g}). Fix or remove these files, or raise max_bad_fraction:\n  {named}{more}"
    )


def merge_counts(tallies: Iterable[dict[str, int]]) -> dict[str, int]:
    """Sum flat count dicts (e.g. over splits)."""
    total: Counter[str] = Counter()
    for counts in tallies:
        total.update(counts)
    return dict(sorted(total.items()))


class SharedSkipFlags:
    """Per-sample skip marks that DataLoader worker processes can set and the main process can read.

    Backed by a shared-memory tensor with one byte per sample (0 = fine, i + 1 = ``reasons[i]``). Each worker
    only writes the byte of the sample it failed on, so concurrent writers never race on a shared counter.

    Args:
        size: Number of samples.
        reasons: Reason names that marks may use.
    """

    def __init__(self, size: int, reasons: Sequence[str] = SKIP_REASONS) -> None:
        if len(reasons) > 254:
            raise ValueError("at most 254 skip reasons fit in one byte")
        self.reasons = tuple(reasons)
        self.flags = torch.zeros(size, dtype=torch.uint8).share_memory_()

    def mark(self, index: int, reason: str) -> None:
        self.flags[index] = self.reasons.index(reason) + 1

    def is_marked(self, index: int) -> bool:
        return bool(self.flags[index])

    def marked_indices(self) -> list[int]:
        return torch.nonzero(self.flags).flatten().tolist()

    def __len__(self) -> int:
        return int(torch.count_nonzero(self.flags))

    def counts(self) -> dict[str, int]:
        """``{reason: count}`` for every reason that occurred."""
        codes = torch.bincount(self.flags.long(), minlength=len(self.reasons) + 1)[1:]
        return {reason: int(n) for reason, n in zip(self.reasons, codes, strict=True) if n}


class SkippingFileDataset(Dataset):
    """A dataset with one file per sample whose unreadable files are skipped, counted and checked.

    Subclasses implement :meth:`load`. ``__getitem__`` returns the sample of the first readable file at or after
    the requested index (wrapping around), marks every failure in :attr:`skips`, logs it, and raises
    :class:`TooManyBadFilesError` once setup skips plus load failures exceed ``max_bad_fraction`` of the scan.

    Args:
        files: One file per sample (already scanned).
        tally: The setup scan of these files; it sets the denominator of the threshold.
        max_bad_fraction: Threshold (in [0, 1]) on the fraction of skipped files.
    """

    def __init__(
        self, files: Sequence[str | os.PathLike], tally: BadInputTally, max_bad_fraction: float
    ) -> None:
        absolute = [os.path.abspath(f) for f in files]
        self.base = os.path.commonpath([os.path.dirname(f) for f in absolute]) if absolute else ""
        # One numpy byte array instead of a list of str: forked DataLoader workers that touch Python objects copy
        # their memory pages (reference counts), which costs the size of the list once per worker.
        self._relative = np.array([os.path.relpath(f, self.base).encode() for f in absolute])
        self.tally, self.max_bad_fraction = tally, max_bad_fraction
        self.skips = SharedSkipFlags(len(absolute))

    def load(self, index: int) -> Any:
        """Decode sample ``index``; raise any exception if the file is broken."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self._relative)

    def path(self, index: int) -> str:
        return os.path.join(self.base, self._relative[index].decode())

    def __getitem__(self, index: int) -> Any:
        return self.first_readable(index)

    def first_readable(self, index: int, replace: bool = True) -> Any:
        """Load ``index``, or with ``replace`` the next readable sample after it.

        Returns:
            The sample, or ``None`` if ``index`` is broken and ``replace`` is false.

        Raises:
            TooManyBadFilesError: If the failures pass the threshold or no file at all is readable.
        """
        for offset in range(len(self) if replace else 1):
            i = (index + offset) % len(self)
            if self.skips.is_marked(i):
                continue
            try:
                return self.load(i)
            except Exception as error:  # noqa: BLE001 -- a broken file must never stop training
                self._skip(i, error)
        if replace:
            raise TooManyBadFilesError(f"None of the {len(self)} {self.tally.name} could be read.")
        return None

    def _skip(self, index: int, error: Exception) -> None:
        path = self.path(index)
        reason = skip_reason(path, error)
        self.skips.mark(index, reason)
        log.warning("Skipping %s (%s): %s", path, reason, error)
        failed = self.tally.skipped_files + self.skipped_while_loading()
        if len(failed) / max(self.tally.scanned, 1) > self.max_bad_fraction:
            message = too_many_bad_files_message(
                self.tally.name, failed, self.tally.scanned, self.max_bad_fraction
            )
            raise TooManyBadFilesError(message)

    def skipped_while_loading(self) -> list[str]:
        """Files that passed the setup scan but failed to decode (marked by any worker process)."""
        return [self.path(i) for i in self.skips.marked_indices()]

    def bad_input_counts(self) -> dict[str, int]:
        """Setup scan counts plus failures found while loading."""
        late = {f"skipped/{reason}": n for reason, n in self.skips.counts().items()}
        return merge_counts([self.tally.counts(), late, {"skipped_files": len(self.skips)}])
