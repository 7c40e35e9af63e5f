"""Cached address parsing for the hot path.

`ipaddress` parsing costs microseconds per call, and the reconciler sees the same handful of
addresses on every apply (validate, order, check invariants): cache the parse.
"""

from __future__ import annotations

import functools
import ipaddress
from typing import NamedTuple

from apilane.node_loader.nat import Family


class Address(NamedTuple):
    family: Family
    compressed: str  # the canonical text form, as the maps render it
    number: int  # for the canonical numeric order
    unicast: bool  # neither unspecified nor multicast


@functools.lru_cache(maxsize=65536)
def parse(ip: str) -> Address | None:
    """The parsed address, or None when `ip` is not an IP address."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return None
    return Address(
        family="IPv6" if address.version == 6 else "IPv4",
        compressed=address.compressed,
        number=int(address),
        unicast=not (address.is_unspecified or address.is_multicast),
    )


def family_or_none(ip: str) -> Family | None:
    parsed = parse(ip)
    return parsed.family if parsed else None
