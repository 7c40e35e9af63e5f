"""apilane.kube.upstream: kubernetes-asyncio without its generated APIs and models.

The import tests run in a fresh interpreter: this one may have imported kubernetes-asyncio
whole already (other tests do)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

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
