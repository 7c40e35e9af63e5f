"""Calico's `ip:port` list format, used by `KUBERNETES_SERVICE_IPS_PORTS` and
`KUBERNETES_APISERVER_ENDPOINTS`: the one parser and renderer for it.

The format is what calico-node's `ebpf-bootstrap` init container reads
(`node/pkg/nodeinit`): entries separated by commas, each `ipv4:port` or `[ipv6]:port`,
surrounding spaces trimmed. This parser is stricter than Calico's in two ways, on
purpose: port 0 is refused (it would program a frontend nobody can reach) and duplicates
are refused (Calico counts them twice and skews backend weighting).

Rendering is canonical: IPv4 before IPv6, then by numeric address, then by port, with
duplicates dropped, so the same set always renders the same string and an unchanged set
never changes a pod template.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from apilane.model import addresses
from apilane.model.addresses import Family, IpAddress
from apilane.model.errors import ApilaneError

MIN_PORT: Final = 1
MAX_PORT: Final = 65535
# Calico's strconv.Atoi accepts leading zeros; a port longer than this is garbage, and
# refusing it early keeps int() away from megabyte-long digit strings.
_MAX_PORT_DIGITS: Final = 5
_DIGITS: Final = re.compile(r"[0-9]+")


class EnvFormatErrorKind(StrEnum):
    """Why an env string was refused; stable strings, safe to match on and to publish."""

    EMPTY_ENTRY = "empty-entry"
    MISSING_PORT = "missing-port"
    INVALID_PORT = "invalid-port"
    PORT_OUT_OF_RANGE = "port-out-of-range"
    INVALID_IP = "invalid-ip"
    UNBRACKETED_IPV6 = "unbracketed-ipv6"
    DUPLICATE = "duplicate"


class EnvFormatError(ApilaneError):
    """An `ip:port` list or entry that Calico's format does not allow.

    `kind` says why, `entry` is the offending entry as written and `index` its position
    (0-based) in the list, or -1 when the error is about a single value.
    """

    kind: EnvFormatErrorKind

    def __init__(self, message: str, *, entry: str = "", index: int = -1) -> None:
        where = f" (entry {index + 1}: {entry!r})" if index >= 0 else ""
        super().__init__(message + where)
        self.entry = entry
        self.index = index


class EmptyEntry(EnvFormatError):
    kind = EnvFormatErrorKind.EMPTY_ENTRY


class MissingPort(EnvFormatError):
    kind = EnvFormatErrorKind.MISSING_PORT


class InvalidPort(EnvFormatError):
    kind = EnvFormatErrorKind.INVALID_PORT


class PortOutOfRange(EnvFormatError):
    kind = EnvFormatErrorKind.PORT_OUT_OF_RANGE


class InvalidIp(EnvFormatError):
    kind = EnvFormatErrorKind.INVALID_IP


class UnbracketedIpv6(EnvFormatError):
    kind = EnvFormatErrorKind.UNBRACKETED_IPV6


class DuplicateEntry(EnvFormatError):
    kind = EnvFormatErrorKind.DUPLICATE


@dataclass(frozen=True, slots=True)
class IpPort:
    """One address and TCP port. Build from text with `IpPort.of`, which validates."""

    ip: IpAddress
    port: int

    def __post_init__(self) -> None:
        if not MIN_PORT <= self.port <= MAX_PORT:
            raise PortOutOfRange(f"port {self.port} is outside {MIN_PORT}-{MAX_PORT}")

    @classmethod
    def of(cls, ip: str | IpAddress, port: int) -> IpPort:
        """An entry from an address (text or parsed) and a port; raises EnvFormatError."""
        address = ip if isinstance(ip, IpAddress) else _parse_ip(ip, entry=ip, index=-1)
        if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
            raise InvalidIp(f"IPv6 address {address} has a zone, which Calico cannot parse")
        return cls(address, port)

    @property
    def family(self) -> Family:
        return addresses.family_of_address(self.ip)

    @property
    def sort_key(self) -> tuple[int, int, int]:
        """Canonical order: IPv4 first, then numeric address, then port."""
        return (self.ip.version, int(self.ip), self.port)

    def __str__(self) -> str:
        if self.ip.version == 6:
            return f"[{self.ip.compressed}]:{self.port}"
        return f"{self.ip}:{self.port}"


def canonical(entries: Iterable[IpPort]) -> tuple[IpPort, ...]:
    """The entries deduplicated and in canonical order."""
    return tuple(sorted(set(entries), key=lambda entry: entry.sort_key))


def render_ip_ports(entries: Iterable[IpPort]) -> str:
    """`10.96.0.1:443,[fd00::1]:443`: canonical, so one set always gives one string."""
    return ",".join(str(entry) for entry in canonical(entries))


def parse_ip_ports(text: str, *, allow_empty: bool = False) -> tuple[IpPort, ...]:
    """Parse a whole env value; entries come back in the order written.

    Raises only EnvFormatError (a subclass that names the reason). An empty value is an
    error unless `allow_empty`, because calico-node skips its bootstrap when either
    variable is empty, which is never what a caller wants to write by accident.
    """
    if text.strip() == "":
        if allow_empty:
            return ()
        raise EmptyEntry("the list is empty", entry=text, index=0)
    seen: set[IpPort] = set()
    parsed: list[IpPort] = []
    for index, raw in enumerate(text.split(",")):
        entry = parse_ip_port(raw, index=index)
        if entry in seen:
            raise DuplicateEntry(f"{entry} appears more than once", entry=raw.strip(), index=index)
        seen.add(entry)
        parsed.append(entry)
    return tuple(parsed)


def parse_ip_port(text: str, *, index: int = -1) -> IpPort:
    """Parse one `ipv4:port` or `[ipv6]:port` entry (surrounding spaces allowed)."""
    entry = text.strip()
    if not entry:
        raise EmptyEntry("empty entry", entry=text, index=index)
    if entry.startswith("["):
        close = entry.find("]")
        if close < 0:
            raise InvalidIp("'[' without a closing ']'", entry=entry, index=index)
        host, rest = entry[1:close], entry[close + 1 :]
        if rest in ("", ":"):
            raise MissingPort("no port after the address", entry=entry, index=index)
        if not rest.startswith(":"):
            raise InvalidPort("expected ':port' after ']'", entry=entry, index=index)
        address = _parse_ip(host, entry=entry, index=index)
        if address.version != 6:
            raise InvalidIp("only IPv6 addresses go in brackets", entry=entry, index=index)
        port_text = rest[1:]
    else:
        colons = entry.count(":")
        if colons == 0:
            raise MissingPort("no ':port'", entry=entry, index=index)
        if colons > 1:
            # Either a bare IPv6 address or `ipv6:port` without brackets; both are ambiguous.
            raise UnbracketedIpv6(
                "IPv6 addresses must be written as [address]:port", entry=entry, index=index
            )
        host, port_text = entry.split(":")
        if port_text == "":
            raise MissingPort("no port after ':'", entry=entry, index=index)
        address = _parse_ip(host, entry=entry, index=index)
    port = _parse_port(port_text, entry=entry, index=index)
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        raise InvalidIp("IPv6 zones are not allowed", entry=entry, index=index)
    return IpPort(address, port)


def _parse_ip(text: str, *, entry: str, index: int) -> IpAddress:
    address = addresses.ip_address(text)
    if address is None:
        raise InvalidIp(f"{text!r} is not an IP address", entry=entry, index=index)
    return address


def _parse_port(text: str, *, entry: str, index: int) -> int:
    if not _DIGITS.fullmatch(text):
        raise InvalidPort(f"port {text!r} is not a decimal number", entry=entry, index=index)
    if len(text.lstrip("0")) > _MAX_PORT_DIGITS:
        raise PortOutOfRange(f"port {text} is above {MAX_PORT}", entry=entry, index=index)
    port = int(text, 10)
    if not MIN_PORT <= port <= MAX_PORT:
        raise PortOutOfRange(
            f"port {port} is outside {MIN_PORT}-{MAX_PORT}", entry=entry, index=index
        )
    return port
