"""LibriSpeech on disk as mono 16 kHz waveforms in [-1, 1]: random crops for training, padded and masked
utterances for evaluation.

The DataModule reads the layout of the official archives and never downloads anything::

    root/LibriSpeech/<subset>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac
    root/LibriSpeech/<subset>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt

``root`` may also be the ``LibriSpeech`` folder itself. ``root: embedded`` selects a small spoken dataset written
once into the same layout (see :mod:`vp_lightning.data.embedded_audio`), so the reading code is the same either
way. FLAC files are decoded with ``soundfile`` (torchaudio's loader needs FFmpeg through torchcodec).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import Dataset

from vp_lightning.data.bad_input import (
    BadInputTally,
    SharedSkipFlags,
    TooManyBadFilesError,
    merge_counts,
    skip_reason,
    too_many_bad_files_message,
)
from vp_lightning.data.embedded_audio import build_embedded_librispeech, embedded_librispeech_dir
from vp_lightning.data.splits import DatasetLayoutError, Split, SplitDataModule

log = logging.getLogger(__name__)

EXPECTED_LAYOUT = (
    "Expected layout: root/LibriSpeech/<subset>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac plus "
    "<speaker>-<chapter>.trans.txt (as unpacked from the official archives; root may also be the LibriSpeech "
    "folder itself). Or set `root: embedded` to use the built-in spoken dataset."
)
#: Paper setting: train on LibriSpeech 960 h, test on test-clean + test-other.
LIBRISPEECH_SUBSETS = {
    "train": ("train-clean-100", "train-clean-360", "train-other-500"),
    "val": ("dev-clean",),
    "test": ("test-clean", "test-other"),
}
EMBEDDED_SUBSETS = {"train": ("embedded-train",), "val": ("embedded-dev",), "test": ("embedded-test",)}

ScanMode = Literal["header", "full", "off"]


# ----------------------------------------------------------------------------------------------------------------
# Finding utterances


@dataclass(frozen=True)
class Utterance:
    """One LibriSpeech utterance on disk; ``transcript`` is ``""`` when its transcript line is missing."""

    path: Path
    utterance_id: str  # "<speaker>-<chapter>-<utt>"
    transcript: str

    @property
    def speaker(self) -> str:
        return self.utterance_id.split("-")[0]


def find_librispeech_base(root: str | os.PathLike, subsets: Sequence[str]) -> Path:
    """The folder that holds the subsets: ``root/LibriSpeech`` or ``root`` itself.

    Raises:
        DatasetLayoutError: If ``root`` does not exist or neither candidate holds any of ``subsets``.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetLayoutError(f"LibriSpeech root {root} does not exist or is not a folder. {EXPECTED_LAYOUT}")
    for base in (root / "LibriSpeech", root):
        if base.is_dir() and any((base / s).is_dir() for s in subsets):
            return base
    inside = root / "LibriSpeech" if (root / "LibriSpeech").is_dir() else root
    raise DatasetLayoutError(
        f"None of the subsets {list(subsets)} is a folder in {inside}. Found there: {_describe_folder(inside)}. "
        f"{EXPECTED_LAYOUT}"
    )


def read_transcripts(chapter_dir: Path) -> dict[str, str] | None:
    """``{utterance_id: TEXT}`` from the chapter's ``*.trans.txt`` files; None if there is none."""
    files = sorted(chapter_dir.glob("*.trans.txt"))
    if not files:
        return None
    out = {}
    for file in files:
        for line in file.read_text(errors="replace").splitlines():
            utt, _, text = line.strip().partition(" ")
            if utt:
                out[utt] = text.strip()
    return out


