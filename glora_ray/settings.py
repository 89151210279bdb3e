"""Shared helper of the typed settings dataclasses."""
from __future__ import annotations

from dataclasses import fields
from typing import Any, Mapping, TypeVar

T = TypeVar("T")


def from_known_fields(cls: type[T], data: Mapping[str, Any], error: type[Exception], what: str) -> T:
    """``cls(**data)``, refusing keys that are not fields of ``cls`` with a message naming them."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise error(f"unknown {what} setting(s) {unknown}; known: {sorted(known)}")
    return cls(**dict(data))
