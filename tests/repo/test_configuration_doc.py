"""docs/configuration.md lists exactly the APILANE_* variables the services read.

The names are collected by running each service's settings loader with a recording `Env`,
so a variable read through any helper counts, and one no longer read fails the test."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from apilane.discovery import settings as discovery_settings
from apilane.model.signing import SigningKey
from apilane.node_loader import settings as node_loader_settings
from apilane.renderer import settings as renderer_settings
from apilane.runtime import config
from apilane.testing.sealing import write_signing_key

pytestmark = [pytest.mark.unit]

_KEY = SigningKey.generate().public_text
DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
LOADERS: dict[str, Callable[[dict[str, str]], Any]] = {
    "discovery": discovery_settings.load,
    "renderer": renderer_settings.load,
    # memory maps: the bpf backend requires a cgroup path, which is not what is tested here
    # and serving needs a trusted key
    "node-loader": lambda environ: node_loader_settings.load(
        environ | {"APILANE_MAP_BACKEND": "memory", "APILANE_TRUSTED_KEYS": _KEY}
    ),
}


@pytest.fixture
def required(tmp_path: Path) -> dict[str, str]:
    """What discovery and the renderer cannot start without: a signing key, a trusted key
    (each service reads only its own of the two)."""
    key, key_file = write_signing_key(tmp_path)
    return {"APILANE_SIGNING_KEY_FILE": str(key_file), "APILANE_TRUSTED_KEYS": key.public_text}


@pytest.fixture
def read_names(monkeypatch: pytest.MonkeyPatch) -> Iterator[set[str]]:
    names: set[str] = set()
    original = config.Env.raw

    def recording(self: config.Env, name: str) -> str | None:
        names.add(config.PREFIX + name)
        return original(self, name)

    monkeypatch.setattr(config.Env, "raw", recording)
    yield names


def documented(section_filter: Callable[[str], bool]) -> set[str]:
    found: set[str] = set()
    section = ""
    for line in DOC.read_text().splitlines():
        if line.startswith("## "):
            section = line[3:]
        elif line.startswith("| `APILANE_") and section_filter(section):
            found.add(re.findall(r"`(APILANE_[A-Z_]+)`", line)[0])
    return found


def test_every_variable_a_service_reads_is_documented_and_nothing_more(
    read_names: set[str], required: dict[str, str]
) -> None:
    for load in LOADERS.values():
        load(required)
    service_sections = documented(lambda section: not section.startswith("Tooling"))
    assert read_names - service_sections == set(), "read but not documented"
    assert service_sections - read_names == set(), "documented but never read"


@pytest.mark.parametrize("service", sorted(LOADERS))
def test_each_service_section_lists_what_that_service_reads(
    service: str, read_names: set[str], required: dict[str, str]
) -> None:
    LOADERS[service](required)
    section = documented(lambda name: name in (service, "Every service"))
    assert read_names == section


# What each service's settings are loaded from when its documented defaults are checked:
# what it cannot start without, a fixed Lease identity (discovery's default is random) and,
# for the renderer, a named preset (auto-detection is switched off by any APILANE_TARGET_*,
# which would make giving a target variable its default value look like a change).
DEFAULTS_BASE: dict[str, dict[str, str]] = {
    "discovery": {"APILANE_POD_NAME": "doc-check"},
    "renderer": {"APILANE_TARGET_PRESET": "operator"},
    "node-loader": {"APILANE_CGROUP_PATH": "/sys/fs/cgroup/apilane-doc-check"},
}
DEFAULT_LOADERS: dict[str, Callable[[dict[str, str]], Any]] = {
    "discovery": discovery_settings.load,
    "renderer": renderer_settings.load,
    "node-loader": node_loader_settings.load,
}


def literal_defaults(section_filter: Callable[[str], bool]) -> dict[str, str]:
    """Variable → its documented default, for rows whose default is one literal value in
    backticks (not a placeholder such as `_INBOX_<public key>` or `$HOSTNAME`)."""
    found: dict[str, str] = {}
    section = ""
    for line in DOC.read_text().splitlines():
        if line.startswith("## "):
            section = line[3:]
        elif line.startswith("| `APILANE_") and section_filter(section):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            value = re.fullmatch(r"`([^`<>$]+)`", cells[1])
            if value:
                found[re.findall(r"`(APILANE_[A-Z_]+)`", cells[0])[0]] = value.group(1)
    return found


@pytest.mark.parametrize("service", sorted(DEFAULT_LOADERS))
def test_each_documented_default_is_what_the_service_uses_when_the_variable_is_unset(
    service: str, required: dict[str, str]
) -> None:
    defaults = literal_defaults(lambda name: name in (service, "Every service"))
    assert len(defaults) >= 8, defaults  # the parsing found the table
    base = required | DEFAULTS_BASE[service]
    load = DEFAULT_LOADERS[service]
    wrong = {}
    for name, value in defaults.items():
        without = {key: val for key, val in base.items() if key != name}
        unset = config.describe(load(without))
        given = config.describe(load(without | {name: value}))
        if given != unset:
            wrong[name] = value
    assert wrong == {}, "documented defaults that are not the defaults"