def index_subset(base: Path, subset: str) -> tuple[list[Utterance], int]:
    """All utterances of one subset, sorted by id, and how many have no transcript.

    Raises:
        DatasetLayoutError: If the subset folder is missing or holds no ``<speaker>/<chapter>/*.flac``.
    """
    folder = base / subset
    if not folder.is_dir():
        raise DatasetLayoutError(
            f"Subset {subset!r} not found: {folder} is not a folder. Subsets found in {base}: "
            f"{_describe_folder(base)}. {EXPECTED_LAYOUT}"
        )
    utterances, missing = [], 0
    for chapter_dir in sorted(p for p in folder.glob("*/*") if p.is_dir() and not p.name.startswith(".")):
        flacs = sorted(f for f in chapter_dir.glob("*.flac") if not f.name.startswith("."))
        if not flacs:
            continue
        transcripts = read_transcripts(chapter_dir) or {}
        for flac in flacs:
            text = transcripts.get(flac.stem)
            missing += text is None
            utterances.append(Utterance(flac, flac.stem, text or ""))
    if not utterances:
        elsewhere = sum(1 for _ in folder.rglob("*.flac"))
        hint = f" ({elsewhere} .flac files lie at other depths)" if elsewhere else ""
        raise DatasetLayoutError(
            f"Subset {subset!r} at {folder} holds no <speaker>/<chapter>/*.flac files{hint}. {EXPECTED_LAYOUT}"
        )
    return utterances, missing


def _describe_folder(folder: Path, limit: int = 8) -> str:
    entries = sorted(folder.iterdir())
    if not entries:
        return "nothing (the folder is empty)"
    shown = [f"{e.name}{'/' if e.is_dir() else ''}" for e in entries[:limit]]
    return ", ".join(shown) + (f" and {len(entries) - limit} more" if len(entries) > limit else "")


# ----------------------------------------------------------------------------------------------------------------
# Reading and checking one file


def inspect_flac(path: str | os.PathLike, full: bool = False) -> tuple[str | None, int, int, int]:
    """Check one audio file cheaply, in the main process, before training.

    Reads the header and the last few samples: a FLAC whose end cannot be reached (an interrupted download) fails
    here without decoding the whole file. ``full=True`` decodes every sample instead.

    Returns:
        ``(skip_reason, frames, sample_rate, channels)``; ``skip_reason`` is None for a usable file.
    """
    header_read = False
    try:
        if os.path.getsize(path) == 0:
            return "empty", 0, 0, 0
        with sf.SoundFile(path) as f:
            frames, rate, channels = f.frames, f.samplerate, f.channels
            header_read = True
            if frames == 0:
                return "empty", 0, rate, channels
            if full:
                f.read(dtype="float32")
            else:
                f.seek(max(0, frames - 64))
                f.read(64, dtype="float32")
    except Exception as error:  # noqa: BLE001 -- any decoder failure means the file is skipped
        reason = skip_reason(path, error)
        # a valid header whose promised samples cannot be reached is the mark of an interrupted copy
        return ("truncated" if header_read and reason == "corrupt" else reason), 0, 0, 0
    return None, frames, rate, channels


def load_audio(
    path: str | os.PathLike,
    sample_rate: int = 16000,
    num_samples: int | None = None,
    position: float | None = None,
    frames: int | None = None,
    file_rate: int | None = None,
) -> Tensor:
    """Decode a (part of an) audio file to mono float32 at ``sample_rate``.

    Args:
        path: Audio file (FLAC, WAV, ... anything libsndfile reads).
        sample_rate: Output rate; other rates are resampled (``torchaudio.functional.resample``).
        num_samples: Read only this many output samples (the whole file if None or longer than the file).
        position: Where the window starts, as a fraction of the free room ``frames - window`` (0 = start,
            0.5 = centre, a uniform random number = random crop). Ignored when ``num_samples`` is None.
        frames, file_rate: The file's length and rate from a previous header read (read here if None).

    Returns:
        ``(1, t)`` samples in [-1, 1]: channels are averaged, ``t <= num_samples``.
    """
    if frames is None or file_rate is None:
        info = sf.info(path)
        frames, file_rate = info.frames, info.samplerate
    start, stop = 0, frames
    if num_samples is not None:
        window = math.ceil(num_samples * file_rate / sample_rate)  # in the file's own samples
        if window < frames:
            start = int(round((position if position is not None else 0.5) * (frames - window)))
            stop = start + window
    data, rate = sf.read(path, start=start, stop=stop, dtype="float32", always_2d=True)  # (t, channels)
    if data.shape[0] == 0:
        raise ValueError(f"{path}: no audio samples")
    wave = torch.from_numpy(data).mean(dim=1)  # (t,) mono: average of the channels
    if rate != sample_rate:
        from torchaudio.functional import resample

        wave = resample(wave, rate, sample_rate)
    if num_samples is not None:
        wave = wave[:num_samples]
    return wave.clamp_(-1.0, 1.0).unsqueeze(0)


