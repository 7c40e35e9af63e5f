"""Test helpers that ship with the package (pytest's importlib mode cannot import helpers
from tests/): the `NatMaps` contract, run on `MemoryNatMaps` and on the kernel adapter; a
recording stand-in for the connect-time programs; a loader run for the length of a block."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from apilane.node_loader.nat import (
    PROTO_TCP,
    PROTO_UDP,
    BackendKey,
    BackendValue,
    Family,
    FrontendKey,
    FrontendValue,
    MapContents,
    NatMaps,
)
from apilane.node_loader.service import NodeLoader


def _empty(maps: NatMaps, family: Family) -> bool:
    contents = maps.dump(family)
    return not contents.frontends and not contents.backends


def check_nat_maps_contract(maps: NatMaps) -> None:
    """Assert the behaviour the reconciler relies on. `maps` must start empty; it is empty
    again afterwards. Raises AssertionError naming the broken rule."""
    for family in _FAMILIES:
        assert _empty(maps, family), f"contract needs empty maps; {family} is not"
    _check_writes_and_deletes(maps)
    _check_large_batches(maps)


_FAMILIES: tuple[Family, ...] = ("IPv4", "IPv6")


def _check_writes_and_deletes(maps: NatMaps) -> None:
    fe4 = FrontendKey(ip="10.96.0.1", port=443, proto=PROTO_TCP)
    fe4_udp = FrontendKey(ip="10.96.0.1", port=443, proto=PROTO_UDP)
    fe6 = FrontendKey(ip="fd00:10:96::1", port=443, proto=PROTO_TCP)
    be4 = {
        BackendKey(7, 0): BackendValue(ip="10.0.0.1", port=6443),
        BackendKey(7, 1): BackendValue(ip="10.0.0.2", port=6443),
    }
    be6 = {BackendKey(7, 0): BackendValue(ip="fd00::a", port=6443)}

    # Writes round-trip exactly, per family, and families are separate maps.
    maps.update_backends("IPv4", be4)
    maps.update_frontends("IPv4", {fe4: FrontendValue(service_id=7, count=2)})
    maps.update_backends("IPv6", be6)
    maps.update_frontends("IPv6", {fe6: FrontendValue(service_id=7, count=1, flags=0)})
    got4, got6 = maps.dump("IPv4"), maps.dump("IPv6")
    assert dict(got4.frontends) == {fe4: FrontendValue(7, 2)}, f"IPv4 frontends: {got4.frontends}"
    assert dict(got4.backends) == be4, f"IPv4 backends: {got4.backends}"
    assert dict(got6.frontends) == {fe6: FrontendValue(7, 1)}, f"IPv6 frontends: {got6.frontends}"
    assert dict(got6.backends) == be6, f"IPv6 backends: {got6.backends}"

    # The protocol is part of the frontend key.
    maps.update_frontends("IPv4", {fe4_udp: FrontendValue(service_id=8, count=1)})
    assert len(maps.dump("IPv4").frontends) == 2, "TCP and UDP frontends must be separate keys"

    # An update replaces the value; a dump is a copy, not a live view.
    snapshot = maps.dump("IPv4")
    maps.update_frontends("IPv4", {fe4: FrontendValue(service_id=9, count=1, flags=0)})
    maps.update_backends("IPv4", {BackendKey(7, 1): BackendValue(ip="10.0.0.3", port=443)})
    assert snapshot.frontends[fe4] == FrontendValue(7, 2), "dump must not change after writes"
    after = maps.dump("IPv4")
    assert after.frontends[fe4] == FrontendValue(9, 1), "update must replace the frontend value"
    assert after.backends[BackendKey(7, 1)] == BackendValue("10.0.0.3", 443), "backend replace"

    # IPv4-mapped IPv6 addresses are ordinary IPv6 keys and round-trip in canonical form.
    mapped = FrontendKey(ip="::ffff:a60:1", port=443, proto=PROTO_TCP)  # ::ffff:10.96.0.1
    maps.update_frontends("IPv6", {mapped: FrontendValue(service_id=3, count=0)})
    assert mapped in maps.dump("IPv6").frontends, "IPv4-mapped IPv6 key must round-trip"

    # Empty batches are no-ops.
    maps.update_backends("IPv4", {})
    maps.update_frontends("IPv6", {})
    maps.delete_frontends("IPv4", [])
    maps.delete_backends("IPv6", [])

    # Deletes of missing keys succeed (ENOENT is success), also mixed with present keys.
    maps.delete_frontends("IPv4", [FrontendKey(ip="10.96.0.99", port=1, proto=PROTO_TCP)])
    maps.delete_backends("IPv4", [BackendKey(99, 0)])
    maps.delete_frontends("IPv4", [fe4, fe4_udp, FrontendKey(ip="10.96.0.98", port=2)])
    maps.delete_backends("IPv4", [*be4, BackendKey(99, 1)])
    maps.delete_frontends("IPv6", [fe6, mapped])
    maps.delete_backends("IPv6", [*be6])
    for family in _FAMILIES:
        assert _empty(maps, family), f"{family} not empty after deletes: {maps.dump(family)}"


def _check_large_batches(maps: NatMaps) -> None:
    # Batches of many entries (what a plan for a large cluster issues) round-trip.
    many = {
        BackendKey(1, n): BackendValue(ip=f"10.1.{n // 250}.{n % 250 + 1}", port=6443)
        for n in range(1000)
    }
    maps.update_backends("IPv4", many)
    assert dict(maps.dump("IPv4").backends) == many, "a 1000-entry batch must round-trip"
    maps.delete_backends("IPv4", list(many))
    assert _empty(maps, "IPv4"), "a 1000-entry batch delete must empty the map"


def contents_of(maps: NatMaps) -> dict[Family, MapContents]:
    return {family: maps.dump(family) for family in ("IPv4", "IPv6")}


class RecordedPrograms:
    """Stands in for the connect-time programs' attach and detach, recording each call (the
    kernel tests cover the real programs); `names` are what it reports attached."""

    def __init__(self, names: tuple[str, ...] = ("apilane_connect4", "apilane_connect6")) -> None:
        self.names = names
        self.attached = False
        self.calls: list[str] = []

    def enable(self) -> None:
        self.calls.append("enable")
        self.attached = True

    def disable(self) -> None:
        self.calls.append("disable")
        self.attached = False

    def attached_programs(self) -> list[str]:
        return list(self.names) if self.attached else []

    def close(self) -> None:
        self.calls.append("close")


@contextlib.asynccontextmanager
async def running(loader: NodeLoader, *, timeout: float = 15.0) -> AsyncIterator[NodeLoader]:
    """`loader` run until the block ends, entered once its first reconcile is done."""
    stopping = asyncio.Event()
    task = asyncio.create_task(loader.run(stopping))
    try:
        deadline = time.monotonic() + timeout
        while not loader.first_reconcile_done:
            if task.done():
                task.result()  # its error, not a timeout
                raise AssertionError("the loader stopped before its first reconcile")
            if time.monotonic() > deadline:
                raise AssertionError(f"no first reconcile within {timeout}s")
            await asyncio.sleep(0.02)
        yield loader
    finally:
        stopping.set()
        await asyncio.wait_for(task, timeout=10)
