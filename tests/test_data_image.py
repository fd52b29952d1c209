"""ImageNetDataModule: layouts, transforms, the embedded photo set, bad input, and unpadded sharding."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DistributedSampler

from vp_lightning.data.bad_input import TooManyBadFilesError
from vp_lightning.data.embedded_images import (
    MANIFEST,
    TRAIN_PHOTOS,
    VAL_PHOTOS,
    build_embedded_photos,
    embedded_photos_dir,
    skimage_data_dir,
)
from vp_lightning.data.image import (
    DatasetLayoutError,
    ImageNetDataModule,
    UnpaddedDistributedSampler,
    load_rgb,
    to_rgb,
)

RES = 16


def _photo(seed: int, size=(24, 20)) -> Image.Image:
    """A small random RGB image (size = (width, height))."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _imagenet_tree(root: Path, n_train=(3, 3), n_val=(2, 1), ext=".JPEG") -> Path:
    """root/{train,val}/<wnid>/<wnid>_<k>.JPEG with n images per class."""
    for split, per_class in (("train", n_train), ("val", n_val)):
        for c, n in enumerate(per_class):
            folder = root / split / f"n0000000{c}"
            folder.mkdir(parents=True)
            for k in range(n):
                _photo(100 * c + k).save(folder / f"n0000000{c}_{k}{ext}", format="JPEG", quality=90)
    return root


