"""A unit's training, search and test lists share no image (docs/method.md §4).

A search that scores subnets on images the supernet trained on ranks memorisation, and a test on
either measures nothing held out.  Two lists overlap when they name the same file, or two files
with the same bytes (a copy under another name): files are compared by size first, and only
those of equal size are hashed, so a whole VTAB-1k collection costs a few ``stat`` calls per image.
"""
from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple, Sequence

from .vtab import DataError, Sample


class RoleList(NamedTuple):
    """One list a unit reads and what for: "training", "search" or a test's name."""

    role: str
    path: Path
    samples: Sequence[Sample]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _by_file(samples: Sequence[Sample]) -> dict[str, Sample]:
    return {os.path.realpath(s.path): s for s in reversed(samples)}  # the first line naming a file wins


def _same_bytes(a: dict[str, Sample], b: dict[str, Sample]) -> tuple[Sample, Sample] | None:
    """The first pair (in ``a``'s order) of distinct files of ``a`` and ``b`` with equal bytes."""
    sizes: dict[int, list[str]] = defaultdict(list)
    for path in b:
        sizes[os.path.getsize(path)].append(path)
    digests: dict[str, str] = {}

    def digest(path: str) -> str:
        if path not in digests:
            digests[path] = _sha256(Path(path))
        return digests[path]

    for path in sorted(a, key=lambda p: a[p].line):
        for other in sizes.get(os.path.getsize(path), ()):
            if other != path and digest(other) == digest(path):
                return a[path], b[other]
    return None


def check_disjoint(lists: Sequence[RoleList], unit: str) -> None:
    """Refuse two lists of ``lists`` (training first, then search, then the tests) that share an
    image; test lists are not compared with each other.  One line naming both lists and the
    first shared image."""
    files = [_by_file(entry.samples) for entry in lists]
    for i, first in enumerate(lists):
        for j in range(i + 1, len(lists)):
            second = lists[j]
            if i >= 2 and j >= 2:
                continue  # two test lists may hold the same images (e.g. a target set and its subset)
            where = f"{unit}: the {first.role} list {first.path} and the {second.role} list {second.path}"
            fix = "training, search and test lists must share no image (docs/method.md §4)"
            shared = [path for path in files[i] if path in files[j]]
            if shared:
                first_shared = min(shared, key=lambda p: files[i][p].line)
                sample = files[i][first_shared]
                raise DataError(f"{where} share {len(shared)} image(s), first {sample.path} (line {sample.line} of the "
                                f"{first.role} list); {fix}")
            copy = _same_bytes(files[i], files[j])
            if copy is not None:
                a, b = copy
                raise DataError(f"{where} hold the same image under two names: {a.path} (line {a.line}) has the "
                                f"bytes of {b.path} (line {b.line}); {fix}")
