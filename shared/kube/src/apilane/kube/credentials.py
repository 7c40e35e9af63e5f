"""Where the client's credentials come from: kubeconfig files or the pod's service account.

kubernetes-asyncio does the loading, so every kind of kubeconfig user works as with kubectl:
client certificates, tokens and token files, `exec` plugins (EKS, GKE, AKS) and `auth-provider`
entries (gcp, oidc); `tls-server-name` is honoured. What it does not do is check the files'
shape, so `load_kubeconfig` does that first and every failure is a ConfigError naming the
file. Credentials that expire are renewed from a `Configuration.refresh_api_key_hook`, which
the ApiClient awaits before each request: a kubeconfig user's authentication is re-run at most
every `REFRESH_SECONDS` (the exec plugin runs again once its token is within five minutes of
`expirationTimestamp`, a token file is read again), and kubernetes-asyncio's in-cluster loader
re-reads the projected service-account token file once a minute. A renewal that fails keeps
the previous credentials and logs why.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from apilane.kube.upstream import (
    ConfigException,
    Configuration,
    InClusterConfigLoader,
    KubeConfigLoader,
    KubeConfigMerger,
)
from apilane.model.errors import ConfigError

log = logging.getLogger(__name__)

IN_CLUSTER_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
REFRESH_SECONDS = 60.0
# An exec plugin or identity provider that hangs must not hang every request behind it.
CREDENTIAL_TIMEOUT = 30.0

# What kubernetes-asyncio raises for bad credentials: its own ConfigException, OSError for a
# missing file or plugin command, ValueError, KeyError or RuntimeError for plugin or provider
# output it cannot use.
_LOAD_ERRORS = (ConfigException, OSError, ValueError, KeyError, RuntimeError, TimeoutError)


class _CredentialRefresh:
    """A `refresh_api_key_hook`: runs `renew` at most every `every` seconds; a failure is
    logged and the previous credentials stay in use."""

    def __init__(self, renew: Callable[[], Awaitable[None]], *, source: str, every: float) -> None:
        self._renew = renew
        self._source = source
        self._every = every
        self._due = time.monotonic() + every

    async def __call__(self, configuration: Configuration) -> None:
        now = time.monotonic()
        if now < self._due:
            return
        self._due = now + self._every  # concurrent requests do not renew twice
        try:
            async with asyncio.timeout(CREDENTIAL_TIMEOUT):
                await self._renew()
        # Whatever a plugin or provider does wrong, the request goes on with the old token.
        except Exception as exc:
            log.warning(
                "could not renew the credentials, keeping the previous ones",
                extra={"source": self._source, "error": _describe(exc)},
            )
        _strip_token(configuration)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return f"no credentials after {CREDENTIAL_TIMEOUT:g} s (a plugin or provider hangs)"
    return str(exc) or type(exc).__name__


def _strip_token(configuration: Configuration) -> None:
    # kubernetes-asyncio sends token files as read; a trailing newline would break the header.
    token = configuration.api_key.get("BearerToken")
    if isinstance(token, str) and token != token.strip():
        configuration.api_key["BearerToken"] = token.strip()


def kubeconfig_paths(value: str) -> list[str]:
    """The files named by a KUBECONFIG-style value (paths separated by ':')."""
    return [path for path in value.split(os.pathsep) if path.strip()]


async def load_kubeconfig(
    paths: str | Sequence[str], *, context: str | None = None
) -> Configuration:
    """A Configuration from one kubeconfig path or several, merged as kubectl does: the first
    file that defines a name (or sets current-context) wins."""
    named = [paths] if isinstance(paths, str) else list(paths)
    path_list = [p for p in named if p.strip()]  # "~" is expanded by both readers
    if not path_list:
        raise ConfigError("kubeconfig: no file given")
    where = f"kubeconfig {', '.join(path_list)}"
    context_name = _context_to_use(path_list, context, where=where)
    configuration = Configuration()
    try:
        merged = KubeConfigMerger(os.pathsep.join(path_list))
        loader = KubeConfigLoader(merged.config, active_context=context_name, config_base_path=None)
        async with asyncio.timeout(CREDENTIAL_TIMEOUT):
            await loader.load_and_set(configuration)
    except _LOAD_ERRORS as exc:
        raise ConfigError(f"{where}: context {context_name!r}: {_describe(exc)}") from exc
    _strip_token(configuration)

    async def renew() -> None:
        # The loader's own dispatch (auth provider, exec plugin, token file), run again.
        await loader._load_authentication()
        if token := getattr(loader, "token", None):
            configuration.api_key["BearerToken"] = token

    configuration.refresh_api_key_hook = _CredentialRefresh(
        renew, source=where, every=REFRESH_SECONDS
    )
    return configuration


def load_in_cluster(
    environ: Mapping[str, str] | None = None, *, base: Path = IN_CLUSTER_DIR
) -> Configuration:
    """A Configuration for the pod's service account (KUBERNETES_SERVICE_HOST/PORT, the
    mounted token and CA), re-reading the token file as it rotates."""
    configuration = Configuration()
    loader = InClusterConfigLoader(
        token_filename=str(base / "token"),
        cert_filename=str(base / "ca.crt"),
        try_refresh_token=True,
        environ=dict(os.environ if environ is None else environ),
    )
    try:
        loader.load_and_set(configuration)
    except (ConfigException, OSError) as exc:
        raise ConfigError(
            f"in-cluster config: {exc} (outside a pod, set KUBECONFIG; inside one, "
            f"KUBERNETES_SERVICE_HOST/KUBERNETES_SERVICE_PORT and a service account token "
            f"mounted at {base} are needed)"
        ) from exc
    _strip_token(configuration)
    reread = configuration.refresh_api_key_hook  # the loader's: re-reads after a minute

    async def renew() -> None:
        if callable(reread):
            reread(configuration)

    configuration.refresh_api_key_hook = _CredentialRefresh(
        renew, source="in-cluster service account", every=0.0
    )
    return configuration


# --------------------------------------------------------------------------- shape checks


_KINDS = (("clusters", "cluster"), ("users", "user"), ("contexts", "context"))
# kubernetes-asyncio implements these two; any other provider would be ignored silently.
_AUTH_PROVIDERS = ("gcp", "oidc")


def _context_to_use(path_list: Sequence[str], context: str | None, *, where: str) -> str:
    """Checks every file's shape and the chosen context's references, which kubernetes-asyncio
    trips over with a TypeError or an empty assertion; returns the context asked for, else the
    first current-context set (kubernetes-asyncio's merger would take the last)."""
    documents = [_read_kubeconfig(Path(path).expanduser()) for path in path_list]
    chosen = context or next(
        (str(d["current-context"]) for d in documents if d.get("current-context")), None
    )
    if not chosen:
        raise ConfigError(f"{where}: no current-context set")
    # First definition wins: later files are applied first and overwritten.
    defined = {
        kind: {
            entry["name"]: entry[field] for d in reversed(documents) for entry in d.get(kind) or []
        }
        for kind, field in _KINDS
    }
    if chosen not in defined["contexts"]:
        raise ConfigError(f"{where}: context {chosen!r} is not defined")
    references = defined["contexts"][chosen]
    for kind, field in _KINDS[:2]:
        name = references.get(field)
        if (name is not None or field == "cluster") and name not in defined[kind]:
            raise ConfigError(f"{where}: {field} {name!r} (context {chosen!r}) is not defined")
    return chosen


def _read_kubeconfig(path: Path) -> dict[str, Any]:
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"kubeconfig {str(path)!r}: cannot read ({exc.strerror})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"kubeconfig {str(path)!r}: not valid YAML ({exc})") from exc
    problem = _shape_problem(document)
    if problem:
        raise ConfigError(f"kubeconfig {str(path)!r}: {problem}")
    return document  # type: ignore[no-any-return]


def _shape_problem(document: Any) -> str | None:
    if not isinstance(document, dict):
        return "expected a mapping at the top level"
    for kind, field in _KINDS:
        entries = document.get(kind) or []
        if not isinstance(entries, list):
            return f"{kind!r} must be a list"
        for index, entry in enumerate(entries):
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                return f"{kind}[{index}] has no name"
            body = entry.get(field)
            if not isinstance(body, dict):
                return f"{field} {entry['name']!r} has no {field!r} mapping"
            problem = _entry_problem(field, body)
            if problem:
                return f"{field} {entry['name']!r}: {problem}"
    return None


def _entry_problem(field: str, body: dict[str, Any]) -> str | None:
    if field == "cluster":
        server = body.get("server")
        if not isinstance(server, str) or not server:
            return "'server' is missing"
        parts = urlsplit(server)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            return f"server {server!r} is not an http(s)://host[:port] URL"
    if field == "user":
        has_cert = "client-certificate" in body or "client-certificate-data" in body
        has_key = "client-key" in body or "client-key-data" in body
        if has_cert != has_key:
            return "a client certificate needs both the certificate and its key"
        provider = (body.get("auth-provider") or {}).get("name")
        if provider is not None and provider not in _AUTH_PROVIDERS:
            return (
                f"auth-provider {provider!r} is not supported (only {', '.join(_AUTH_PROVIDERS)}); "
                "use its exec credential plugin instead"
            )
    return None
