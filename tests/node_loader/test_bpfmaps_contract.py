"""BccNatMaps on real pinned kernel maps: the same `NatMaps` contract as MemoryNatMaps, with
batch operations and with the per-element fallback, plus the adapter's own error handling."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from apilane.node_loader.bpfmaps import BccNatMaps
from apilane.node_loader.memmaps import MapWriteError, MemoryNatMaps
from apilane.node_loader.nat import BackendKey, BackendValue, FrontendKey, FrontendValue
from apilane.node_loader.programs import ConnectTimeLB
from apilane.node_loader.testing import check_nat_maps_contract
from apilane.testing.bpf import BpfLab

pytestmark = [pytest.mark.integration, pytest.mark.bpf]


@pytest.fixture(scope="module")
def lb(bpf_module_lab: BpfLab) -> Iterator[ConnectTimeLB]:
    # Compiled once; never attached (only the maps are exercised here).
    loaded = ConnectTimeLB(
        cgroup_path=bpf_module_lab.child_cgroup(), pin_dir=bpf_module_lab.pin_dir()
    )
    try:
        yield loaded
    finally:
        loaded.close()


@pytest.fixture(params=["batch", "per-element"])
def maps(request: pytest.FixtureRequest, lb: ConnectTimeLB) -> BccNatMaps:
    adapter = BccNatMaps(lb._bpf, use_batch=None if request.param == "batch" else False)
    adapter.clear()
    return adapter


def test_kernel_maps_keep_the_nat_maps_contract(maps: BccNatMaps) -> None:
    check_nat_maps_contract(maps)


def test_the_in_memory_twin_keeps_the_same_contract() -> None:
    check_nat_maps_contract(MemoryNatMaps())


def test_batch_operations_are_used_on_this_kernel(lb: ConnectTimeLB) -> None:
    maps = BccNatMaps(lb._bpf)
    maps.update_backends("IPv4", {BackendKey(1, 0): BackendValue("198.18.0.2", 80)})
    maps.delete_backends("IPv4", [BackendKey(1, 0)])
    assert maps.batch_supported is True


@pytest.mark.parametrize(
    ("family", "frontend"),
    [
        ("IPv4", FrontendKey("fd00:10:96::1", 443)),  # wrong family
        ("IPv4", FrontendKey("10.96.0.1", 70000)),  # port out of range
        ("IPv4", FrontendKey("not-an-ip", 443)),
        ("IPv6", FrontendKey("10.96.0.1", 443)),
        ("IPv4", FrontendKey("10.96.0.1", 443, proto=300)),
    ],
)
def test_bad_input_is_refused_with_a_typed_error_before_anything_is_written(
    maps: BccNatMaps, family: str, frontend: FrontendKey
) -> None:
    good = FrontendKey("10.96.0.2", 443) if family == "IPv4" else FrontendKey("fd00:10:96::2", 443)
    with pytest.raises(MapWriteError):
        maps.update_frontends(
            family,  # type: ignore[arg-type]
            {good: FrontendValue(1, 1), frontend: FrontendValue(1, 1)},
        )
    assert maps.dump(family).frontends == {}  # type: ignore[arg-type]


def test_values_out_of_range_are_refused(maps: BccNatMaps) -> None:
    with pytest.raises(MapWriteError):
        maps.update_frontends("IPv4", {FrontendKey("10.96.0.1", 443): FrontendValue(2**32, 1)})
    with pytest.raises(MapWriteError):
        maps.update_backends("IPv4", {BackendKey(1, -1): BackendValue("198.18.0.2", 80)})
    assert maps.dump("IPv4").frontends == {}
    assert maps.dump("IPv4").backends == {}


def test_a_batch_delete_with_missing_keys_deletes_the_present_ones(maps: BccNatMaps) -> None:
    present = {BackendKey(3, n): BackendValue("198.18.0.2", 1000 + n) for n in range(20)}
    maps.update_backends("IPv4", present)

    # Missing keys first, in the middle and last: a kernel batch stops at the first ENOENT.
    keys = [BackendKey(9, 0), *list(present)[:10], BackendKey(9, 1), *list(present)[10:]]
    maps.delete_backends("IPv4", [*keys, BackendKey(9, 2)])

    assert maps.dump("IPv4").backends == {}


def test_ports_and_addresses_are_stored_in_network_byte_order(lb: ConnectTimeLB) -> None:
    maps = BccNatMaps(lb._bpf)
    maps.clear()
    maps.update_frontends("IPv4", {FrontendKey("10.96.0.1", 443): FrontendValue(5, 1)})
    table = lb._bpf.get_table(b"apilane_fe4")
    [(key, value)] = list(table.items())
    assert bytes(key) == bytes([10, 96, 0, 1, 0x01, 0xBB, 6, 0])
    assert (value.service_id, value.count, value.flags) == (5, 1, 0)
    maps.clear()


def _many_backends(count: int) -> dict[BackendKey, BackendValue]:
    return {
        BackendKey(1 + n // 100, n % 100): BackendValue(f"198.18.{n // 250}.{n % 250 + 1}", 8000)
        for n in range(count)
    }


def test_more_entries_than_one_batch_are_written_read_back_and_deleted(maps: BccNatMaps) -> None:
    # Writes go in chunks of 8192 elements and read-backs through an 8192-element buffer.
    backends = _many_backends(20_000)
    maps.update_backends("IPv4", backends)
    assert maps.dump("IPv4").backends == backends
    maps.delete_backends("IPv4", iter(backends))  # a one-shot iterator is fine too
    assert maps.dump("IPv4").backends == {}


@pytest.mark.parametrize(
    "bad",
    [
        BackendValue("fd00::1", 80),  # wrong family
        BackendValue("198.18.0.1", 65536),  # port out of range
        BackendValue("198.18.0.1", -1),
    ],
)
def test_one_bad_value_at_the_end_of_a_large_write_writes_nothing(
    maps: BccNatMaps, bad: BackendValue
) -> None:
    items = {**_many_backends(10_000), BackendKey(999, 0): bad}
    with pytest.raises(MapWriteError, match="backend"):
        maps.update_backends("IPv4", items)
    assert maps.dump("IPv4").backends == {}
