"""What a run's results depend on: the one definition the pipeline, training and search share.

Every field of a settings dataclass affects results unless its ``dataclasses.field`` metadata
says otherwise:

* ``EXECUTION_ONLY``: how the run executes (resources, checkpoint frequency, fault handling,
  extra reports such as a tested front, baselines or more seeds, each kept in its own records).
  Changing it continues a run.
* ``EXTENDS``: the run's length (``SearchConfig.generations``).  Raising it extends a run from
  where it stopped; the stage that owns it refuses a value below what is already stored.

``result_identity`` collects the rest, recursing into nested settings dataclasses, and
``differences`` names what differs between a stored identity and the current one.

Every stage answers "is this the same run?" the same way: the record it writes beside its
outputs keeps the inputs that decided them (``with_identity``), and a rerun compares its own
inputs with those (``identity_changes``): the pipeline's config.json, the search's run.json, a
finished training's train_config.json, each baseline's record, the winner's test.json and
inference.json.  What a stage does with a change is its own: the pipeline and the search refuse
(their stored results would mix with others), the finished stages are redone.  A field whose
value is ``"auto"`` is recorded as what it resolves to (the dataclass's ``resolved_field``), so
that a run moved to other hardware, where ``auto`` means another precision or merge, does not
count as the same run.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import fields, is_dataclass
from typing import Any, Mapping

_KEY = "affects_results"
IDENTITY = "identity"  # where a stage's record keeps the inputs that decided it
EXECUTION_ONLY = {_KEY: "no"}
EXTENDS = {_KEY: "extends"}


def _normalised(data: Any) -> Any:
    """JSON's view of ``data``: tuples become lists, enums their values, keys strings."""
    return json.loads(json.dumps(data, sort_keys=True, default=_plain))


def _plain(value: Any) -> Any:
    return getattr(value, "value", str(value))  # an Enum's value, else its text


def result_identity(config: Any) -> dict[str, Any]:
    """The fields of ``config`` (a settings dataclass) that determine its run's results."""
    identity: dict[str, Any] = {}
    for spec in fields(config):
        if spec.metadata.get(_KEY, "yes") != "yes":
            continue
        value = getattr(config, spec.name)
        resolve = getattr(config, "resolved_field", None)
        if resolve is not None:
            value = resolve(spec.name, value)
        identity[spec.name] = result_identity(value) if is_dataclass(value) else _normalised(value)
    return identity


def result_extent(config: Any) -> dict[str, Any]:
    """The ``EXTENDS`` fields of ``config`` (nested like ``result_identity``): how far its run goes."""
    extent: dict[str, Any] = {}
    for spec in fields(config):
        value = getattr(config, spec.name)
        if is_dataclass(value):
            inner = result_extent(value)
            if inner:
                extent[spec.name] = inner
        elif spec.metadata.get(_KEY) == "extends":
            extent[spec.name] = _normalised(value)
    return extent


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    if isinstance(data, Mapping):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: data}


def differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(dotted field name, stored value, current value)`` for every field that differs."""
    have, want = flatten(_normalised(stored)), flatten(_normalised(current))
    return [(name, have.get(name), want.get(name)) for name in sorted(set(have) | set(want))
            if have.get(name) != want.get(name)]


def describe(diffs: list[tuple[str, Any, Any]], limit: int = 6) -> str:
    """``"train.seed: stored 0, now 99; ..."`` for an error message."""
    return "; ".join(f"{name}: stored {old!r}, now {new!r}" for name, old, new in diffs[:limit])


def with_identity(record: Mapping[str, Any], inputs: Mapping[str, Any]) -> dict[str, Any]:
    """``record`` with ``inputs``, what decided its results, kept beside it (normalised)."""
    return {**record, IDENTITY: _normalised(inputs)}


def identity_changes(record: Mapping[str, Any] | None, inputs: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """Every input that differs from those ``record`` (a ``with_identity`` record) was made from;
    [] for the same inputs.  No record, or one without inputs, differs in every input."""
    stored = record.get(IDENTITY) if isinstance(record, Mapping) else None
    return differences(stored if isinstance(stored, Mapping) else {}, inputs)


def identity_digest(inputs: Mapping[str, Any]) -> str:
    """A digest of ``inputs`` that any process computes alike (normalised, keys sorted)."""
    return hashlib.sha256(json.dumps(_normalised(inputs), sort_keys=True).encode()).hexdigest()
