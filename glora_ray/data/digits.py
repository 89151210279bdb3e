"""The embedded default dataset: scikit-learn's bundled handwritten digits in VTAB-1k layout.

scikit-learn ships 1,797 real 8x8 grey-scale digit scans (UCI optdigits test set) inside its
wheel, so this dataset needs no network.  ``write_digits_dataset(root)`` writes

    <root>/digits/images/<label>/<index>.png
    <root>/digits/train800.txt  val200.txt  train800val200.txt  test.txt (the other 797)

split by a seeded numpy Generator and stratified by class.  ``write_digits_dataset(root,
name="digits_orientation")`` writes a harder, structured task from the same scans (like VTAB's
dSprites orientation): every digit turned by 0, 90, 180 or 270 degrees (drawn per image, balanced,
seeded), the label being the turn; digits such as 0, 1 and 8 look alike under a half turn, so
its ceiling is below 100 %.  ``name="digits_count"`` is a counting task (like VTAB's CLEVR count):
one to four scans placed at random, without overlap, on a 24x24 canvas, the label being how
many (minus one); the canvases of the test list are made of other scans than those of
train800 and val200.  Run it as a command too:

    python -m glora_ray.data.digits <root> [--name digits_orientation]
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from .. import storage
from .vtab import LIST_SUFFIX, DataError, validate_dataset

DIGITS = "digits"
DIGITS_ORIENTATION = "digits_orientation"
DIGITS_COUNT = "digits_count"
EMBEDDED_NAMES = (DIGITS, DIGITS_ORIENTATION, DIGITS_COUNT)
QUARTER_TURNS = 4
MAX_COUNT, CANVAS = 4, 24  # digits_count: 1..MAX_COUNT scans of 8x8 on a CANVAS x CANVAS image
TRAIN_SIZE, VAL_SIZE = 800, 200
IMAGES_DIR = "images"
_PIXEL_MAX = 16  # sklearn's digits count 0..16 ink pixels per 4x4 cell


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images, bunch.target.astype(np.int64)


def stratified_order(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A permutation in which every prefix holds each class in (about) its overall share.

    Each class's members are shuffled and spread evenly over [0, 1) with a random phase;
    sorting by that position interleaves the classes.
    """
    position = np.empty(len(labels), dtype=np.float64)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        position[members] = (np.arange(len(members)) + rng.random()) / len(members)
    return np.argsort(position, kind="stable")


