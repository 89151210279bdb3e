"""Stopping a driver cleanly on SIGTERM (job schedulers, ``ray job stop``) and SIGINT (Ctrl-C).

The first signal raises ``RunStopped`` (a ``KeyboardInterrupt``) in the main thread, so the job
unwinds like Ctrl-C: ``run_main`` shuts Ray down (no Ray process of ours stays) and ends with
one line and exit status 128 + the signal (130, 143).  Every result file is written under a
temporary name and renamed (``storage.atomic_write``), so a stopped generation is either
complete or absent, and rerunning the same command resumes (docs/method.md §6).  A second
signal while the driver cleans up exits at once.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Tasks aborted by the stop fail; Ray would report each as an "Unhandled error" when its result
# is dropped unread.
_QUIET_ENV = "RAY_IGNORE_UNHANDLED_ERRORS"


class RunStopped(KeyboardInterrupt):
    """The driver was told to stop by ``signum``."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


_received: list[int] = []


def _on_signal(signum: int, frame: FrameType | None) -> None:
    if _received:  # stopping already: a second signal means now
        os._exit(128 + signum)
    _received.append(signum)
    os.environ[_QUIET_ENV] = "1"
    logging.getLogger("ray").setLevel(logging.CRITICAL)
    raise RunStopped(signum)


def install_stop_handlers() -> dict[int, Any]:
    """SIGTERM and SIGINT raise ``RunStopped`` from here on (a SIGINT the caller ignores stays
    ignored); returns the previous handlers for ``restore_handlers``.  Main thread only."""
    previous: dict[int, Any] = {}
    if threading.current_thread() is not threading.main_thread():
        return previous
    _received.clear()
    for signum in STOP_SIGNALS:
        current = signal.getsignal(signum)
        if signum == signal.SIGINT and current == signal.SIG_IGN:
            continue
        previous[signum] = current
        signal.signal(signum, _on_signal)
    return previous


def restore_handlers(previous: dict[int, Any]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def stop_signal(interrupt: KeyboardInterrupt) -> int:
    """The signal behind ``interrupt``: the one the handler received (Ray re-raises an exception
    from a signal handler inside ``ray.get``/``ray.wait`` as a plain ``KeyboardInterrupt``), its
    own, or SIGINT for Python's plain Ctrl-C."""
    if _received:
        return _received[0]
    return interrupt.signum if isinstance(interrupt, RunStopped) else int(signal.SIGINT)


def shutdown_ray() -> None:
    """Disconnect from Ray; a local instance this driver started stops with all its processes."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
