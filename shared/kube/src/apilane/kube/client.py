"""apilane's Kubernetes client: plain dicts over kubernetes-asyncio's ApiClient.

Callers speak in API paths ("/api/v1/namespaces/default/services/kubernetes") and plain
dicts, exactly as the API server sends them. kubernetes-asyncio supplies the credentials
(see `apilane.kube.credentials`) and the HTTP session; this module adds timeouts,
pagination, watch streaming and typed errors. HTTP failures become `KubeError` subclasses
carrying the server's `Status` message, so callers can branch on the type (`NotFound`,
`Conflict`, `Gone`, ...) and retry only what is retryable (`Unavailable`).

A client never depends on one API server: besides the configured (or in-cluster) server it
keeps the API server endpoints its service last saw (`use_endpoints`, fed from the latest
snapshot) and moves on to the next one when a connection fails (`ServerList`). Those
endpoints are addressed by IP, so their certificates are verified against a name every
apiserver's serving certificate carries: the kubeconfig's `tls-server-name` when it has one,
else `kubernetes.default.svc`. Verification is never switched off.
"""

from __future__ import annotations

import builtins
import contextlib
import copy
import ipaddress
import logging
import os
import ssl
from collections.abc import AsyncGenerator, Iterable, Mapping
from typing import Any, Literal

import aiohttp
import msgspec

from apilane.kube.credentials import kubeconfig_paths, load_in_cluster, load_kubeconfig
from apilane.kube.upstream import ApiClient, Configuration, api_client
from apilane.model.errors import ApilaneError, ConfigError

PatchType = Literal["strategic", "merge", "json", "apply"]

PATCH_CONTENT_TYPES: dict[str, str] = {
    "strategic": "application/strategic-merge-patch+json",
    "merge": "application/merge-patch+json",
    "json": "application/json-patch+json",
    # JSON is valid YAML, so server-side apply bodies are sent as JSON.
    "apply": "application/apply-patch+yaml",
}

USER_AGENT = "apilane/0.1"
REQUEST_TIMEOUT = 30.0
CONNECT_TIMEOUT = 10.0
LIST_PAGE_SIZE = 500
# A watch connection may stay quiet until the server's own timeout; allow a margin on top.
WATCH_READ_MARGIN = 30.0
# What a request that never got a complete response raises.
_TRANSPORT_ERRORS = (aiohttp.ClientError, TimeoutError, OSError)

# What API server endpoints reached by IP are verified against when the kubeconfig names no
# tls-server-name: the apiserver's own bootstrap puts it in every serving certificate.
ENDPOINT_SERVER_NAME = "kubernetes.default.svc"
# Errors that say the connection was never made: nothing reached the server, so the same
# request may go to the next one at once, whatever its verb.
_NOT_CONNECTED_ERRORS = (aiohttp.ClientConnectorError,)

log = logging.getLogger(__name__)
_json_decoder = msgspec.json.Decoder()


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


# --------------------------------------------------------------------------- servers


def endpoint_url(ip: str, port: int) -> str:
    """https://ip:port, with IPv6 addresses in brackets; ValueError for a bad address/port."""
    address = ipaddress.ip_address(ip)
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range")
    host = f"[{address}]" if address.version == 6 else str(address)
    return f"https://{host}:{port}"


class ServerList:
    """The API server URLs a client may use, in order: the configured one first, then the
    endpoints its service last saw. `current` is the one in use; `failed(url)` moves on to the
    next (round the list) when `url` is still current, so concurrent failures of one server
    move on once."""

    def __init__(self, configured: str) -> None:
        self.configured = configured.rstrip("/")
        self._urls = [self.configured]
        self._index = 0

    @property
    def urls(self) -> tuple[str, ...]:
        return tuple(self._urls)

    @property
    def current(self) -> str:
        return self._urls[self._index]

    def is_configured(self, url: str) -> bool:
        return url == self.configured

    def update(self, urls: Iterable[str]) -> None:
        """The configured URL, then `urls` (duplicates dropped); the current one stays current
        while it is listed, else the configured one is."""
        current = self.current
        fresh = [self.configured]
        for url in urls:
            if url.rstrip("/") not in fresh:
                fresh.append(url.rstrip("/"))
        self._urls = fresh
        self._index = fresh.index(current) if current in fresh else 0

    def failed(self, url: str) -> str | None:
        """`url` could not be reached: the URL to use next, or None when there is no other
        (or another failure already moved on)."""
        if url != self.current or len(self._urls) < 2:
            return None
        self._index = (self._index + 1) % len(self._urls)
        return self.current


# --------------------------------------------------------------------------- client