def digits_splits(labels: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """Indices of train800, val200, train800val200 and test (the rest), each stratified."""
    if len(labels) < TRAIN_SIZE + VAL_SIZE + 1:
        raise DataError(f"need more than {TRAIN_SIZE + VAL_SIZE} digits, got {len(labels)}")
    rng = np.random.default_rng(seed)
    order = stratified_order(labels, rng)
    trainval, test = order[: TRAIN_SIZE + VAL_SIZE], order[TRAIN_SIZE + VAL_SIZE:]
    # The same once more inside train+val: its first 200 are a stratified val200.
    trainval = trainval[stratified_order(labels[trainval], rng)]
    train, val = np.sort(trainval[VAL_SIZE:]), np.sort(trainval[:VAL_SIZE])
    return {
        "train800": train,
        "val200": val,
        "train800val200": np.concatenate([train, val]),
        "test": np.sort(test),
    }


def embedded_images(name: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The 8x8 images and labels of the embedded dataset ``name`` (one of ``EMBEDDED_NAMES``)."""
    images, labels = _load_digits()
    if name == DIGITS:
        return images, labels
    if name == DIGITS_ORIENTATION:
        rng = np.random.default_rng([seed, QUARTER_TURNS])
        turns = rng.permutation(np.arange(len(labels)) % QUARTER_TURNS)  # balanced
        turned = np.stack([np.rot90(image, int(k)) for image, k in zip(images, turns)])
        return turned, turns.astype(np.int64)
    if name == DIGITS_COUNT:
        return _count_canvases(images, labels, seed)
    raise DataError(f"no embedded dataset {name!r}; embedded datasets: {list(EMBEDDED_NAMES)}")


def _count_canvases(glyphs: np.ndarray, glyph_labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """digits_count: as many canvases as scans, each with 1..MAX_COUNT scans (balanced) placed at
    random without overlap.  A canvas takes its scans from the scans of its own side of the split
    (train800 and val200, or test), so the test list's canvases hold no scan the training saw."""
    rng = np.random.default_rng([seed, MAX_COUNT, CANVAS])
    counts = rng.permutation(np.arange(len(glyph_labels)) % MAX_COUNT) + 1
    labels = (counts - 1).astype(np.int64)
    canvas_splits, glyph_splits = digits_splits(labels, seed), digits_splits(glyph_labels, seed)
    side = glyph_splits["train800val200"]
    pool_of = np.full(len(labels), 0)
    pool_of[canvas_splits["test"]] = 1
    pools = (side, glyph_splits["test"])
    size = glyphs.shape[1]
    canvases = np.zeros((len(labels), CANVAS, CANVAS), dtype=glyphs.dtype)
    for index, count in enumerate(counts):
        chosen = rng.choice(pools[pool_of[index]], size=count, replace=False)
        placed: list[tuple[int, int]] = []
        while len(placed) < count:  # rejection sampling: at most 4 boxes of 8 in 24x24 always fit
            y, x = (int(v) for v in rng.integers(0, CANVAS - size + 1, size=2))
            if all(abs(y - py) >= size or abs(x - px) >= size for py, px in placed):
                placed.append((y, x))
        for glyph, (y, x) in zip(chosen, placed):
            canvases[index, y:y + size, x:x + size] = glyphs[glyph]
    return canvases, labels


def _image_path(index: int, label: int) -> str:
    return f"{IMAGES_DIR}/{label}/{index:04d}.png"


def _list_texts(labels: np.ndarray, seed: int) -> dict[str, str]:
    return {
        split: "".join(f"{_image_path(int(i), int(labels[i]))} {int(labels[i])}\n" for i in indices)
        for split, indices in digits_splits(labels, seed).items()
    }


def _matches(folder: Path, texts: dict[str, str]) -> bool:
    """Whether ``folder`` already holds exactly this dataset (same lists, every image present)."""
    for split, text in texts.items():
        path = folder / f"{split}{LIST_SUFFIX}"
        if not path.is_file() or path.read_text() != text:
            return False
    try:
        validate_dataset(folder.parent, folder.name)
    except DataError:
        return False
    return True


def write_digits_dataset(root: str | os.PathLike, seed: int = 0, name: str = DIGITS) -> Path:
    """Write the embedded dataset ``name`` (``EMBEDDED_NAMES``) under ``<root>/<name>`` and return
    that folder.

    Idempotent: an existing identical folder is kept.  The folder is built under a temporary
    name and renamed into place, so a reader never sees half of it (and concurrent writers
    agree on one copy).
    """
    root = Path(root)
    target = root / name
    images, labels = embedded_images(name, seed)
    texts = _list_texts(labels, seed)
    if target.exists():
        if _matches(target, texts):
            return target
        raise DataError(
            f"{target} exists but is not the {name} dataset for seed {seed}; remove it or choose another root"
        )
    try:
        with storage.staged_dir(target, replace=False) as staging:
            for label in np.unique(labels):
                (staging / IMAGES_DIR / str(int(label))).mkdir(parents=True)
            pixels = np.rint(images * (255.0 / _PIXEL_MAX)).clip(0, 255).astype(np.uint8)
            for index, (image, label) in enumerate(zip(pixels, labels)):
                Image.fromarray(image).save(staging / _image_path(index, int(label)))
            for split, text in texts.items():
                (staging / f"{split}{LIST_SUFFIX}").write_text(text)
    except OSError:
        # Another writer won the rename; keep its copy if it is the same dataset.
        if not _matches(target, texts):
            raise
    return target


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m glora_ray.data.digits",
        description="Write scikit-learn's bundled digits as a VTAB-1k style dataset under <root>/<name>.",
    )
    parser.add_argument("root", help="data root; the dataset goes to <root>/digits")
    parser.add_argument("--seed", type=int, default=0, help="seed of the stratified split (default 0)")
    parser.add_argument("--name", choices=EMBEDDED_NAMES, default=DIGITS, help="which embedded dataset")
    args = parser.parse_args(argv)
    folder = write_digits_dataset(args.root, seed=args.seed, name=args.name)
    counts = validate_dataset(folder.parent, args.name)
    print(folder)
    for split, count in counts.items():
        print(f"  {split}{LIST_SUFFIX}: {count}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
