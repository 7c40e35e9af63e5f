"""`apilane history` against a real nats-server with the production permissions: snapshots
sealed and published as discovery's identity (one forged by an unknown key among them),
read back as the operator's identity, which may read every revision and write none."""

from __future__ import annotations

import asyncio
import json
import secrets

import pytest
from opentelemetry.sdk.trace import TracerProvider

from apilane.cli.main import main
from apilane.model import events, signing, subjects
from apilane.model.signing import SigningKey, TrustedKeys
from apilane.runtime.bus import Bus, PermissionDenied
from apilane.runtime.natsauth import Role
from apilane.testing.nats import NatsServer
from apilane.testing.nats_fixtures import ConnectAs
from apilane.testing.sealing import TEST_KEY, put_sealed, seal
from apilane.testing.snapshots import make_snapshot

pytestmark = [pytest.mark.integration, pytest.mark.nats]

TEMPLATE = "https://traces.example/trace/{trace_id}"


async def publish_traced(bus: Bus, snapshot: events.EndpointSnapshot, key: SigningKey) -> str:
    """Seal and write `snapshot` inside a span, as discovery does; returns the trace id."""
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("publish snapshot") as span:
        await put_sealed(bus, seal(snapshot, key=key), cluster=snapshot.cluster)
    return f"{span.get_span_context().trace_id:032x}"


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch, nats_server: NatsServer) -> str:
    """A fresh cluster name, and the command's environment: the operator's identity."""
    name = f"c-{secrets.token_hex(4)}"
    for variable, value in nats_server.env(Role.OPERATOR, name).items():
        monkeypatch.setenv(variable, value)
    monkeypatch.setenv("APILANE_TRACE_URL_TEMPLATE", TEMPLATE)
    return name