class KubeClient:
    """A kubernetes-asyncio ApiClient (one aiohttp session) to the configured API server, and
    a second one for the API server endpoints `use_endpoints` adds (verified against
    `endpoint_server_name`). Create with `from_config`, `close()` when done. `source` says
    where the credentials came from; `server` is the URL in use."""

    def __init__(self, configuration: Configuration, *, source: str = "") -> None:
        self.configuration = configuration
        self.source = source or configuration.host
        self.servers = ServerList(str(configuration.host))
        self.endpoint_server_name = configuration.tls_server_name or ENDPOINT_SERVER_NAME
        self._api = self._api_client(configuration)
        self._endpoint_api: ApiClient | None = None

    def _api_client(self, configuration: Configuration) -> ApiClient:
        try:
            api = api_client(configuration)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                f"{self.source}: the certificate authority or the client certificate and key "
                f"are not valid PEM, or the key does not match ({exc})"
            ) from exc
        api.user_agent = USER_AGENT
        return api

    @property
    def server(self) -> str:
        return self.servers.current

    def use_endpoints(self, endpoints: Iterable[tuple[str, int]]) -> None:
        """The API server endpoints (ip, port) the service saw last, to fall back on after
        the configured server (the hook a service feeds from its latest snapshot). Bad
        addresses are logged and skipped."""
        urls = []
        for ip, port in endpoints:
            try:
                urls.append(endpoint_url(ip, port))
            except ValueError as exc:
                log.warning("API server endpoint skipped", extra={"ip": ip, "error": str(exc)})
        before = self.servers.urls
        self.servers.update(urls)
        if self.servers.urls != before:
            log.info("API server URLs", extra={"urls": list(self.servers.urls)})

    def _api_for(self, url: str) -> ApiClient:
        if self.servers.is_configured(url):
            return self._api
        if self._endpoint_api is None:
            configuration = copy.copy(self.configuration)
            configuration.tls_server_name = self.endpoint_server_name
            self._endpoint_api = self._api_client(configuration)
        return self._endpoint_api

    def _unreachable(self, url: str, exc: BaseException) -> str | None:
        """`url` failed at the transport level: move on; returns the next URL, if any."""
        following = self.servers.failed(url)
        if following is not None:
            log.warning(
                "API server unreachable, trying the next",
                extra={"server": url, "next": following, "error": f"{type(exc).__name__}: {exc}"},
            )
        return following

    @classmethod
    async def from_config(cls, kubeconfig: str | None = None) -> KubeClient:
        """From kubeconfig path(s) (':'-separated, merged); with None or "" from $KUBECONFIG,
        else the in-cluster service account. Raises ConfigError naming what is wrong."""
        paths = kubeconfig_paths(kubeconfig or os.environ.get("KUBECONFIG", ""))
        if paths:
            return cls(await load_kubeconfig(paths), source=f"kubeconfig {', '.join(paths)}")
        return cls(load_in_cluster(), source="in-cluster service account")

    # -- plumbing

    async def _send(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None,
        body: Any,
        content_type: str,
        timeout: aiohttp.ClientTimeout,
    ) -> tuple[aiohttp.ClientResponse, str]:
        """The response, status unchecked and body unread (release it with `async with`), and
        the URL it came from. A transport failure moves the client on to the next server; a
        connection that could not be made is tried on each other server at once (nothing
        reached the first, so any verb may be repeated). Raises Unavailable."""
        if not path.startswith("/"):
            raise ValueError(f"API path must start with '/': {path!r}")
        attempts = len(self.servers.urls)
        while True:
            url = self.servers.current
            try:
                response = await self._send_to(
                    url,
                    method,
                    path,
                    params=params,
                    body=body,
                    content_type=content_type,
                    timeout=timeout,
                )
            except _TRANSPORT_ERRORS as exc:
                following = self._unreachable(url, exc)
                attempts -= 1
                if isinstance(exc, _NOT_CONNECTED_ERRORS) and following and attempts > 0:
                    continue
                raise Unavailable(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
            return response, url

    async def _send_to(
        self,
        url: str,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None,
        body: Any,
        content_type: str,
        timeout: aiohttp.ClientTimeout,
    ) -> aiohttp.ClientResponse:
        response: aiohttp.ClientResponse = await self._api_for(url).call_api(
            path,
            method,
            query_params=dict(params or {}),
            header_params={"Accept": "application/json", "Content-Type": content_type},
            body=body,
            auth_settings=["BearerToken"],
            _preload_content=False,
            _request_timeout=timeout,
            _host=url,
        )
        return response

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
        request_timeout = aiohttp.ClientTimeout(
            total=timeout or REQUEST_TIMEOUT, connect=CONNECT_TIMEOUT
        )
        response, url = await self._send(
            method,
            path,
            params=params,
            body=body,
            content_type=content_type,
            timeout=request_timeout,
        )
        try:
            async with response:
                payload = await response.read()
                status = response.status
        except _TRANSPORT_ERRORS as exc:
            self._unreachable(url, exc)
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
        timeout = aiohttp.ClientTimeout(
            total=None, connect=CONNECT_TIMEOUT, sock_read=timeout_seconds + WATCH_READ_MARGIN
        )
        response, url = await self._send(
            "GET", path, params=params, body=None, content_type="application/json", timeout=timeout
        )
        try:
            async with response:
                if response.status >= 400:
                    payload = await response.read()
                    raise error_from_status(
                        response.status,
                        _decode_or_none(payload),
                        fallback=f"WATCH {path}: {payload[:500].decode(errors='replace')}",
                    )
                async with contextlib.aclosing(_watch_events(response, path)) as events:
                    async for event in events:
                        yield event
        except _TRANSPORT_ERRORS as exc:
            self._unreachable(url, exc)
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
        await self._api.close()
        if self._endpoint_api is not None:
            await self._endpoint_api.close()

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


async def _watch_events(
    response: aiohttp.ClientResponse, path: str
) -> AsyncGenerator[dict[str, Any], None]:
    """One event per line of the response body."""
    buffer = b""
    # Not readline(): aiohttp caps a line at its read buffer size and large objects exceed it.
    async for chunk in response.content.iter_any():
        buffer += chunk
        while (newline := buffer.find(b"\n")) >= 0:
            line, buffer = buffer[:newline], buffer[newline + 1 :]
            if line.strip():
                yield _watch_event(line, path)
    if buffer.strip():
        yield _watch_event(buffer, path)


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
