"""A thin async Kubernetes REST client on aiohttp.

Callers speak in API paths ("/api/v1/namespaces/default/services/kubernetes") and plain
dicts, exactly as the API server sends them; this module only adds authentication, timeouts,
pagination, watch streaming and typed errors. HTTP failures become `KubeError` subclasses
carrying the server's `Status` message, so callers can branch on the type (`NotFound`,
`Conflict`, `Gone`, ...) and retry only what is retryable (`Unavailable`).
"""

from __future__ import annotations

import base64
import builtins
import contextlib
import logging
import os
import ssl
import tempfile
import time
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp
import msgspec
import yaml

from apilane.model.errors import ApilaneError, ConfigError

log = logging.getLogger(__name__)

PatchType = Literal["strategic", "merge", "json", "apply"]

PATCH_CONTENT_TYPES: dict[str, str] = {
    "strategic": "application/strategic-merge-patch+json",
    "merge": "application/merge-patch+json",
    "json": "application/json-patch+json",
    # JSON is valid YAML, so server-side apply bodies are sent as JSON.
    "apply": "application/apply-patch+yaml",
}

IN_CLUSTER_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
USER_AGENT = "apilane/0.1"
REQUEST_TIMEOUT = 30.0
CONNECT_TIMEOUT = 10.0
LIST_PAGE_SIZE = 500
# Projected service-account tokens rotate (about hourly); re-read the file well before that.
TOKEN_REFRESH_SECONDS = 60.0
# A watch connection may stay quiet until the server's own timeout; allow a margin on top.
WATCH_READ_MARGIN = 30.0

_json_decoder = msgspec.json.Decoder()
_json_encoder = msgspec.json.Encoder()


class KubeError(ApilaneError):
    """The API server refused a request or could not be reached.

    `status` is the HTTP code (0 when no response arrived), `reason` the Status reason
    ("NotFound", "AlreadyExists", ...), `message` the server's human-readable explanation.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int = 0,
        reason: str = "",
        details: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{status} {reason}: {message}" if status else message)
        self.status = status
        self.reason = reason
        self.message = message
        self.details: dict[str, Any] = dict(details or {})


class NotFound(KubeError):
    """404: the object (or the resource type) does not exist."""


class Conflict(KubeError):
    """409: a stale resourceVersion on update, or the object already exists on create."""


class Gone(KubeError):
    """410: the resourceVersion is too old (compacted); list again."""


class Unavailable(KubeError):
    """The server could not be reached, timed out, or answered 429/5xx: worth retrying."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class Unauthorized(KubeError):
    """401: the credentials were not accepted (expired token, unknown certificate)."""


class Forbidden(KubeError):
    """403: authenticated, but RBAC does not allow this request."""


class Invalid(KubeError):
    """422: the object failed validation; `details["causes"]` names the fields."""


_ERRORS_BY_STATUS: dict[int, type[KubeError]] = {
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    410: Gone,
    422: Invalid,
    429: Unavailable,
}


def error_from_status(status: int, body: Any, *, fallback: str = "") -> KubeError:
    """Build the typed error for an HTTP status and a (possibly non-Status) response body."""
    reason = ""
    message = fallback
    details: Mapping[str, Any] | None = None
    if isinstance(body, Mapping):
        reason = str(body.get("reason") or "")
        message = str(body.get("message") or fallback)
        raw_details = body.get("details")
        details = raw_details if isinstance(raw_details, Mapping) else None
        retry = (details or {}).get("retryAfterSeconds")
    else:
        retry = None
    kind = _ERRORS_BY_STATUS.get(status)
    if kind is None:
        kind = Unavailable if status >= 500 else KubeError
    if kind is Unavailable:
        return Unavailable(
            message or "server unavailable",
            status=status,
            reason=reason,
            details=details,
            retry_after=float(retry) if isinstance(retry, int | float) else None,
        )
    return kind(message or f"HTTP {status}", status=status, reason=reason, details=details)


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class Credentials:
    """Everything needed to reach one API server, resolved from a kubeconfig or in-cluster."""

    server: str
    ca_file: str | None = None
    ca_data: bytes | None = None
    insecure_skip_tls_verify: bool = False
    tls_server_name: str | None = None
    client_cert_file: str | None = None
    client_key_file: str | None = None
    client_cert_data: bytes | None = None
    client_key_data: bytes | None = None
    token: str | None = None
    token_file: str | None = None
    source: str = ""  # where this came from, for error messages


def _decode_b64(value: Any, *, where: str) -> bytes:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: expected base64 data")
    try:
        return base64.b64decode(value, validate=False)
    except ValueError as exc:
        raise ConfigError(f"{where}: not valid base64 ({exc})") from exc


