"""apilane.model.objects: the exact reading of every odd value a Kubernetes object may hold."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import pytest

from apilane.model.objects import as_dict, as_int, as_items, as_list, as_str

pytestmark = [pytest.mark.unit]

ODD = [None, True, 0, 1.5, "text", b"bytes", object()]


def test_as_dict_returns_the_mapping_itself_and_empty_for_anything_else() -> None:
    obj = {"a": 1}
    assert as_dict(obj) is obj
    ordered = OrderedDict(b=2)
    assert as_dict(ordered) is ordered
    for value in [*ODD, [("a", 1)], ("a",)]:
        assert as_dict(value) == {}


def test_as_list_reads_json_arrays_only() -> None:
    items = [1, 2]
    copied = as_list(items)
    assert copied == [1, 2] and copied is not items
    assert as_list((1, 2)) == [1, 2]
    for value in [*ODD, {"a": 1}, {1, 2}, iter([1, 2]), (x for x in [1])]:
        assert as_list(value) == []


def test_as_items_reads_any_collection_but_text_and_mappings() -> None:
    assert as_items([1, 2]) == [1, 2]
    assert as_items((1, 2)) == [1, 2]
    assert as_items(x for x in (3, 4)) == [3, 4]
    assert as_items({"a": 1}.values()) == [1]
    assert as_items(frozenset({5})) == [5]
    for value in [None, True, 0, 1.5, "text", b"bytes", {"a": 1}, OrderedDict(a=1), object()]:
        assert as_items(value) == []


@pytest.mark.parametrize(
    ("value", "expected"),
    [("x", "x"), ("", ""), (None, ""), (1, ""), (True, ""), (b"x", ""), (["x"], "")],
)
def test_as_str(value: Any, expected: str) -> None:
    assert as_str(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [(3, 3), (0, 0), (-2, -2), (True, 0), (False, 0), ("3", 0), (3.0, 0), (None, 0), ([3], 0)],
)
def test_as_int(value: Any, expected: int) -> None:
    assert as_int(value) == expected