def _dm(root, **kwargs) -> ImageNetDataModule:
    kwargs = {"resolution": RES, "batch_size": 2, "num_workers": 0, "max_bad_fraction": 0.0, **kwargs}
    return ImageNetDataModule(root=str(root), **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Layouts


def test_imagefolder_layout_samples_are_square_crops_in_range(tmp_path):
    dm = _dm(_imagenet_tree(tmp_path))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (2, 3, RES, RES) and batch.dtype == torch.float32
    assert batch.min() >= -1.0 and batch.max() <= 1.0
    assert batch.min() < -0.5 and batch.max() > 0.5  # random pixels span the range after scaling
    assert len(dm.train_dataloader()) == 3  # 6 images, drop_last
    val = list(dm.val_dataloader())
    assert [b.shape[0] for b in val] == [2, 1]  # no drop_last for validation
    assert dm.bad_input_counts == {"scanned_files": 9, "skipped_files": 0}


def test_val_transform_is_resize_then_center_crop(tmp_path):
    # A 32x16 image whose left, middle and right quarters differ: the centre crop keeps only the middle half.
    pixels = np.zeros((16, 32, 3), dtype=np.uint8)
    pixels[:, 8:24] = 255
    folder = tmp_path / "val" / "c"
    folder.mkdir(parents=True)
    Image.fromarray(pixels).save(folder / "x.png")
    dm = _dm(tmp_path, resolution=16, test_split="val")
    dm.setup("test")
    x = dm.test_dataloader().dataset[0]
    assert x.shape == (3, 16, 16)
    assert torch.allclose(x, torch.ones_like(x))  # white (255) maps to +1


def test_train_crops_are_random_and_val_crops_fixed(tmp_path):
    _imagenet_tree(tmp_path, n_train=(2,), n_val=(2,))
    dm = _dm(tmp_path, resolution=8)
    dm.setup("fit")
    train, val = dm.train_dataloader().dataset, dm.val_dataloader().dataset
    torch.manual_seed(0)
    assert any(not torch.equal(train[0], train[0]) for _ in range(5))
    assert torch.equal(val[0], val[0])


def test_flat_folder_recursive_and_case_insensitive_extensions(tmp_path):
    # A COCO-like tree: no class folders, nested subfolders, mixed extensions; non-images and hidden files ignored.
    for name in ["a.jpg", "b.JPG", "c.Png", "sub/d.webp", "sub/deeper/e.bmp", "f.jpeg"]:
        path = tmp_path / "images" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        _photo(len(name)).save(path)
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    (tmp_path / "images" / "._a.jpg").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    dm = _dm(tmp_path, train_split="images", val_split="images")
    dm.setup("fit")
    dataset = dm.train_dataloader().dataset
    assert len(dataset) == 6
    assert sorted(Path(dataset.path(i)).name for i in range(6)) == [
        "a.jpg",
        "b.JPG",
        "c.Png",
        "d.webp",
        "e.bmp",
        "f.jpeg",
    ]
    assert dm.bad_input_counts["skipped_files"] == 0


def test_file_list_relative_and_absolute(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for k in range(4):
        _photo(k).save(photos / f"{k}.png")
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "train.txt").write_text(
        f"# training images\n../photos/0.png\n\n{photos / '1.png'}\n../photos/2.png\n"
    )
    (lists / "val.txt").write_text("../photos/3.png\n")
    dm = _dm(tmp_path, train_split="lists/train.txt", val_split=str(lists / "val.txt"), batch_size=1)
    dm.setup("fit")
    train = dm.train_dataloader().dataset
    assert sorted(Path(train.path(i)).name for i in range(len(train))) == ["0.png", "1.png", "2.png"]
    assert len(dm.val_dataloader().dataset) == 1


def test_file_list_missing_entries_are_counted(tmp_path):
    _photo(0).save(tmp_path / "ok.png")
    (tmp_path / "list.txt").write_text("ok.png\ngone.png\n")
    dm = _dm(tmp_path, train_split="list.txt", val_split="list.txt", batch_size=1, max_bad_fraction=0.5)
    dm.setup("fit")
    assert (
        dm.bad_input_counts["skipped/missing"] == 2
    )  # once per split (train and val are indexed separately)


# ----------------------------------------------------------------------------------------------------------------
# Layout errors


def test_missing_root_names_expected_layout(tmp_path):
    with pytest.raises(DatasetLayoutError) as err:
        _dm(tmp_path / "imagenet").setup("fit")
    message = str(err.value)
    assert str(tmp_path / "imagenet") in message and "does not exist" in message
    assert "root/train/<class>/*.JPEG" in message and "root/val/<class>/*.JPEG" in message
    assert "root: embedded" in message


def test_missing_split_names_what_was_found(tmp_path):
    (tmp_path / "train2017").mkdir()
    (tmp_path / "annotations").mkdir()
    with pytest.raises(DatasetLayoutError) as err:
        _dm(tmp_path).setup("fit")
    message = str(err.value)
    assert "no train split" in message and "annotations/" in message and "train2017/" in message
    assert "root/train/<class>/*.JPEG" in message


def test_split_without_images_is_an_error(tmp_path):
    _imagenet_tree(tmp_path)
    labels = tmp_path / "val_raw" / "labels"
    labels.mkdir(parents=True)
    (labels / "labels.csv").write_text("a,b\n")
    with pytest.raises(DatasetLayoutError) as err:
        _dm(tmp_path, val_split="val_raw").setup("validate")
    assert "contains no images" in str(err.value) and "labels/labels.csv" in str(err.value)


def test_empty_split_folder_is_an_error(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(DatasetLayoutError, match="contains no images.*the folder is empty"):
        _dm(tmp_path).setup("fit")


def test_split_of_only_broken_files_is_an_error(tmp_path):
    folder = tmp_path / "val" / "c"
    folder.mkdir(parents=True)
    (folder / "x.jpg").write_bytes(b"")
    with pytest.raises(DatasetLayoutError, match="no readable images"):
        _dm(tmp_path, max_bad_fraction=1.0).setup("validate")


def test_train_split_smaller_than_a_batch_is_an_error(tmp_path):
    dm = _dm(_imagenet_tree(tmp_path), batch_size=8)
    dm.setup("fit")
    with pytest.raises(DatasetLayoutError, match="fewer than batch_size=8"):
        dm.train_dataloader()


def test_dataloader_before_setup_says_what_to_call(tmp_path):
    with pytest.raises(RuntimeError, match=r"setup\('fit'\)"):
        _dm(_imagenet_tree(tmp_path)).train_dataloader()


# ----------------------------------------------------------------------------------------------------------------
# Bad input


def _save_bad_inputs(folder: Path) -> None:
    """One file of each kind the scan must skip or convert, plus three good images."""
    folder.mkdir(parents=True)
    for k in range(3):
        _photo(k).save(folder / f"good{k}.jpg", quality=90)
    good = (folder / "good0.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (folder / "empty.JPEG").write_bytes(b"")
    (folder / "garbage.png").write_bytes(b"this is not a PNG" * 20)
    _photo(10).convert("L").save(folder / "gray.jpg")
    _photo(11).convert("RGBA").save(folder / "rgba.png")
    _photo(12).convert("CMYK").save(folder / "cmyk.jpg")
    _photo(13).convert("P").save(folder / "palette.png")
    Image.fromarray(np.full((20, 24), 257 * 40, dtype=np.uint16)).save(folder / "deep.png")
    _photo(14, size=(6, 9)).save(folder / "tiny.png")


def test_bad_inputs_are_skipped_converted_and_counted(tmp_path):
    _save_bad_inputs(tmp_path / "train" / "c")
    dm = _dm(tmp_path, train_split="train", val_split="train", batch_size=1, max_bad_fraction=0.5)
    dm.setup("validate")  # only the val split (the same folder, centre crops)
    assert dm.bad_input_counts == {
        "scanned_files": 12,
        "skipped_files": 3,
        "skipped/corrupt": 1,
        "skipped/empty": 1,
        "skipped/truncated": 1,
        "converted/16bit": 1,
        "converted/alpha": 1,
        "converted/cmyk": 1,
        "converted/grayscale": 1,
        "converted/palette": 1,
        "upscaled": 1,
    }
    dataset = dm.val_dataloader().dataset
    names = sorted(Path(dataset.path(i)).name for i in range(len(dataset)))
    assert names == sorted(["good0.jpg", "good1.jpg", "good2.jpg", "gray.jpg", "rgba.png", "cmyk.jpg",
                            "palette.png", "deep.png", "tiny.png"])  # fmt: skip
    for i in range(len(dataset)):
        x = dataset[i]
        assert x.shape == (3, RES, RES) and -1.0 <= x.min() and x.max() <= 1.0, dataset.path(i)


def test_too_many_bad_files_stops_setup_naming_them(tmp_path):
    _save_bad_inputs(tmp_path / "train" / "c")
    with pytest.raises(TooManyBadFilesError) as err:
        _dm(tmp_path, val_split="train", max_bad_fraction=0.2).setup("validate")
    message = str(err.value)
    assert "3 of 12 val images" in message
    for name in ("truncated.jpg", "empty.JPEG", "garbage.png"):
        assert name in message


def test_conversions_keep_content():
    # 16-bit grey 257 * 40 -> 40 in every channel (PIL's own convert would clip it to 255).
    deep = to_rgb(Image.fromarray(np.full((2, 2), 257 * 40, dtype=np.uint16)))
    assert np.asarray(deep).tolist() == [[[40, 40, 40]] * 2] * 2
    # Fully transparent pixels become white, opaque ones keep their colour.
    rgba = np.array([[[10, 20, 30, 0], [10, 20, 30, 255]]], dtype=np.uint8)
    assert np.asarray(to_rgb(Image.fromarray(rgba, "RGBA"))).tolist() == [[[255, 255, 255], [10, 20, 30]]]
    assert to_rgb(Image.new("L", (3, 2), 7)).getpixel((0, 0)) == (7, 7, 7)


def test_exif_orientation_is_applied(tmp_path):
    image = _photo(0, size=(20, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    image.save(tmp_path / "rotated.jpg", exif=exif)
    assert load_rgb(tmp_path / "rotated.jpg").size == (10, 20)


def test_file_failing_while_loading_is_replaced_and_counted(tmp_path):
    _imagenet_tree(tmp_path, n_train=(4,), n_val=(1,))
    (tmp_path / "train" / "n00000000" / "late.jpg").write_bytes(b"")
    dm = _dm(tmp_path, scan="off", batch_size=1, max_bad_fraction=0.3, val_split="train")
    dm.setup("validate")  # centre crops, so samples are reproducible
    dataset = dm.val_dataloader().dataset
    broken = [Path(dataset.path(i)).name for i in range(len(dataset))].index("late.jpg")
    replacement = dataset[(broken + 1) % len(dataset)]
    assert torch.equal(dataset[broken], replacement)  # the next readable image instead of a crash
    assert dm.bad_input_counts["skipped/empty"] == 1 and dm.bad_input_counts["skipped_files"] == 1
    assert dataset.skipped_while_loading() == [str(tmp_path / "train" / "n00000000" / "late.jpg")]


def test_late_failures_in_worker_processes_reach_the_datamodule(tmp_path):
    _imagenet_tree(tmp_path, n_train=(5,), n_val=(1,))
    folder = tmp_path / "train" / "n00000000"
    good = (folder / "n00000000_0.JPEG").read_bytes()
    (folder / "n00000000_1.JPEG").write_bytes(good[: len(good) // 2])
    dm = _dm(tmp_path, scan="off", batch_size=1, num_workers=2, max_bad_fraction=0.5)
    dm.setup("fit")
    assert sum(b.shape[0] for b in dm.train_dataloader()) == 5  # the broken sample was replaced
    assert dm.bad_input_counts["skipped/truncated"] == 1


def test_late_failures_beyond_threshold_stop_loading(tmp_path):
    _imagenet_tree(tmp_path, n_train=(4,), n_val=(1,))
    for name in ("x.jpg", "y.jpg"):
        (tmp_path / "train" / "n00000000" / name).write_bytes(b"")
    dm = _dm(tmp_path, scan="off", batch_size=1, max_bad_fraction=0.2)
    dm.setup("fit")
    with pytest.raises(TooManyBadFilesError, match="2 of 6 train images"):
        for _ in dm.train_dataloader():
            pass


# ----------------------------------------------------------------------------------------------------------------
# Embedded photo set


def test_photographs_exist_in_scikit_image():
    for photo in TRAIN_PHOTOS + VAL_PHOTOS:
        assert (skimage_data_dir() / photo).is_file(), photo


def _small_build(cache, seed=0):
    return build_embedded_photos(cache, seed=seed, train_crops_per_photo=2, val_crops_per_photo=3)


def _contents(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_embedded_build_is_deterministic_and_layout_is_imagenet(tmp_path):
    a, b = _small_build(tmp_path / "a"), _small_build(tmp_path / "b")
    assert a == embedded_photos_dir(tmp_path / "a") and a.name == "embedded-photos-v1"
    assert _contents(a) == _contents(b)
    assert len(list(a.glob("train/*/*.png"))) == 2 * len(TRAIN_PHOTOS)
    assert sorted(p.name for p in (a / "val").iterdir()) == ["chelsea", "rocket"]
    sizes = {Image.open(p).size for p in a.rglob("*.png")}
    assert all(64 <= w <= 96 and 64 <= h <= 96 for w, h in sizes) and len(sizes) > 5
    other = _small_build(tmp_path / "a", seed=1)
    assert other.name == "embedded-photos-v1-seed1" and _contents(other) != _contents(a)


def test_embedded_build_skips_when_present_and_refuses_partial(tmp_path):
    root = _small_build(tmp_path)
    first = next(root.rglob("*.png"))
    stamp = first.stat().st_mtime_ns
    assert _small_build(tmp_path) == root and first.stat().st_mtime_ns == stamp
    with pytest.raises(RuntimeError, match="different settings"):
        build_embedded_photos(tmp_path, train_crops_per_photo=5, val_crops_per_photo=3)
    first.unlink()
    with pytest.raises(RuntimeError, match="instead of 14.*rm -r"):
        _small_build(tmp_path)
    (root / MANIFEST).unlink()
    with pytest.raises(RuntimeError, match="not built completely"):
        _small_build(tmp_path)


def test_embedded_concurrent_builds_agree(tmp_path):
    results = []
    threads = [threading.Thread(target=lambda: results.append(_small_build(tmp_path))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0] == results[1]
    assert os.listdir(tmp_path) == ["embedded-photos-v1"]  # no temporary folders left behind
    assert len(_contents(results[0])) == 2 * len(TRAIN_PHOTOS) + 3 * len(VAL_PHOTOS)


def test_embedded_datamodule(tmp_path, monkeypatch):
    monkeypatch.setenv("VP_LIGHTNING_CACHE", str(tmp_path))
    dm = ImageNetDataModule(root="embedded", resolution=32, batch_size=8, num_workers=0)
    dm.prepare_data()
    dm.setup("fit")
    assert (tmp_path / "embedded-photos-v1" / MANIFEST).exists()
    assert len(dm.train_dataloader().dataset) == 200 * len(TRAIN_PHOTOS)
    assert len(dm.val_dataloader().dataset) == 100 * len(VAL_PHOTOS)
    batch = next(iter(dm.val_dataloader()))
    assert batch.shape == (8, 3, 32, 32) and batch.std() > 0.1
    assert dm.bad_input_counts == {"scanned_files": 1600, "skipped_files": 0}


# ----------------------------------------------------------------------------------------------------------------
# Distributed sharding


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("n", [1, 5, 7, 10])
def test_unpadded_sampler_covers_each_index_once(world_size, n):
    dataset = list(range(n))
    shards = [
        list(UnpaddedDistributedSampler(dataset, num_replicas=world_size, rank=r)) for r in range(world_size)
    ]
    flat = [i for shard in shards for i in shard]
    assert sorted(flat) == list(range(n))  # union is everything, nothing duplicated
    assert [len(UnpaddedDistributedSampler(dataset, world_size, r)) for r in range(world_size)] == list(
        map(len, shards)
    )
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    # torch's sampler, for contrast, repeats indices whenever n does not divide by the world size.
    padded = sum(len(DistributedSampler(dataset, world_size, r, shuffle=False)) for r in range(world_size))
    assert padded == n + (-n) % world_size


def test_unpadded_sampler_example():
    assert list(UnpaddedDistributedSampler(list(range(7)), num_replicas=3, rank=1)) == [1, 4]


def test_dataloaders_shard_when_distributed(tmp_path, monkeypatch):
    import vp_lightning.data.splits as splits_module

    _imagenet_tree(tmp_path, n_train=(4, 4), n_val=(3, 2))
    dm = _dm(tmp_path, seed=7)
    dm.setup("fit")
    assert (
        dm.train_dataloader().sampler.__class__.__name__ == "RandomSampler"
    )  # no process group: plain loaders
    monkeypatch.setattr(splits_module, "distributed_world", lambda: (2, 1))
    train = dm.train_dataloader()
    assert type(train.sampler) is DistributedSampler  # explicit, so sharding does not depend on the Trainer
    assert (train.sampler.num_replicas, train.sampler.rank, train.sampler.shuffle, train.sampler.seed) == (
        2,
        1,
        True,
        7,
    )
    assert len(train) == 2 and train.drop_last  # 8 images / 2 ranks / batch 2
    val = dm.val_dataloader()
    assert isinstance(val.sampler, UnpaddedDistributedSampler) and list(val.sampler) == [
        1,
        3,
    ]  # 5 images, rank 1


class _CountImages(L.LightningModule):
    """Counts validation images over all processes and checks which sampler Lightning ended up using."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)

    def on_validation_epoch_start(self) -> None:
        # Plain counters, not torchmetrics states: under ddp_spawn on CPU the module is pickled into the children
        # and metric states (unlike parameters and buffers) stay in memory shared between the processes.
        self.counts = torch.zeros(2)

    def validation_step(self, batch, batch_idx):
        sampler = self.trainer.val_dataloaders.sampler
        self.counts += torch.tensor([batch.shape[0], isinstance(sampler, UnpaddedDistributedSampler)])

    def on_validation_epoch_end(self) -> None:
        images, unpadded_batches = self.all_gather(self.counts).sum(0)
        self.log_dict({"images": images, "unpadded_batches": unpadded_batches})


@pytest.mark.slow
@pytest.mark.parametrize("use_distributed_sampler", [True, False])
def test_two_process_validation_counts_each_image_once(tmp_path, use_distributed_sampler):
    _imagenet_tree(tmp_path, n_train=(2,), n_val=(4, 3))  # 7 validation images on 2 processes
    dm = _dm(tmp_path, batch_size=2)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        use_distributed_sampler=use_distributed_sampler,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    (metrics,) = trainer.validate(_CountImages(), datamodule=dm)
    assert metrics["images"] == 7  # a padded sampler would give 8
    assert metrics["unpadded_batches"] == 4  # batches on rank 0 (2+2) and rank 1 (2+1) all used our sampler
