"""A unit's training, search and test lists share no image (docs/method.md §4).

A search that scores subnets on images the supernet trained on ranks memorisation, and a test on
either measures nothing held out.  Two lists that name the same file are refused.  Two files with
the same bytes under other names are only warned about: a benchmark can hold such copies itself
(dSprites draws a square alike at four orientations; CIFAR has exact duplicates across its
splits), which no user can remove, and the paper's numbers include them.  Files are compared by
size first, and only those of equal size are hashed, so a whole VTAB-1k collection costs a few
``stat`` calls per image.
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple, Sequence

from .vtab import DataError, Sample

log = logging.getLogger(__name__)


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


def _copies(a: dict[str, Sample], b: dict[str, Sample]) -> list[tuple[Sample, Sample]]:
    """Every file of ``a`` (in ``a``'s order) that has the bytes of another file of ``b``, with one such file."""
    sizes: dict[int, list[str]] = defaultdict(list)
    for path in b:
        sizes[os.path.getsize(path)].append(path)
    digests: dict[str, str] = {}

    def digest(path: str) -> str:
        if path not in digests:
            digests[path] = _sha256(Path(path))
        return digests[path]

    copies = []
    for path in sorted(a, key=lambda p: a[p].line):
        twin = next((other for other in sizes.get(os.path.getsize(path), ())
                     if other != path and digest(other) == digest(path)), None)
        if twin is not None:
            copies.append((a[path], b[twin]))
    return copies


def check_disjoint(lists: Sequence[RoleList], unit: str) -> None:
    """Refuse two lists of ``lists`` (training first, then search, then the tests) that name the
    same image file, in one line naming both lists and the first shared image; warn of copies
    under other names.  Test lists are not compared with each other."""
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
            copies = _copies(files[i], files[j])
            if copies:
                (a, b), count = copies[0], len(copies)
                log.warning("%s hold %d image(s) whose bytes the other list holds under another name, first %s "
                            "(line %d) has the bytes of %s (line %d): a benchmark may hold such copies itself; in "
                            "your own data, remove them (docs/method.md §4)", where, count, a.path, a.line, b.path, b.line)
