"""PURE: IP address parsing, once for every package.

`ipaddress` parsing costs microseconds per call, and the same handful of addresses recurs in
every snapshot (validated, ordered, digested, checked against the maps on every apply), so
the parse is cached. Nothing here strips whitespace or accepts a zone: callers that read
free-form input normalise it first.
"""

from __future__ import annotations

import functools
import ipaddress
from typing import Literal, NamedTuple

Family = Literal["IPv4", "IPv6"]
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Address(NamedTuple):
    family: Family
    compressed: str  # the canonical text form (what the maps render, what digests hash)
    number: int  # for the canonical numeric order
    unicast: bool  # neither unspecified nor multicast


@functools.lru_cache(maxsize=65536)
def ip_address(text: str) -> IpAddress | None:
    """The `ipaddress` object for `text`, or None when it is not an IP address."""
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


@functools.lru_cache(maxsize=65536)
def parse(text: str) -> Address | None:
    """The parsed address, or None when `text` is not an IP address."""
    address = ip_address(text)
    if address is None:
        return None
    return Address(
        family=family_of_address(address),
        compressed=address.compressed,
        number=int(address),
        unicast=not (address.is_unspecified or address.is_multicast),
    )


def family_of_address(address: IpAddress) -> Family:
    return "IPv6" if address.version == 6 else "IPv4"


def family_or_none(text: str) -> Family | None:
    parsed = parse(text)
    return parsed.family if parsed else None


def family_of(text: str) -> Family:
    """The family of an address known to be valid; ValueError otherwise."""
    parsed = parse(text)
    if parsed is None:
        raise ValueError(f"{text!r} is not an IP address")
    return parsed.family


def canonical(text: str) -> str | None:
    """The canonical text form ("fd00::0:1" -> "fd00::1"), or None when not an address."""
    parsed = parse(text)
    return parsed.compressed if parsed else None
