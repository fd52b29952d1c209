"""LibriSpeech DataModule on tiny FLAC trees in the real layout, bad input, and the embedded spoken dataset."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from vp_lightning.data.bad_input import TooManyBadFilesError
from vp_lightning.data.image import DatasetLayoutError, UnpaddedDistributedSampler
from vp_lightning.data.librispeech import (
    LibriSpeechDataModule,
    inspect_flac,
    load_audio,
    pad_collate,
)

SR = 16000


def tone(seconds: float, rate: int = SR, freq: float = 440.0, channels: int = 1) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    wave = 0.5 * np.sin(2 * np.pi * freq * t).astype(np.float32)
    return wave if channels == 1 else np.stack([wave] * channels, axis=1)


def write_utt(base: Path, subset: str, utt_id: str, data: np.ndarray, rate: int = SR, text: str | None = "HELLO"):
    speaker, chapter, _ = utt_id.split("-")
    folder = base / subset / speaker / chapter
    folder.mkdir(parents=True, exist_ok=True)
    sf.write(folder / f"{utt_id}.flac", data, rate, format="FLAC", subtype="PCM_16")
    if text is not None:
        with open(folder / f"{speaker}-{chapter}.trans.txt", "a") as f:
            f.write(f"{utt_id} {text}\n")
    return folder / f"{utt_id}.flac"


@pytest.fixture
def libri(tmp_path) -> Path:
    """root/LibriSpeech/{train-clean-100, dev-clean, test-clean}: a few clean 16 kHz utterances each."""
    base = tmp_path / "root" / "LibriSpeech"
    for i in range(6):
        write_utt(base, "train-clean-100", f"19-198-{i:04d}", tone(0.3 + 0.1 * i, freq=200 + 50 * i))
    for i, seconds in enumerate([0.25, 0.6, 0.4]):
        write_utt(base, "dev-clean", f"84-121-{i:04d}", tone(seconds), text=f"UTTERANCE NUMBER {i}")
    write_utt(base, "test-clean", "61-70-0000", tone(0.5))
    return tmp_path / "root"


def module(root, **kw) -> LibriSpeechDataModule:
    args = dict(train_subsets=["train-clean-100"], val_subsets=["dev-clean"], test_subsets=["test-clean"],
                batch_size=2, num_workers=0, train_crop_seconds=0.5)
    return LibriSpeechDataModule(root=str(root), **{**args, **kw})


def test_train_batches_are_fixed_crops_and_short_files_are_padded_with_a_mask(libri):
    dm = module(libri)
    dm.setup("fit")
    loader = dm.train_dataloader()
    masks = []
    for batch in loader:
        assert set(batch) == {"x", "mask"}
        # padded to the longest item of the batch (the shuffle may pair the two short files): at most the crop
        assert batch["x"].shape == batch["mask"].shape and batch["x"].dtype == torch.float32
        assert batch["x"].shape[:2] == (2, 1) and batch["x"].shape[-1] == batch["mask"].sum(-1).max() <= 8000
        assert batch["x"].abs().max() <= 1.0
        assert (batch["x"] * (1 - batch["mask"])).abs().max() == 0  # padding is zeros
        masks.append(batch["mask"].sum((1, 2)))
    lengths = sorted(torch.cat(masks).tolist())
    assert lengths == [4800.0, 6400.0, 8000.0, 8000.0, 8000.0, 8000.0]  # 0.3 s and 0.4 s files padded to 0.5 s
    assert dm.bad_input_counts["padded/short"] == 2


def test_random_crops_vary_and_come_from_the_file(libri):
    dm = module(libri, train_crop_seconds=0.1)
    dm.setup("fit")
    dataset = dm._dataset("train")
    idx = dm.utterances("train").index(next(u for u in dm.utterances("train") if u.utterance_id == "19-198-0005"))
    whole = load_audio(dm.utterances("train")[idx].path)[0]
    crops = {tuple(dataset[idx][0, :4].tolist()) for _ in range(8)}
    assert len(crops) > 1
    crop = dataset[idx][0]
    starts = [s for s in range(len(whole) - 1600 + 1) if torch.equal(whole[s : s + 1600], crop)]
    assert starts  # an exact window of the decoded file


def test_eval_batches_hold_whole_utterances_longest_first(libri):
    dm = module(libri, eval_batch_size=3)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert batch["x"].shape == (3, 1, 9600)
    assert batch["mask"].sum((1, 2)).tolist() == [9600.0, 6400.0, 4000.0]
    assert [u.utterance_id for u in dm.utterances("val")] == ["84-121-0001", "84-121-0002", "84-121-0000"]
    assert dm.utterances("val")[0].transcript == "UTTERANCE NUMBER 1"


def test_eval_centre_crops(libri):
    dm = module(libri, eval_crop_seconds=0.3, eval_batch_size=3)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert batch["mask"].sum((1, 2)).tolist() == [4800.0, 4800.0, 4000.0]
    whole = load_audio(dm.utterances("val")[0].path)[0]  # 0.6 s: the centre 0.3 s starts at 0.15 s
    assert torch.equal(batch["x"][0, 0], whole[2400:7200])


def test_root_may_be_the_librispeech_folder_itself(libri):
    dm = module(libri / "LibriSpeech")
    dm.setup("test")
    assert len(dm.utterances("test")) == 1


def test_stereo_is_averaged_to_mono(tmp_path):
    base = tmp_path / "LibriSpeech"
    left, right = tone(0.2), tone(0.2, freq=300.0)
    write_utt(base, "dev-clean", "1-2-0000", np.stack([left, right], axis=1))
    assert inspect_flac(base / "dev-clean/1/2/1-2-0000.flac")[3] == 2
    dm = module(tmp_path, val_subsets=["dev-clean"])
    dm.setup("validate")
    x = next(iter(dm.val_dataloader()))["x"][0, 0]
    expected = (torch.from_numpy(left) + torch.from_numpy(right)) / 2
    assert torch.allclose(x, expected, atol=2 / 32768)  # 16-bit FLAC rounding
    assert dm.bad_input_counts["converted/downmixed"] == 1


@pytest.mark.parametrize("rate", [8000, 44100])
def test_other_sample_rates_are_resampled(tmp_path, rate):
    write_utt(tmp_path / "LibriSpeech", "dev-clean", "1-2-0000", tone(0.5, rate=rate, freq=1000.0), rate=rate)
    dm = module(tmp_path, val_subsets=["dev-clean"])
    dm.setup("validate")
    x = next(iter(dm.val_dataloader()))["x"][0, 0]
    assert x.shape[-1] == 8000  # 0.5 s at 16 kHz
    spectrum = torch.fft.rfft(x).abs()
    assert spectrum.argmax().item() == pytest.approx(1000 * 0.5, abs=2)  # still a 1 kHz tone
    assert dm.bad_input_counts["converted/resampled"] == 1


def test_resampled_crops_have_the_requested_length(tmp_path):
    write_utt(tmp_path / "LibriSpeech", "train-clean-100", "1-2-0000", tone(2.0, rate=44100), rate=44100)
    write_utt(tmp_path / "LibriSpeech", "dev-clean", "3-4-0000", tone(0.5))
    dm = module(tmp_path, batch_size=1, train_crop_seconds=0.25)
    dm.setup("fit")
    assert dm._dataset("train")[0].shape == (1, 4000)


def test_missing_transcript_keeps_the_utterance_and_is_counted(tmp_path):
    base = tmp_path / "LibriSpeech"
    write_utt(base, "dev-clean", "1-2-0000", tone(0.3), text=None)  # no trans.txt at all
    write_utt(base, "dev-clean", "3-4-0000", tone(0.3), text="SPOKEN")
    write_utt(base, "dev-clean", "3-4-0001", tone(0.3), text=None)  # trans.txt lacks this line
    dm = module(tmp_path, val_subsets=["dev-clean"])
    dm.setup("validate")
    texts = {u.utterance_id: u.transcript for u in dm.utterances("val")}
    assert texts == {"1-2-0000": "", "3-4-0000": "SPOKEN", "3-4-0001": ""}
    assert dm.bad_input_counts["missing_transcript"] == 2
    assert dm.bad_input_counts["skipped_files"] == 0


def broken_files(base: Path, subset: str) -> dict[str, Path]:
    """A corrupt, a zero-length and a truncated FLAC next to readable ones."""
    good = write_utt(base, subset, "5-6-0000", tone(1.0))
    corrupt = good.with_name("5-6-0001.flac")
    corrupt.write_bytes(b"this is not a flac file" * 40)
    empty = good.with_name("5-6-0002.flac")
    empty.write_bytes(b"")
    truncated = good.with_name("5-6-0003.flac")
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    return {"corrupt": corrupt, "empty": empty, "truncated": truncated}


def test_broken_files_are_skipped_counted_and_named_above_the_threshold(tmp_path):
    base = tmp_path / "LibriSpeech"
    for i in range(1, 8):
        write_utt(base, "train-clean-100", f"5-6-{i + 10:04d}", tone(0.6))
    bad = broken_files(base, "train-clean-100")
    write_utt(base, "dev-clean", "3-4-0000", tone(0.5))
    dm = module(tmp_path, max_bad_fraction=0.5)  # 3 of 11 files broken
    dm.setup("fit")
    counts = dm.bad_input_counts
    assert counts["scanned_files"] == 11 + 1 and counts["skipped_files"] == 3  # train + the one dev file
    assert counts["skipped/corrupt"] == counts["skipped/empty"] == counts["skipped/truncated"] == 1
    assert len(dm.utterances("train")) == 8
    assert sum(b["x"].shape[0] for b in dm.train_dataloader()) == 8

    strict = module(tmp_path, max_bad_fraction=0.1)
    with pytest.raises(TooManyBadFilesError) as error:
        strict.setup("fit")
    for path in bad.values():
        assert str(path) in str(error.value)


def test_files_failing_after_the_scan_are_replaced_in_training_and_masked_in_evaluation(tmp_path):
    base = tmp_path / "LibriSpeech"
    for subset in ("train-clean-100", "dev-clean"):
        write_utt(base, subset, "1-2-0000", tone(0.4))
        write_utt(base, subset, "1-2-0001", tone(0.4))
    for subset in ("train-clean-100", "dev-clean"):
        (base / subset / "1/2/1-2-0000.flac").write_bytes(b"garbage" * 100)  # broken after the (skipped) scan
    dm = module(tmp_path, scan="off", max_bad_fraction=0.5, eval_crop_seconds=None)
    dm.setup("fit")
    train = dm._dataset("train")
    assert torch.equal(train[0], train[1])  # the next readable file stands in
    batch = next(iter(dm.val_dataloader()))
    assert batch["mask"].sum((1, 2)).tolist() == [0.0, 6400.0]  # the failed utterance adds nothing
    assert dm.bad_input_counts["skipped/corrupt"] == 2
    strict = module(tmp_path, scan="off", max_bad_fraction=0.0)
    strict.setup("fit")
    with pytest.raises(TooManyBadFilesError, match="1-2-0000.flac"):
        strict._dataset("train")[0]


def test_layout_errors_name_the_expected_layout(tmp_path, libri):
    with pytest.raises(DatasetLayoutError, match=r"does not exist.*LibriSpeech/<subset>/<speaker>/<chapter>"):
        module(tmp_path / "nowhere").setup("fit")
    with pytest.raises(DatasetLayoutError, match=r"'train-clean-360' not found.*dev-clean/.*Expected layout"):
        module(libri, train_subsets=["train-clean-100", "train-clean-360"]).setup("fit")
    (tmp_path / "flat" / "LibriSpeech" / "dev-clean").mkdir(parents=True)
    sf.write(tmp_path / "flat/LibriSpeech/dev-clean/1-2-0000.flac", tone(0.1), SR)
    with pytest.raises(DatasetLayoutError, match=r"no <speaker>/<chapter>/\*.flac files \(1 .flac files lie"):
        module(tmp_path / "flat").setup("validate")
    with pytest.raises(DatasetLayoutError, match="None of the subsets"):
        module(tmp_path / "flat", val_subsets=["test-other"]).setup("validate")


def test_empty_split_after_skipping_is_an_error(tmp_path):
    broken_files(tmp_path / "LibriSpeech", "dev-clean")["corrupt"].parent.joinpath("5-6-0000.flac").unlink()
    with pytest.raises(DatasetLayoutError, match="no readable utterances"):
        module(tmp_path, max_bad_fraction=1.0).setup("validate")


def test_bad_arguments_fail_at_construction(libri):
    with pytest.raises(ValueError, match="crop lengths"):
        module(libri, train_crop_seconds=0)
    with pytest.raises(ValueError, match="scan"):
        module(libri, scan="sometimes")
    with pytest.raises(ValueError, match="val_subsets is empty"):
        module(libri, val_subsets=[])


def test_defaults_follow_the_paper_for_real_data_and_embedded_subsets_otherwise():
    real = LibriSpeechDataModule(root="/data")
    assert real.subsets["train"] == ("train-clean-100", "train-clean-360", "train-other-500")
    assert real.subsets["test"] == ("test-clean", "test-other")
    embedded = LibriSpeechDataModule(root="embedded")
    assert embedded.subsets == {"train": ("embedded-train",), "val": ("embedded-dev",), "test": ("embedded-test",)}


def test_pad_collate_and_unpadded_sharding():
    batch = pad_collate([torch.ones(1, 3), torch.zeros(1, 0)])
    assert batch["x"].shape == (2, 1, 3) and batch["mask"].tolist() == [[[1, 1, 1]], [[0, 0, 0]]]
    assert pad_collate([torch.zeros(1, 0)])["x"].shape == (1, 1, 1)  # never a zero-length batch
    dataset = list(range(7))
    shards = [list(UnpaddedDistributedSampler(dataset, num_replicas=3, rank=r)) for r in range(3)]
    assert sorted(i for shard in shards for i in shard) == dataset  # every utterance exactly once


# -- embedded spoken dataset ------------------------------------------------------------------------------------


def test_documentation_sentences_and_transcripts():
    from vp_lightning.data.embedded_audio import CHAPTERS, SPEAKERS, documentation_sentences, transcript_text

    sentences = documentation_sentences()
    need = sum(len(SPEAKERS[s]) * CHAPTERS[s][0] * CHAPTERS[s][1] for s in SPEAKERS)
    assert len(sentences) >= need
    assert all(5 <= len(s.split()) <= 15 and s.endswith(".") for s in sentences)
    assert not any(c in s for s in sentences for c in "\"`()_=<>[]{}0123456789")
    assert transcript_text("Names, like x's, are bound; see here.") == "NAMES LIKE X'S ARE BOUND SEE HERE"
    speakers = [s.id for group in SPEAKERS.values() for s in group]
    assert len(speakers) == len(set(speakers))


def test_missing_espeak_is_a_clear_error(tmp_path, monkeypatch):
    import vp_lightning.data.embedded_audio as embedded

    monkeypatch.setattr(embedded.shutil, "which", lambda name: None)
    with pytest.raises(embedded.EspeakNotFoundError, match="apt-get install espeak-ng"):
        LibriSpeechDataModule(root="embedded", cache_dir=str(tmp_path)).prepare_data()
    assert not any(tmp_path.iterdir())  # nothing half-built, no fallback data


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng (apt-get install espeak-ng)")
def test_embedded_dataset_builds_once_deterministically_and_reads_like_librispeech(tmp_path, monkeypatch):
    import vp_lightning.data.embedded_audio as embedded

    # one short chapter per speaker keeps the build to a few seconds
    monkeypatch.setattr(embedded, "CHAPTERS", {s: (1, 1) for s in embedded.SUBSETS})
    root = embedded.build_embedded_librispeech(tmp_path / "a")
    files = sorted(root.glob("LibriSpeech/*/*/*/*.flac"))
    assert len(files) == 16
    stamp = files[0].stat().st_mtime_ns
    assert embedded.build_embedded_librispeech(tmp_path / "a") == root and files[0].stat().st_mtime_ns == stamp
    again = embedded.build_embedded_librispeech(tmp_path / "b")
    for f in files:  # same audio bit for bit
        other = again / f.relative_to(root)
        assert np.array_equal(sf.read(f)[0], sf.read(other)[0])

    speakers = {s: {p.parent.parent.name for p in files if p.parts[-4] == s} for s in embedded.SUBSETS}
    assert not (speakers["embedded-train"] & speakers["embedded-dev"]) and not (
        speakers["embedded-train"] & speakers["embedded-test"])

    dm = LibriSpeechDataModule(root="embedded", cache_dir=str(tmp_path / "a"), batch_size=2, num_workers=0)
    dm.prepare_data()
    dm.setup(None)
    texts = {s: {u.transcript for u in dm.utterances(s)} for s in ("train", "val", "test")}
    assert not (texts["train"] & texts["val"]) and not (texts["train"] & texts["test"])
    assert all(t and t == t.upper() for group in texts.values() for t in group)
    info = sf.info(files[0])
    assert info.samplerate == 16000 and info.channels == 1 and info.duration > 1.0
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].shape == (2, 1, 16000) and batch["x"].std() > 0.01  # speech, not silence
    assert math.isclose(dm.bad_input_counts["skipped_files"], 0)


def _shard_lengths(rank: int, root: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{out}.pg", rank=rank, world_size=2)
    try:
        dm = module(root, val_subsets=["dev-clean"], eval_batch_size=2)
        dm.setup("validate")
        lengths = [int(n) for batch in dm.val_dataloader() for n in batch["mask"].sum((1, 2)).tolist()]
        Path(f"{out}.{rank}").write_text(" ".join(map(str, lengths)))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_share_the_validation_utterances_without_duplicates(tmp_path):
    base = tmp_path / "LibriSpeech"
    seconds = [0.1 + 0.05 * i for i in range(5)]  # 5 utterances on 2 ranks: a padded sampler would repeat one
    for i, s in enumerate(seconds):
        write_utt(base, "dev-clean", f"7-8-{i:04d}", tone(s))
    torch.multiprocessing.spawn(_shard_lengths, args=(str(tmp_path), str(tmp_path / "lengths")), nprocs=2)
    per_rank = [[int(n) for n in (tmp_path / f"lengths.{r}").read_text().split()] for r in range(2)]
    assert sorted(per_rank[0] + per_rank[1]) == sorted(round(s * SR) for s in seconds)
    assert sorted(len(r) for r in per_rank) == [2, 3]
