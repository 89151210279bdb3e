"""A user's own datasets: any folder in a known layout whose name is outside the registry.

Its classes are counted from its labels (docs/method.md §4): the training list's labels must be
exactly 0..K-1, every class present there; the other lists may use only those K.  A given class
count (``--num-classes``) replaces the count: labels must then lie in 0..K-1, no more.
"""
from __future__ import annotations

from pathlib import Path

from .vtab import DATASETS, DataError, canonical_dataset_name, dataset_dir, is_registered, list_file, parse_list_file

CUSTOM_GROUP = "custom"  # the summary's group of a dataset outside the registry


def count_classes(train_list: str | Path, images: str | Path | None = None) -> int:
    """K of a training list whose labels are 0..K-1 with every class present; else a ``DataError``."""
    # The classes are what is being counted: labels need only be >= 0 here.
    samples = parse_list_file(train_list, num_classes=None, check_exists=False, images=images)
    labels = sorted({s.label for s in samples})
    missing = sorted(set(range(labels[-1] + 1)) - set(labels))
    if missing:
        shown = ", ".join(str(m) for m in missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise DataError(
            f"{train_list}: cannot count the classes of this dataset: no sample of class(es) {shown}; labels must "
            f"be 0..K-1 with every class in the training list (or give the class count with --num-classes)"
        )
    return len(labels)


def resolve_dataset_name(name: str, root: str | Path) -> str:
    """A registry name in its canonical spelling, or the name of an own dataset under ``root``."""
    if is_registered(name):
        return canonical_dataset_name(name)
    if (Path(root) / name).is_dir():
        return name
    raise DataError(
        f"unknown dataset {name!r}: not one of {', '.join(sorted(DATASETS))} (or their other spellings), and "
        f"{str(Path(root) / name)!r} is no folder; an own dataset is a folder under --data-root in the "
        f"VTAB-1k layout"
    )


def own_dataset_classes(root: str | Path, name: str, train_split: str, num_classes: int | None = None) -> int:
    """Classes of the own dataset ``<root>/<name>`` in the VTAB-1k layout (``num_classes`` wins)."""
    if num_classes is not None:
        if num_classes < 1:
            raise DataError(f"--num-classes must be >= 1, got {num_classes}")
        return num_classes
    dataset_dir(root, name)  # a clear error when the folder is missing
    return count_classes(list_file(root, name, train_split))
