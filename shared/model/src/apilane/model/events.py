"""Every message that crosses the bus, as msgspec Structs.

Schema-evolution rules (msgspec's own): a new field always has a default, and decoders
ignore fields they do not know, so an older consumer keeps working when a newer producer
adds one. A field is never renamed or retyped; a breaking change is a new subject version
(`apilane.v2…`, see `subjects`).

Messages are JSON on the wire, so a person can read them with the `nats` CLI. Encoders and
decoders are built once, at import. Decoding is the only way in from the bus, and it raises
`MalformedEvent` and nothing else.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Final, Literal, TypeAlias

import msgspec

from apilane.model import addresses
from apilane.model.errors import ApilaneError

SCHEMA_VERSION: Final = 1
# The largest message we accept: a snapshot of 10k endpoints is ~1.5 MB of JSON; anything
# larger is a producer bug or an attack, not a cluster.
MAX_MESSAGE_BYTES: Final = 4 * 1024 * 1024

Family: TypeAlias = addresses.Family
Protocol = Literal["TCP", "UDP", "SCTP"]


class MalformedEvent(ApilaneError):
    """A message from the bus that is not one of ours: truncated, wrong types, too large."""


class WarningReason(StrEnum):
    """Machine-readable reasons; stable strings, part of the public contract."""

    EXTERNALLY_MANAGED_KUBE_PROXY = "ExternallyManagedKubeProxy"
    KUBE_PROXY_MISSING = "KubeProxyMissing"
    KUBE_PROXY_NOT_READY = "KubeProxyNotReady"
    MANAGED_CONTROL_PLANE = "ManagedControlPlane"
    NO_READY_ENDPOINTS = "NoReadyEndpoints"
    FAMILY_MISMATCH = "FamilyMismatch"
    INVALID_ENDPOINT = "InvalidEndpoint"
    UNSUPPORTED_ADDRESS_TYPE = "UnsupportedAddressType"
    TERMINATING_FALLBACK = "TerminatingFallback"
    SERVICE_MISSING = "ServiceMissing"
    INVALID_SNAPSHOT = "InvalidSnapshot"
    RENDER_FAILED = "RenderFailed"
    APPLY_FAILED = "ApplyFailed"
    SNAPSHOT_REFUSED = "SnapshotRefused"  # not signed by a trusted key, or not acceptable
    SNAPSHOT_EXPIRED = "SnapshotExpired"  # the snapshot a node holds is past its expiry


class Finding(msgspec.Struct, frozen=True, kw_only=True):
    """Something discovery noticed that a person may need to act on."""

    reason: str  # a WarningReason value; kept as str so new reasons never break old readers
    message: str
    object_ref: str = ""  # "Kind/namespace/name" or "Kind/name"
    detail: dict[str, str] = {}


class ServiceEndpoint(msgspec.Struct, frozen=True, kw_only=True, order=True):
    """One cluster IP of the `kubernetes` Service crossed with one of its ports."""

    ip: str
    port: int
    family: Family
    protocol: Protocol = "TCP"
    port_name: str = ""
    target_port: str = ""  # the Service's targetPort, by name or number, as a string


class ApiServerEndpoint(msgspec.Struct, frozen=True, kw_only=True, order=True):
    """One API server address with the port that the Service's targetPort selects."""

    ip: str
    port: int
    family: Family
    protocol: Protocol = "TCP"
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    node_name: str = ""
    zone: str = ""


class KubeProxyState(msgspec.Struct, frozen=True, kw_only=True):
    present: bool = False
    ready: bool = False
    managed_by: str = ""  # which marker said it is externally managed, e.g. "label:app.kubernetes.io/managed-by=Helm"
    namespace: str = "kube-system"
    name: str = "kube-proxy"


class EndpointSnapshot(msgspec.Struct, frozen=True, kw_only=True, tag="endpoint-snapshot"):
    """The whole API-server endpoint state of one cluster. Every event carries all of it."""

    cluster: str
    generation: int
    service_endpoints: tuple[ServiceEndpoint, ...]
    apiserver_endpoints: tuple[ApiServerEndpoint, ...]
    digest: str
    observed_at: datetime
    trigger_times: tuple[datetime, ...] = ()
    resource_versions: tuple[str, ...] = ()  # "EndpointSlice/default/kubernetes-abc@1234"
    findings: tuple[Finding, ...] = ()
    kube_proxy: KubeProxyState = KubeProxyState()
    managed_provider: str = ""  # "eks", "gke", … when the API server lives outside the cluster
    schema_version: int = SCHEMA_VERSION


