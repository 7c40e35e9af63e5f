"""The Helm chart (deploy/helm/apilane) and its alerting rules, through the real tools.

`helm` and `promtool` come from tools/install-chart-tools.sh (built from the Go module proxy
at pinned versions, cached outside the repository, like kube-apiserver) or from the
executables named by $APILANE_HELM / $APILANE_PROMTOOL. A missing one raises
ComponentMissing saying how to get it; the fixtures turn that into a failure, never a skip.

The chart is the source of the plain manifests: `make manifests` (tools/render_manifests.py)
writes deploy/*.yaml and deploy/alerts/apilane-rules.yaml from its default rendering, and
tests/deploy checks that deploy/ and the chart agree object by object. The comparison and
the splitting of helm's output are pure functions here, unit-tested.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from apilane.testing.procs import ComponentMissing

REPO = Path(__file__).resolve().parents[5]
CHART = REPO / "deploy" / "helm" / "apilane"
DEPLOY = REPO / "deploy"
RULES_FILE = DEPLOY / "alerts" / "apilane-rules.yaml"
# Must agree with tools/install-chart-tools.sh (a test checks).
HELM_VERSION = "v3.22.0"
PROMETHEUS_VERSION = "3.16.0"
RELEASE = "apilane"
RULE_TEMPLATE = "templates/prometheusrule.yaml"
GENERATED_HEADER = (
    "# Generated from deploy/helm/apilane by `make manifests`: change the chart, then run it.\n"
)
INSTALL_HINT = "run `make setup` (or `bash tools/install-chart-tools.sh`)"

ObjectKey = tuple[str, str, str]


class ChartError(RuntimeError):
    """helm or promtool refused: the message carries what it printed."""


def cache_root() -> Path:
    base = os.environ.get("APILANE_CACHE") or os.path.join(Path.home(), ".cache", "apilane")
    return Path(base)


def _find(name: str, variable: str, cached: Path) -> str:
    override = os.environ.get(variable, "").strip()
    if override:
        if os.access(override, os.X_OK):
            return override
        raise ComponentMissing(f"{variable}={override} is not an executable {name}")
    if os.access(cached, os.X_OK):
        return str(cached)
    raise ComponentMissing(
        f"{name} not found at {cached}: {INSTALL_HINT}, or point {variable} at one"
    )


def find_helm() -> str:
    return _find("helm", "APILANE_HELM", cache_root() / f"helm-{HELM_VERSION}" / "helm")


def find_promtool() -> str:
    cached = cache_root() / f"promtool-v{PROMETHEUS_VERSION}" / "promtool"
    return _find("promtool", "APILANE_PROMTOOL", cached)


def run_tool(argv: Sequence[str], *, cwd: Path | None = None) -> str:
    """stdout of a finished command; ChartError with its output when it fails."""
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, check=False, timeout=120)
    if proc.returncode != 0:
        raise ChartError(
            f"{Path(argv[0]).name} {' '.join(argv[1:])} exited {proc.returncode}:\n"
            f"{proc.stdout}{proc.stderr}"
        )
    return proc.stdout


def _with_values(values: Mapping[str, Any] | None, argv: list[str]) -> str:
    if not values:
        return run_tool(argv)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="apilane-values-") as f:
        yaml.safe_dump(dict(values), f)
        f.flush()
        return run_tool([*argv, "--values", f.name])


def render(
    values: Mapping[str, Any] | None = None,
    *,
    show_only: Sequence[str] = (),
    helm: str | None = None,
) -> str:
    """`helm template` of the chart with `values` over its defaults."""
    argv = [helm or find_helm(), "template", RELEASE, str(CHART)]
    for template in show_only:
        argv += ["--show-only", template]
    return _with_values(values, argv)


def lint(values: Mapping[str, Any] | None = None, *, helm: str | None = None) -> str:
    """`helm lint --strict`: warnings fail too."""
    return _with_values(values, [helm or find_helm(), "lint", "--strict", str(CHART)])


# --------------------------------------------------------------------------- pure


_SOURCE = re.compile(r"^---\n# Source: [^/\n]+/(\S+)\n", re.MULTILINE)


def rendered_sources(text: str) -> dict[str, list[str]]:
    """helm template output → {template path: [document text, ...]} in output order (the
    `# Source:` line removed). Helm orders documents by kind; the chart's templates list
    theirs in that order already, so each file reads as written."""
    parts = _SOURCE.split(text)
    if parts[0].strip():
        raise ChartError(f"unexpected text before the first document: {parts[0][:200]!r}")
    sources: dict[str, list[str]] = {}
    for template, body in zip(parts[1::2], parts[2::2], strict=True):
        sources.setdefault(template, []).append(body.strip("\n") + "\n")
    return sources


def documents(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def object_key(doc: Mapping[str, Any]) -> ObjectKey:
    meta = doc.get("metadata") or {}
    return (str(doc.get("kind", "")), str(meta.get("namespace", "")), str(meta.get("name", "")))


def by_key(docs: Sequence[dict[str, Any]]) -> dict[ObjectKey, dict[str, Any]]:
    objects: dict[ObjectKey, dict[str, Any]] = {}
    for doc in docs:
        key = object_key(doc)
        if key in objects:
            raise ChartError(f"{'/'.join(k for k in key if k)} is defined twice")
        objects[key] = doc
    return objects


def differences(expected: Any, actual: Any, path: str = "") -> list[str]:
    """Every field path where two parsed objects differ (lists compared by position)."""
    if isinstance(expected, Mapping) and isinstance(actual, Mapping):
        found = []
        for key in sorted(set(expected) | set(actual), key=str):
            where = f"{path}.{key}" if path else str(key)
            if key not in actual:
                found.append(f"{where}: only in the first ({_short(expected[key])})")
            elif key not in expected:
                found.append(f"{where}: only in the second ({_short(actual[key])})")
            else:
                found += differences(expected[key], actual[key], where)
        return found
    if isinstance(expected, list) and isinstance(actual, list):
        found = []
        for index in range(max(len(expected), len(actual))):
            where = f"{path}[{index}]"
            if index >= len(actual):
                found.append(f"{where}: only in the first ({_short(expected[index])})")
            elif index >= len(expected):
                found.append(f"{where}: only in the second ({_short(actual[index])})")
            else:
                found += differences(expected[index], actual[index], where)
        return found
    if expected != actual:
        return [f"{path}: {_short(expected)} != {_short(actual)}"]
    return []


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def compare_objects(
    first: Mapping[ObjectKey, Mapping[str, Any]],
    second: Mapping[ObjectKey, Mapping[str, Any]],
    *,
    names: tuple[str, str] = ("first", "second"),
) -> list[str]:
    """Human-readable differences between two sets of objects keyed by kind/namespace/name."""
    report = []
    for key in sorted(set(first) | set(second)):
        label = "/".join(part for part in key if part)
        if key not in second:
            report.append(f"{label}: only in {names[0]}")
        elif key not in first:
            report.append(f"{label}: only in {names[1]}")
        else:
            report += [
                f"{label}: {line}".replace("the first", names[0]).replace("the second", names[1])
                for line in differences(first[key], second[key])
            ]
    return report


def rules_file_text(rule_document: str) -> str:
    """The plain Prometheus rules file from the rendered PrometheusRule document: its `spec`
    (which is exactly a rules file: `groups:`), with the template's comments kept."""
    _head, marker, spec = rule_document.partition("\nspec:\n")
    if not marker:
        raise ChartError("the PrometheusRule has no spec")
    body = textwrap.dedent(spec)
    if not body.startswith("groups:"):
        raise ChartError("the PrometheusRule's spec does not start with groups")
    rules = yaml.safe_load(body)
    if rules != yaml.safe_load(rule_document)["spec"]:
        raise ChartError("re-indenting the PrometheusRule's spec changed it")
    return body


def alert_rules(values: Mapping[str, Any] | None = None, *, helm: str | None = None) -> str:
    """The rules file text for `values` (the PrometheusRule enabled whatever they say)."""
    merged = dict(values or {})
    alerts = dict(merged.get("alerts", {}))
    alerts["prometheusRule"] = {**alerts.get("prometheusRule", {}), "enabled": True}
    merged["alerts"] = alerts
    text = render(merged, show_only=[RULE_TEMPLATE], helm=helm)
    [document] = rendered_sources(text)[RULE_TEMPLATE]
    return rules_file_text(document)
