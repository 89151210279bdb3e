"""Test-only fault injection: crash or hang evaluator actors, fail a training step.

Never used in production: nothing happens unless the environment variable ``GLORA_RAY_FAULTS``
names a JSON file.  The test suite sets it before Ray starts, so every Ray worker and actor
inherits it, and writes a plan into that file for the one test that wants faults (see
``tests/helpers.py::injected_faults``).  The file is read when a fault point is reached, so a
plan written after Ray started still reaches the actors.

Plan keys::

    {"evaluate": {"on_call": 2, "actors": [0], "action": "exit" | "hang" | "sleep", "seconds": 3},
     "start": {"actors": [1]},
     "train_step": 15 | {"step": 63, "action": "raise" | "hang"},
     "write": {"match": "population/gen=0001"}}

``evaluate``: the listed evaluator actors (by start index; absent: every actor, replacements
included) end their process (``exit``), never return (``hang``) or return ``seconds`` late
(``sleep``) at the start of their ``on_call``-th evaluate call.  ``start``: the listed evaluator actors (absent: every one) raise
``InjectedFailure`` in their constructor, i.e. fail to start.  ``train_step``: at that global step,
raise ``InjectedFailure`` in a training attempt that did not start from a checkpoint, or (``hang``)
stop there for good the first time any worker reaches it, after creating the file
``hang_marker()`` names; a test waits for it, then takes a node away (later attempts pass).
``write``: every file written through ``storage`` whose path holds ``match`` fails as on a full
disk (``OSError`` ENOSPC).
"""
from __future__ import annotations

import errno
import json
import os
import time
from typing import Any

ENV_VAR = "GLORA_RAY_FAULTS"


class InjectedFailure(RuntimeError):
    """The failure a test asked for."""


def plan(point: str) -> Any:
    """The planned fault at ``point``, or None (always None outside the tests)."""
    path = os.environ.get(ENV_VAR)
    if not path or not os.path.isfile(path):
        return None
    with open(path) as handle:
        return json.load(handle).get(point)


def at_evaluate_call(actor_index: int, call: int) -> None:
    """The evaluator actors' fault point, at the start of every evaluate call."""
    fault = plan("evaluate")
    if not fault or fault["on_call"] != call or actor_index not in fault.get("actors", [actor_index]):
        return
    action = fault.get("action", "exit")
    if action == "sleep":
        time.sleep(fault["seconds"])
        return
    if action == "hang":
        while True:  # until the pool's call_timeout_s ends this actor
            time.sleep(60)
    os._exit(1)


def at_actor_start(actor_index: int) -> None:
    """The evaluator actors' fault point, at the start of their constructor."""
    fault = plan("start")
    if fault is not None and actor_index in fault.get("actors", [actor_index]):
        raise InjectedFailure(f"injected start failure of actor-{actor_index} ({ENV_VAR})")


def hang_marker() -> str:
    """The file a training step's ``hang`` fault creates when it is reached."""
    return f"{os.environ[ENV_VAR]}.hung"


def at_train_step(step: int, resumed: bool) -> None:
    """The training loop's fault point, before every step."""
    fault = plan("train_step")
    if isinstance(fault, int):
        fault = {"step": fault}
    if not fault or fault["step"] != step:
        return
    if fault.get("action", "raise") == "hang":
        if os.path.exists(hang_marker()):
            return  # a later attempt, restarted after the hang was ended from outside
        open(hang_marker(), "a").close()
        while True:
            time.sleep(60)
    if not resumed:
        raise InjectedFailure(f"injected failure at step {step} ({ENV_VAR})")


def at_write(path: str) -> None:
    """The storage layer's fault point, before every file it writes."""
    fault = plan("write")
    if fault is not None and fault["match"] in path:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
