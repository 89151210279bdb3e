"""Test-only fault injection: crash or hang evaluator actors, fail a training step.

Never used in production: nothing happens unless the environment variable ``GLORA_RAY_FAULTS``
names a JSON file.  The test suite sets it before Ray starts, so every Ray worker and actor
inherits it, and writes a plan into that file for the one test that wants faults (see
``tests/helpers.py::injected_faults``).  The file is read when a fault point is reached, so a
plan written after Ray started still reaches the actors.

Plan keys::

    {"evaluate": {"on_call": 2, "actors": [0], "action": "exit" | "hang"},
     "start": {"actors": [1]},
     "train_step": 15}

``evaluate``: the listed evaluator actors (by start index; absent: every actor, replacements
included) end their process (``exit``) or never return (``hang``) at the start of their
``on_call``-th evaluate call.  ``start``: the listed evaluator actors (absent: every one) raise
``InjectedFailure`` in their constructor, i.e. fail to start.  ``train_step``: raise ``InjectedFailure`` at that global step in
a training attempt that did not start from a checkpoint.
"""
from __future__ import annotations

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
    if fault.get("action", "exit") == "hang":
        while True:  # until the pool's call_timeout_s ends this actor
            time.sleep(60)
    os._exit(1)


def at_actor_start(actor_index: int) -> None:
    """The evaluator actors' fault point, at the start of their constructor."""
    fault = plan("start")
    if fault is not None and actor_index in fault.get("actors", [actor_index]):
        raise InjectedFailure(f"injected start failure of actor-{actor_index} ({ENV_VAR})")


def at_train_step(step: int, resumed: bool) -> None:
    """The training loop's fault point, before every step."""
    if not resumed and plan("train_step") == step:
        raise InjectedFailure(f"injected failure at step {step} ({ENV_VAR})")
