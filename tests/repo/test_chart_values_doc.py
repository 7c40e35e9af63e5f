"""deploy/README.md's table of chart values covers every value of values.yaml, and names
none that values.yaml does not have.

The table's shorthand: after a full path, `.name` is a sibling of that path's last part
(`nats.bundled.replicas`, `.image`, `.storage.size`: all under `nats.bundled`), and `<service>` stands for each of the three services."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = [pytest.mark.unit]

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "deploy" / "README.md"
VALUES = ROOT / "deploy" / "helm" / "apilane" / "values.yaml"
SERVICES = ("discovery", "renderer", "nodeLoader")


def documented_values() -> set[str]:
    text = README.read_text()
    table = text.split("| value | default | what |", 1)[1].split("\n\n", 1)[0]
    paths: set[str] = set()
    for line in table.splitlines()[2:]:
        names = re.findall(r"`([^`]+)`", line.split("|")[1])
        parent = ""
        for name in names:
            if not name.startswith("."):
                parent = name.rsplit(".", 1)[0]
            path = parent + name if name.startswith(".") else name
            paths |= {path.replace("<service>", service) for service in SERVICES}
    return paths


def leaf_paths(values: dict[str, Any], prefix: str = "") -> set[str]:
    found: set[str] = set()
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            found |= leaf_paths(value, path + ".")
        else:
            found.add(path)
    return found


def covered(leaf: str, documented: set[str]) -> bool:
    parts = leaf.split(".")
    return any(".".join(parts[:i]) in documented for i in range(1, len(parts) + 1))


def test_every_chart_value_is_in_the_readme_table() -> None:
    documented = documented_values()
    leaves = leaf_paths(yaml.safe_load(VALUES.read_text()))
    assert len(leaves) > 50
    assert {leaf for leaf in leaves if not covered(leaf, documented)} == set()


def test_the_readme_table_names_only_values_the_chart_has() -> None:
    leaves = leaf_paths(yaml.safe_load(VALUES.read_text()))
    documented = documented_values()
    assert len(documented) > 40
    stale = {
        path
        for path in documented
        if not any(leaf == path or leaf.startswith(path + ".") for leaf in leaves)
    }
    assert stale == set()