RenderOutcome = Literal["applied", "unchanged", "dry-run", "failed", "ignored", "waiting"]


class RenderResult(msgspec.Struct, frozen=True, kw_only=True, tag="render-result"):
    cluster: str
    generation: int
    digest: str
    outcome: RenderOutcome
    reason: str = ""
    daemonset: str = ""  # "namespace/name"
    daemonset_generation: int | None = None
    env: dict[str, str] = {}
    diff: str = ""
    patch: dict[str, Any] | None = None
    at: datetime = msgspec.field(default_factory=lambda: datetime.now(UTC))


class MapSummary(msgspec.Struct, frozen=True, kw_only=True):
    services: int = 0
    frontends: int = 0
    backends: int = 0
    by_family: dict[str, int] = {}


class NodeState(msgspec.Struct, frozen=True, kw_only=True, tag="node-state"):
    cluster: str
    node: str
    generation: int
    digest: str
    maps: MapSummary = MapSummary()
    programs_attached: tuple[str, ...] = ()
    connect_time_lb: bool = True
    last_error: str = ""
    applied_at: datetime | None = None
    updated_at: datetime = msgspec.field(default_factory=lambda: datetime.now(UTC))
    # The held snapshot's signature: until when it is valid, and by which key. A node whose
    # snapshot expired keeps programming it (fail static) and says so with `stale`.
    snapshot_expires_at: datetime | None = None
    stale: bool = False
    signed_by: str = ""  # the key id, e.g. "ed25519:0123456789abcdef"
    # Backends ("ip:port") this node's probes found unhealthy and left out of its maps, and
    # whether some frontend keeps every backend because none passes (fail static).
    unhealthy_backends: tuple[str, ...] = ()
    health_fail_static: bool = False


class ClusterWarning(msgspec.Struct, frozen=True, kw_only=True, tag="warning"):
    cluster: str
    reason: str  # a WarningReason value
    message: str
    source: str  # the service that raised it
    object_ref: str = ""
    generation: int = 0
    at: datetime = msgspec.field(default_factory=lambda: datetime.now(UTC))


Event = EndpointSnapshot | RenderResult | NodeState | ClusterWarning

_encoder: Final = msgspec.json.Encoder()
_decoder: Final = msgspec.json.Decoder(Event)
_snapshot_decoder: Final = msgspec.json.Decoder(EndpointSnapshot)


def encode(event: Event) -> bytes:
    return _encoder.encode(event)


def decode(data: bytes) -> Event:
    """Decode any bus message; the only exception it raises is `MalformedEvent`."""
    _check_size(data)
    try:
        event: Event = _decoder.decode(data)
        return event
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
        raise MalformedEvent(f"cannot decode event: {exc}") from exc


def decode_snapshot(data: bytes) -> EndpointSnapshot:
    _check_size(data)
    try:
        return _snapshot_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
        raise MalformedEvent(f"cannot decode endpoint snapshot: {exc}") from exc


def _check_size(data: bytes) -> None:
    if len(data) > MAX_MESSAGE_BYTES:
        raise MalformedEvent(f"message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")


def canonical_digest(
    service_endpoints: tuple[ServiceEndpoint, ...],
    apiserver_endpoints: tuple[ApiServerEndpoint, ...],
) -> str:
    """A digest over the data-plane-relevant content only, independent of input order.

    Conditions are left out on purpose: a ready endpoint becoming serving-but-terminating
    does not change where traffic goes, so it must not cause a publish or a patch.
    """
    svc = sorted({(e.family, _ip_key(e.ip), e.port, e.protocol) for e in service_endpoints})
    api = sorted({(e.family, _ip_key(e.ip), e.port, e.protocol) for e in apiserver_endpoints})
    canonical = _encoder.encode({"v": 1, "service": svc, "apiserver": api})
    return "sha256:" + hashlib.sha256(canonical).hexdigest()


def _ip_key(ip: str) -> str:
    # Normalise textual forms (e.g. "fd00::0:1" and "fd00::1") so they hash alike.
    return addresses.canonical(ip) or ip
