"""What the documentation cites exists: every test it names as evidence, every repository
path, every metric and every alert. A renamed test or metric fails here instead of leaving a
doc that points at nothing.

Configuration variables and their defaults are checked by test_configuration_doc.py; that
the alert rules read only exported metrics, by tests/deploy/test_alerts.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.unit]

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted(
    [
        ROOT / "README.md",
        ROOT / "deploy" / "README.md",
        *(ROOT / "docs").glob("*.md"),
        *(ROOT / "services").glob("*/*.md"),
    ]
)
TOP_DIRS = ("tests", "bench", "tools", "services", "shared", "cli", "deploy", "docs", "bpf")
PRODUCTION_SOURCES = [ROOT / "services", ROOT / "shared", ROOT / "cli"]
# KV bucket names share the metrics' prefix.
NOT_METRICS = re.compile(r"apilane_v\d+_")
RULES_FILE = ROOT / "deploy" / "alerts" / "apilane-rules.yaml"
# Kubernetes resource/name references that look like repository paths.
NOT_PATHS = frozenset({"services/kubernetes"})


def doc_tokens(pattern: str) -> set[tuple[str, str]]:
    """(doc, match) for every match of `pattern` in the docs."""
    return {
        (str(doc.relative_to(ROOT)), match)
        for doc in DOCS
        for match in re.findall(pattern, doc.read_text())
    }


def defined_tests() -> set[str]:
    found: set[str] = set()
    for path in (ROOT / "tests").rglob("*.py"):
        found |= set(re.findall(r"^\s*(?:async\s+)?def (test_\w+)", path.read_text(), re.M))
    return found


def test_the_docs_are_found() -> None:
    names = {doc.name for doc in DOCS}
    assert {"README.md", "configuration.md", "security.md", "RBAC.md"} <= names


def test_every_test_a_doc_names_exists() -> None:
    tests = defined_tests()
    modules = {path.stem for path in (ROOT / "tests").rglob("test_*.py")}
    cited = doc_tokens(r"\b(test_\w+)\b")
    assert len(cited) > 20
    missing = {(doc, name) for doc, name in cited if name not in tests | modules}
    assert missing == set(), "tests named in the docs that do not exist"


def test_every_repository_path_a_doc_names_exists() -> None:
    # Paths outside backticks too ("(tests/discovery/test_x.py)"); placeholders are skipped.
    pattern = rf"(?<![\w/.$-])((?:{'|'.join(TOP_DIRS)})/[\w./-]*[\w/])(?![\w*<{{-]|\.\w)"
    cited = doc_tokens(pattern)
    assert len(cited) > 20
    missing = set()
    for doc, path in cited:
        # deploy/README.md also names files relative to deploy/ ("alerts/...").
        here = (ROOT / doc).parent
        if path in NOT_PATHS:
            continue
        if not (ROOT / path).exists() and not (here / path).exists():
            missing.add((doc, path))
    assert missing == set(), "paths named in the docs that do not exist"


def test_every_metric_a_doc_names_is_exported() -> None:
    code = "\n".join(
        path.read_text()
        for root in PRODUCTION_SOURCES
        for path in root.rglob("*.py")
        if "testing" not in path.parts
    )
    cited = {
        (doc, name)
        for doc, name in doc_tokens(r"\b(apilane_[a-z0-9_]+)")
        if not NOT_METRICS.match(name)
    }
    assert len(cited) > 5
    # prometheus_client takes a counter's name with or without its _total suffix.
    missing = {
        (doc, name)
        for doc, name in cited
        if f'"{name}"' not in code and f'"{name.removesuffix("_total")}"' not in code
    }
    assert missing == set(), "metrics named in the docs that nothing exports"


def test_the_alert_table_lists_exactly_the_rules() -> None:
    rules = yaml.safe_load(RULES_FILE.read_text())["groups"]
    defined = {rule["alert"] for group in rules for rule in group["rules"]}
    table = set(re.findall(r"^\| `(Apilane\w+)` \|", (ROOT / "deploy/README.md").read_text(), re.M))
    assert table == defined
    cited = {name for _, name in doc_tokens(r"\b(Apilane[A-Z]\w+)\b")}
    assert cited - defined == set(), "alerts named in the docs that no rule defines"
