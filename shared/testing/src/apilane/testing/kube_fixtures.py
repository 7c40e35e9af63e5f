"""pytest fixtures for a real kube-apiserver + etcd; loaded as a plugin by tests/conftest.py
(`pytest_plugins = ["apilane.testing.kube_fixtures"]`).

`control_plane` is session-scoped and synchronous (it only starts processes), so it works
with any event loop scope; `kube` and `kube_namespace` are per test, on the test's loop.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator, Iterator

import pytest

from apilane.kube.client import KubeClient, KubeError
from apilane.testing.ha import HAControlPlane
from apilane.testing.kube import (
    START_TIMES,
    ControlPlane,
    delete_kubernetes_endpoint_slices,
)
from apilane.testing.procs import ComponentMissing


@pytest.fixture(scope="session")
def control_plane() -> Iterator[ControlPlane]:
    """etcd + kube-apiserver for the whole session (about 5 s to start)."""
    try:
        plane = ControlPlane()
    except ComponentMissing as exc:
        pytest.fail(str(exc))
    with plane:
        yield plane


@pytest.fixture
async def kube(control_plane: ControlPlane) -> AsyncIterator[KubeClient]:
    """An admin KubeClient for one test."""
    client = await control_plane.client()
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def kube_namespace(kube: KubeClient) -> AsyncIterator[str]:
    """A fresh namespace per test. There is no namespace controller in this control plane,
    so deletion leaves it Terminating; the names never repeat, so that does not matter."""
    name = f"t-{secrets.token_hex(4)}"
    await kube.create(
        "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
    )
    try:
        yield name
    finally:
        with contextlib.suppress(KubeError):
            await kube.delete(f"/api/v1/namespaces/{name}")


@pytest.fixture
async def kubernetes_endpoints(kube: KubeClient) -> AsyncIterator[KubeClient]:
    """The kubernetes Service's EndpointSlices start and end empty (the session control plane
    is shared and has no endpoint reconciler); yields the admin client for convenience."""
    await delete_kubernetes_endpoint_slices(kube)
    try:
        yield kube
    finally:
        with contextlib.suppress(KubeError):
            await delete_kubernetes_endpoint_slices(kube)


@pytest.fixture
def ha_control_plane() -> Iterator[HAControlPlane]:
    """Three apiservers on one etcd with the lease endpoint reconciler (root; ~10-20 s)."""
    try:
        plane = HAControlPlane(3)
    except ComponentMissing as exc:
        pytest.fail(str(exc))
    with plane:
        yield plane


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if START_TIMES:
        terminalreporter.write_sep("-", "kube fixture start times")
        for what, seconds in START_TIMES:
            terminalreporter.write_line(f"{what}: {seconds:.2f} s")
