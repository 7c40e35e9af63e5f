"""Readers for untyped Kubernetes objects (JSON decoded into dicts and lists): pure.

Everything read from the API server, a watch or a manifest may be missing or of the wrong
type. These readers never raise: a value of the wrong type reads as the empty value of the
type asked for, so the caller handles one shape ("absent") instead of many.

    as_dict(obj.get("metadata")).get("name")
    as_list(spec.get("ports"))
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def as_dict(value: Any) -> Mapping[str, Any]:
    """A JSON object as a mapping (the same object, not a copy); anything else reads as {}."""
    return value if isinstance(value, Mapping) else {}


def as_list(value: Any) -> list[Any]:
    """A JSON array (a list, or a tuple from our own code) as a new list; anything else,
    including a string or an object, reads as []."""
    return list(value) if isinstance(value, list | tuple) else []


def as_items(value: Any) -> list[Any]:
    """A collection a caller handed over (a list, a generator, a view of a cache) as a new
    list; a string, bytes, a mapping or a non-iterable reads as []. For JSON fields use
    `as_list`: there a mapping or a string is never a list of items."""
    if isinstance(value, list | tuple):
        return list(value)
    if isinstance(value, Iterable) and not isinstance(value, str | bytes | Mapping):
        return list(value)
    return []


def as_str(value: Any) -> str:
    """A string as is; anything else (None, a number) reads as ""."""
    return value if isinstance(value, str) else ""


def as_int(value: Any) -> int:
    """An integer as is; anything else reads as 0, including a bool (JSON true is no count)
    and a numeric string (the API sends counts as numbers)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