def _resolve_path(value: Any, *, base: Path, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: expected a file path")
    path = Path(value).expanduser()
    if not path.is_absolute():
        # kubectl resolves relative paths against the kubeconfig file's directory.
        path = base / path
    if not path.is_file():
        raise ConfigError(f"{where}: file {str(path)!r} does not exist")
    return str(path)


def _named(entries: Any, *, kind: str, source: str) -> dict[str, dict[str, Any]]:
    if entries is None:
        return {}
    if not isinstance(entries, list):
        raise ConfigError(f"kubeconfig {source}: {kind!r} must be a list")
    out: dict[str, dict[str, Any]] = {}
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ConfigError(f"kubeconfig {source}: {kind}[{index}] has no name")
        out.setdefault(entry["name"], entry)  # first definition wins, as kubectl merges
    return out


def load_kubeconfig(paths: str | list[str], *, context: str | None = None) -> Credentials:
    """Resolve credentials from one kubeconfig path or several (merged like kubectl: the first
    file that defines a name wins). Raises ConfigError naming the file and the bad field."""
    path_list = [paths] if isinstance(paths, str) else list(paths)
    path_list = [p for p in path_list if p]
    if not path_list:
        raise ConfigError("kubeconfig: no file given")
    clusters: dict[str, dict[str, Any]] = {}
    users: dict[str, dict[str, Any]] = {}
    contexts: dict[str, dict[str, Any]] = {}
    current: str | None = None
    origin: dict[tuple[str, str], Path] = {}
    for raw_path in path_list:
        path = Path(raw_path).expanduser()
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"kubeconfig {str(path)!r}: cannot read ({exc.strerror})") from exc
        try:
            document = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"kubeconfig {str(path)!r}: not valid YAML ({exc})") from exc
        if not isinstance(document, dict):
            raise ConfigError(f"kubeconfig {str(path)!r}: expected a mapping at the top level")
        for kind, store in (("clusters", clusters), ("users", users), ("contexts", contexts)):
            for name, entry in _named(document.get(kind), kind=kind, source=str(path)).items():
                if name not in store:
                    store[name] = entry
                    origin[(kind, name)] = path.parent.resolve()
        if current is None and document.get("current-context"):
            current = str(document["current-context"])
    source = ", ".join(path_list)
    context_name = context or current
    if not context_name:
        raise ConfigError(f"kubeconfig {source}: no current-context set")
    if context_name not in contexts:
        raise ConfigError(f"kubeconfig {source}: context {context_name!r} is not defined")
    ctx = contexts[context_name].get("context")
    if not isinstance(ctx, dict):
        raise ConfigError(f"kubeconfig {source}: context {context_name!r} has no 'context' mapping")
    cluster_name = ctx.get("cluster")
    user_name = ctx.get("user")
    if cluster_name not in clusters:
        raise ConfigError(
            f"kubeconfig {source}: cluster {cluster_name!r} (context {context_name!r}) is not defined"
        )
    cluster = clusters[cluster_name].get("cluster")
    if not isinstance(cluster, dict):
        raise ConfigError(f"kubeconfig {source}: cluster {cluster_name!r} has no 'cluster' mapping")
    user: dict[str, Any] = {}
    if user_name is not None:
        if user_name not in users:
            raise ConfigError(
                f"kubeconfig {source}: user {user_name!r} (context {context_name!r}) is not defined"
            )
        user = users[user_name].get("user") or {}
        if not isinstance(user, dict):
            raise ConfigError(f"kubeconfig {source}: user {user_name!r} has no 'user' mapping")

    where_c = f"kubeconfig {source}: cluster {cluster_name!r}"
    where_u = f"kubeconfig {source}: user {user_name!r}"
    server = cluster.get("server")
    if not isinstance(server, str) or not server:
        raise ConfigError(f"{where_c}: 'server' is missing")
    parts = urlsplit(server)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ConfigError(f"{where_c}: server {server!r} is not an http(s)://host[:port] URL")
    cluster_base = origin[("clusters", cluster_name)]
    user_base = origin.get(("users", str(user_name)), cluster_base)

    fields: dict[str, Any] = {"server": server.rstrip("/"), "source": source}
    if "certificate-authority-data" in cluster:
        fields["ca_data"] = _decode_b64(
            cluster["certificate-authority-data"], where=f"{where_c}: certificate-authority-data"
        )
    elif "certificate-authority" in cluster:
        fields["ca_file"] = _resolve_path(
            cluster["certificate-authority"],
            base=cluster_base,
            where=f"{where_c}: certificate-authority",
        )
    fields["insecure_skip_tls_verify"] = bool(cluster.get("insecure-skip-tls-verify", False))
    if cluster.get("tls-server-name"):
        fields["tls_server_name"] = str(cluster["tls-server-name"])

    for unsupported in ("exec", "auth-provider", "username", "password"):
        if unsupported in user:
            raise ConfigError(
                f"{where_u}: {unsupported!r} authentication is not supported; use a client certificate or a token"
            )
    if "client-certificate-data" in user:
        fields["client_cert_data"] = _decode_b64(
            user["client-certificate-data"], where=f"{where_u}: client-certificate-data"
        )
    elif "client-certificate" in user:
        fields["client_cert_file"] = _resolve_path(
            user["client-certificate"], base=user_base, where=f"{where_u}: client-certificate"
        )
    if "client-key-data" in user:
        fields["client_key_data"] = _decode_b64(
            user["client-key-data"], where=f"{where_u}: client-key-data"
        )
    elif "client-key" in user:
        fields["client_key_file"] = _resolve_path(
            user["client-key"], base=user_base, where=f"{where_u}: client-key"
        )
    has_cert = "client_cert_data" in fields or "client_cert_file" in fields
    has_key = "client_key_data" in fields or "client_key_file" in fields
    if has_cert != has_key:
        raise ConfigError(f"{where_u}: a client certificate needs both the certificate and its key")
    if user.get("token"):
        fields["token"] = str(user["token"])
    elif user.get("tokenFile"):
        fields["token_file"] = _resolve_path(
            user["tokenFile"], base=user_base, where=f"{where_u}: tokenFile"
        )
    return Credentials(**fields)


