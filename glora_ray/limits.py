"""Process limits that break torch and Ray in ways their errors do not name (docs/method.md §6).

An address-space limit (``ulimit -v``) makes ``import torch`` fail ("failed to map segment from
shared object") and Ray's start time out: torch and Ray map several GiB of virtual memory (shared
libraries, thread stacks, the object store) whatever they end up using.  Standard library only,
so a pipeline checks it before anything heavy loads.
"""
from __future__ import annotations

import contextlib
import resource
import sys
from typing import Iterator


def address_space_limit() -> int | None:
    """The soft ``RLIMIT_AS`` in bytes, or None when there is none."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    return None if soft == resource.RLIM_INFINITY else soft


def limit_hint() -> str:
    """What to do about the address-space limit this process runs under."""
    limit = address_space_limit()
    return (f"this process runs under an address-space limit (ulimit -v) of {(limit or 0) // 2**20:,} MiB, and torch "
            f"and Ray map several GiB of virtual memory whatever they use: run without it (to bound memory, use "
            f"cgroups or a container's memory limit)")


@contextlib.contextmanager
def loading_under_limits() -> Iterator[None]:
    """Imports inside that fail under an address-space limit end the program with one ``error:``
    line (exit 2) naming the limit; without a limit, the error is left as it is."""
    try:
        yield
    except ImportError as err:
        if address_space_limit() is None:
            raise
        print(f"error: cannot load torch or Ray ({err}); {limit_hint()}", file=sys.stderr)
        raise SystemExit(2) from None
