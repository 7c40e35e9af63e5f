"""`apilane status` and `apilane simulate failover`: the pure parts — which address a
simulated failover brings in, when a change counts as programmed everywhere, what status
prints. The commands themselves run against `apilane up` (see README, Quick start)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from apilane.cli.failover import (
    DEMO_RANGE,
    done,
    next_address,
    probe_changes,
    replaced_endpoints,
)
from apilane.cli.status import Seal, View, open_value, render_view, view_as_json
from apilane.cli.target import StackInfo
from apilane.model import events
from apilane.model.signing import SigningKey, TrustedKeys
from apilane.testing.sealing import seal, seal_payload

pytestmark = [pytest.mark.unit]


def snapshot(generation: int, ips: tuple[str, ...]) -> events.EndpointSnapshot:
    service = (events.ServiceEndpoint(ip="10.96.0.1", port=443, family="IPv4"),)
    apiservers = tuple(events.ApiServerEndpoint(ip=ip, port=6443, family="IPv4") for ip in ips)
    return events.EndpointSnapshot(
        cluster="local",
        generation=generation,
        service_endpoints=service,
        apiserver_endpoints=apiservers,
        digest=events.canonical_digest(service, apiservers),
        observed_at=datetime.now(UTC),
    )


def node(generation: int) -> events.NodeState:
    return events.NodeState(
        cluster="local", node="local-node", generation=generation, digest="sha256:x"
    )


def view(*, generation: int, ips: tuple[str, ...], env: str, nodes: list[events.NodeState]) -> View:
    return View(
        snapshot=snapshot(generation, ips),
        trace_id="0c331ca0dbaa59abf6713206563fdc28",
        nodes=nodes,
        calico_env={"KUBERNETES_APISERVER_ENDPOINTS": env},
        daemonset_generation=3,
    )


def test_failover_brings_in_an_address_never_used_before() -> None:
    assert next_address({"198.18.0.10", "198.18.0.11", "198.18.0.12"}) == "198.18.0.13"
    assert next_address({"198.18.0.11", "198.18.0.12", "198.18.0.13"}) == "198.18.0.14"


def test_failover_addresses_stay_in_the_demo_range() -> None:
    # At the top of the range it wraps to the lowest free demo address.
    assert next_address({"198.18.0.254", "198.18.0.10"}) == "198.18.0.11"
    for used in ({"198.18.0.10"}, {"198.18.0.200", "198.18.0.201"}):
        assert next_address(used) in {str(h) for h in DEMO_RANGE.hosts()}


def test_a_change_is_done_only_when_snapshot_daemonset_and_every_node_have_it() -> None:
    new_ips = ("198.18.0.11", "198.18.0.12", "198.18.0.13")
    env = ",".join(f"{ip}:6443" for ip in new_ips)
    assert done(view(generation=2, ips=new_ips, env=env, nodes=[node(2)]), 1, "198.18.0.13")
    # The snapshot has not moved on yet.
    assert not done(view(generation=1, ips=new_ips, env=env, nodes=[node(1)]), 1, "198.18.0.13")
    # calico-node not patched yet.
    stale_env = "198.18.0.10:6443"
    assert not done(
        view(generation=2, ips=new_ips, env=stale_env, nodes=[node(2)]), 1, "198.18.0.13"
    )
    # A node still behind, or no node at all.
    assert not done(
        view(generation=2, ips=new_ips, env=env, nodes=[node(2), node(1)]), 1, "198.18.0.13"
    )
    assert not done(view(generation=2, ips=new_ips, env=env, nodes=[]), 1, "198.18.0.13")


def test_failover_shows_when_a_node_s_probes_take_a_backend_out_and_back() -> None:
    ips = ("198.18.0.10", "198.18.0.11")
    dead = msgspec.structs.replace(node(1), unhealthy_backends=("198.18.0.10:6443",))
    shown: set[tuple[str, str]] = set()
    assert probe_changes(view(generation=1, ips=ips, env="", nodes=[node(1)]), shown) == []
    assert probe_changes(view(generation=1, ips=ips, env="", nodes=[dead]), shown) == [
        "local-node: probes took 198.18.0.10:6443 out of its maps"
    ]
    assert probe_changes(view(generation=1, ips=ips, env="", nodes=[dead]), shown) == []
    assert probe_changes(view(generation=1, ips=ips, env="", nodes=[node(1)]), shown) == [
        "local-node: 198.18.0.10:6443 passes its probes again"
    ]


def test_status_names_generations_endpoints_and_the_trace() -> None:
    info = StackInfo(
        cluster="local",
        nats_urls=("nats://127.0.0.1:4222",),
        kubeconfig="/dev/null",
        zipkin_url="http://127.0.0.1:9411",
    )
    ips = ("198.18.0.10", "198.18.0.11", "198.18.0.12")
    text = render_view(view(generation=2, ips=ips, env="198.18.0.10:6443", nodes=[node(1)]), info)
    assert "snapshot generation 2" in text
    assert "198.18.0.10:6443, 198.18.0.11:6443, 198.18.0.12:6443" in text
    assert "http://127.0.0.1:9411/zipkin/traces/0c331ca0dbaa59abf6713206563fdc28" in text
    assert "local-node" in text and "generation 1" in text and "behind" in text


def test_without_a_tracing_ui_status_still_names_the_trace() -> None:
    info = StackInfo(cluster="local", nats_urls=("nats://x:4222",), kubeconfig="", zipkin_url="")
    ips = ("198.18.0.10",)
    text = render_view(view(generation=1, ips=ips, env="198.18.0.10:6443", nodes=[]), info)
    assert "trace id: 0c331ca0dbaa59abf6713206563fdc28" in text
    assert "none has reported yet" in text


def test_failover_retires_the_oldest_endpoint_and_adds_the_new_one_last() -> None:
    endpoints = [
        {"addresses": ["198.18.0.10"], "conditions": {"ready": True}},
        {"addresses": ["198.18.0.11"], "conditions": {"ready": True}},
    ]
    replaced, retired, added = replaced_endpoints(endpoints)
    assert (retired, added) == ("198.18.0.10", "198.18.0.12")
    assert [e["addresses"] for e in replaced] == [["198.18.0.11"], ["198.18.0.12"]]
    assert replaced[-1]["conditions"] == {"ready": True}


def info(trusted: TrustedKeys) -> StackInfo:
    return StackInfo(
        cluster="local",
        nats_urls=("nats://x:4222",),
        kubeconfig="",
        zipkin_url="",
        trusted_keys=trusted,
    )


def test_a_verified_snapshot_shows_its_key_and_expiry() -> None:
    key = SigningKey.generate()
    sealed = seal(snapshot(4, ("198.18.0.10",)), key=key, ttl=timedelta(minutes=30))
    opened = open_value(sealed, TrustedKeys.of(key))
    assert opened.snapshot is not None and opened.snapshot.generation == 4
    assert opened.seal is not None and opened.seal.key_id == key.key_id
    assert opened.untrusted == ""
    shown = View(
        snapshot=opened.snapshot,
        trace_id="",
        nodes=[],
        calico_env={},
        daemonset_generation=1,
        seal=opened.seal,
    )
    text = render_view(shown, info(TrustedKeys.of(key)))
    assert "snapshot generation 4" in text
    assert f"signed by {key.key_id}, expires in 30m" in text
    as_json = json.loads(view_as_json(shown, info(TrustedKeys.of(key))))
    assert as_json["trusted"] is True
    assert as_json["signed_by"] == key.key_id
    assert as_json["expires_at"] == opened.seal.expires_at.isoformat()


def test_an_expired_snapshot_says_so() -> None:
    key = SigningKey.generate()
    issued = datetime.now(UTC) - timedelta(hours=2)
    seal_info = Seal(key_id=key.key_id, issued_at=issued, expires_at=issued + timedelta(hours=1))
    shown = View(
        snapshot=snapshot(2, ("198.18.0.10",)),
        trace_id="",
        nodes=[],
        calico_env={},
        daemonset_generation=1,
        seal=seal_info,
    )
    assert f"signed by {key.key_id}, EXPIRED 60m ago" in render_view(
        shown, info(TrustedKeys.of(key))
    )


@pytest.mark.parametrize(
    ("trusted", "reason"),
    [
        (TrustedKeys.of(SigningKey.generate()), "unknown-key: signed by"),
        (TrustedKeys({}), "no trusted keys"),
    ],
)
def test_a_snapshot_no_trusted_key_signed_is_shown_untrusted_without_its_content(
    trusted: TrustedKeys, reason: str
) -> None:
    sealed = seal(snapshot(7, ("198.18.0.66",)), key=SigningKey.generate())
    opened = open_value(sealed, trusted)
    assert opened.snapshot is None and opened.seal is None
    assert opened.untrusted.startswith(reason)
    shown = View(
        snapshot=None,
        trace_id="",
        nodes=[],
        calico_env={},
        daemonset_generation=1,
        untrusted=opened.untrusted,
    )
    text = render_view(shown, info(trusted))
    assert "snapshot: UNTRUSTED" in text
    assert "198.18.0.66" not in text and "generation 7" not in text
    as_json = json.loads(view_as_json(shown, info(trusted)))
    assert (as_json["trusted"], as_json["snapshot"]) == (False, None)
    assert as_json["untrusted"] == opened.untrusted


def test_plain_bytes_and_a_signed_non_snapshot_are_untrusted_too() -> None:
    key = SigningKey.generate()
    plain = events.encode(snapshot(3, ("198.18.0.10",)))
    assert open_value(plain, TrustedKeys.of(key)).untrusted.startswith("unsigned:")
    garbage = seal_payload(b"not a snapshot", generation=3, cluster="local", key=key)
    assert open_value(garbage, TrustedKeys.of(key)).untrusted.startswith("malformed:")


def test_status_reads_the_env_calico_node_gets_from_a_configmap() -> None:
    from apilane.cli.status import calico_env

    daemonset = {
        "metadata": {"namespace": "calico-system"},
        "spec": {
            "template": {
                "spec": {
                    "containers": [
                        {
                            "name": "calico-node",
                            "env": [
                                {"name": "KUBERNETES_SERVICE_IPS_PORTS", "value": "10.96.0.1:443"},
                                {
                                    "name": "KUBERNETES_APISERVER_ENDPOINTS",
                                    "valueFrom": {
                                        "configMapKeyRef": {
                                            "name": "apilane-kubernetes-endpoints",
                                            "key": "KUBERNETES_APISERVER_ENDPOINTS",
                                        }
                                    },
                                },
                                {"name": "DATASTORE_TYPE", "value": "kubernetes"},
                            ],
                        }
                    ]
                }
            }
        },
    }
    data = {"KUBERNETES_APISERVER_ENDPOINTS": "192.168.5.4:6443"}
    assert calico_env(daemonset, {"apilane-kubernetes-endpoints": data}) == {
        "KUBERNETES_SERVICE_IPS_PORTS": "10.96.0.1:443",
        "KUBERNETES_APISERVER_ENDPOINTS": "192.168.5.4:6443",
    }
    missing = calico_env(daemonset, {})
    assert missing["KUBERNETES_APISERVER_ENDPOINTS"] == (
        "<missing: ConfigMap apilane-kubernetes-endpoints key KUBERNETES_APISERVER_ENDPOINTS>"
    )