def in_cluster_credentials(
    environ: Mapping[str, str] | None = None, *, base: Path = IN_CLUSTER_DIR
) -> Credentials:
    """Credentials of the pod's service account (KUBERNETES_SERVICE_HOST/PORT, token, CA)."""
    env = os.environ if environ is None else environ
    host = env.get("KUBERNETES_SERVICE_HOST", "").strip()
    port = env.get("KUBERNETES_SERVICE_PORT", "").strip()
    if not host or not port:
        raise ConfigError(
            "no kubeconfig: KUBECONFIG is unset and KUBERNETES_SERVICE_HOST/KUBERNETES_SERVICE_PORT "
            "are missing, so this is not running in a pod either"
        )
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"KUBERNETES_SERVICE_PORT={port!r}: expected a port number")
    token_file = base / "token"
    ca_file = base / "ca.crt"
    for needed in (token_file, ca_file):
        if not needed.is_file():
            raise ConfigError(
                f"in-cluster config: {needed} is missing (is a service account token mounted?)"
            )
    bracketed = f"[{host}]" if ":" in host else host
    return Credentials(
        server=f"https://{bracketed}:{port}",
        ca_file=str(ca_file),
        token_file=str(token_file),
        source="in-cluster service account",
    )


def _ssl_context(creds: Credentials) -> ssl.SSLContext | bool:
    if not creds.server.startswith("https://"):
        return False
    if creds.insecure_skip_tls_verify:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        try:
            context = ssl.create_default_context(
                cafile=creds.ca_file,
                cadata=creds.ca_data.decode() if creds.ca_data is not None else None,
            )
        except (ssl.SSLError, ValueError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"{creds.source}: the certificate authority is not a valid PEM certificate ({exc})"
            ) from exc
    if creds.client_cert_data is not None or creds.client_cert_file is not None:
        _load_client_cert(context, creds)
    return context


def _load_client_cert(context: ssl.SSLContext, creds: Credentials) -> None:
    # ssl only loads certificates from files: inline data goes through a private temp dir
    # that is removed right after loading.
    with tempfile.TemporaryDirectory(prefix="apilane-kube-") as scratch:
        cert_file = creds.client_cert_file
        key_file = creds.client_key_file
        if creds.client_cert_data is not None:
            cert_file = os.path.join(scratch, "client.crt")
            Path(cert_file).write_bytes(creds.client_cert_data)
        if creds.client_key_data is not None:
            key_file = os.path.join(scratch, "client.key")
            fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(creds.client_key_data)
        try:
            context.load_cert_chain(certfile=str(cert_file), keyfile=key_file)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                f"{creds.source}: the client certificate or key is not valid PEM, or they do not match ({exc})"
            ) from exc


# --------------------------------------------------------------------------- client


