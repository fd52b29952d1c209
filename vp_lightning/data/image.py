"""ImageNet-style image data: folder trees or file lists of photos, cropped squares in [-1, 1].

The DataModule reads what users already have on disk (the ILSVRC-2012 "ImageFolder" layout, any tree of images,
or a text file list) and never downloads anything. ``root: embedded`` selects a small real-photo set written once
into the same layout (see :mod:`vp_lightning.data.embedded_images`), so the reading code is the same either way.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from PIL import Image, ImageOps
from torch import Tensor
from torchvision.transforms import v2

from vp_lightning.data.bad_input import BadInputTally, SkippingFileDataset, skip_reason
from vp_lightning.data.embedded_images import build_embedded_photos, embedded_photos_dir
from vp_lightning.data.splits import (  # noqa: F401  (re-exported: long-standing import location)
    DatasetLayoutError,
    Split,
    SplitDataModule,
    UnpaddedDistributedSampler,
    distributed_world,
)

#: Extensions (compared lower-case) that count as images when walking a folder.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)
#: Extensions read as a text file list (one image path per line).
FILE_LIST_EXTENSIONS: frozenset[str] = frozenset({".txt", ".lst", ".list"})

EXPECTED_LAYOUT = (
    "Expected layout: root/train/<class>/*.JPEG and root/val/<class>/*.JPEG (the ImageNet folder layout; any "
    "tree of images under each split folder works too, and train_split/val_split/test_split may name other "
    "subfolders or a .txt file list with one image path per line). Or set `root: embedded` to use the built-in "
    "real-photo dataset."
)

ScanMode = Literal["header", "full", "off"]


# ----------------------------------------------------------------------------------------------------------------
# Finding files


def find_images(folder: Path) -> list[Path]:
    """All image files under ``folder`` (recursive, sorted, extensions case-insensitive, hidden files skipped).

    Hidden names are skipped because archives made on macOS carry ``._photo.jpg`` resource forks that are not
    images.
    """
    found = []
    for parent, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [
            Path(parent, f)
            for f in files
            if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS
        ]
    return sorted(found)


def read_file_list(path: Path) -> list[Path]:
    """Image paths listed in a text file, one per line; relative paths are relative to the list's folder.

    Blank lines and lines starting with ``#`` are ignored.
    """
    lines = (line.strip() for line in path.read_text().splitlines())
    return [path.parent / line for line in lines if line and not line.startswith("#")]


def resolve_split(root: Path, split: str, split_name: str) -> list[Path]:
    """The image files of one split.

    Args:
        root: Dataset root (must exist).
        split: A subfolder of ``root`` (``"train"``), a folder path, or a text file list, relative to ``root``
            or absolute.
        split_name: ``train``/``val``/``test``, for messages.

    Returns:
        Image paths (a file list's entries are returned even if missing; the scan counts those).

    Raises:
        DatasetLayoutError: If the split does not exist or holds no images.
    """
    location = Path(split).expanduser()
    location = location if location.is_absolute() else root / location
    if location.is_file() and location.suffix.lower() in FILE_LIST_EXTENSIONS:
        files = read_file_list(location)
        if not files:
            raise DatasetLayoutError(f"The {split_name} file list {location} lists no images.")
        return files
    if not location.is_dir():
        raise DatasetLayoutError(
            f"Dataset root {root} has no {split_name} split: {location} is neither a folder nor a .txt file list. "
            f"Found in the root: {_describe_folder(root)}. {EXPECTED_LAYOUT}"
        )
    files = find_images(location)
    if not files:
        raise DatasetLayoutError(
            f"The {split_name} split {location} contains no images (extensions {', '.join(sorted(IMAGE_EXTENSIONS))}"
            f", any case). Found there: {_describe_folder(location, recursive=True)}. {EXPECTED_LAYOUT}"
        )
    return files


def _describe_folder(folder: Path, recursive: bool = False, limit: int = 8) -> str:
    entries = sorted(folder.rglob("*") if recursive else folder.iterdir())
    if not entries:
        return "nothing (the folder is empty)"
    shown = [f"{e.relative_to(folder)}{'/' if e.is_dir() else ''}" for e in entries[:limit]]
    more = f" and {len(entries) - limit} more" if len(entries) > limit else ""
    return ", ".join(shown) + more


# ----------------------------------------------------------------------------------------------------------------
# Reading and checking one image


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    Transparent pixels are composited on white (how viewers show them); 16-bit and float images are scaled
    rather than clipped (PIL's own ``convert`` clips 16-bit values at 255).
    """
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        image = _high_bit_depth_to_l(image)
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info


def _high_bit_depth_to_l(image: Image.Image) -> Image.Image:
    pixels = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        pixels = pixels * 255.0 if pixels.max(initial=0.0) <= 1.0 else pixels
    elif image.mode.startswith("I;16") or pixels.max(initial=0.0) > 255:
        pixels = pixels / 257.0  # 65535 -> 255
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def conversion_kind(mode: str, info: dict) -> str | None:
    """The bad-input count an image of this PIL mode adds (``None`` for plain RGB)."""
    if mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in info:
        return "converted/alpha"
    if mode in ("1", "L"):
        return "converted/grayscale"
    if mode == "P":
        return "converted/palette"
    if mode == "CMYK":
        return "converted/cmyk"
    if mode.startswith("I") or mode == "F":
        return "converted/16bit"
    return None if mode == "RGB" else "converted/other"


def load_rgb(path: str | os.PathLike, min_side: int | None = None) -> Image.Image:
    """Decode an image file to RGB, upright according to its EXIF orientation.

    Args:
        path: Image file.
        min_side: If given, JPEGs may be decoded at a reduced scale (DCT scaling, several times faster) as long
            as both sides stay at least ``min_side``.

    Returns:
        An RGB PIL image.

    Raises:
        Exception: Whatever PIL raises for missing, truncated or corrupt files.
    """
    with Image.open(path) as image:
        if min_side is not None and image.format == "JPEG":
            image.draft("RGB", (min_side, min_side))
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
        return to_rgb(image)


def inspect_image(path: str | os.PathLike, min_side: int, full: bool = False) -> tuple[str | None, list[str]]:
    """Check one file cheaply, in the main process, before training.

    A header read catches zero-length, unreadable, non-image and most corrupt files. JPEG and PNG files whose end
    marker is missing (the signature of an interrupted download) are decoded to confirm they are truncated;
    ``full=True`` decodes every file.

    Args:
        path: Image file.
        min_side: Target crop side; smaller images count as ``upscaled``.
        full: Decode the whole image instead of reading the header.

    Returns:
        ``(skip_reason, conversions)``: the reason the file must be skipped (``None`` if usable) and the
        conversions it will need (e.g. ``["converted/cmyk", "upscaled"]``).
    """
    try:
        if os.path.getsize(path) == 0:
            return "empty", []
        with Image.open(path) as image:
            if full or not _has_end_marker(path, image.format):
                image.load()
            size, mode, info = image.size, image.mode, image.info
    except Exception as error:  # noqa: BLE001 -- any decoder failure means the file is skipped
        return skip_reason(path, error), []
    kinds = [k for k in [conversion_kind(mode, info)] if k]
    if min(size) < min_side:
        kinds.append("upscaled")
    return None, kinds


_END_MARKERS = {"JPEG": b"\xff\xd9", "MPO": b"\xff\xd9", "PNG": b"IEND"}


def _has_end_marker(path: str | os.PathLike, image_format: str | None) -> bool:
    marker = _END_MARKERS.get(image_format or "")
    if marker is None:
        return True
    with open(path, "rb") as f:
        f.seek(max(0, os.fstat(f.fileno()).st_size - 1024))
        # Some cameras append bytes after the JPEG end marker, so look at the last KiB, not the last two bytes.
        return marker in f.read()


def scan_images(
    files: Sequence[Path], min_side: int, mode: ScanMode = "header", name: str = "images"
) -> tuple[list[Path], BadInputTally]:
    """Run :func:`inspect_image` over ``files``.

    Args:
        files: Candidate image files.
        min_side: Target crop side.
        mode: ``header`` (cheap), ``full`` (decode everything) or ``off`` (trust every file; failures are then
            only found, and counted, while loading).
        name: What the files are, for messages (e.g. ``"train images"``).

    Returns:
        The usable files and the tally of skipped and converted ones.
    """
    tally = BadInputTally(name=name, scanned=len(files))
    if mode == "off":
        return list(files), tally
    # Threads, because the scan waits on the file system (often a network one) more than on the CPU.
    with ThreadPoolExecutor(max_workers=8 if len(files) > 256 else 1) as pool:
        results = list(pool.map(lambda f: inspect_image(f, min_side, full=mode == "full"), files))
    kept = []
    for path, (reason, kinds) in zip(files, results, strict=True):
        if reason is not None:
            tally.skip(path, reason)
            continue
        kept.append(path)
        for kind in kinds:
            tally.convert(kind)
    return kept, tally


# ----------------------------------------------------------------------------------------------------------------
# Dataset, transforms, sampler


def image_transform(
    resolution: int, train: bool, random_flip: bool = True
) -> Callable[[Image.Image], Tensor]:
    """Resize the shorter side to ``resolution``, crop a square (random for training, central otherwise).

    Returns:
        A callable mapping an RGB PIL image to a float32 tensor of shape (3, resolution, resolution) in [-1, 1].
    """
    steps: list = [
        v2.Resize(resolution, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.RandomCrop(resolution) if train else v2.CenterCrop(resolution),
    ]
    if train and random_flip:
        steps.append(v2.RandomHorizontalFlip())
    steps += [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * 3, [0.5] * 3)]
    return v2.Compose(steps)


class ImageFiles(SkippingFileDataset):
    """Image files mapped to tensors; a file that fails to decode is replaced by the next readable one.

    Args:
        files: Image paths (already scanned).
        transform: RGB PIL image -> (3, h, w) tensor.
        tally: The setup scan of this split; it sets the denominator of the bad-file threshold.
        max_bad_fraction: Threshold (in [0, 1]) of skipped files, counting failures found while loading.
        min_side: Passed to :func:`load_rgb` for faster JPEG decoding.
    """

    def __init__(
        self,
        files: Sequence[Path],
        transform: Callable[[Image.Image], Tensor],
        tally: BadInputTally,
        max_bad_fraction: float = 0.01,
        min_side: int | None = None,
    ) -> None:
        super().__init__(files, tally, max_bad_fraction)
        self.transform, self.min_side = transform, min_side

    def load(self, index: int) -> Tensor:
        """Returns: (3, h, w) float32 in [-1, 1]."""
        return self.transform(load_rgb(self.path(index), self.min_side))


# ----------------------------------------------------------------------------------------------------------------
# DataModule


class ImageNetDataModule(SplitDataModule):
    """ImageNet (or any folder of photos) as square crops in [-1, 1]; batches are tensors (b, 3, h, w).

    Splits are read from ``root/train_split`` etc. Each may be a folder (ImageNet's ``train/<wnid>/*.JPEG``
    layout, a flat folder of COCO images, or any tree: images are found recursively, class folders are ignored),
    or a ``.txt`` file with one image path per line (relative to the list's folder, or absolute).
    ``root: embedded`` (or ``None``) builds and uses a small real-photo set (:mod:`.embedded_images`).

    Bad input: at setup every split is scanned in the main process. Unreadable, zero-length, truncated and
    corrupt files are skipped and counted; grayscale, palette, alpha, CMYK and 16-bit images are converted to
    RGB; images smaller than the crop are upscaled. A summary line is logged per split, and if more than
    ``max_bad_fraction`` of a split is skipped, setup fails with :class:`TooManyBadFilesError` naming the files.
    A file that passes the scan but fails to decode during training is replaced by the next readable image,
    counted, and checked against the same threshold. :attr:`bad_input_counts` gives all counts, e.g. for logging
    ``data/skipped_files``. Every process scans the whole split (so the counts are global); for ImageNet's 1.28 M
    training files the header scan reads 1.28 M file headers, which ``scan: off`` skips.

    Distributed training: when ``torch.distributed`` is initialised, training uses a shuffling
    ``DistributedSampler`` (Lightning calls its ``set_epoch``) and validation/test use
    :class:`UnpaddedDistributedSampler`. torch's default sampler would pad a validation set whose size does not
    divide by the world size with repeated images (e.g. 50,000 images on 3 ranks -> 50,001 evaluated, one image
    counted twice in token statistics); the unpadded sampler evaluates every image exactly once, so a 2-process
    run counts the same images as a 1-process run. Ranks may then run one validation batch fewer than others,
    so validation steps must not call collectives per step (``self.log(..., sync_dist=True)`` inside
    ``validation_step`` would wait forever); metrics that synchronise at ``compute()`` are fine. Both samplers
    subclass ``DistributedSampler``, so Lightning keeps them with either value of the Trainer's
    ``use_distributed_sampler``.

    Args:
        root: Dataset root, or ``"embedded"``/``None`` for the built-in photo set.
        resolution: Side of the square crops.
        batch_size: Per-process batch size.
        num_workers: DataLoader worker processes.
        pin_memory: Pin host memory (only takes effect when CUDA is available).
        persistent_workers: Keep workers between epochs (default: when ``num_workers > 0``).
        random_flip: Random horizontal flips for training.
        train_split: Training split (subfolder of ``root``, folder, or ``.txt`` file list).
        val_split: Validation split.
        test_split: Test (and predict) split.
        max_bad_fraction: Largest fraction of a split that may be skipped as broken before setup fails.
        scan: Setup check of every file: ``header`` (fast), ``full`` (decode all) or ``off``.
        cache_dir: Where the embedded set is built (default ``$VP_LIGHTNING_CACHE`` or ``~/.cache/vp_lightning``).
        seed: Seed of the embedded set's crops and of the distributed training shuffle.
    """

    def __init__(
        self,
        root: str | None = "embedded",
        resolution: int = 256,
        batch_size: int = 32,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool | None = None,
        random_flip: bool = True,
        train_split: str = "train",
        val_split: str = "val",
        test_split: str = "val",
        max_bad_fraction: float = 0.01,
        scan: ScanMode = "header",
        cache_dir: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if resolution < 1 or batch_size < 1 or num_workers < 0:
            raise ValueError(
                f"resolution and batch_size must be >= 1 and num_workers >= 0, got resolution={resolution}, "
                f"batch_size={batch_size}, num_workers={num_workers}"
            )
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must lie in [0, 1], got {max_bad_fraction}")
        if scan not in ("header", "full", "off"):
            raise ValueError(f"scan must be 'header', 'full' or 'off', got {scan!r}")
        self.save_hyperparameters()
        self.root, self.resolution, self.batch_size = root, resolution, batch_size
        self.num_workers, self.pin_memory, self.random_flip = num_workers, pin_memory, random_flip
        self.persistent_workers = num_workers > 0 if persistent_workers is None else persistent_workers
        self.splits: dict[Split, str] = {"train": train_split, "val": val_split, "test": test_split}
        self.max_bad_fraction, self.scan, self.cache_dir, self.seed = max_bad_fraction, scan, cache_dir, seed
        self.eval_batch_size = batch_size
        self._datasets: dict[tuple[str, bool], ImageFiles] = {}
        self._resolved_root: Path | None = None

    def _embedded_root(self) -> Path:
        target = embedded_photos_dir(self.cache_dir, self.seed)
        if not target.exists():
            rank_zero_info(f"Building the embedded photo dataset (scikit-image photographs) in {target}")
        return build_embedded_photos(self.cache_dir, self.seed)

    def _root(self) -> Path:
        if self._resolved_root is None:
            self._resolved_root = self._find_root()
        return self._resolved_root

    def _find_root(self) -> Path:
        if self.embedded:
            root = self._embedded_root()
            rank_zero_info(f"Using the embedded photo dataset at {root}")
            return root
        root = Path(self.root).expanduser()
        if not root.is_dir():
            raise DatasetLayoutError(
                f"Dataset root {root} does not exist or is not a folder. {EXPECTED_LAYOUT}"
            )
        return root

    def _key(self, split: Split) -> tuple[str, bool]:
        # val and test usually name the same folder: index and scan it once.
        return self.splits[split], split == "train"

    def _describe(self, split: Split, count: int) -> str:
        return f"The {split} split has {count} usable images"

    def _build(self, split: Split) -> ImageFiles:
        files = resolve_split(self._root(), self.splits[split], split)
        kept, tally = scan_images(files, self.resolution, self.scan, name=f"{split} images")
        (rank_zero_warn if tally.num_skipped else rank_zero_info)(tally.summary())
        tally.check(self.max_bad_fraction)
        if not kept:
            raise DatasetLayoutError(f"The {split} split ({self.splits[split]}) has no readable images.")
        transform = image_transform(self.resolution, train=split == "train", random_flip=self.random_flip)
        return ImageFiles(kept, transform, tally, self.max_bad_fraction, min_side=self.resolution)
