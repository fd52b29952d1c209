"""A small real-photo dataset built from the photographs shipped inside the scikit-image wheel.

``root: embedded`` in a config selects it, so ``fit`` runs on a machine without ImageNet. Random crops of nine
colour photographs are written once as PNG files in the ImageNet folder layout::

    <cache>/embedded-photos-v1/train/<photo>/<photo>_0000.png     (7 photographs)
    <cache>/embedded-photos-v1/val/<photo>/<photo>_0000.png       (2 held-out photographs)

and then read by the same code that reads ImageNet. The crops have random sizes (64-96 px per side) and come from
windows of random scale, so they range from close-ups to whole-scene views. The build is deterministic given the
seed, takes a few seconds, and is atomic: files are written to a temporary folder that is renamed into place, so
two processes building at once (e.g. two DDP ranks) never see a half-written folder.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image

from vp_lightning.data.atomic import atomic_folder

#: Bump when the recipe changes so old caches are not reused.
EMBEDDED_VERSION = 1

#: Colour photographs used for training. The stereo pair motorcycle_left/right stays on one side of the split so
#: the validation photographs are never near-copies of training ones.
TRAIN_PHOTOS: tuple[str, ...] = (
    "astronaut.png",
    "coffee.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "retina.jpg",
)
#: Held-out photographs for validation (a cat, and a rocket on a launch pad).
VAL_PHOTOS: tuple[str, ...] = ("chelsea.png", "rocket.jpg")

MANIFEST = "manifest.json"

# A crop this flat (e.g. the black border around the retina photograph) teaches nothing; draw another.
_MIN_CROP_STD = 8.0
_MAX_DRAWS = 50


def skimage_data_dir() -> Path:
    """The folder of sample images inside the installed scikit-image package.

    Raises:
        ModuleNotFoundError: If scikit-image is not installed.
    """
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "The embedded image dataset is built from photographs shipped with scikit-image; "
            "install it with `pip install scikit-image`."
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def default_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir`` if given, else ``$VP_LIGHTNING_CACHE``, else ``~/.cache/vp_lightning``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("VP_LIGHTNING_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vp_lightning"


def embedded_photos_dir(cache_dir: str | os.PathLike | None = None, seed: int = 0) -> Path:
    """Where the dataset for ``seed`` lives (built or not)."""
    name = f"embedded-photos-v{EMBEDDED_VERSION}" + (f"-seed{seed}" if seed else "")
    return default_cache_dir(cache_dir) / name


def build_embedded_photos(
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    train_crops_per_photo: int = 200,
    val_crops_per_photo: int = 100,
    min_side: int = 64,
    max_side: int = 96,
) -> Path:
    """Build the embedded photo dataset if it is not there yet, and return its root.

    Args:
        cache_dir: Parent folder; see :func:`default_cache_dir`.
        seed: Seed of the crop positions, scales and sizes; a different seed gets its own folder.
        train_crops_per_photo: Crops per training photograph.
        val_crops_per_photo: Crops per held-out photograph.
        min_side: Smallest crop side in pixels.
        max_side: Largest crop side in pixels.

    Returns:
        The dataset root, containing ``train/`` and ``val/`` in the ImageNet folder layout.

    Raises:
        RuntimeError: If the folder exists but was not built by this function for the same settings.
    """
    target = embedded_photos_dir(cache_dir, seed)
    recipe = {
        "version": EMBEDDED_VERSION,
        "seed": seed,
        "train": {p: train_crops_per_photo for p in TRAIN_PHOTOS},
        "val": {p: val_crops_per_photo for p in VAL_PHOTOS},
        "min_side": min_side,
        "max_side": max_side,
    }
    if target.exists():
        _check_existing(target, recipe)
        return target

    source = skimage_data_dir()
    with atomic_folder(target, MANIFEST, recipe) as tmp:
        for split in ("train", "val"):
            for photo_index, (photo, count) in enumerate(recipe[split].items()):
                _write_crops(
                    source / photo,
                    tmp / split,
                    count,
                    min_side,
                    max_side,
                    (seed, split == "val", photo_index),
                )
    _check_existing(target, recipe)
    return target


def _check_existing(target: Path, recipe: dict) -> None:
    manifest = target / MANIFEST
    fix = f"Delete the folder to rebuild it: rm -r {target}"
    if not manifest.exists():
        raise RuntimeError(f"{target} exists but has no {MANIFEST}, so it was not built completely. {fix}")
    if json.loads(manifest.read_text()) != recipe:
        raise RuntimeError(f"{target} was built with different settings than requested. {fix}")
    for split in ("train", "val"):
        found = sum(1 for _ in (target / split).glob("*/*.png")) if (target / split).is_dir() else 0
        expected = sum(recipe[split].values())
        if found != expected:
            raise RuntimeError(f"{target / split} holds {found} images instead of {expected}. {fix}")


def _write_crops(photo: Path, out_root: Path, count: int, min_side: int, max_side: int, seed: tuple) -> None:
    """Write ``count`` crops of ``photo`` to ``out_root/<photo stem>/``."""
    with Image.open(photo) as im:
        image = im.convert("RGB")
    pixels = np.asarray(image)
    out_dir = out_root / photo.stem
    out_dir.mkdir(parents=True)
    # One generator per photograph: adding a photograph later leaves the crops of the others unchanged.
    rng = np.random.default_rng([*seed, 20240917])
    for k in range(count):
        crop = _draw_crop(image, pixels, rng, min_side, max_side)
        crop.save(out_dir / f"{photo.stem}_{k:04d}.png", compress_level=1)


def _draw_crop(
    image: Image.Image, pixels: np.ndarray, rng: np.random.Generator, min_side: int, max_side: int
):
    width, height = image.size
    for _ in range(_MAX_DRAWS):
        out_w, out_h = (int(s) for s in rng.integers(min_side, max_side + 1, size=2))
        # Window scale log-uniform between native resolution and 3/4 of the photo: close-ups and wide views.
        largest = min(width / out_w, height / out_h) * 0.75
        scale = math.exp(rng.uniform(0.0, math.log(max(largest, 1.0))))
        win_w, win_h = min(width, round(out_w * scale)), min(height, round(out_h * scale))
        left, top = int(rng.integers(0, width - win_w + 1)), int(rng.integers(0, height - win_h + 1))
        if pixels[top : top + win_h, left : left + win_w].std() >= _MIN_CROP_STD:
            break
    box = (left, top, left + win_w, top + win_h)
    return image.resize((out_w, out_h), Image.Resampling.LANCZOS, box=box)
