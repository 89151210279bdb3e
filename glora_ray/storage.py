"""Output storage through pyarrow filesystems: a local path, a shared mount or a cloud URI."""
from __future__ import annotations

import json
import os
import posixpath
import uuid
from typing import Any, BinaryIO, Callable

import pyarrow.fs as pafs


def resolve(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or a URI such as s3://bucket/run or file:///mnt/x.

    A plain local path (relative, with "~", spaces or "%") is never parsed as a URI.
    """
    uri = os.fspath(uri)
    if "://" in uri:  # s3://, gs://, hdfs://, file://: pyarrow picks the filesystem
        fs, path = pafs.FileSystem.from_uri(uri)
    else:
        fs, path = pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    return fs, path.rstrip("/") or "/"


def atomic_write(fs: pafs.FileSystem, path: str, write: Callable[[BinaryIO], None]) -> None:
    """Write under a hidden temporary name beside ``path``, then move it into place.

    Readers (and Parquet dataset scans, which skip names starting with ".") never see half a
    file; a failed write leaves no temporary behind.
    """
    folder, name = posixpath.split(path)
    fs.create_dir(folder, recursive=True)
    tmp = posixpath.join(folder, f".{name}.tmp-{uuid.uuid4().hex}")
    try:
        with fs.open_output_stream(tmp) as stream:
            write(stream)
        fs.move(tmp, path)  # a rename on local and POSIX-like stores
    except BaseException:
        if fs.get_file_info(tmp).type != pafs.FileType.NotFound:
            fs.delete_file(tmp)
        raise


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


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))
