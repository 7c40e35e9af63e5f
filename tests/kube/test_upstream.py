"""apilane.kube.upstream: kubernetes-asyncio without its generated APIs and models, and a
session that keeps requests on the event loop and on one connection.

The import tests run in a fresh interpreter: this one may have imported kubernetes-asyncio
whole already (other tests do)."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from apilane.kube.client import KubeClient
from apilane.kube.upstream import environment_names_a_proxy
from apilane.testing.kube import ControlPlane

PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")


def run_fresh(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


# --------------------------------------------------------------------------- imports


@pytest.mark.unit
def test_the_client_imports_no_generated_api_or_model() -> None:
    out = run_fresh(
        """
        import sys
        import apilane.kube.client, apilane.kube.credentials
        loaded = [m for m in sys.modules if m.startswith("kubernetes_asyncio")]
        generated = [m for m in loaded if m.startswith(("kubernetes_asyncio.client.api.",
                     "kubernetes_asyncio.client.models.", "kubernetes_asyncio.watch",
                     "kubernetes_asyncio.dynamic", "kubernetes_asyncio.stream"))]
        print(len(loaded), len(generated))
        """
    )
    loaded, generated = map(int, out.split())
    assert generated == 0
    assert loaded < 30  # api_client, configuration, rest, exceptions, the config loaders


@pytest.mark.unit
def test_the_rest_of_kubernetes_asyncio_still_imports_after_the_client() -> None:
    out = run_fresh(
        """
        import apilane.kube.upstream as upstream
        import kubernetes_asyncio
        from kubernetes_asyncio.client import CoreV1Api, V1Pod
        from kubernetes_asyncio.client.models import V1Service
        import kubernetes_asyncio.client as client
        assert client.ApiClient is upstream.ApiClient
        assert client.Configuration is upstream.Configuration
        assert client.models.V1Pod is V1Pod and V1Service.__name__ == "V1Service"
        assert CoreV1Api.__module__ == "kubernetes_asyncio.client.api.core_v1_api"
        assert kubernetes_asyncio.watch.Watch and kubernetes_asyncio.config.load_kube_config
        print(kubernetes_asyncio.__version__)
        """
    )
    assert out.strip()


@pytest.mark.unit
def test_kubernetes_asyncio_imported_whole_first_is_left_as_it_is() -> None:
    out = run_fresh(
        """
        import kubernetes_asyncio.client as client
        import apilane.kube.upstream as upstream
        assert upstream.ApiClient is client.ApiClient
        assert "__getattr__" not in vars(client)
        print("ok")
        """
    )
    assert out.strip() == "ok"


@pytest.mark.unit
def test_a_missing_name_is_still_an_attribute_error() -> None:
    run_fresh(
        """
        import apilane.kube.upstream
        import kubernetes_asyncio.client as client
        try:
            client.NoSuchThing
        except AttributeError:
            pass
        else:
            raise SystemExit("no AttributeError")
        try:
            client.NoSuchThing
        except AttributeError:
            pass
        else:
            raise SystemExit("no AttributeError the second time")
        """
    )


# --------------------------------------------------------------------------- proxies


@pytest.mark.unit
@pytest.mark.parametrize(
    ("variables", "named"),
    [
        ({}, False),
        ({"NO_PROXY": "10.0.0.1"}, False),
        ({"HTTPS_PROXY": "http://proxy:3128"}, True),
        ({"https_proxy": "http://proxy:3128"}, True),
        ({"HTTP_PROXY": "http://proxy:3128"}, True),
    ],
)
def test_environment_names_a_proxy(
    monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], named: bool
) -> None:
    for name in (*PROXY_VARIABLES, "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    assert environment_names_a_proxy() is named


# --------------------------------------------------------------------------- real apiserver


class CountingExecutor(ThreadPoolExecutor):
    """The loop's default executor, counting what is handed to it."""

    def __init__(self) -> None:
        super().__init__(max_workers=2)
        self.submitted = 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        self.submitted += 1
        return super().submit(fn, *args, **kwargs)


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        with contextlib.suppress(ConnectionError):
            writer.close()


class Relay:
    """A TCP relay on loopback to the apiserver that counts the connections it is given.
    As a proxy (`proxy=True`) it first expects an HTTP CONNECT, as HTTPS_PROXY is used."""

    def __init__(self, target: str, *, proxy: bool = False) -> None:
        parts = urlsplit(target)
        self.target = (parts.hostname or "", parts.port or 443)
        self.proxy = proxy
        self.connections = 0
        self.connect_lines: list[str] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> Relay:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.proxy:
            request = await reader.readuntil(b"\r\n\r\n")
            self.connect_lines.append(request.split(b"\r\n", 1)[0].decode())
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))


@pytest.fixture
def no_proxy_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (*PROXY_VARIABLES, "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)


@contextlib.asynccontextmanager
async def started(relay: Relay) -> AsyncIterator[Relay]:
    await relay.start()
    try:
        yield relay
    finally:
        await relay.close()


def configmap(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {}}


@pytest.mark.integration
@pytest.mark.kube
@pytest.mark.usefixtures("no_proxy_in_environment")
async def test_requests_stay_on_the_event_loop_and_on_one_connection(
    control_plane: ControlPlane, kube_namespace: str, tmp_path: Path
) -> None:
    base = f"/api/v1/namespaces/{kube_namespace}/configmaps"
    async with started(Relay(control_plane.url)) as relay:
        kubeconfig = control_plane.pki.kubeconfig(
            tmp_path / "kubeconfig", server=f"https://127.0.0.1:{relay.port}"
        )
        async with await KubeClient.from_config(str(kubeconfig)) as client:
            executor = CountingExecutor()
            asyncio.get_running_loop().set_default_executor(executor)
            await client.create(base, configmap("one"))
            for round_ in range(10):
                live = await client.get(f"{base}/one")
                body = {
                    "metadata": {"resourceVersion": live["metadata"]["resourceVersion"]},
                    "data": {"round": str(round_)},
                }
                await client.patch(f"{base}/one", body)
            listed = await client.list(base)
    # 22 requests: none looked anything up in a worker thread (a proxy, a netrc entry), and
    # all went over one kept-alive connection.
    assert executor.submitted == 0
    assert relay.connections == 1
    assert listed["items"][0]["data"] == {"round": "9"}


@pytest.mark.integration
@pytest.mark.kube
@pytest.mark.usefixtures("no_proxy_in_environment")
async def test_a_proxy_named_in_the_environment_is_used(
    control_plane: ControlPlane, kube_namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with started(Relay(control_plane.url, proxy=True)) as proxy:
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.port}")
        async with await control_plane.client() as client:
            namespace = await client.get(f"/api/v1/namespaces/{kube_namespace}")
            await client.get(f"/api/v1/namespaces/{kube_namespace}")
    assert namespace["metadata"]["name"] == kube_namespace
    server = urlsplit(control_plane.url)
    assert proxy.connect_lines == [f"CONNECT {server.hostname}:{server.port} HTTP/1.1"]
