"""pytest fixtures for the pinned helm and promtool; loaded as a plugin by tests/conftest.py.
A missing binary fails the test with the way to get it (never a skip)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from apilane.testing.chart import find_helm, find_promtool
from apilane.testing.procs import ComponentMissing


def _required(find: Callable[[], str]) -> str:
    try:
        return find()
    except ComponentMissing as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="session")
def helm() -> str:
    """The helm executable (tools/install-chart-tools.sh's build, or $APILANE_HELM)."""
    return _required(find_helm)


@pytest.fixture(scope="session")
def promtool() -> str:
    """The promtool executable (tools/install-chart-tools.sh's build, or $APILANE_PROMTOOL)."""
    return _required(find_promtool)
