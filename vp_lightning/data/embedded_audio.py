"""A small spoken English dataset in the LibriSpeech layout, synthesised once with espeak-ng.

``root: embedded`` in an audio config selects it, so ``fit`` runs on a machine without LibriSpeech. Plain English
sentences from the Python documentation shipped with CPython (``pydoc_data.topics``; 5-15 words, letters only)
are spoken by espeak-ng voices with different accents, voice variants, speaking rates and pitches, each acting
as one "speaker". The audio is resampled to 16 kHz, given a faint noise floor (about -70 dBFS, in place of
espeak-ng's exact digital silence) and written as FLAC with LibriSpeech-style transcripts::

    <cache>/embedded-librispeech-v2/LibriSpeech/<subset>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac
    <cache>/embedded-librispeech-v2/LibriSpeech/<subset>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt

with subsets ``embedded-train`` (10 speakers, 100 utterances, about 7 minutes), ``embedded-dev`` and
``embedded-test`` (3 speakers and 12 utterances each, about 50 s). The three subsets share neither speakers nor
sentences. The files are then read by the same code that reads LibriSpeech.

The build takes a few seconds, is deterministic for a given espeak-ng and Python version, and is atomic: files are
written to a temporary folder that is renamed into place, so two processes building at once (e.g. two DDP ranks)
never see a half-written folder. An existing build is reused.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from vp_lightning.data.atomic import atomic_folder
from vp_lightning.data.embedded_images import default_cache_dir

#: Bump when the recipe changes so old caches are not reused.
EMBEDDED_VERSION = 2
SAMPLE_RATE = 16000
#: Standard deviation of the background noise added to every utterance (about -70 dBFS). espeak-ng writes exact
#: digital silence between words, which no microphone records; a faint noise floor keeps the embedded set closer
#: to read speech and keeps log-spectral losses from chasing exact zeros.
NOISE_FLOOR = 3e-4
MANIFEST = "manifest.json"
SUBSETS = ("embedded-train", "embedded-dev", "embedded-test")


class EspeakNotFoundError(RuntimeError):
    """espeak-ng is needed to build the embedded dataset and is not installed."""


@dataclass(frozen=True)
class Speaker:
    """One synthetic speaker: an espeak-ng voice (accent), a voice variant, a speaking rate and a pitch."""

    id: int
    voice: str  # espeak-ng voice (accent), e.g. "en-gb-scotland"
    variant: str  # espeak-ng variant (timbre), e.g. "f3"
    words_per_minute: int
    pitch: int  # 0-99, espeak-ng default 50
    sex: str  # of the variant, for SPEAKERS.TXT

    @property
    def espeak_voice(self) -> str:
        return f"{self.voice}+{self.variant}"


#: subset -> speakers; no speaker appears in two subsets.
SPEAKERS: dict[str, tuple[Speaker, ...]] = {
    "embedded-train": (
        Speaker(101, "en-us", "m3", 160, 45, "M"),
        Speaker(102, "en-us", "f3", 170, 60, "F"),
        Speaker(103, "en-gb", "m1", 150, 40, "M"),
        Speaker(104, "en-gb", "f2", 165, 65, "F"),
        Speaker(105, "en-gb-scotland", "m7", 155, 50, "M"),
        Speaker(106, "en-029", "f4", 175, 55, "F"),
        Speaker(107, "en-gb-x-rp", "m2", 145, 35, "M"),
        Speaker(108, "en-us-nyc", "f1", 180, 70, "F"),
        Speaker(109, "en-gb-x-gbclan", "m4", 160, 48, "M"),
        Speaker(110, "en-gb-x-gbcwmd", "f5", 150, 58, "F"),
    ),
    "embedded-dev": (
        Speaker(201, "en-us", "m5", 165, 42, "M"),
        Speaker(202, "en-gb", "f3", 155, 62, "F"),
        Speaker(203, "en-gb-scotland", "f2", 170, 57, "F"),
    ),
    "embedded-test": (
        Speaker(301, "en-us", "f4", 160, 66, "F"),
        Speaker(302, "en-gb-x-rp", "m6", 175, 38, "M"),
        Speaker(303, "en-029", "m1", 150, 52, "M"),
    ),
}
#: subset -> (chapters per speaker, utterances per chapter)
CHAPTERS: dict[str, tuple[int, int]] = {"embedded-train": (2, 5), "embedded-dev": (1, 4), "embedded-test": (1, 4)}

_WORD = re.compile(r"^[A-Za-z][a-z'-]*[,;]?$")  # plain words only: no code, quotes, digits or symbols
_HEADING = re.compile(r"[*=\-~^]+")


def embedded_librispeech_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the embedded dataset lives (built or not); the LibriSpeech tree is its ``LibriSpeech/`` folder."""
    return default_cache_dir(cache_dir) / f"embedded-librispeech-v{EMBEDDED_VERSION}"


