"""desired.py: validation, the snapshot → frontends/backends mapping, service-id choice."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import pytest

from apilane.model import events
from apilane.model.events import ApiServerEndpoint, EndpointSnapshot, ServiceEndpoint
from apilane.node_loader.desired import (
    DigestMismatch,
    EmptySnapshot,
    InvalidSnapshot,
    desired_state,
    service_ref,
    target_contents,
)
from apilane.node_loader.nat import (
    PROTO_TCP,
    PROTO_UDP,
    BackendKey,
    BackendValue,
    FrontendKey,
    FrontendValue,
    MapContents,
)
from apilane.testing.snapshots import make_snapshot

pytestmark = [pytest.mark.unit]


def raw_snapshot(services, apiservers, *, digest=None, generation=1) -> EndpointSnapshot:
    svc = tuple(ServiceEndpoint(**s) for s in services)
    api = tuple(ApiServerEndpoint(**a) for a in apiservers)
    return EndpointSnapshot(
        cluster="default",
        generation=generation,
        service_endpoints=svc,
        apiserver_endpoints=api,
        digest=digest if digest is not None else events.canonical_digest(svc, api),
        observed_at=datetime.now(UTC),
    )


SVC4 = {"ip": "10.96.0.1", "port": 443, "family": "IPv4"}
API4 = {"ip": "10.0.0.1", "port": 6443, "family": "IPv4"}


@pytest.mark.parametrize(
    ("services", "apiservers", "error", "fragment"),
    [
        ([{**SVC4, "ip": "10.96.0.300"}], [API4], InvalidSnapshot, "not an IP address"),
        ([SVC4], [{**API4, "ip": "banana"}], InvalidSnapshot, "not an IP address"),
        ([{**SVC4, "port": 0}], [API4], InvalidSnapshot, "outside 1-65535"),
        ([SVC4], [{**API4, "port": 70000}], InvalidSnapshot, "outside 1-65535"),
        ([{**SVC4, "family": "IPv6"}], [API4], InvalidSnapshot, "marked IPv6"),
        ([SVC4], [{**API4, "ip": "fd00::1"}], InvalidSnapshot, "marked IPv4"),
        ([SVC4], [{**API4, "ip": "0.0.0.0"}], InvalidSnapshot, "unicast"),
        ([SVC4], [{**API4, "ip": "224.0.0.1"}], InvalidSnapshot, "unicast"),
        ([SVC4, SVC4], [API4], InvalidSnapshot, "duplicate service endpoint"),
        ([SVC4], [API4, {**API4, "node_name": "other"}], InvalidSnapshot, "duplicate API server"),
        (
            [SVC4],
            [{**API4, "ip": "fd00::0:1", "family": "IPv6"}, {**API4, "ip": "fd00::1", "family": "IPv6"}],
            InvalidSnapshot,
            "duplicate API server",
        ),
        ([SVC4], [], EmptySnapshot, "no API server endpoints"),
        ([], [API4], EmptySnapshot, "no service addresses"),
    ],
    ids=[
        "bad-service-ip", "bad-apiserver-ip", "port-0", "port-too-big", "service-family-mismatch",
        "apiserver-family-mismatch", "unspecified-address", "multicast-address", "duplicate-service",
        "duplicate-apiserver", "duplicate-after-normalising", "no-apiservers", "no-service",
    ],
)  # fmt: skip
def test_invalid_snapshots_raise_typed_errors(services, apiservers, error, fragment):
    with pytest.raises(error, match=fragment) as caught:
        desired_state(raw_snapshot(services, apiservers))
    assert isinstance(caught.value, InvalidSnapshot)
    assert caught.value.problems


def test_every_problem_is_reported_not_only_the_first():
    with pytest.raises(InvalidSnapshot) as caught:
        desired_state(raw_snapshot([{**SVC4, "port": 0}], [{**API4, "ip": "x"}]))
    assert len(caught.value.problems) == 2


def test_digest_mismatch_is_rejected():
    with pytest.raises(DigestMismatch, match="does not match"):
        desired_state(raw_snapshot([SVC4], [API4], digest="sha256:00"))


def test_snapshot_for_another_cluster_is_rejected():
    snapshot = make_snapshot(generation=1, cluster="other")
    with pytest.raises(InvalidSnapshot, match="cluster 'other'"):
        desired_state(snapshot, cluster="default")


def test_newer_schema_version_is_rejected():
    snapshot = msgspec.structs.replace(make_snapshot(generation=1), schema_version=99)
    with pytest.raises(InvalidSnapshot, match="schema version"):
        desired_state(snapshot)


def test_frontends_get_all_backends_of_their_family_in_canonical_order():
    snapshot = make_snapshot(
        generation=3,
        services=("10.96.0.1:443", "[fd00:96::1]:443"),
        apiservers=("10.0.0.10:6443", "10.0.0.9:6443", "[fd00::b]:6443", "[fd00::a]:6443"),
    )
    desired = desired_state(snapshot)
    assert desired.generation == 3
    assert desired.held == {}
    assert desired.frontends == {
        "IPv4": {
            FrontendKey("10.96.0.1", 443, PROTO_TCP): (
                BackendValue("10.0.0.9", 6443),
                BackendValue("10.0.0.10", 6443),  # numeric, not string, order
            )
        },
        "IPv6": {
            FrontendKey("fd00:96::1", 443, PROTO_TCP): (
                BackendValue("fd00::a", 6443),
                BackendValue("fd00::b", 6443),
            )
        },
    }


def test_order_of_the_snapshot_does_not_matter():
    one = make_snapshot(
        generation=1, apiservers=("10.0.0.2:6443", "10.0.0.1:6443", "10.0.0.3:6443")
    )
    two = make_snapshot(
        generation=1, apiservers=("10.0.0.3:6443", "10.0.0.1:6443", "10.0.0.2:6443")
    )
    assert desired_state(one).frontends == desired_state(two).frontends


def test_addresses_are_normalised():
    snapshot = make_snapshot(
        generation=1, services=("[fd00:0:0::1]:443",), apiservers=("[fd00:0::0:a]:6443",)
    )
    desired = desired_state(snapshot)
    assert list(desired.frontends["IPv6"]) == [FrontendKey("fd00::1", 443)]
    assert desired.frontends["IPv6"][FrontendKey("fd00::1", 443)] == (
        BackendValue("fd00::a", 6443),
    )


def test_ipv6_service_with_only_ipv4_backends_holds_the_ipv6_family_and_reports_it():
    snapshot = make_snapshot(
        generation=1, services=("10.96.0.1:443", "[fd00:96::1]:443"), apiservers=("10.0.0.1:6443",)
    )
    desired = desired_state(snapshot)
    assert desired.programmed_families == ("IPv4",)
    assert "IPv6" in desired.held
    assert [f.reason for f in desired.findings] == ["FamilyMismatch"]


def test_ipv4_service_with_only_ipv6_backends_programs_nothing_and_does_not_raise():
    snapshot = make_snapshot(
        generation=1, services=("10.96.0.1:443",), apiservers=("[fd00::1]:6443",)
    )
    desired = desired_state(snapshot)
    # IPv6 has no frontend, so it is programmed empty; IPv4 is held as it is.
    assert desired.programmed_families == ("IPv6",)
    assert desired.frontends["IPv6"] == {}
    assert set(desired.held) == {"IPv4"}


def test_udp_service_ports_use_protocol_17_and_sctp_is_reported_not_programmed():
    udp = desired_state(make_snapshot(generation=1, protocol="UDP"))
    assert list(udp.frontends["IPv4"]) == [FrontendKey("10.96.0.1", 443, PROTO_UDP)]
    sctp = desired_state(make_snapshot(generation=1, protocol="SCTP"))
    assert sctp.frontends["IPv4"] == {}
    assert [f.reason for f in sctp.findings] == ["InvalidEndpoint"]


def test_findings_name_the_service_the_snapshot_was_built_from():
    """Discovery's Service is configurable (APILANE_SERVICE_NAMESPACE/NAME): the findings
    name the one recorded in the snapshot, not a fixed default/kubernetes."""
    versions = ("EndpointSlice/infra/apiserver-x1@41", "Service/infra/apiserver@40")
    held = make_snapshot(generation=1, services=("10.96.0.1:443", "[fd00:96::1]:443"))
    sctp = make_snapshot(generation=1, protocol="SCTP")
    findings = [
        finding
        for snapshot in (held, sctp)
        for finding in desired_state(
            msgspec.structs.replace(snapshot, resource_versions=versions)
        ).findings
    ]
    assert service_ref(msgspec.structs.replace(held, resource_versions=versions)) == (
        "Service/infra/apiserver"
    )
    assert [(f.reason, f.object_ref) for f in findings] == [
        ("FamilyMismatch", "Service/infra/apiserver"),
        ("InvalidEndpoint", "Service/infra/apiserver"),
    ]
    # A snapshot that does not record its Service names none rather than a wrong one.
    assert [f.object_ref for f in desired_state(sctp).findings] == [""]


# --- service ids -------------------------------------------------------------------------

FE_A = FrontendKey("10.96.0.1", 443)
FE_B = FrontendKey("10.96.0.2", 443)
B1, B2, B3 = (
    BackendValue("10.0.0.1", 6443),
    BackendValue("10.0.0.2", 6443),
    BackendValue("10.0.0.3", 6443),
)


def contents(frontends=None, backends=None) -> MapContents:
    return MapContents(frontends=dict(frontends or {}), backends=dict(backends or {}))


def desired_for(frontends):
    snapshot = make_snapshot(generation=1)
    base = desired_state(snapshot)
    return type(base)(generation=1, digest=base.digest, frontends={"IPv4": frontends})


def ids(target) -> dict:
    return {k: v.service_id for k, v in target["IPv4"].frontends.items()}


def test_first_ids_are_the_lowest_starting_at_one_in_key_order():
    target = target_contents(desired_for({FE_B: (B1,), FE_A: (B1, B2)}), {})
    assert ids(target) == {FE_A: 1, FE_B: 2}
    assert target["IPv4"].backends == {
        BackendKey(1, 0): B1,
        BackendKey(1, 1): B2,
        BackendKey(2, 0): B1,
    }


def test_unchanged_frontend_keeps_its_id_even_a_high_one():
    actual = {"IPv4": contents({FE_A: FrontendValue(42, 1)}, {BackendKey(42, 0): B1})}
    target = target_contents(desired_for({FE_A: (B1,)}), actual)
    assert ids(target) == {FE_A: 42}
    assert target["IPv4"] == actual["IPv4"]


def test_changed_backend_set_moves_to_an_id_nobody_references():
    actual = {"IPv4": contents({FE_A: FrontendValue(1, 1)}, {BackendKey(1, 0): B1})}
    target = target_contents(desired_for({FE_A: (B1, B2)}), actual)
    assert ids(target) == {FE_A: 2}


def test_new_id_avoids_ids_of_stale_backends_and_other_frontends():
    actual = {
        "IPv4": contents(
            {FE_B: FrontendValue(1, 1)},
            {BackendKey(1, 0): B1, BackendKey(2, 0): B2, BackendKey(3, 5): B3},
        )
    }
    target = target_contents(desired_for({FE_A: (B1,), FE_B: (B1,)}), actual)
    assert ids(target) == {FE_A: 4, FE_B: 1}


def test_two_frontends_sharing_an_id_are_both_given_fresh_ids():
    """Calico issue 13279: a colliding id must never be adopted by either service."""
    actual = {
        "IPv4": contents(
            {FE_A: FrontendValue(1, 1), FE_B: FrontendValue(1, 1)}, {BackendKey(1, 0): B1}
        )
    }
    target = target_contents(desired_for({FE_A: (B1,), FE_B: (B1,)}), actual)
    assert ids(target) == {FE_A: 2, FE_B: 3}


def test_a_frontend_with_a_dangling_ordinal_is_not_adopted():
    actual = {"IPv4": contents({FE_A: FrontendValue(1, 2)}, {BackendKey(1, 0): B1})}
    target = target_contents(desired_for({FE_A: (B1, B2)}), actual)
    assert ids(target) == {FE_A: 2}


def test_held_families_get_no_target():
    desired = desired_state(
        make_snapshot(generation=1, services=("[fd00::1]:443",), apiservers=("10.0.0.1:6443",))
    )
    assert set(target_contents(desired, {})) == {"IPv4"}
