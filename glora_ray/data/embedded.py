"""Embedded few-shot and domain-generalization data in NOAH's layout, made of the bundled digits.

Nothing here is downloaded: scikit-learn's 1,797 real 8x8 digit scans (see ``digits``) become

* ``write_digits_fewshot(root)``: ``<root>/few-shot/digits`` with K-shot training lists
  (K in 1 2 4 8 16, seeds 0 1 2) drawn from the digits' train800 pool, ``val_meta.list`` (their
  val200) and ``test_meta.list`` (the other 797);
* ``write_digits_domain(root)``: a 10-class stand-in for ImageNet under ``<root>/few-shot/imagenet``
  (16-shot lists, a 4-shot held-out list to search on, the test digits as its validation set) and
  four shifted copies of the test digits under ``<root>/domain-generalization``, standing in for the
  four target sets: Gaussian noise (imagenetv2), inverted ink (imagenet-sketch), rotated by 35
  degrees and only the odd digits (imagenet-adversarial), blurred and only the even digits
  (imagenet-rendition).  These are real images under real shifts, not the paper's data sets.

Image names hold a space (``digit 0001.png``), as real few-shot lists do.  Folders are written
under a temporary name and renamed into place; an existing identical folder is kept.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
from PIL import Image, ImageFilter

from .digits import _PIXEL_MAX, _load_digits, digits_splits
from .fewshot import (
    ANNOTATIONS_DIR,
    DEFAULT_SEARCH_LIST,
    DOMAIN_DIR,
    DOMAIN_SHOTS,
    FEW_SHOT_DIR,
    IMAGENET,
    IMAGENET_TEST_LIST,
    IMAGES_DIR,
    SEEDS,
    SHOTS,
    TEST_LIST,
    VAL_LIST,
    shot_list_name,
)
from .vtab import DataError

DIGITS = "digits"
SEARCH_SHOTS = 4  # NOAH's held-out ImageNet list holds 4 images per class
SHIFT_SIZE = 32  # the shifted copies are drawn at 32 px, where rotation and blur are visible
ROTATION_DEGREES = 35.0
NOISE_STD = 40.0  # grey levels of the Gaussian noise
BLUR_RADIUS = 1.5


def _image_name(index: int, label: int) -> str:
    return f"{label}/digit {index:04d}.png"


def _list_text(indices: np.ndarray, labels: np.ndarray) -> str:
    return "".join(f"{_image_name(int(i), int(labels[i]))} {int(labels[i])}\n" for i in indices)


def k_shot(pool: np.ndarray, labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """``shots`` samples of every class from ``pool``; for one seed, the K-shot lists are nested."""
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels[pool]):
        members = rng.permutation(pool[labels[pool] == label])
        if len(members) < shots:
            raise DataError(f"class {int(label)} has {len(members)} samples in the pool, fewer than {shots} shots")
        chosen.append(members[:shots])
    return np.sort(np.concatenate(chosen))


def _pixels(images: np.ndarray) -> np.ndarray:
    return np.rint(images * (255.0 / _PIXEL_MAX)).clip(0, 255).astype(np.uint8)


def _shifted(pixels: np.ndarray, shift: Callable[[Image.Image, np.random.Generator], Image.Image],
             seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = []
    for image in pixels:
        big = Image.fromarray(image).resize((SHIFT_SIZE, SHIFT_SIZE), Image.Resampling.BICUBIC)
        out.append(np.asarray(shift(big, rng), dtype=np.uint8))
    return np.stack(out)


def _noisy(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    array = np.asarray(image, dtype=np.float64) + rng.normal(0.0, NOISE_STD, size=image.size[::-1])
    return Image.fromarray(array.clip(0, 255).astype(np.uint8))


def _inverted(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    return Image.fromarray(255 - np.asarray(image, dtype=np.uint8))


def _rotated(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    return image.rotate(ROTATION_DEGREES, resample=Image.Resampling.BICUBIC, fillcolor=0)


def _blurred(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(BLUR_RADIUS))


# target set -> (shift, classes kept: None for all)
SHIFTS: Mapping[str, tuple[Callable[[Image.Image, np.random.Generator], Image.Image], Callable[[int], bool] | None]] = {
    "imagenetv2": (_noisy, None),
    "imagenet-sketch": (_inverted, None),
    "imagenet-adversarial": (_rotated, lambda label: label % 2 == 1),
    "imagenet-rendition": (_blurred, lambda label: label % 2 == 0),
}



def _matches(folder: Path, texts: Mapping[str, str], images: Mapping[str, np.ndarray]) -> bool:
    """Whether ``folder`` already holds these lists (same text) and images (every file present)."""
    for name, text in texts.items():
        path = folder / name
        if not path.is_file() or path.read_text() != text:
            return False
    return all((folder / name).is_file() for name in images)


def write_folder_once(target: Path, texts: Mapping[str, str], images: Mapping[str, np.ndarray]) -> Path:
    """Write text files and PNG images under ``target``, whole or not at all; keep an identical folder."""
    if target.exists():
        if _matches(target, texts, images):
            return target
        raise DataError(f"{target} exists but does not hold the embedded data this run writes; "
                        f"remove it or choose another --data-root")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for name, pixels in images.items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(staging / name)
        for name, text in texts.items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_text(text)
        try:
            os.replace(staging, target)
        except OSError:
            # Another writer won the rename; keep its copy if it is the same data.
            if not _matches(target, texts, images):
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _annotation(name: str) -> str:
    return f"{ANNOTATIONS_DIR}/{name}"


def _image_files(pixels: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> dict[str, np.ndarray]:
    return {f"{IMAGES_DIR}/{_image_name(int(i), int(labels[i]))}": pixels[i] for i in indices}


def _shot_lists(pool: np.ndarray, labels: np.ndarray, shots: tuple[int, ...], seeds: tuple[int, ...]) -> dict[str, str]:
    return {_annotation(shot_list_name(k, s)): _list_text(k_shot(pool, labels, k, s), labels)
            for k in shots for s in seeds}


def write_digits_fewshot(root: str | os.PathLike, seed: int = 0) -> Path:
    """``<root>/few-shot/digits``: K-shot lists for K in 1 2 4 8 16 and seeds 0 1 2, val and test lists."""
    images, labels = _load_digits()
    pixels = _pixels(images)
    splits = digits_splits(labels, seed)
    texts = {
        **_shot_lists(splits["train800"], labels, SHOTS, SEEDS),
        _annotation(VAL_LIST): _list_text(splits["val200"], labels),
        _annotation(TEST_LIST): _list_text(splits["test"], labels),
    }
    return write_folder_once(Path(root) / FEW_SHOT_DIR / DIGITS, texts, _image_files(pixels, labels, np.arange(len(labels))))


def write_digits_domain(root: str | os.PathLike, seed: int = 0) -> Path:
    """A 10-class stand-in for ImageNet and its four shifted target sets under ``root`` (see the module)."""
    root = Path(root)
    images, labels = _load_digits()
    pixels = _pixels(images)
    splits = digits_splits(labels, seed)
    search = k_shot(splits["val200"], labels, SEARCH_SHOTS, seed)
    texts = {
        **_shot_lists(splits["train800"], labels, (DOMAIN_SHOTS,), SEEDS),
        _annotation(DEFAULT_SEARCH_LIST): _list_text(search, labels),
        _annotation(IMAGENET_TEST_LIST): _list_text(splits["test"], labels),
    }
    used = np.concatenate([splits["train800"], search, splits["test"]])
    write_folder_once(root / FEW_SHOT_DIR / IMAGENET, texts, _image_files(pixels, labels, used))
    test = splits["test"]
    for offset, (target, (shift, keep)) in enumerate(SHIFTS.items(), start=1):
        kept = test if keep is None else test[[keep(int(labels[i])) for i in test]]
        shifted = np.zeros((len(labels), SHIFT_SIZE, SHIFT_SIZE), dtype=np.uint8)
        shifted[kept] = _shifted(pixels[kept], shift, seed + offset)
        write_folder_once(root / DOMAIN_DIR / target, {_annotation(VAL_LIST): _list_text(kept, labels)},
                          _image_files(shifted, labels, kept))
    return root