def documentation_sentences(min_words: int = 5, max_words: int = 15) -> list[str]:
    """Sorted unique plain-English sentences from ``pydoc_data.topics`` (code blocks and headings removed)."""
    from pydoc_data.topics import topics

    found = set()
    for key in sorted(topics):
        for paragraph in re.split(r"\n\s*\n", topics[key]):
            lines = paragraph.split("\n")
            if any(line.startswith(" ") for line in lines) or any(_HEADING.fullmatch(x.strip()) for x in lines):
                continue  # indented = code example or grammar; underlined = heading
            for sentence in re.split(r"(?<=[.!?])\s+", " ".join(line.strip() for line in lines)):
                words = sentence[:-1].split()
                if (sentence.endswith(".") and min_words <= len(words) <= max_words
                        and all(_WORD.match(w) for w in words) and words[-1][-1].isalpha()):
                    found.add(sentence)
    return sorted(found)


def transcript_text(sentence: str) -> str:
    """LibriSpeech-style transcript: upper case, punctuation other than apostrophes removed."""
    return " ".join(re.sub(r"[^A-Za-z' ]", " ", sentence).upper().split())


def espeak_binary() -> str:
    """Path of the espeak-ng executable.

    Raises:
        EspeakNotFoundError: With the command that installs it.
    """
    path = shutil.which("espeak-ng")
    if path is None:
        raise EspeakNotFoundError(
            "The embedded mini-LibriSpeech is spoken by espeak-ng, which is not installed. Install it with "
            "`apt-get install espeak-ng` (Debian/Ubuntu; `brew install espeak-ng` on macOS), or set the data "
            "root to a LibriSpeech folder (root/LibriSpeech/<subset>/<speaker>/<chapter>/*.flac)."
        )
    return path


def speak(text: str, speaker: Speaker, sample_rate: int = SAMPLE_RATE, espeak: str | None = None) -> np.ndarray:
    """Synthesise ``text`` with ``speaker``'s voice; returns float32 mono samples at ``sample_rate``.

    Raises:
        RuntimeError: If espeak-ng fails or does not know the voice.
    """
    from torchaudio.functional import resample

    command = [espeak or espeak_binary(), "-v", speaker.espeak_voice, "-s", str(speaker.words_per_minute),
               "-p", str(speaker.pitch), "--stdout", text]
    result = subprocess.run(command, capture_output=True, check=False)
    if result.returncode != 0 or not result.stdout.startswith(b"RIFF") or b"does not exist" in result.stderr:
        raise RuntimeError(f"espeak-ng failed for voice {speaker.espeak_voice!r}: {result.stderr.decode().strip()}")
    wave, rate = sf.read(io.BytesIO(result.stdout), dtype="float32")
    if wave.ndim == 2:
        wave = wave.mean(axis=1)
    if rate != sample_rate:
        wave = resample(torch.from_numpy(wave), rate, sample_rate).numpy()
    return np.clip(wave, -1.0, 1.0)


def _recipe() -> dict:
    return {
        "version": EMBEDDED_VERSION,
        "sample_rate": SAMPLE_RATE,
        "noise_floor": NOISE_FLOOR,
        "speakers": {subset: [asdict(s) for s in speakers] for subset, speakers in SPEAKERS.items()},
        "chapters": {subset: list(shape) for subset, shape in CHAPTERS.items()},
    }