async def test_history_lists_each_generation_its_diff_signature_and_trace(
    bus: Bus,
    nats_server: NatsServer,
    connect_as: ConnectAs,
    cluster: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key = SigningKey.generate()
    monkeypatch.setenv("APILANE_TRUSTED_KEYS", key.public_text)
    discovery = await connect_as(Role.DISCOVERY, cluster)
    neighbour = f"c-{secrets.token_hex(4)}"
    other = await connect_as(Role.DISCOVERY, neighbour)
    traces = [
        await publish_traced(
            discovery,
            make_snapshot(cluster=cluster, generation=1, apiservers=["198.18.0.10:6443"]),
            key,
        ),
        await publish_traced(
            other,
            make_snapshot(cluster=neighbour, generation=1, apiservers=["198.18.9.9:6443"]),
            key,
        ),
        await publish_traced(
            discovery,
            make_snapshot(
                cluster=cluster, generation=2, apiservers=["198.18.0.10:6443", "198.18.0.11:6443"]
            ),
            key,
        ),
        # Written with discovery's identity but not its key: a stolen NATS credential.
        await publish_traced(
            discovery,
            make_snapshot(cluster=cluster, generation=3, apiservers=["203.0.113.66:6443"]),
            SigningKey.generate(),
        ),
        await publish_traced(
            discovery,
            make_snapshot(cluster=cluster, generation=4, apiservers=["198.18.0.11:8443"]),
            key,
        ),
    ]
    mine = [traces[0], *traces[2:]]
    url = bus.nc.connected_url
    assert url is not None
    stack = ["--nats-url", f"nats://{url.hostname}:{url.port}", "--cluster", cluster]

    assert await asyncio.to_thread(main, [*stack, "history", "--output", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["cluster"], report["history"]) == (cluster, subjects.SNAPSHOT_HISTORY)
    kept = report["generations"]
    assert [(g["generation"], g["trusted"]) for g in kept] == [
        (1, True),
        (2, True),
        (None, False),
        (4, True),
    ]
    assert [g["trace_id"] for g in kept] == mine
    assert [g["trace_url"] for g in kept] == [TEMPLATE.format(trace_id=t) for t in mine]
    assert all(g["written_at"] for g in kept)
    assert [g["revision"] for g in kept] == sorted(g["revision"] for g in kept)
    assert kept[0]["signed_by"] == key.key_id
    assert kept[1]["diff"]["apiservers_added"] == ["198.18.0.11:6443"]
    assert kept[1]["diff"]["apiservers_removed"] == []
    assert kept[2]["untrusted"].startswith("unknown-key:") and kept[2]["snapshot"] is None
    # Generation 4 is diffed against 2, the last one a consumer would have applied.
    assert kept[3]["diff"] == {
        "apiservers_added": ["198.18.0.11:8443"],
        "apiservers_removed": ["198.18.0.10:6443", "198.18.0.11:6443"],
        "services_added": [],
        "services_removed": [],
        "ports_before": ["443/TCP", "6443/TCP"],
        "ports_after": ["443/TCP", "8443/TCP"],
        "first": False,
    }
    assert kept[0]["diff"]["first"] is True

    assert await asyncio.to_thread(main, ["history", *stack]) == 0  # options after it
    text = capsys.readouterr().out
    assert f"cluster '{cluster}': 4 kept revision(s)" in text
    assert "+ API server 198.18.0.11:6443" in text
    assert "~ ports 443/TCP, 6443/TCP -> 443/TCP, 8443/TCP" in text
    assert "UNTRUSTED, not shown (unknown-key" in text and "203.0.113.66" not in text
    assert f"trace: https://traces.example/trace/{traces[0]}" in text
    assert "198.18.9.9" not in text  # the other cluster's key is not this one's history
    assert "1 revision(s) did NOT verify against the trusted keys" in text


async def test_history_of_a_cluster_without_snapshots_is_empty(
    bus: Bus, cluster: str, capsys: pytest.CaptureFixture[str]
) -> None:
    url = bus.nc.connected_url
    assert url is not None
    argv = ["--nats-url", f"nats://{url.hostname}:{url.port}", "--cluster", cluster, "history"]
    assert await asyncio.to_thread(main, argv) == 0
    assert "no snapshot published yet" in capsys.readouterr().out


async def test_the_bucket_keeps_the_last_revisions_and_the_reader_may_not_write(
    bus: Bus, connect_as: ConnectAs, cluster: str
) -> None:
    """kv_history returns what the bucket's history setting keeps, oldest first; the
    operator's identity reads it (the CLI's) and cannot write the key."""
    discovery = await connect_as(Role.DISCOVERY, cluster)
    key = subjects.snapshot_key(cluster)
    total = subjects.SNAPSHOT_HISTORY + 3
    for generation in range(1, total + 1):
        snapshot = make_snapshot(cluster=cluster, generation=generation)
        await put_sealed(discovery, seal(snapshot), cluster=cluster)
    operator = await connect_as(Role.OPERATOR, cluster)
    kept = await operator.kv_history(subjects.SNAPSHOT_BUCKET, key)
    assert len(kept) == subjects.SNAPSHOT_HISTORY
    trusted = TrustedKeys.parse(TEST_KEY.public_text, source="test")
    generations = [signing.open_snapshot(e.value, trusted).snapshot.generation for e in kept]
    assert generations == list(range(total - subjects.SNAPSHOT_HISTORY + 1, total + 1))
    revisions = [entry.revision for entry in kept]
    assert revisions == sorted(revisions) and len(set(revisions)) == len(revisions)
    assert all(entry.operation == "PUT" and entry.written_at is not None for entry in kept)
    renderer = await connect_as(Role.RENDERER, cluster)
    assert [
        e.revision for e in await renderer.kv_history(subjects.SNAPSHOT_BUCKET, key)
    ] == revisions
    with pytest.raises(PermissionDenied):
        await operator.kv_put(subjects.SNAPSHOT_BUCKET, key, b"forged")
    assert [
        e.revision for e in await operator.kv_history(subjects.SNAPSHOT_BUCKET, key)
    ] == revisions


async def test_history_before_the_bucket_exists_says_so(
    nats_server: NatsServer, connect_as: ConnectAs, cluster: str, capsys: pytest.CaptureFixture[str]
) -> None:
    operator = await connect_as(Role.OPERATOR, cluster)  # nobody provisioned the streams
    url = operator.nc.connected_url
    assert url is not None
    argv = ["--nats-url", f"nats://{url.hostname}:{url.port}", "--cluster", cluster, "history"]
    assert await asyncio.to_thread(main, argv) == 1
    assert f"bucket {subjects.SNAPSHOT_BUCKET} does not exist" in capsys.readouterr().err
