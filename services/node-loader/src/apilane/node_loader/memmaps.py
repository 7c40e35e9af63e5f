"""`MemoryNatMaps`: the in-memory twin of the pinned kernel NAT maps.

It behaves like the kernel maps as the reconciler sees them: an update replaces the value,
a delete of a missing key succeeds (ENOENT counts as success), a full map refuses new keys,
a key of the wrong family cannot be stored, and `dump` returns a copy, not a live view.
Used by the unit tests, the NATS service tests, scale runs and running without root.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from apilane.model import addresses
from apilane.model.errors import ApilaneError
from apilane.node_loader.nat import (
    FAMILIES,
    BackendKey,
    BackendValue,
    Family,
    FrontendKey,
    FrontendValue,
    MapContents,
)

# The kernel maps' default size (bpf/nat.h); a scale run may ask for more.
DEFAULT_MAX_ENTRIES = 65536
_U32_MAX = 0xFFFFFFFF


class MapWriteError(ApilaneError):
    """A map refused a write: full, or a key or value the map cannot hold."""


@dataclass
class _FamilyMaps:
    frontends: dict[FrontendKey, FrontendValue] = field(default_factory=dict)
    backends: dict[BackendKey, BackendValue] = field(default_factory=dict)


class MemoryNatMaps:
    """Both families' frontend and backend maps, in dicts. Not thread-safe (neither is the loop)."""

    def __init__(self, *, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._maps: dict[Family, _FamilyMaps] = {family: _FamilyMaps() for family in FAMILIES}
        # Counts every element written or deleted, so tests can assert "no writes".
        self.operations = 0

    def dump(self, family: Family) -> MapContents:
        maps = self._maps[family]
        return MapContents(frontends=dict(maps.frontends), backends=dict(maps.backends))

    def update_backends(self, family: Family, items: Mapping[BackendKey, BackendValue]) -> None:
        table = self._maps[family].backends
        for key, value in items.items():
            _check_u32(key.service_id, "service id")
            _check_u32(key.ordinal, "ordinal")
            _check_address(family, value.ip, value.port, "backend")
            self._store(table, key, value)

    def update_frontends(self, family: Family, items: Mapping[FrontendKey, FrontendValue]) -> None:
        table = self._maps[family].frontends
        for key, value in items.items():
            _check_address(family, key.ip, key.port, "frontend")
            _check_u32(value.service_id, "service id")
            _check_u32(value.count, "count")
            self._store(table, key, value)

    def delete_frontends(self, family: Family, keys: Iterable[FrontendKey]) -> None:
        table = self._maps[family].frontends
        for key in keys:
            table.pop(key, None)
            self.operations += 1

    def delete_backends(self, family: Family, keys: Iterable[BackendKey]) -> None:
        table = self._maps[family].backends
        for key in keys:
            table.pop(key, None)
            self.operations += 1

    def clear(self) -> None:
        for maps in self._maps.values():
            maps.frontends.clear()
            maps.backends.clear()

    def _store(self, table: dict, key: object, value: object) -> None:  # type: ignore[type-arg]
        if key not in table and len(table) >= self.max_entries:
            raise MapWriteError(f"map full ({self.max_entries} entries): cannot add {key}")
        table[key] = value
        self.operations += 1


def _check_u32(value: int, what: str) -> None:
    if not 0 <= value <= _U32_MAX:
        raise MapWriteError(f"{what} {value} does not fit in 32 bits")


def _check_address(family: Family, ip: str, port: int, what: str) -> None:
    actual = addresses.family_or_none(ip)
    if actual is None:
        raise MapWriteError(f"{what} address {ip!r} is not an IP address")
    if actual != family:
        raise MapWriteError(f"{what} address {ip} is {actual}, not {family}")
    if not 0 <= port <= 0xFFFF:
        raise MapWriteError(f"{what} port {port} does not fit in 16 bits")


def dump_all(maps: object) -> dict[Family, MapContents]:
    """Both families' contents from any `NatMaps`."""
    return {family: maps.dump(family) for family in FAMILIES}  # type: ignore[attr-defined]


def render(contents: Mapping[Family, MapContents]) -> list[str]:
    """The maps as sorted lines, for assertions and diffs in tests and the CLI.

    `IPv4 fe 10.96.0.1:443/6 -> id=1 count=2 flags=0`
    `IPv4 be id=1 #0 -> 10.0.0.1:6443`
    """
    lines: list[str] = []
    for family in FAMILIES:
        if family not in contents:
            continue
        maps = contents[family]
        for fkey, fvalue in sorted(maps.frontends.items()):
            lines.append(
                f"{family} fe {_host_port(fkey.ip, fkey.port)}/{fkey.proto} -> "
                f"id={fvalue.service_id} count={fvalue.count} flags={fvalue.flags}"
            )
        for bkey, bvalue in sorted(maps.backends.items()):
            lines.append(
                f"{family} be id={bkey.service_id} #{bkey.ordinal} -> {_host_port(bvalue.ip, bvalue.port)}"
            )
    return lines


def render_resolved(contents: Mapping[Family, MapContents]) -> list[str]:
    """Each frontend with the backends its ordinals resolve to, without service ids.

    Two map states that route every connect() the same way render the same, whatever ids
    they use: `IPv4 10.96.0.1:443/6 -> [10.0.0.1:6443, 10.0.0.2:6443]`.
    """
    lines: list[str] = []
    for family in FAMILIES:
        if family not in contents:
            continue
        maps = contents[family]
        for fkey, fvalue in sorted(maps.frontends.items()):
            targets = []
            for ordinal in range(fvalue.count):
                backend = maps.backends.get(BackendKey(fvalue.service_id, ordinal))
                targets.append(
                    "MISSING" if backend is None else _host_port(backend.ip, backend.port)
                )
            lines.append(
                f"{family} {_host_port(fkey.ip, fkey.port)}/{fkey.proto} -> [{', '.join(targets)}]"
            )
    return lines


def _host_port(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
