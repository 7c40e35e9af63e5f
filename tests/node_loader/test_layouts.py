"""The pin suffixes the loader expects are the ones bpf/nat.h gives its maps."""

from __future__ import annotations

import re

import pytest

from apilane.node_loader.pinned import LAYOUT_VERSIONS
from apilane.node_loader.pinnedmaps import LAYOUTS
from apilane.node_loader.programs import default_source_dir

pytestmark = pytest.mark.unit

_DEFINE = re.compile(r'^#define (APILANE_\w+_LAYOUT) "(\w+)"', re.MULTILINE)
_PIN_MACRO = re.compile(r"^#define (APILANE_\w*PIN)\(name\) .* (APILANE_\w+_LAYOUT)$", re.MULTILINE)
_PINNED_MAP = re.compile(r'(APILANE_\w*PIN)\("(apilane_\w+)"\)')


def layouts_in_nat_h() -> dict[str, str]:
    """Each pinned map's layout version, as bpf/nat.h names its pin."""
    source = (default_source_dir() / "nat.h").read_text()
    versions = dict(_DEFINE.findall(source))
    macros = {macro: versions[layout] for macro, layout in _PIN_MACRO.findall(source)}
    return {name: macros[macro] for macro, name in _PINNED_MAP.findall(source)}


def test_the_loaders_layout_versions_are_bpf_nat_hs() -> None:
    in_source = layouts_in_nat_h()
    assert {"apilane_fe4", "apilane_be6", "apilane_conn"} <= set(in_source)
    assert {name: in_source[name] for name in LAYOUT_VERSIONS} == LAYOUT_VERSIONS
    assert set(LAYOUT_VERSIONS) == set(LAYOUTS)