def pad_collate(items: Sequence[Tensor]) -> dict[str, Tensor]:
    """Pad ``(1, t_i)`` waveforms to the longest and mark real samples.

    Returns:
        ``{"x": (b, 1, T), "mask": (b, 1, T) float32}`` with ``mask = 1`` on real samples, 0 on padding. An item
        with no samples (an evaluation file that failed to decode) becomes all padding; ``T >= 1``.
    """
    longest = max(1, max(item.shape[-1] for item in items))
    x = torch.stack([F.pad(item, (0, longest - item.shape[-1])) for item in items])
    mask = torch.zeros_like(x)
    for i, item in enumerate(items):
        mask[i, :, : item.shape[-1]] = 1.0
    return {"x": x, "mask": mask}


# ----------------------------------------------------------------------------------------------------------------
# Dataset


class AudioClips(Dataset):
    """Audio files mapped to ``(1, t)`` mono waveforms, whole or cropped.

    A file that passed the setup scan but fails to decode is marked (visible across DataLoader workers) and
    counted against ``max_bad_fraction``. For training it is replaced by the next readable file; for evaluation
    it yields an empty waveform, which :func:`pad_collate` turns into an all-padding item, so no utterance is
    counted twice.

    Args:
        utterances: Files to read (already scanned).
        frames, rates: Length and sample rate of each file from the scan (``-1`` if unknown).
        tally: The setup scan of this split; it sets the denominator of the bad-file threshold.
        sample_rate: Output sample rate.
        crop_samples: Output length for crops, or None for whole files.
        random_crop: Random crop positions (training); otherwise centred.
        replace_failed: Replace a failed file by the next one (training) instead of an empty item.
        max_bad_fraction: Threshold in [0, 1] of skipped files, counting failures found while loading.
    """

    def __init__(
        self,
        utterances: Sequence[Utterance],
        frames: Sequence[int],
        rates: Sequence[int],
        tally: BadInputTally,
        sample_rate: int = 16000,
        crop_samples: int | None = None,
        random_crop: bool = False,
        replace_failed: bool = False,
        max_bad_fraction: float = 0.01,
    ) -> None:
        paths = [os.path.abspath(u.path) for u in utterances]
        self.base = os.path.commonpath([os.path.dirname(p) for p in paths]) if paths else ""
        # numpy arrays, not lists of Python objects: forked workers would copy the pages they touch (refcounts)
        self._relative = np.array([os.path.relpath(p, self.base).encode() for p in paths])
        self.frames = np.asarray(frames, dtype=np.int64)
        self.rates = np.asarray(rates, dtype=np.int64)
        self.tally, self.sample_rate, self.crop_samples = tally, sample_rate, crop_samples
        self.random_crop, self.replace_failed, self.max_bad_fraction = random_crop, replace_failed, max_bad_fraction
        self.skips = SharedSkipFlags(len(paths))

    def __len__(self) -> int:
        return len(self._relative)

    def path(self, index: int) -> str:
        return os.path.join(self.base, self._relative[index].decode())

    def __getitem__(self, index: int) -> Tensor:
        """Returns: ``(1, t)`` float32 in [-1, 1], ``t <= crop_samples`` for crops (``t = 0`` for a failed
        evaluation file)."""
        for offset in range(len(self) if self.replace_failed else 1):
            i = (index + offset) % len(self)
            if self.skips.is_marked(i):
                continue
            try:
                return self._load(i)
            except Exception as error:  # noqa: BLE001 -- a broken file must never stop training
                self._skip(i, error)
        if self.replace_failed:
            raise TooManyBadFilesError(f"None of the {len(self)} {self.tally.name} could be read.")
        return torch.zeros(1, 0)

    def _load(self, i: int) -> Tensor:
        known = self.frames[i] > 0
        position = None
        if self.crop_samples is not None:
            position = float(torch.rand(())) if self.random_crop else 0.5
        return load_audio(
            self.path(i), self.sample_rate, self.crop_samples, position,
            frames=int(self.frames[i]) if known else None, file_rate=int(self.rates[i]) if known else None,
        )

    def _skip(self, index: int, error: Exception) -> None:
        path = self.path(index)
        reason = skip_reason(path, error)
        self.skips.mark(index, reason)
        log.warning("Skipping %s (%s): %s", path, reason, error)
        failed = self.tally.skipped_files + self.skipped_while_loading()
        if len(failed) / max(self.tally.scanned, 1) > self.max_bad_fraction:
            raise TooManyBadFilesError(
                too_many_bad_files_message(self.tally.name, failed, self.tally.scanned, self.max_bad_fraction)
            )

    def skipped_while_loading(self) -> list[str]:
        """Files that passed the setup scan but failed to decode (from every worker process)."""
        return [self.path(i) for i in self.skips.marked_indices()]

    def bad_input_counts(self) -> dict[str, int]:
        """Setup scan counts plus failures found while loading."""
        late = {f"skipped/{reason}": n for reason, n in self.skips.counts().items()}
        return merge_counts([self.tally.counts(), late, {"skipped_files": len(self.skips)}])


