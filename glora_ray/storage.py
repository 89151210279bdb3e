"""Output storage through pyarrow filesystems: a local path, a shared mount or a cloud URI."""
from __future__ import annotations

import contextlib
import json
import os
import posixpath
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Iterator

import pyarrow as pa
import pyarrow.fs as pafs

from . import faults
from .errors import DamagedFileError, GLoRARayError, one_line

if TYPE_CHECKING:  # pandas only where a frame is written
    import pandas as pd


class StorageError(GLoRARayError):
    """A URI no filesystem (pyarrow's own, or fsspec's) can serve."""


def resolve(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or a URI such as s3://bucket/run or file:///mnt/x.

    A plain local path (relative, with "~", spaces or "%") is never parsed as a URI.  Schemes
    pyarrow does not know natively (memory://, az://, ...) go through an installed fsspec
    implementation, wrapped as a pyarrow filesystem.
    """
    uri = os.fspath(uri)
    if "://" in uri:  # s3://, gs://, hdfs://, file://: pyarrow picks the filesystem
        try:
            fs, path = pafs.FileSystem.from_uri(uri)
        except pa.ArrowInvalid:
            fs, path = _fsspec(uri)
    else:
        fs, path = pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    return fs, path.rstrip("/") or "/"


def _fsspec(uri: str) -> tuple[pafs.FileSystem, str]:
    try:
        import fsspec

        fs, path = fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as err:
        raise StorageError(f"{uri}: no filesystem for this URI's scheme in pyarrow or fsspec ({err}); use a "
                           f"local path, file://, s3://, gs://, hdfs:// or an installed fsspec protocol") from None
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def local_path(uri: str | os.PathLike) -> str | None:
    """The local path behind ``uri``, or None when it lives on another filesystem."""
    fs, path = resolve(uri)
    return path if isinstance(fs, pafs.LocalFileSystem) else None


def atomic_write(fs: pafs.FileSystem, path: str, write: Callable[[BinaryIO], None]) -> None:
    """Write under a hidden temporary name beside ``path``, then move it into place.

    Readers (and Parquet dataset scans, which skip names starting with ".") never see half a
    file; a failed write leaves no temporary behind.
    """
    folder, name = posixpath.split(path)
    fs.create_dir(folder, recursive=True)
    faults.at_write(path)  # test-only; nothing by default
    tmp = posixpath.join(folder, f".{name}.tmp-{uuid.uuid4().hex}")
    try:
        with fs.open_output_stream(tmp) as stream:
            write(stream)
        fs.move(tmp, path)  # a rename on local and POSIX-like stores
    except BaseException:
        if fs.get_file_info(tmp).type != pafs.FileType.NotFound:
            fs.delete_file(tmp)
        raise


@contextlib.contextmanager
def staged_dir(destination: str | os.PathLike, *, replace: bool = True) -> Iterator[Path]:
    """A local folder filled under a hidden temporary name beside ``destination``, then renamed
    into place whole (the folder counterpart of ``atomic_write``).

    ``replace``: an existing ``destination`` is swapped out; otherwise it stays and the rename
    raises ``FileExistsError`` (another writer was first).  A failure leaves no temporary behind.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = destination.with_name(f".{destination.name}.tmp-{uuid.uuid4().hex}")
    staging.mkdir()
    try:
        yield staging
        if destination.exists():
            if not replace:
                raise FileExistsError(f"{destination} already exists")
            old = destination.with_name(f".{destination.name}.old-{uuid.uuid4().hex}")
            os.replace(destination, old)
            os.replace(staging, destination)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def install_dir(source: str | os.PathLike, destination: str) -> None:
    """Copy the local folder ``source`` to ``destination`` (a path or URI), replacing it whole.

    A local destination is swapped in by one rename (``staged_dir``).  An object store has no
    rename of a folder: the old folder is deleted, then the files are uploaded; callers write the
    file that marks the folder complete after this returns (the training job's history and
    settings), so a half-uploaded folder is never taken for a finished one.
    """
    local = local_path(destination)
    if local is not None:
        with staged_dir(local) as staging:
            shutil.copytree(source, staging, dirs_exist_ok=True)
        return
    delete_dir(destination)
    fs, path = resolve(destination)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(os.fspath(source), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def download_dir(uri: str, destination: str | os.PathLike) -> None:
    """Copy the folder ``uri`` (a path or URI) into the local folder ``destination``."""
    fs, path = resolve(uri)
    os.makedirs(destination, exist_ok=True)
    pafs.copy_files(path, os.fspath(destination), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())


def delete_dir(uri: str) -> None:
    """Remove the folder ``uri`` and everything under it; nothing when it is not there."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def delete_file(uri: str) -> None:
    """Remove the file ``uri``; nothing when it is not there."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)


def list_dir(uri: str) -> list[tuple[str, bool]]:
    """(name, is a folder) of every entry directly under ``uri``, sorted; [] when it is not there."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    return sorted((info.base_name, info.type == pafs.FileType.Directory)
                  for info in fs.get_file_info(pafs.FileSelector(path, recursive=False)))


def join(base: str, *parts: str) -> str:
    """Join URI or path components with '/' (pyarrow paths are always posix)."""
    return posixpath.join(base, *parts)


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_empty_dir(uri: str) -> bool:
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return True
    return not fs.get_file_info(pafs.FileSelector(path, recursive=False))


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = resolve(uri)
    atomic_write(fs, path, lambda stream: stream.write(data))


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as stream:
        return stream.read()


def write_json(uri: str, payload: Any) -> None:
    write_bytes(uri, json.dumps(payload, indent=2, sort_keys=True, default=str).encode())


def read_parquet(uri: str) -> pd.DataFrame:
    """The Parquet file at ``uri`` (a path or URI) as a pandas frame, as ``write_parquet`` wrote it."""
    import io

    import pandas as pd

    return pd.read_parquet(io.BytesIO(read_bytes(uri)))


def write_parquet(uri: str, frame: pd.DataFrame) -> None:
    """A pandas frame as Parquet (no index), written atomically like every file here."""
    import io

    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    write_bytes(uri, buffer.getvalue())


def read_json(uri: str, kind: type | None = None, remedy: str = "remove it and rerun") -> Any:
    """The JSON at ``uri``; with ``kind`` (e.g. ``dict``), one that is not that type, like one that
    does not parse, is a ``DamagedFileError`` naming the file and ``remedy``."""
    data = read_bytes(uri)
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DamagedFileError(f"{uri} is damaged ({one_line(err)}); {remedy}") from None
    if kind is not None and not isinstance(value, kind):
        raise DamagedFileError(f"{uri} is damaged (a JSON {type(value).__name__}, not a {kind.__name__}); {remedy}")
    return value
