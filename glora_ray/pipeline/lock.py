"""One driver per output folder: a lock file in ``--out`` while a pipeline runs.

Two drivers writing one output would train into the same Ray Train folder and both write the
results; the second is refused at once, naming the folder and the first driver's host and pid.
The lock is a file created atomically (``O_CREAT | O_EXCL``) holding ``{host, pid, started}``.
A lock left by a driver of this host that no longer runs (killed with SIGKILL, or crashed) is
stale: it is taken over with a warning.  A lock of another host cannot
be checked from here: it is refused with how to remove it.  URIs (``s3://`` and the like) have no
atomic create-if-absent that every store honours: they are not locked (a note is logged); one
driver per URI is then the scheduler's or the user's to ensure (docs/method.md §6).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

from .. import storage
from .config import PipelineConfigError

log = logging.getLogger(__name__)
LOCK_FILE = ".glora-ray.lock"
_WRITE_GRACE_S = 5.0  # a lock file younger than this and unreadable is still being written


class OutputLockedError(PipelineConfigError):
    """Another driver holds the output folder."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user: alive
        return True
    return True


def _read(path: Path) -> dict[str, Any] | None:
    """The lock's record; None when it vanished meanwhile; {} when it is unreadable (half written)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise OutputLockedError(f"{path} is a folder where the lock file of --out must be; remove it (or choose "
                                f"another --out)") from None
    except (UnicodeDecodeError, OSError):
        return {}  # unreadable: treated like a half-written lock (stale once old)
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return record if isinstance(record, dict) else {}


class OutputLock:
    """Held while one driver runs on ``out``; a context manager (``with OutputLock(cfg.out):``)."""

    def __init__(self, out: str):
        self.out = out
        self.path: Path | None = None
        self._created_dir: Path | None = None

    # -- acquire ---------------------------------------------------------------------------------
    def acquire(self) -> None:
        local = storage.local_path(self.out)
        if local is None:
            log.warning("--out %s is not locked (object stores have no atomic create-if-absent): run one driver "
                        "per URI at a time", self.out)
            return
        folder = Path(local)
        if not folder.exists():
            try:
                folder.mkdir(parents=True)
            except FileExistsError:
                pass  # another driver made it meanwhile
            except OSError as err:
                raise PipelineConfigError(f"--out {self.out}: cannot create the folder ({err})") from err
            else:
                self._created_dir = folder
        path = folder / LOCK_FILE
        record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        for _ in range(3):  # a stale lock taken over by another rerun meanwhile: look again
            if self._create(path, record):
                self.path = path
                return
            self._refuse_or_clear(path)
        raise OutputLockedError(f"--out {self.out}: could not take the lock {path}; another driver keeps taking it")

    @staticmethod
    def _create(path: Path, record: dict[str, Any]) -> bool:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as err:
            raise PipelineConfigError(f"--out {path.parent}: cannot create the lock file {path.name} ({err})") from err
        with os.fdopen(fd, "w") as handle:
            json.dump(record, handle)
        return True

    def _refuse_or_clear(self, path: Path) -> None:
        """Refuse a live (or uncheckable) holder; move a stale lock aside so it can be taken."""
        record = _read(path)
        if record is None:
            return  # released meanwhile
        host, pid = record.get("host"), record.get("pid")
        if not record or not isinstance(pid, int):
            try:
                age = time.time() - path.stat().st_mtime
            except FileNotFoundError:
                return  # released meanwhile
            if age < _WRITE_GRACE_S:
                raise OutputLockedError(f"--out {self.out} is being locked by another driver (lock file {path} "
                                        f"is being written); run one driver per output folder")
            host, pid = socket.gethostname(), -1  # unreadable and old: a driver died while writing it
        if host != socket.gethostname():
            raise OutputLockedError(
                f"--out {self.out} is in use by the driver pid {pid} on host {host} (since {record.get('started')}); "
                f"this host cannot check whether it still runs: if it does not, remove {path}")
        if pid > 0 and _pid_alive(pid):
            raise OutputLockedError(f"--out {self.out} is in use by the driver pid {pid} on host {host} (since "
                                    f"{record.get('started')}); wait for it, stop it, or choose another --out; if pid "
                                    f"{pid} is no glora-ray driver (pids are reused), remove {path}")
        aside = path.with_name(f"{path.name}.stale-{uuid.uuid4().hex}")
        try:
            os.replace(path, aside)
        except FileNotFoundError:
            return  # another rerun took it over first
        os.remove(aside)
        log.warning("--out %s: stale lock of driver pid %s on %s (started %s, no longer running) taken over",
                    self.out, pid, host, record.get("started"))

    # -- release ---------------------------------------------------------------------------------
    def release(self) -> None:
        """Remove this driver's lock (and the folder, when this driver made it and left it empty)."""
        if self.path is None:
            return
        record = _read(self.path)
        if record and record.get("pid") == os.getpid() and record.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)
        self.path = None
        if self._created_dir is not None:
            try:
                self._created_dir.rmdir()  # only when empty: a run that wrote nothing leaves nothing
            except OSError:
                pass
            self._created_dir = None

    def __enter__(self) -> "OutputLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