def scan_utterances(
    utterances: Sequence[Utterance], sample_rate: int, mode: ScanMode = "header", name: str = "utterances"
) -> tuple[list[Utterance], list[int], list[int], BadInputTally]:
    """Run :func:`inspect_flac` over ``utterances``.

    Returns:
        The usable utterances, their frame counts and sample rates (``-1`` with ``mode="off"``), and the tally of
        skipped files and conversions (``converted/resampled``, ``converted/downmixed``).
    """
    tally = BadInputTally(name=name, scanned=len(utterances))
    if mode == "off":
        return list(utterances), [-1] * len(utterances), [-1] * len(utterances), tally
    # Threads, because the scan waits on the file system (often a network one) more than on the CPU.
    with ThreadPoolExecutor(max_workers=8 if len(utterances) > 256 else 1) as pool:
        results = list(pool.map(lambda u: inspect_flac(u.path, full=mode == "full"), utterances))
    kept, frames, rates = [], [], []
    for utt, (reason, n, rate, channels) in zip(utterances, results, strict=True):
        if reason is not None:
            tally.skip(utt.path, reason)
            continue
        kept.append(utt)
        frames.append(n)
        rates.append(rate)
        if rate != sample_rate:
            tally.convert("converted/resampled")
        if channels > 1:
            tally.convert("converted/downmixed")
    return kept, frames, rates, tally


# ----------------------------------------------------------------------------------------------------------------
# DataModule


