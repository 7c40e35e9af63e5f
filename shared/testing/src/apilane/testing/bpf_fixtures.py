"""pytest fixtures for eBPF tests (load with `pytest_plugins` or `-p`).

A missing component (not root, no bcc, no kernel headers, no bpffs, no cgroup2) fails the test
with a message saying how to fix it: never a silent skip. Everything a fixture creates is
removed afterwards; see apilane.testing.bpf for the safety rules it enforces.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from apilane.testing.bpf import (
    BpfLab,
    NetNamespace,
    Topology,
    check_bpf_environment,
)
from apilane.testing.procs import ComponentMissing


@pytest.fixture(scope="session")
def bpf_environment() -> Path:
    """Checks the machine once; returns the cgroup2 mount."""
    try:
        return check_bpf_environment()
    except ComponentMissing as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture
def bpf_lab(bpf_environment: Path) -> Iterator[BpfLab]:
    """A lab for one test: cgroups, namespaces, pin dirs and processes, all removed afterwards."""
    lab = BpfLab(cgroup_root=bpf_environment)
    try:
        yield lab
    finally:
        lab.close()


@pytest.fixture(scope="module")
def bpf_module_lab(bpf_environment: Path) -> Iterator[BpfLab]:
    """The same, shared by one test module (when compiling per test would cost too much)."""
    lab = BpfLab(cgroup_root=bpf_environment)
    try:
        yield lab
    finally:
        lab.close()


@pytest.fixture
def child_cgroup(bpf_lab: BpfLab) -> Path:
    """A fresh cgroup under the cgroup2 mount: `<mount>/apilane-test-<id>`."""
    return bpf_lab.child_cgroup()


@pytest.fixture
def pin_dir(bpf_lab: BpfLab) -> Path:
    """A fresh bpffs directory: `/sys/fs/bpf/apilane-test-<id>`."""
    return bpf_lab.pin_dir()


@pytest.fixture
def netns(bpf_lab: BpfLab) -> Callable[[str], NetNamespace]:
    """Factory: `netns("client")` makes a named namespace with loopback up and no routes."""
    return bpf_lab.netns


@pytest.fixture
def bpf_topology(bpf_lab: BpfLab) -> Callable[..., Topology]:
    """Factory: `bpf_topology(backends=3)`, a client namespace linked to each backend's."""
    return bpf_lab.topology
