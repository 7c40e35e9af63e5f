"""`make manifests`: write the plain manifests from the Helm chart's default rendering.

deploy/helm/apilane is the one source: each of its templates renders, with the default
values, into the deploy/ file of the same name (deploy/discovery.yaml from
templates/discovery.yaml, ...), and its alerting rules into deploy/alerts/apilane-rules.yaml.
To change a manifest, change the chart and run this; tests/deploy fails while deploy/ and
the chart differ, and says which object and field.

    .venv/bin/python tools/render_manifests.py          # write
    .venv/bin/python tools/render_manifests.py --check  # exit 1 if a file would change
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from apilane.testing import chart
from apilane.testing.procs import ComponentMissing


def wanted_files() -> dict[Path, str]:
    """Every file this tool owns, with the text it should hold."""
    files: dict[Path, str] = {}
    for template, docs in chart.rendered_sources(chart.render()).items():
        target = chart.DEPLOY / Path(template).name
        files[target] = chart.GENERATED_HEADER + "---\n".join(docs)
    rules = chart.alert_rules()
    files[chart.RULES_FILE] = chart.GENERATED_HEADER + rules
    return files


def stray_manifests(owned: set[Path]) -> list[Path]:
    """deploy/*.yaml files the chart does not render (they would escape the equality test's
    "only in deploy/" report only if someone removed it)."""
    return sorted(p for p in chart.DEPLOY.glob("*.yaml") if p not in owned)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 on drift")
    args = parser.parse_args()
    try:
        files = wanted_files()
    except (ComponentMissing, chart.ChartError) as exc:
        print(f"render_manifests: {exc}", file=sys.stderr)
        return 2
    changed = [path for path, text in files.items() if _read(path) != text]
    strays = stray_manifests(set(files))
    for path in strays:
        print(f"render_manifests: {_rel(path)} is not rendered by the chart", file=sys.stderr)
    if args.check:
        for path in changed:
            print(f"render_manifests: {_rel(path)} differs from the chart's rendering")
        return 1 if changed or strays else 0
    for path in changed:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(files[path])
        print(f"wrote {_rel(path)}")
    if not changed:
        print("deploy/ already matches the chart")
    return 1 if strays else 0


def _read(path: Path) -> str | None:
    return path.read_text() if path.exists() else None


def _rel(path: Path) -> str:
    return str(path.relative_to(chart.REPO))


if __name__ == "__main__":
    sys.exit(main())