class LibriSpeechDataModule(SplitDataModule):
    """LibriSpeech (or the embedded spoken set) as mono waveforms; batches are ``{"x": (b, 1, T), "mask": (b, 1, T)}``.

    Training batches are random crops of ``train_crop_seconds``; an utterance shorter than the crop is kept and
    padded, with ``mask = 0`` on the padding (counted at setup as ``padded/short``). Validation and test batches
    hold whole utterances (``eval_crop_seconds=None``) or centre crops, padded to the longest in the batch and
    masked the same way. Evaluation utterances are ordered longest first (when the scan knows their lengths) so
    each batch pads little and a batch that does not fit in memory fails at the first step.

    Every file is decoded with ``soundfile``, averaged to mono, resampled to ``sample_rate`` if needed, and
    scaled to [-1, 1]. Missing transcripts do not matter to a tokenizer: such utterances are used and counted
    (``missing_transcript``).

    Bad input: at setup every file is checked in the main process (header and last samples, or a full decode
    with ``scan="full"``). Zero-length, unreadable, truncated and corrupt files are skipped and counted, and if
    more than ``max_bad_fraction`` of a split is skipped, setup fails with :class:`TooManyBadFilesError` naming
    the files. A file that passes the scan but fails to decode later is, in training, replaced by the next
    readable file, and in evaluation turned into an all-padding item (so it adds nothing to losses or metrics);
    either way it is counted and checked against the same threshold. :attr:`bad_input_counts` gives all counts.

    Distributed training: when ``torch.distributed`` is initialised, training uses a shuffling
    ``DistributedSampler`` and validation/test use :class:`UnpaddedDistributedSampler`, so every evaluation
    utterance is seen by exactly one rank (ranks may run one batch fewer than others; validation steps must not
    call collectives per step). Both subclass ``DistributedSampler``, so Lightning keeps them.

    Args:
        root: Folder containing ``LibriSpeech/<subset>`` (or the subsets directly), or ``"embedded"``/``None``.
        train_subsets: Training subsets (default: the 960 h, or ``embedded-train``).
        val_subsets: Validation subsets (default: ``dev-clean``, or ``embedded-dev``).
        test_subsets: Test (and predict) subsets (default: ``test-clean`` + ``test-other``, or ``embedded-test``).
        sample_rate: Output sample rate.
        train_crop_seconds: Length of training crops.
        eval_crop_seconds: None for whole utterances in validation/test, or the length of centre crops.
        batch_size: Per-process training batch size.
        eval_batch_size: Per-process validation/test batch size (default ``batch_size``).
        num_workers: DataLoader worker processes.
        pin_memory: Pin host memory (only takes effect when CUDA is available).
        persistent_workers: Keep workers between epochs (default: when ``num_workers > 0``).
        max_bad_fraction: Largest fraction of a split that may be skipped as broken before the run stops.
        scan: Setup check of every file: ``header`` (fast), ``full`` (decode all) or ``off``.
        cache_dir: Where the embedded set is built (default ``$VP_LIGHTNING_CACHE`` or ``~/.cache/vp_lightning``).
        seed: Seed of the distributed training shuffle.
    """

    def __init__(
        self,
        root: str | None = "embedded",
        train_subsets: Sequence[str] | None = None,
        val_subsets: Sequence[str] | None = None,
        test_subsets: Sequence[str] | None = None,
        sample_rate: int = 16000,
        train_crop_seconds: float = 1.0,
        eval_crop_seconds: float | None = None,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool | None = None,
        max_bad_fraction: float = 0.01,
        scan: ScanMode = "header",
        cache_dir: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if sample_rate < 1 or batch_size < 1 or num_workers < 0 or (eval_batch_size or 1) < 1:
            raise ValueError(
                f"sample_rate, batch_size and eval_batch_size must be >= 1 and num_workers >= 0, got "
                f"sample_rate={sample_rate}, batch_size={batch_size}, eval_batch_size={eval_batch_size}, "
                f"num_workers={num_workers}"
            )
        if train_crop_seconds <= 0 or (eval_crop_seconds is not None and eval_crop_seconds <= 0):
            raise ValueError(
                f"crop lengths must be > 0 seconds, got train_crop_seconds={train_crop_seconds}, "
                f"eval_crop_seconds={eval_crop_seconds}"
            )
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must lie in [0, 1], got {max_bad_fraction}")
        if scan not in ("header", "full", "off"):
            raise ValueError(f"scan must be 'header', 'full' or 'off', got {scan!r}")
        self.save_hyperparameters()
        self.root = root
        defaults = EMBEDDED_SUBSETS if self.embedded else LIBRISPEECH_SUBSETS
        given = {"train": train_subsets, "val": val_subsets, "test": test_subsets}
        self.subsets: dict[Split, tuple[str, ...]] = {
            split: tuple([value] if isinstance(value, str) else value) if value is not None else defaults[split]
            for split, value in given.items()
        }
        for split, names in self.subsets.items():
            if not names:
                raise ValueError(f"{split}_subsets is empty; name at least one subset folder")
        self.sample_rate, self.batch_size = sample_rate, batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.train_crop_seconds, self.eval_crop_seconds = train_crop_seconds, eval_crop_seconds
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.persistent_workers = num_workers > 0 if persistent_workers is None else persistent_workers
        self.max_bad_fraction, self.scan, self.cache_dir, self.seed = max_bad_fraction, scan, cache_dir, seed
        self._datasets: dict[tuple[tuple[str, ...], bool], AudioClips] = {}
        self._utterances: dict[tuple[str, ...], list[Utterance]] = {}

    def utterances(self, split: Split) -> list[Utterance]:
        """The usable utterances of a split (with transcripts), in dataset order; call :meth:`setup` first."""
        self._dataset(split)
        return self._utterances[self._key(split)]

    collate_fn = staticmethod(pad_collate)

    # ------------------------------------------------------------------------------------------------------------

    def _embedded_root(self) -> Path:
        target = embedded_librispeech_dir(self.cache_dir)
        if not target.exists():
            rank_zero_info(f"Building the embedded spoken dataset (espeak-ng voices) in {target}")
        return build_embedded_librispeech(self.cache_dir)

    def _base(self) -> Path:
        if self.embedded:
            root = self._embedded_root()
            rank_zero_info(f"Using the embedded spoken dataset at {root}")
            return root / "LibriSpeech"
        return find_librispeech_base(self.root, [s for names in self.subsets.values() for s in names])

    def _key(self, split: Split) -> tuple[tuple[str, ...], bool]:
        # val and test may name the same subsets: index and scan them once.
        return self.subsets[split], split == "train"

    def _describe(self, split: Split, count: int) -> str:
        return f"The {split} subsets {list(self.subsets[split])} have {count} usable utterances"

    def _build(self, split: Split) -> AudioClips:
        base = self._base()
        subsets = self.subsets[split]
        found: list[Utterance] = []
        missing = 0
        for subset in subsets:
            utterances, no_text = index_subset(base, subset)
            found += utterances
            missing += no_text
        name = f"{split} utterances ({', '.join(subsets)})"
        kept, frames, rates, tally = scan_utterances(found, self.sample_rate, self.scan, name=name)
        if missing:
            tally.converted["missing_transcript"] += missing
        train = split == "train"
        crop = self.train_crop_seconds if train else self.eval_crop_seconds
        crop_samples = None if crop is None else max(1, round(crop * self.sample_rate))
        if crop_samples is not None and self.scan != "off":
            short = sum(1 for n, r in zip(frames, rates, strict=True) if n * self.sample_rate < crop_samples * r)
            if short:
                tally.converted["padded/short"] += short
        (rank_zero_warn if tally.num_skipped else rank_zero_info)(tally.summary())
        tally.check(self.max_bad_fraction)
        if not kept:
            raise DatasetLayoutError(f"The {split} subsets {list(subsets)} have no readable utterances.")
        if not train and self.scan != "off":  # longest first: little padding per batch, memory errors show early
            order = sorted(range(len(kept)), key=lambda i: (-frames[i] / rates[i], kept[i].utterance_id))
            kept, frames, rates = [kept[i] for i in order], [frames[i] for i in order], [rates[i] for i in order]
        self._utterances[self._key(split)] = kept
        return AudioClips(kept, frames, rates, tally, self.sample_rate, crop_samples, random_crop=train,
                          replace_failed=train, max_bad_fraction=self.max_bad_fraction)
