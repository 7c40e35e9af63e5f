"""PURE: an endpoint snapshot → the NAT entries this node should hold, per family.

Two steps, both without I/O (and between them, when the prober has found unhealthy
backends, `apply_health(desired, unhealthy)`: each frontend keeps its healthy backends only,
or all of them when none is healthy):

1. `desired_state(snapshot)` validates the snapshot and says, per family, which frontend
   (service IP, port, protocol) should lead to which backends (the API server
   endpoints of the same family, in canonical sorted order = ordinals 0..n-1).
   A family whose service has addresses but no API server endpoint of that family is
   *held*: it is left exactly as it is in the maps (fail static) and reported as a
   finding, never programmed empty. IPv4-mapped IPv6 traffic is the kernel program's
   business (connect6 looks it up in the IPv4 maps); here families never mix.

2. `target_contents(desired, actual)` chooses service ids against what the maps hold:
   - a frontend whose backends are already programmed exactly (under an id that no
     other frontend shares) keeps its id: no write at all;
   - any other frontend, new or changed, gets the lowest id that appears nowhere in the
     maps of its family (neither in a frontend nor in a backend key) and nowhere else in
     the target. Ids therefore never collide (Calico issue 13279 came from a fixed id),
     survive restarts (they are read back from the maps), and a changed backend set is
     always written under an id that no frontend references yet, so make-before-break
     never rewrites an ordinal that a racing connect() may be reading.
   Ids start at 1, so a zeroed entry never looks like a programmed service.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace

from apilane.model import addresses, events
from apilane.model.errors import ApilaneError
from apilane.model.events import (
    ApiServerEndpoint,
    EndpointSnapshot,
    Finding,
    ServiceEndpoint,
    WarningReason,
)
from apilane.node_loader.nat import (
    FAMILIES,
    PROTO_TCP,
    PROTO_UDP,
    BackendKey,
    BackendValue,
    Family,
    FrontendKey,
    FrontendValue,
    MapContents,
)

FIRST_SERVICE_ID = 1
MAX_SERVICE_ID = 0xFFFFFFFF
_PROTOCOLS = {"TCP": PROTO_TCP, "UDP": PROTO_UDP}


class InvalidSnapshot(ApilaneError):
    """A snapshot that must not reach the maps; `problems` lists every reason found."""

    reason: str = WarningReason.INVALID_SNAPSHOT

    def __init__(self, problems: list[str] | tuple[str, ...]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(self.problems))


class EmptySnapshot(InvalidSnapshot):
    """No API server endpoint (or no service address) at all: programming it would cut
    every node off the API server, so the last good state stays (Calico PR 13060)."""

    reason = WarningReason.NO_READY_ENDPOINTS


class DigestMismatch(InvalidSnapshot):
    """The snapshot's digest is not the canonical digest of its content: corrupted or
    produced by an incompatible writer."""


class ServiceIdsExhausted(ApilaneError):
    """No free 32-bit service id is left in a family (cannot happen with sane input)."""


@dataclass(frozen=True, slots=True)
class DesiredState:
    """What the snapshot asks for, before service ids are chosen."""

    generation: int
    digest: str
    # Families to program; a family present with no frontends is cleared.
    frontends: Mapping[Family, Mapping[FrontendKey, tuple[BackendValue, ...]]]
    # Families left as they are in the maps, with the reason (fail static per family).
    held: Mapping[Family, str] = field(default_factory=dict)
    findings: tuple[Finding, ...] = ()

    @property
    def programmed_families(self) -> tuple[Family, ...]:
        return tuple(f for f in FAMILIES if f in self.frontends)


def validate(snapshot: EndpointSnapshot, *, cluster: str | None = None) -> None:
    """Raise `InvalidSnapshot` (or a subclass) unless the snapshot is safe to program."""
    problems: list[str] = []
    if cluster is not None and snapshot.cluster != cluster:
        problems.append(
            f"snapshot is for cluster {snapshot.cluster!r}, this node is in {cluster!r}"
        )
    if snapshot.generation < 1:
        problems.append(f"generation {snapshot.generation} is not positive")
    if snapshot.schema_version > events.SCHEMA_VERSION:
        problems.append(
            f"schema version {snapshot.schema_version} is newer than {events.SCHEMA_VERSION}"
        )
    groups: tuple[tuple[str, tuple[ServiceEndpoint | ApiServerEndpoint, ...]], ...] = (
        ("service endpoint", snapshot.service_endpoints),
        ("API server endpoint", snapshot.apiserver_endpoints),
    )
    for label, endpoints in groups:
        seen: set[tuple[str, int, str]] = set()
        for endpoint in endpoints:
            key = _check_endpoint(label, endpoint.ip, endpoint.port, endpoint.family, problems)
            if key is None:
                continue
            if (key, endpoint.port, endpoint.protocol) in seen:
                problems.append(f"duplicate {label} {key}:{endpoint.port}/{endpoint.protocol}")
            seen.add((key, endpoint.port, endpoint.protocol))
    if problems:
        raise InvalidSnapshot(problems)
    if not snapshot.apiserver_endpoints or not snapshot.service_endpoints:
        missing = (
            "API server endpoints" if not snapshot.apiserver_endpoints else "service addresses"
        )
        raise EmptySnapshot([f"snapshot generation {snapshot.generation} has no {missing}"])
    expected = events.canonical_digest(snapshot.service_endpoints, snapshot.apiserver_endpoints)
    if snapshot.digest != expected:
        raise DigestMismatch(
            [f"digest {snapshot.digest!r} does not match the content ({expected})"]
        )


def _check_endpoint(what: str, ip: str, port: int, family: str, problems: list[str]) -> str | None:
    """Append what is wrong with one endpoint; return its normalised address when usable."""
    address = addresses.parse(ip)
    if address is None:
        problems.append(f"{what} {ip!r} is not an IP address")
        return None
    usable = True
    if address.family != family:
        problems.append(f"{what} {ip} is {address.family} but marked {family}")
        usable = False
    if not address.unicast:
        problems.append(f"{what} {ip} cannot be a unicast destination")
        usable = False
    if not 1 <= port <= 65535:
        problems.append(f"{what} {ip} has port {port} outside 1-65535")
        usable = False
    return address.compressed if usable else None


def service_ref(snapshot: EndpointSnapshot) -> str:
    """The Service the snapshot was built from, `Service/<namespace>/<name>` (discovery's
    APILANE_SERVICE_NAMESPACE/NAME), as recorded in its resource versions; "" if absent."""
    for version in snapshot.resource_versions:
        if version.startswith("Service/"):
            return version.partition("@")[0]
    return ""


def desired_state(snapshot: EndpointSnapshot, *, cluster: str | None = None) -> DesiredState:
    """Validate, then map the snapshot to frontends and their backends per family."""
    validate(snapshot, cluster=cluster)
    service = service_ref(snapshot)
    findings: list[Finding] = []
    frontends_by_family = _frontends(snapshot, service, findings)
    backends_by_family: dict[Family, set[BackendValue]] = {f: set() for f in FAMILIES}
    for api in snapshot.apiserver_endpoints:
        backends_by_family[api.family].add(BackendValue(ip=_canonical(api.ip), port=api.port))

    programmed: dict[Family, dict[FrontendKey, tuple[BackendValue, ...]]] = {}
    held: dict[Family, str] = {}
    for family in FAMILIES:
        frontends = frontends_by_family[family]
        backends = tuple(sorted(backends_by_family[family], key=_backend_order))
        if frontends and not backends:
            held[family] = _hold(family, service, findings)
            continue
        programmed[family] = {frontend: backends for frontend in sorted(frontends)}
    return DesiredState(
        generation=snapshot.generation,
        digest=snapshot.digest,
        frontends=programmed,
        held=held,
        findings=tuple(findings),
    )


@dataclass(frozen=True, slots=True)
class HealthOutcome:
    """What the health table did to a desired state."""

    desired: DesiredState
    # Backends left out of the programmed set because they failed their probes.
    excluded: tuple[BackendValue, ...] = ()
    # Frontends whose every backend is unhealthy: they keep the full set (fail static).
    fail_static: tuple[FrontendKey, ...] = ()


def apply_health(desired: DesiredState, unhealthy: Collection[BackendValue]) -> HealthOutcome:
    """Leave unhealthy backends out of each frontend's set, but never the last one: a
    frontend none of whose backends passes its probes keeps them all, because then the
    probes (the node's own path, the prober) are more likely wrong than every API server,
    and an empty or shrunken set would cut the node off for nothing."""
    if not unhealthy:
        return HealthOutcome(desired=desired)
    excluded: set[BackendValue] = set()
    fail_static: list[FrontendKey] = []
    frontends: dict[Family, dict[FrontendKey, tuple[BackendValue, ...]]] = {}
    for family, wanted in desired.frontends.items():
        frontends[family] = {}
        for key, backends in wanted.items():
            healthy = tuple(b for b in backends if b not in unhealthy)
            if not healthy and backends:
                fail_static.append(key)
                healthy = backends
            excluded.update(b for b in backends if b not in healthy)
            frontends[family][key] = healthy
    return HealthOutcome(
        desired=replace(desired, frontends=frontends),
        excluded=tuple(sorted(excluded)),
        fail_static=tuple(sorted(fail_static)),
    )


def _frontends(
    snapshot: EndpointSnapshot, service: str, findings: list[Finding]
) -> dict[Family, set[FrontendKey]]:
    """The frontends per family; a protocol the programs cannot translate is a finding."""
    frontends: dict[Family, set[FrontendKey]] = {f: set() for f in FAMILIES}
    for svc in snapshot.service_endpoints:
        proto = _PROTOCOLS.get(svc.protocol)
        if proto is None:
            findings.append(
                Finding(
                    reason=WarningReason.INVALID_ENDPOINT,
                    message=(
                        f"service address {svc.ip}:{svc.port}/{svc.protocol} is not programmed:"
                        " the connect-time load balancer handles TCP and UDP only"
                    ),
                    object_ref=service,
                )
            )
            continue
        frontends[svc.family].add(FrontendKey(ip=_canonical(svc.ip), port=svc.port, proto=proto))
    return frontends


def _hold(family: Family, service: str, findings: list[Finding]) -> str:
    """A family with service addresses and no API server of its own: left as it is."""
    other = "IPv4" if family == "IPv6" else "IPv6"
    reason = (
        f"the service has {family} addresses but every API server endpoint is {other};"
        f" the {family} maps are left as they are"
    )
    findings.append(
        Finding(
            reason=WarningReason.FAMILY_MISMATCH,
            message=reason,
            object_ref=service,
            detail={"family": family},
        )
    )
    return reason


def _backend_order(backend: BackendValue) -> tuple[int, int]:
    """Canonical order: numeric address, then port (stable whatever the snapshot order)."""
    parsed = addresses.parse(backend.ip)
    return (parsed.number if parsed else 0), backend.port


def _canonical(ip: str) -> str:
    parsed = addresses.parse(ip)
    assert parsed is not None, ip  # validate() ran first
    return parsed.compressed


def target_contents(
    desired: DesiredState, actual: Mapping[Family, MapContents]
) -> dict[Family, MapContents]:
    """The exact map contents to reach, for each programmed family (held ones are absent)."""
    return {
        family: _target_family(desired.frontends[family], actual.get(family, _EMPTY))
        for family in desired.programmed_families
    }


_EMPTY = MapContents(frontends={}, backends={})


def _target_family(
    wanted: Mapping[FrontendKey, tuple[BackendValue, ...]], actual: MapContents
) -> MapContents:
    holders: dict[int, int] = {}
    for value in actual.frontends.values():
        holders[value.service_id] = holders.get(value.service_id, 0) + 1

    ids: dict[FrontendKey, int] = {}
    for key, members in wanted.items():
        current = actual.frontends.get(key)
        if (
            current is not None
            and holders[current.service_id] == 1
            and _programmed_exactly(actual, current, members)
        ):
            ids[key] = current.service_id

    taken = {v.service_id for v in actual.frontends.values()}
    taken.update(k.service_id for k in actual.backends)
    taken.update(ids.values())
    candidate = FIRST_SERVICE_ID
    for key in sorted(wanted):
        if key in ids:
            continue
        while candidate in taken:
            candidate += 1
        if candidate > MAX_SERVICE_ID:
            raise ServiceIdsExhausted("no free service id left")
        ids[key] = candidate
        taken.add(candidate)

    frontends: dict[FrontendKey, FrontendValue] = {}
    backends: dict[BackendKey, BackendValue] = {}
    for key, members in wanted.items():
        service_id = ids[key]
        frontends[key] = FrontendValue(service_id=service_id, count=len(members))
        for ordinal, backend in enumerate(members):
            backends[BackendKey(service_id=service_id, ordinal=ordinal)] = backend
    return MapContents(frontends=frontends, backends=backends)


def _programmed_exactly(
    actual: MapContents, current: FrontendValue, backends: tuple[BackendValue, ...]
) -> bool:
    if current.count != len(backends) or current.flags != 0:
        return False
    return all(
        actual.backends.get(BackendKey(current.service_id, ordinal)) == backend
        for ordinal, backend in enumerate(backends)
    )
