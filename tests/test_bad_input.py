"""Bad-input accounting shared by the DataModules: tallies, threshold error, shared skip flags."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from vp_lightning.data.bad_input import (
    BadInputTally,
    SharedSkipFlags,
    SkippingFileDataset,
    TooManyBadFilesError,
    merge_counts,
    skip_reason,
)


def test_tally_counts_and_summary():
    tally = BadInputTally("train images", scanned=10)
    tally.skip("a.jpg", "truncated")
    tally.skip("b.jpg", "empty")
    tally.skip("c.jpg", "truncated")
    tally.convert("converted/cmyk")
    tally.convert("upscaled")
    tally.convert("upscaled")

    assert tally.num_skipped == 3
    assert tally.bad_fraction == pytest.approx(0.3)
    assert tally.counts() == {
        "scanned_files": 10,
        "skipped_files": 3,
        "skipped/empty": 1,
        "skipped/truncated": 2,
        "converted/cmyk": 1,
        "upscaled": 2,
    }
    assert tally.summary() == (
        "train images: 10 scanned, 3 skipped (empty: 1, truncated: 2), 1 converted/cmyk, 2 upscaled"
    )


def test_threshold_is_inclusive_and_error_names_files():
    tally = BadInputTally("val images", scanned=4)
    tally.skip("/data/val/x/broken.JPEG", "corrupt")
    tally.check(max_bad_fraction=0.25)  # 1/4 is allowed

    with pytest.raises(TooManyBadFilesError) as err:
        tally.check(max_bad_fraction=0.2)
    message = str(err.value)
    assert "/data/val/x/broken.JPEG" in message
    assert "1 of 4 val images" in message and "max_bad_fraction=0.2" in message


def test_threshold_counts_late_failures_once_and_lists_at_most_ten():
    tally = BadInputTally("images", scanned=100)
    tally.skip("f0", "empty")
    tally.check(0.02, extra_skipped=["f0"])  # f0 is not counted twice: 1/100
    late = [f"f{i}" for i in range(1, 15)]
    with pytest.raises(TooManyBadFilesError) as err:
        tally.check(0.02, extra_skipped=late)
    message = str(err.value)
    assert message.startswith("15 of 100 images")
    assert "f9\n" in message and "f10" not in message and "... and 5 more" in message


def test_empty_tally_never_raises():
    BadInputTally("images").check(0.0)


def test_skip_reason(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    data = tmp_path / "data.jpg"
    data.write_bytes(b"xx")
    assert skip_reason(tmp_path / "gone.jpg", OSError("whatever")) == "missing"
    assert skip_reason(empty, OSError("cannot identify image file")) == "empty"
    assert skip_reason(data, PermissionError("denied")) == "unreadable"
    assert skip_reason(data, OSError("image file is truncated (3 bytes not processed)")) == "truncated"
    assert skip_reason(data, SyntaxError("broken PNG file")) == "corrupt"


def test_merge_counts():
    assert merge_counts([{"skipped_files": 1, "upscaled": 2}, {"skipped_files": 3, "skipped/empty": 3}]) == {
        "skipped/empty": 3,
        "skipped_files": 4,
        "upscaled": 2,
    }


def test_shared_skip_flags_counts():
    flags = SharedSkipFlags(6, reasons=("empty", "corrupt"))
    flags.mark(1, "corrupt")
    flags.mark(4, "empty")
    flags.mark(5, "corrupt")
    assert len(flags) == 3
    assert flags.marked_indices() == [1, 4, 5]
    assert flags.is_marked(4) and not flags.is_marked(0)
    assert flags.counts() == {"empty": 1, "corrupt": 2}
    with pytest.raises(ValueError):
        flags.mark(0, "not-a-reason")


class _MarksOdd(Dataset):
    """Marks every odd index as corrupt from inside whichever worker loads it."""

    def __init__(self, n: int) -> None:
        self.flags = SharedSkipFlags(n)
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        if i % 2:
            self.flags.mark(i, "corrupt")
        return torch.tensor(i)


def test_shared_skip_flags_see_marks_from_worker_processes():
    dataset = _MarksOdd(9)
    for _ in DataLoader(dataset, batch_size=2, num_workers=2):
        pass
    assert dataset.flags.marked_indices() == [1, 3, 5, 7]
    assert dataset.flags.counts() == {"corrupt": 4}


class _TextFiles(SkippingFileDataset):
    def load(self, index: int) -> str:
        text = open(self.path(index)).read()
        if not text:
            raise ValueError("empty file")
        return text


def test_skipping_file_dataset_replaces_and_counts(tmp_path):
    for name, text in [("a.txt", "A"), ("b.txt", ""), ("c.txt", "C"), ("d.txt", "")]:
        (tmp_path / name).write_text(text)
    files = sorted(tmp_path.iterdir())
    dataset = _TextFiles(files, BadInputTally("notes", scanned=4), max_bad_fraction=0.5)
    assert dataset.path(1) == str(tmp_path / "b.txt")
    assert [dataset[i] for i in range(4)] == ["A", "C", "C", "A"]  # b -> c, d -> (wraps) a
    assert dataset.first_readable(1, replace=False) is None
    assert dataset.skipped_while_loading() == [str(tmp_path / "b.txt"), str(tmp_path / "d.txt")]
    assert dataset.bad_input_counts() == {"scanned_files": 4, "skipped_files": 2, "skipped/empty": 2}


def test_skipping_file_dataset_threshold(tmp_path):
    for name in ("a.txt", "b.txt", "c.txt"):
        (tmp_path / name).write_text("" if name != "c.txt" else "C")
    dataset = _TextFiles(sorted(tmp_path.iterdir()), BadInputTally("notes", scanned=3), max_bad_fraction=0.5)
    with pytest.raises(TooManyBadFilesError, match="2 of 3 notes"):
        dataset[0]
