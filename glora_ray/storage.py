"""Output storage through pyarrow filesystems: a local path, a shared mount or a cloud URI."""
from __future__ import annotations

import json
import posixpath
from typing import Any

import pyarrow.fs as pafs


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or a URI such as s3://bucket/run or file:///mnt/x."""
    return pafs.FileSystem.from_uri(uri) if "://" in uri else (pafs.LocalFileSystem(), _absolute(uri))


def _absolute(path: str) -> str:
    import os

    return os.path.abspath(os.path.expanduser(path))


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
    """Write atomically: a temporary name first, then a rename, so readers never see half a file."""
    fs, path = resolve(uri)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    tmp = f"{path}.tmp"
    with fs.open_output_stream(tmp) as stream:
        stream.write(data)
    fs.move(tmp, path)


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as stream:
        return stream.read()


def write_json(uri: str, payload: Any) -> None:
    write_bytes(uri, json.dumps(payload, indent=2, sort_keys=True, default=str).encode())


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))