def _assign_sentences(seed: int = 0) -> dict[str, list[str]]:
    """Disjoint sentence lists per subset, in a fixed shuffled order."""
    sentences = documentation_sentences()
    random.Random(seed).shuffle(sentences)
    out, start = {}, 0
    for subset in SUBSETS:
        chapters, utterances = CHAPTERS[subset]
        need = len(SPEAKERS[subset]) * chapters * utterances
        out[subset] = sentences[start : start + need]
        start += need
    if start > len(sentences):
        raise RuntimeError(f"pydoc_data.topics has only {len(sentences)} usable sentences, {start} needed")
    return out


def build_embedded_librispeech(cache_dir: str | os.PathLike | None = None) -> Path:
    """Build the embedded dataset if it is not there yet, and return its root.

    Args:
        cache_dir: Parent folder; ``$VP_LIGHTNING_CACHE`` or ``~/.cache/vp_lightning`` when None.

    Returns:
        The dataset root; the LibriSpeech tree is ``<root>/LibriSpeech/<subset>/...``.

    Raises:
        EspeakNotFoundError: If the dataset must be built and espeak-ng is not installed.
        RuntimeError: If the folder exists but is incomplete or was built by another recipe.
    """
    target = embedded_librispeech_dir(cache_dir)
    recipe = _recipe()
    if target.exists():
        _check_existing(target, recipe)
        return target
    espeak = espeak_binary()
    with atomic_folder(target, MANIFEST, recipe) as tmp:
        sentences = _assign_sentences()
        for subset in SUBSETS:
            _write_subset(tmp / "LibriSpeech" / subset, subset, sentences[subset], espeak)
        _write_speakers_table(tmp / "LibriSpeech" / "SPEAKERS.TXT")
    _check_existing(target, recipe)
    return target


def _write_subset(folder: Path, subset: str, sentences: list[str], espeak: str) -> None:
    chapters, utterances = CHAPTERS[subset]
    queue = iter(sentences)
    for speaker in SPEAKERS[subset]:
        for c in range(chapters):
            chapter = speaker.id * 100 + c + 1
            chapter_dir = folder / str(speaker.id) / str(chapter)
            chapter_dir.mkdir(parents=True)
            lines = []
            for u in range(utterances):
                sentence = next(queue)
                utt_id = f"{speaker.id}-{chapter}-{u:04d}"
                wave = speak(sentence, speaker, espeak=espeak)
                noise = np.random.default_rng([speaker.id, chapter, u]).normal(0.0, NOISE_FLOOR, wave.shape)
                sf.write(chapter_dir / f"{utt_id}.flac", np.clip(wave + noise, -1.0, 1.0), SAMPLE_RATE,
                         format="FLAC", subtype="PCM_16")
                lines.append(f"{utt_id} {transcript_text(sentence)}\n")
            (chapter_dir / f"{speaker.id}-{chapter}.trans.txt").write_text("".join(lines))


def _write_speakers_table(path: Path) -> None:
    rows = ["; Synthetic speakers of the embedded mini-LibriSpeech (espeak-ng voice+variant, rate, pitch)\n",
            "; ID  |SEX| SUBSET           | NAME\n"]
    for subset, speakers in SPEAKERS.items():
        for s in speakers:
            rows.append(f"{s.id:<5}| {s.sex} | {subset:<16} | {s.espeak_voice} {s.words_per_minute}wpm "
                        f"pitch{s.pitch}\n")
    path.write_text("".join(rows))


def _check_existing(target: Path, recipe: dict) -> None:
    manifest = target / MANIFEST
    fix = f"Delete the folder to rebuild it: rm -r {target}"
    if not manifest.exists():
        raise RuntimeError(f"{target} exists but has no {MANIFEST}, so it was not built completely. {fix}")
    if json.loads(manifest.read_text()) != recipe:
        raise RuntimeError(f"{target} was built with a different recipe than this version expects. {fix}")
    for subset in SUBSETS:
        chapters, utterances = CHAPTERS[subset]
        expected = len(SPEAKERS[subset]) * chapters * utterances
        found = sum(1 for _ in (target / "LibriSpeech" / subset).glob("*/*/*.flac"))
        if found != expected:
            raise RuntimeError(f"{target / 'LibriSpeech' / subset} holds {found} FLAC files, not {expected}. {fix}")
