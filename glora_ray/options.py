"""Command-line options declared on the configuration fields they set.

A settings dataclass marks a field as an option with ``field(metadata=option(...))``: its help
group, help text, flag (default ``--`` and the field's name) and argparse settings.  The
pipelines' parsers are generated from these declarations (``pipeline/cli.py``), so an option
cannot exist without the field it sets, and its destination is the field's own path
(``train.num_workers``): nothing routes options by name.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

_KEY = "option"

# Help groups, in the order --help shows them.
JOB = "job"
MODEL = "model"
BUDGET = "budget (adapter parameters; 0.29M, 800k or an integer)"
TRAINING = "stage 1: supernet training"
SEARCH = "stage 2: evolutionary search"
WINNER = "stage 3: the winner"
GROUPS = (JOB, MODEL, BUDGET, TRAINING, SEARCH, WINNER)


@dataclass(frozen=True)
class Option:
    """How one configuration field appears on the command line."""

    group: str
    help: str = ""
    flag: str | None = None  # None: --<field name with dashes>
    argparse: Mapping[str, Any] = field(default_factory=dict)  # type, nargs, choices, metavar, action
    unset: str | None = None  # what the field's None means, shown as the preset's value
    negation: tuple[str, str] | None = None  # a boolean's (--no-... flag, its help)
    exclusive: str | None = None  # options sharing this name exclude each other (e.g. weight sources)
    excludes: str | None = None  # the flag of another option this one cannot be given with
    # A mapping field: one option per key (``--forms-A`` .. ``--forms-E``), each its own argparse settings.
    per_key: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def flag_for(self, name: str, key: str | None = None) -> str:
        flag = self.flag or "--" + name.replace("_", "-")
        return flag if key is None else f"{flag}-{key}"


def option(group: str, help: str = "", **settings: Any) -> dict[str, Option]:
    """``dataclasses.field`` metadata declaring the field an option (see ``Option``)."""
    return {_KEY: Option(group, help, **settings)}


def declared(metadata: Mapping[str, Any]) -> Option | None:
    return metadata.get(_KEY)


def json_object(text: str) -> dict[str, Any]:
    """An argparse ``type``: a JSON object such as ``'{"depth": 4}'``."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"depth\": 4}}'; got {text!r}")
    return value
