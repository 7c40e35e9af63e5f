"""NAT map entries as plain values, and the interface every map adapter implements.

These mirror `bpf/nat.h` (the single source of the C layout); the bcc adapter converts them
to bcc's generated ctypes key/leaf types, and an in-memory adapter stores them as they are.
The pure core (`desired`, `plan`) works only with these types.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol, TypeAlias

from apilane.model import addresses
from apilane.model.addresses import family_of

Family: TypeAlias = addresses.Family

FAMILIES: tuple[Family, ...] = ("IPv4", "IPv6")

PROTO_TCP = 6
PROTO_UDP = 17


@dataclass(frozen=True, order=True, slots=True)
class FrontendKey:
    """A service address: `struct apilane_fe_key{4,6}`."""

    ip: str
    port: int
    proto: int = PROTO_TCP

    @property
    def family(self) -> Family:
        return family_of(self.ip)


@dataclass(frozen=True, order=True, slots=True)
class FrontendValue:
    """`struct apilane_fe_value`: which service id, how many backends (ordinals 0..count-1)."""

    service_id: int
    count: int
    flags: int = 0


@dataclass(frozen=True, order=True, slots=True)
class BackendKey:
    """`struct apilane_be_key`: (service id, ordinal). Ids are per family map."""

    service_id: int
    ordinal: int


@dataclass(frozen=True, order=True, slots=True)
class BackendValue:
    """`struct apilane_be_value{4,6}`: where a connect() is sent."""

    ip: str
    port: int

    @property
    def family(self) -> Family:
        return family_of(self.ip)


@dataclass(frozen=True, slots=True)
class MapContents:
    """Everything in the NAT maps of one family, as read back from the kernel."""

    frontends: Mapping[FrontendKey, FrontendValue]
    backends: Mapping[BackendKey, BackendValue]


class NatMaps(Protocol):
    """The NAT maps of one node, both families. Implemented by the bcc adapter (kernel maps)
    and by an in-memory twin with the same behaviour (tests, scale runs)."""

    def dump(self, family: Family) -> MapContents: ...

    def update_backends(self, family: Family, items: Mapping[BackendKey, BackendValue]) -> None: ...

    def update_frontends(
        self, family: Family, items: Mapping[FrontendKey, FrontendValue]
    ) -> None: ...

    def delete_frontends(self, family: Family, keys: Iterable[FrontendKey]) -> None:
        """Deleting a key that is not there is not an error (ENOENT counts as success)."""

    def delete_backends(self, family: Family, keys: Iterable[BackendKey]) -> None:
        """Deleting a key that is not there is not an error (ENOENT counts as success)."""