class KubeClient:
    """One aiohttp session to one API server. Create with `from_config`, `close()` when done."""

    def __init__(self, credentials: Credentials) -> None:
        self.credentials = credentials
        self.server = credentials.server
        self._ssl = _ssl_context(credentials)
        self._token = credentials.token
        self._token_read_at = 0.0
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    async def from_config(cls, kubeconfig: str | None = None) -> KubeClient:
        """From a kubeconfig path; with None or "" from $KUBECONFIG (colon-separated paths,
        merged), else the in-cluster service account."""
        if kubeconfig:
            return cls(load_kubeconfig(kubeconfig))
        env_paths = os.environ.get("KUBECONFIG", "").strip()
        if env_paths:
            return cls(load_kubeconfig([p for p in env_paths.split(os.pathsep) if p]))
        return cls(in_cluster_credentials())

    # -- plumbing

    def _session_or_open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                ssl=self._ssl,
                limit=64,
                # Names resolve once per connection; the default DNS cache would keep a stale
                # API server address after a failover.
                use_dns_cache=False,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                headers={"User-Agent": USER_AGENT, "Accept": "application/json"},
                timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT, connect=CONNECT_TIMEOUT),
                json_serialize=lambda obj: _json_encoder.encode(obj).decode(),
            )
        return self._session

    def _auth_headers(self) -> dict[str, str]:
        if self.credentials.token_file is not None:
            now = time.monotonic()
            if self._token is None or now - self._token_read_at > TOKEN_REFRESH_SECONDS:
                try:
                    self._token = Path(self.credentials.token_file).read_text().strip()
                    self._token_read_at = now
                except OSError as exc:
                    if self._token is None:
                        raise Unauthorized(
                            f"cannot read token file {self.credentials.token_file}: {exc}"
                        ) from exc
                    log.warning(
                        "cannot re-read token file, keeping the previous token",
                        extra={"error": str(exc)},
                    )
        return {"Authorization": f"Bearer {self._token}"} if self._token else {}

    def _url(self, path: str) -> str:
        if not path.startswith("/"):
            raise ValueError(f"API path must start with '/': {path!r}")
        return self.server + path

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """One request; returns the decoded JSON object or raises a typed KubeError."""
        session = self._session_or_open()
        headers = self._auth_headers()
        data: bytes | None = None
        if body is not None:
            data = _json_encoder.encode(body)
            headers["Content-Type"] = content_type
        request_timeout = aiohttp.ClientTimeout(
            total=timeout or REQUEST_TIMEOUT, connect=CONNECT_TIMEOUT
        )
        try:
            async with session.request(
                method,
                self._url(path),
                params=dict(params or {}),
                data=data,
                headers=headers,
                timeout=request_timeout,
            ) as response:
                payload = await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise Unavailable(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
        decoded = _decode_or_none(payload)
        if status >= 400:
            text = payload[:500].decode(errors="replace")
            raise error_from_status(status, decoded, fallback=f"{method} {path}: {text}")
        if not isinstance(decoded, dict):
            raise KubeError(
                f"{method} {path}: expected a JSON object, got {payload[:200]!r}", status=status
            )
        return decoded

    # -- verbs

    async def get(self, path: str, *, params: dict[str, str] | None = None) -> dict[str, Any]:
        return await self.request("GET", path, params=params)

    async def list(
        self,
        path: str,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
        resource_version: str | None = None,
    ) -> dict[str, Any]:
        """The whole List object; pages are fetched with `continue` and their items joined
        (every page is served from the same snapshot, so the first page's resourceVersion
        stands for the whole list)."""
        params = _selectors(label_selector, field_selector)
        if resource_version is not None:
            params["resourceVersion"] = resource_version
        params["limit"] = str(LIST_PAGE_SIZE)
        result: dict[str, Any] | None = None
        items: list[dict[str, Any]] = []
        while True:
            page = await self.request("GET", path, params=params)
            items.extend(page.get("items") or [])
            if result is None:
                result = page
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                break
            params = {"continue": str(token), "limit": str(LIST_PAGE_SIZE)}
        result["items"] = items
        result.setdefault("metadata", {}).pop("continue", None)
        return result

    async def watch(
        self,
        path: str,
        *,
        resource_version: str,
        label_selector: str | None = None,
        field_selector: str | None = None,
        allow_bookmarks: bool = True,
        timeout_seconds: int = 300,
    ) -> AsyncGenerator[dict[str, Any], None]:
        """Raw watch events ({"type", "object"}) from `resource_version` until the server ends
        the stream (after about `timeout_seconds`). Raises Gone on 410 (as an HTTP status or
        an ERROR event), another KubeError for other ERROR events, Unavailable when the
        connection breaks. Close it with `contextlib.aclosing` when stopping early."""
        params = _selectors(label_selector, field_selector)
        params.update(
            {
                "watch": "true",
                "resourceVersion": resource_version,
                "allowWatchBookmarks": "true" if allow_bookmarks else "false",
                "timeoutSeconds": str(int(timeout_seconds)),
            }
        )
        session = self._session_or_open()
        timeout = aiohttp.ClientTimeout(
            total=None, connect=CONNECT_TIMEOUT, sock_read=timeout_seconds + WATCH_READ_MARGIN
        )
        try:
            async with session.get(
                self._url(path), params=params, headers=self._auth_headers(), timeout=timeout
            ) as response:
                if response.status >= 400:
                    payload = await response.read()
                    raise error_from_status(
                        response.status,
                        _decode_or_none(payload),
                        fallback=f"WATCH {path}: {payload[:500].decode(errors='replace')}",
                    )
                buffer = b""
                # Not readline(): aiohttp caps a line at 128 KiB and large objects exceed it.
                async for chunk in response.content.iter_any():
                    buffer += chunk
                    while (newline := buffer.find(b"\n")) >= 0:
                        line, buffer = buffer[:newline], buffer[newline + 1 :]
                        if line.strip():
                            yield _watch_event(line, path)
                if buffer.strip():
                    yield _watch_event(buffer, path)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise Unavailable(f"WATCH {path}: {type(exc).__name__}: {exc}") from exc

    async def create(
        self,
        path: str,
        body: dict[str, Any],
        *,
        field_manager: str = "apilane",
        dry_run: bool = False,
    ) -> dict[str, Any]:
        params = {"fieldManager": field_manager}
        if dry_run:
            params["dryRun"] = "All"
        return await self.request("POST", path, params=params, body=body)

    async def replace(
        self, path: str, body: dict[str, Any], *, field_manager: str = "apilane"
    ) -> dict[str, Any]:
        return await self.request("PUT", path, params={"fieldManager": field_manager}, body=body)

    async def patch(
        self,
        path: str,
        body: dict[str, Any] | builtins.list[Any],
        *,
        patch_type: PatchType = "strategic",
        field_manager: str = "apilane",
        dry_run: bool = False,
        force: bool = False,
    ) -> dict[str, Any]:
        """Strategic merge by default: lists with merge keys (containers, env) merge by name,
        where a JSON merge patch would replace them wholesale."""
        if patch_type not in PATCH_CONTENT_TYPES:
            raise ValueError(f"unknown patch type {patch_type!r}")
        params = {"fieldManager": field_manager}
        if dry_run:
            params["dryRun"] = "All"
        if force:
            if patch_type != "apply":
                raise ValueError("force only applies to server-side apply patches")
            params["force"] = "true"
        return await self.request(
            "PATCH", path, params=params, body=body, content_type=PATCH_CONTENT_TYPES[patch_type]
        )

    async def delete(
        self,
        path: str,
        *,
        propagation_policy: str | None = None,
        grace_period_seconds: int | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] | None = None
        if propagation_policy is not None or grace_period_seconds is not None:
            body = {"apiVersion": "v1", "kind": "DeleteOptions"}
            if propagation_policy is not None:
                body["propagationPolicy"] = propagation_policy
            if grace_period_seconds is not None:
                body["gracePeriodSeconds"] = grace_period_seconds
        return await self.request("DELETE", path, body=body)

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    async def __aenter__(self) -> KubeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _selectors(label_selector: str | None, field_selector: str | None) -> dict[str, str]:
    params: dict[str, str] = {}
    if label_selector:
        params["labelSelector"] = label_selector
    if field_selector:
        params["fieldSelector"] = field_selector
    return params


def _decode_or_none(payload: bytes) -> Any:
    if not payload:
        return None
    with contextlib.suppress(msgspec.DecodeError):
        return _json_decoder.decode(payload)
    return None


def _watch_event(line: bytes, path: str) -> dict[str, Any]:
    try:
        event = _json_decoder.decode(line)
    except msgspec.DecodeError as exc:
        raise Unavailable(f"WATCH {path}: undecodable event ({exc}): {line[:200]!r}") from exc
    if not isinstance(event, dict) or not isinstance(event.get("object"), dict):
        raise Unavailable(f"WATCH {path}: malformed event {line[:200]!r}")
    if event.get("type") == "ERROR":
        status = event["object"]
        code = status.get("code")
        raise error_from_status(
            code if isinstance(code, int) else 500, status, fallback=f"WATCH {path}: error event"
        )
    return event
