"""The parts of kubernetes-asyncio apilane uses, imported without the rest.

apilane speaks to the API server in paths and plain dicts through `ApiClient.call_api`, and
takes its credentials from kubernetes-asyncio's kubeconfig and in-cluster loaders. It never
uses the generated API classes or models. But `import kubernetes_asyncio.client.<anything>`
first runs the package `__init__`s, which import every API class and every model (about 850
modules, some 35 MiB of resident memory, seconds of start-up). So before importing the
modules it needs, this module registers those packages with their `__init__` not yet run: their
submodules import as usual, and the first lookup of any other name on a package runs its
`__init__` then, so code that does want the generated classes (`from kubernetes_asyncio.client
import CoreV1Api`) still gets them. When kubernetes-asyncio was imported before this module,
nothing is deferred and everything works as usual, only without the saving.

`api_client` is kubernetes-asyncio's ApiClient with one change to its aiohttp session, for
the latency of every request: see its docstring.

Every other apilane module imports kubernetes-asyncio from here.
"""

from __future__ import annotations

import importlib.util
import sys
import urllib.request
from types import ModuleType
from typing import Any

import aiohttp

# kubernetes-asyncio's: watch events of large objects exceed aiohttp's default buffer.
READ_BUFSIZE = 2**21

# Parents first: a submodule's spec is found through its parent's __path__.
DEFERRED_PACKAGES = (
    "kubernetes_asyncio",
    "kubernetes_asyncio.client",
    "kubernetes_asyncio.client.models",
)


def defer_package_init(name: str) -> ModuleType:
    """`name` in sys.modules, as imported already or as a package whose `__init__` has not
    run: a submodule's name imports that submodule, the first lookup of any other name it
    does not hold runs the `__init__`."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        raise ImportError(f"{name} is not an importable package", name=name)
    module = importlib.util.module_from_spec(spec)
    loader = spec.loader

    def complete(attribute: str) -> Any:
        # PEP 562: called only for names the module does not hold.
        if importlib.util.find_spec(f"{name}.{attribute}") is not None:
            # `from package import submodule`, as api_client imports `rest`.
            return importlib.import_module(f"{name}.{attribute}")
        if module.__dict__.pop("__getattr__", None) is not None:
            # Someone wants more than apilane imports: run the real __init__ once, into this
            # same module object, and look again.
            loader.exec_module(module)
            return getattr(module, attribute)
        raise AttributeError(f"module {name!r} has no attribute {attribute!r}")

    module.__getattr__ = complete  # type: ignore[method-assign]
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, module)
    return module


for _package in DEFERRED_PACKAGES:
    defer_package_init(_package)

from kubernetes_asyncio.client.api_client import ApiClient  # noqa: E402
from kubernetes_asyncio.client.configuration import Configuration  # noqa: E402

# What the package would export and the config loaders below import from it
# (`from kubernetes_asyncio.client import ApiClient, Configuration`). vars(), not hasattr():
# looking up a missing name on the deferred package would run its __init__.
vars(sys.modules["kubernetes_asyncio.client"]).setdefault("ApiClient", ApiClient)
vars(sys.modules["kubernetes_asyncio.client"]).setdefault("Configuration", Configuration)

from kubernetes_asyncio.config.config_exception import ConfigException  # noqa: E402
from kubernetes_asyncio.config.incluster_config import InClusterConfigLoader  # noqa: E402
from kubernetes_asyncio.config.kube_config import (  # noqa: E402
    KubeConfigLoader,
    KubeConfigMerger,
)


def api_client(configuration: Configuration) -> ApiClient:
    """kubernetes-asyncio's ApiClient for `configuration`, on a session that makes no lookups
    in the environment per request when the environment names no HTTP(S) proxy.

    kubernetes-asyncio's session trusts the environment, and aiohttp then looks for a proxy
    and a ~/.netrc entry on every request, each in a worker thread: two hand-offs to a thread
    and back per request, which on a busy node cost milliseconds. The environment of a
    process does not change, so it is asked once, here: with no proxy in it, the session is
    replaced by one on the same connector that does not look (the Authorization header is
    always ours; kubectl reads no netrc either). With a proxy, kubernetes-asyncio's session
    stays, and HTTP(S)_PROXY and NO_PROXY are honoured for every server, as kubectl does.
    """
    client = ApiClient(configuration)
    if environment_names_a_proxy():
        return client
    rest_client = client.rest_client
    trusting = rest_client.pool_manager
    rest_client.pool_manager = aiohttp.ClientSession(
        connector=trusting.connector, trust_env=False, read_bufsize=READ_BUFSIZE
    )
    trusting.detach()  # the connector is the new session's now; the old one is closed
    return client


def environment_names_a_proxy() -> bool:
    """Whether HTTP_PROXY or HTTPS_PROXY (either case) is set: aiohttp uses no other."""
    return any(scheme in ("http", "https") for scheme in urllib.request.getproxies())


__all__ = [
    "ApiClient",
    "ConfigException",
    "Configuration",
    "InClusterConfigLoader",
    "KubeConfigLoader",
    "KubeConfigMerger",
    "api_client",
]
