"""Every image a run will read, opened before any compute (docs/method.md §4, §6).

A list file names images; a file that is not an image, or one cut short, would otherwise be found
only when a Ray worker decodes it (in ``test``: after training and the whole search).  Checks are
header-level and cheap, so a whole VTAB-1k collection is checked in seconds:

- every format: PIL identifies the file and parses its header (``Image.open(...).verify()``);
- PNG: ``verify`` also reads every chunk through IEND and checks its CRC, so truncation is caught;
- JPEG: ``verify`` reads only the header, so the end-of-image marker is looked for near the end
  of the file (a truncated JPEG has none: byte stuffing keeps the marker out of image data);
- any other format: decoded whole (rare in image-classification lists, and small);
- every format: at most ``MAX_IMAGE_PIXELS`` pixels (read from the header): a small file can
  declare a huge image (a 10000x10000 PNG compresses to 12 KB) that would take hundreds of MB
  when a worker decodes it.

The input is a plain list of ``ImageRef`` (image path, list file, line), so any dataset layout
(VTAB-1k, few-shot, domain-generalization lists) can use it.
"""
from __future__ import annotations

import errno
import logging
import os
import time
import warnings
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence

from PIL import Image

from ..errors import one_line
from .vtab import DataError, Sample, raise_problems, read_split

log = logging.getLogger(__name__)

_JPEG_END = b"\xff\xd9"
# Bytes searched for the end-of-image marker: tolerates padding or metadata some writers append.
_JPEG_TAIL_BYTES = 4096
MAX_REPORTED = 5  # bad files named in an error message
MAX_IMAGE_PIXELS = 40_000_000  # above every photo of the paper's datasets (ImageNet's largest: ~32 MP)
PROGRESS_EVERY_S = 10.0  # seconds between progress lines of a long check
_CHUNK = 256  # images per task handed to a thread


class ImageRef(NamedTuple):
    """One image as a list file names it: where the file is, and which list line names it."""

    path: Path
    list_file: Path
    line: int

    @property
    def where(self) -> str:
        return f"{self.list_file}:{self.line}"


class ImageProblem(NamedTuple):
    ref: ImageRef
    problem: str

    def describe(self) -> str:
        return f"{self.ref.where}: {self.ref.path} ({self.problem})"


def _jpeg_is_complete(path: Path) -> bool:
    with open(path, "rb") as stream:
        stream.seek(0, os.SEEK_END)
        stream.seek(max(0, stream.tell() - _JPEG_TAIL_BYTES))
        return _JPEG_END in stream.read()


@contextmanager
def _without_pil_size_warning() -> Iterator[None]:
    """PIL's large-image warning left out: the pixel budget is ours.  Warning filters are one
    global list, so this is entered by the calling thread only, around any worker threads."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


def image_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be read as an image (one line), or None when it can."""
    with _without_pil_size_warning():
        return _problem(Path(path))


def _problem(path: Path) -> str | None:
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                return (f"{width}x{height} = {width * height:,} pixels, above the budget of {MAX_IMAGE_PIXELS:,}; "
                        f"resize it")
            image_format = image.format
            if image_format in ("PNG", "JPEG"):
                image.verify()
            else:
                image.load()
        if image_format == "JPEG" and not _jpeg_is_complete(path):
            return "truncated JPEG: no end-of-image marker"
    except Exception as err:  # noqa: BLE001 - whatever PIL raises, the file is not a readable image
        return one_line(err)
    return None


def _check_chunk(refs: Sequence[ImageRef]) -> list[ImageProblem]:
    return [ImageProblem(ref, problem) for ref in refs if (problem := _problem(ref.path)) is not None]


def verify_images(
    refs: Iterable[ImageRef | tuple[str | os.PathLike, str | os.PathLike, int]],
    *,
    threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[ImageProblem]:
    """Every unreadable image of ``refs``, in input order; each file is opened once.

    ``refs`` holds ``ImageRef`` or plain ``(image path, list file, line)`` tuples.  Threads help:
    the work is file reads and PIL's C code.  ``progress(done, total)`` is called about every
    ``PROGRESS_EVERY_S`` seconds (default: an INFO log line for sets of more than one chunk).
    """
    unique: dict[Path, ImageRef] = {}
    for item in refs:
        ref = ImageRef(Path(item[0]), Path(item[1]), int(item[2]))
        unique.setdefault(ref.path, ref)  # an image named by two splits is checked once
    ordered = list(unique.values())
    if threads is None:
        threads = min(32, (os.cpu_count() or 1) * 4)  # I/O-bound: more threads than cores
    if threads < 1:
        raise DataError(f"threads must be >= 1, got {threads}")
    if progress is None and len(ordered) > _CHUNK:
        progress = _log_progress
    chunks = [ordered[i:i + _CHUNK] for i in range(0, len(ordered), _CHUNK)]
    problems: list[ImageProblem] = []
    done, last_report = 0, time.monotonic()
    with _without_pil_size_warning(), ThreadPoolExecutor(max_workers=threads, thread_name_prefix="verify-images") as pool:
        for chunk, found in zip(chunks, pool.map(_check_chunk, chunks)):
            problems.extend(found)
            done += len(chunk)
            if progress is not None and (time.monotonic() - last_report >= PROGRESS_EVERY_S or done == len(ordered)):
                progress(done, len(ordered))
                last_report = time.monotonic()
    return problems


def _log_progress(done: int, total: int) -> None:
    log.info("verifying images: %d/%d", done, total)


def check_images(refs: Iterable[ImageRef | tuple[str | os.PathLike, str | os.PathLike, int]], **options) -> int:
    """Raise one ``DataError`` naming the first few unreadable images; returns how many were checked."""
    refs = list(refs)
    problems = verify_images(refs, **options)
    if problems:
        shown = "; ".join(p.describe() for p in problems[:MAX_REPORTED])
        more = f"; and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
        raise DataError(f"{len(problems)} image(s) cannot be read: {shown}{more}")
    return len({Path(item[0]) for item in refs})


def sample_refs(samples: Iterable[Sample]) -> list[ImageRef]:
    """``ImageRef`` of parsed list-file samples (``parse_list_file``, ``read_split``)."""
    return [ImageRef(s.path, s.list_file, s.line) for s in samples]


def split_images(root: str | os.PathLike, dataset: str, splits: Sequence[str]) -> list[ImageRef]:
    """The images that VTAB-1k style list files of ``splits`` name, with list file and line."""
    return [ref for split in splits for ref in sample_refs(read_split(root, dataset, split))]


def check_data_root(root: str | os.PathLike) -> None:
    """A ``DataError`` when ``root`` cannot be resolved: a symlink loop (on it or a folder above it),
    which every later look at it would report as missing or, when the embedded data is written
    there, as a ``FileExistsError`` (docs/method.md §6).  A root that does not exist yet passes."""
    try:
        os.stat(root)
    except FileNotFoundError:
        return
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise DataError(f"--data-root {os.fspath(root)!r} is a symlink loop (too many levels of symbolic links); "
                            f"point it at a real folder") from None
        raise DataError(f"--data-root {os.fspath(root)!r} cannot be read ({one_line(err)})") from None


def check_decodable(samples: Sequence[Sample], list_path: str | Path) -> None:
    """Every image of ``samples`` decodes; else a ``DataError`` naming each bad line of ``list_path``."""
    found = verify_images(sample_refs(samples))
    problems = [f"{p.ref.where}: cannot decode image {str(p.ref.path)!r}: {p.problem}" for p in found]
    raise_problems(Path(list_path), problems)
