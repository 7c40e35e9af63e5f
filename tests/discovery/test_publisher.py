"""The publishing state machine, against an in-memory stand-in for the bus's KV semantics.

The stand-in is our own protocol (`SnapshotBus`), not nats-py: the real bus is exercised by
the integration tests. Here the rules are checked one by one, fast and deterministically.
Every value is sealed as discovery seals it; `puts` are the snapshots opened again.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest
from prometheus_client import CollectorRegistry

from apilane.discovery.antientropy import Action, Assessment
from apilane.discovery.metrics import DiscoveryMetrics
from apilane.discovery.publisher import ObservedChange, Outcome, Publisher
from apilane.discovery.sealing import Sealer
from apilane.model import events, subjects
from apilane.model.endpoints import SnapshotResult, build_snapshot
from apilane.model.events import ClusterWarning, EndpointSnapshot, Finding, WarningReason
from apilane.model.signing import Envelope, SignedSnapshot, SigningKey, TrustedKeys, open_snapshot
from apilane.runtime.bus import BusError, KvEntry, RevisionMismatch
from apilane.testing.sealing import seal

pytestmark = [pytest.mark.unit]

KEY = "c1"
DISCOVERY = SigningKey.generate()
ITSELF = TrustedKeys.of(DISCOVERY)
TTL = timedelta(hours=1)


class MemoryBus:
    """KV with per-key revisions and compare-and-set, a warnings log, and an outage switch."""

    def __init__(self) -> None:
        self.revision = 0
        self.kv: dict[str, tuple[int, bytes]] = {}
        self.puts: list[EndpointSnapshot] = []
        self.sealed: list[SignedSnapshot] = []  # every value written, verified
        self.warnings: list[ClusterWarning] = []
        self.msg_ids: list[str] = []
        self.down = False
        self.before_put: Any = None  # a hook that may write first, to lose a CAS race

    def _check(self) -> None:
        if self.down:
            raise BusError("nats: no servers available")

    async def kv_get(
        self, bucket: str, key: str, *, include_deleted: bool = False
    ) -> KvEntry | None:
        self._check()
        if key not in self.kv:
            return None
        revision, value = self.kv[key]
        return KvEntry(bucket=bucket, key=key, value=value, revision=revision)

    async def kv_put(
        self,
        bucket: str,
        key: str,
        value: events.Event | bytes,
        *,
        expected_revision: int | None = None,
        msg_id: str | None = None,
        headers: Any = None,
        timeout: float = 5.0,
    ) -> int:
        self._check()
        if self.before_put is not None:
            hook, self.before_put = self.before_put, None
            hook(self)
        current = self.kv.get(key, (0, b""))[0]
        if expected_revision is not None and expected_revision != current:
            raise RevisionMismatch(f"{key} at {current}, expected {expected_revision}")
        assert isinstance(value, bytes), "discovery writes sealed envelopes only"
        self.revision += 1
        self.kv[key] = (self.revision, value)
        opened = open_snapshot(value, ITSELF)
        self.sealed.append(opened)
        if not self.sealed[:-1] or self.sealed[-2].content_digest != opened.content_digest:
            self.puts.append(opened.snapshot)  # a refresh re-signs the same content
        self.msg_ids.append(msg_id or "")
        return self.revision

    async def publish(
        self,
        subject: str,
        event: events.Event,
        *,
        msg_id: str | None = None,
        headers: Any = None,
        timeout: float = 5.0,
    ) -> int:
        self._check()
        assert subject == subjects.warnings_subject(KEY)
        assert isinstance(event, ClusterWarning)
        self.warnings.append(event)
        return len(self.warnings)

    def seed(
        self, generation: int, result: SnapshotResult | None = None, key: SigningKey = DISCOVERY
    ) -> None:
        """Another writer's value: by default another replica's (the same key), of a view
        none of the tests offers."""
        snapshot = (result or view("198.51.100.1")).to_event(
            cluster=KEY, generation=generation, observed_at=datetime.now(UTC)
        )
        self.put_raw(seal(snapshot, key=key))

    def put_raw(self, value: bytes) -> None:
        self.revision += 1
        self.kv[KEY] = (self.revision, value)


class Recorder:
    def __init__(self) -> None:
        self.recorded: list[Finding] = []
        self.fail = False

    async def record(self, finding: Finding) -> None:
        if self.fail:
            raise RuntimeError("apiserver unavailable")
        self.recorded.append(finding)


def view(*ips: str, ds: Any = "ready") -> SnapshotResult:
    slice_ = {
        "metadata": {"name": "kubernetes", "namespace": "default", "resourceVersion": "5"},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ip]} for ip in ips],
        "ports": [{"name": "https", "port": 6443}],
    }
    kube_proxy = None
    if ds == "ready":
        kube_proxy = {
            "metadata": {"name": "kube-proxy"},
            "status": {"desiredNumberScheduled": 1, "numberReady": 1},
        }
    return build_snapshot(
        service={
            "metadata": {"name": "kubernetes"},
            "spec": {
                "clusterIPs": ["10.96.0.1"],
                "ports": [{"name": "https", "port": 443, "targetPort": 6443}],
            },
        },
        endpoint_slices=[slice_],
        kube_proxy=kube_proxy,
        nodes=[],
    )


def change(
    rv: str, *, trigger: datetime | None = None, observed_at: float | None = None
) -> ObservedChange:
    return ObservedChange(
        object_ref="EndpointSlice/default/kubernetes",
        resource_version=rv,
        observed_at=observed_at if observed_at is not None else datetime.now(UTC).timestamp(),
        trigger_time=trigger,
    )


@pytest.fixture
def bus() -> MemoryBus:
    return MemoryBus()


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def publisher(bus: MemoryBus, registry: CollectorRegistry) -> Publisher:
    return Publisher(
        cluster=KEY,
        bus=bus,
        metrics=DiscoveryMetrics(registry),
        sealer=Sealer(DISCOVERY, TTL),
        coalesce_window=0.05,
        retry_initial=0.01,
        retry_max=0.05,
    )


def metric(registry: CollectorRegistry, name: str, labels: dict[str, str] | None = None) -> float:
    return registry.get_sample_value(name, labels or {}) or 0.0


async def test_the_first_publish_is_generation_one_with_compare_and_set(
    publisher: Publisher, bus: MemoryBus, registry: CollectorRegistry
) -> None:
    publisher.offer(view("192.0.2.1"), change("10"))
    assert await publisher.flush() is Outcome.PUBLISHED
    [snapshot] = bus.puts
    assert snapshot.generation == 1
    assert [e.ip for e in snapshot.apiserver_endpoints] == ["192.0.2.1"]
    assert bus.msg_ids == [f"{KEY}:1:{snapshot.digest}"]
    assert "EndpointSlice/default/kubernetes@10" in snapshot.resource_versions
    assert metric(registry, "apilane_discovery_publishes_total") == 1


async def test_a_burst_is_one_publish_naming_every_resource_version(
    publisher: Publisher, bus: MemoryBus, registry: CollectorRegistry
) -> None:
    publisher.offer(view("192.0.2.1"), change("10"))
    publisher.offer(view("192.0.2.1", "192.0.2.2"), change("11"))
    publisher.offer(view("192.0.2.1", "192.0.2.3"), change("12"))
    assert await publisher.flush() is Outcome.PUBLISHED
    [snapshot] = bus.puts
    assert [e.ip for e in snapshot.apiserver_endpoints] == ["192.0.2.1", "192.0.2.3"]
    assert {
        "EndpointSlice/default/kubernetes@10",
        "EndpointSlice/default/kubernetes@11",
        "EndpointSlice/default/kubernetes@12",
    } <= set(snapshot.resource_versions)
    assert metric(registry, "apilane_discovery_coalesced_total") == 2
    assert metric(registry, "apilane_discovery_change_to_publish_seconds_count") == 3


async def test_the_run_loop_publishes_a_lone_change_at_once_and_coalesces_a_burst_behind_it(
    bus: MemoryBus, registry: CollectorRegistry
) -> None:
    """The leading edge goes out at once; what comes within the window after it is one
    trailing publish of the latest view, naming every change it carries."""
    publisher = Publisher(
        cluster=KEY,
        bus=bus,
        metrics=DiscoveryMetrics(registry),
        sealer=Sealer(DISCOVERY, TTL),
        coalesce_window=0.5,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(publisher.run(stop))
    publisher.offer(view("192.0.2.1", "192.0.2.10"), change("0"))
    await until(lambda: len(bus.puts) == 1)
    # No await in between: all four land inside the window the first publish opened.
    for rv in range(1, 5):
        publisher.offer(view("192.0.2.1", f"192.0.2.{10 + rv}"), change(str(rv)))
    assert len(bus.puts) == 1
    await until(lambda: len(bus.puts) == 2)
    await asyncio.sleep(0.6)  # another window: nothing more is pending
    stop.set()
    await asyncio.wait_for(task, 2)
    assert [s.generation for s in bus.puts] == [1, 2]
    assert [e.ip for e in bus.puts[0].apiserver_endpoints] == ["192.0.2.1", "192.0.2.10"]
    assert [e.ip for e in bus.puts[1].apiserver_endpoints] == ["192.0.2.1", "192.0.2.14"]
    assert {f"EndpointSlice/default/kubernetes@{rv}" for rv in range(1, 5)} <= set(
        bus.puts[1].resource_versions
    )
    assert metric(registry, "apilane_discovery_coalesced_total") == 3


async def until(condition: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


async def test_the_same_digest_is_not_published_again(
    publisher: Publisher, bus: MemoryBus, registry: CollectorRegistry
) -> None:
    publisher.offer(view("192.0.2.1", "192.0.2.2"), change("10"))
    await publisher.flush()
    publisher.offer(view("192.0.2.2", "192.0.2.1"), change("11"))
    assert not publisher.pending  # known no-op: not even a KV read
    assert await publisher.flush() is Outcome.IDLE
    assert len(bus.puts) == 1
    assert metric(registry, "apilane_discovery_suppressed_total") == 1


async def test_a_digest_another_replica_already_published_is_not_published_again(
    publisher: Publisher, bus: MemoryBus, registry: CollectorRegistry
) -> None:
    bus.seed(3, view("192.0.2.1"))
    publisher.offer(view("192.0.2.1"), change("10"))
    assert await publisher.flush() is Outcome.SUPPRESSED
    assert bus.puts == []
    assert publisher.last_generation == 3
    assert metric(registry, "apilane_discovery_suppressed_total") == 1


async def test_an_empty_set_is_never_published_and_warns(
    publisher: Publisher, bus: MemoryBus, registry: CollectorRegistry
) -> None:
    publisher.offer(view("192.0.2.1"), change("10"))
    await publisher.flush()
    publisher.offer(view(), change("11"))
    assert await publisher.flush() is Outcome.REFUSED_EMPTY
    assert len(bus.puts) == 1
    assert publisher.last_published is not None
    assert [e.ip for e in publisher.last_published.apiserver_endpoints] == ["192.0.2.1"]
    assert [w.reason for w in bus.warnings] == [WarningReason.NO_READY_ENDPOINTS]
    assert bus.warnings[0].generation == 1
    assert metric(registry, "apilane_discovery_refused_empty_total") == 1


async def test_the_generation_continues_from_the_bucket(
    publisher: Publisher, bus: MemoryBus
) -> None:
    bus.seed(41)
    publisher.offer(view("192.0.2.1"), change("10"))
    await publisher.flush()
    assert bus.puts[-1].generation == 42


async def test_a_lost_compare_and_set_rereads_and_moves_past_the_winner(
    publisher: Publisher, bus: MemoryBus
) -> None:
    bus.seed(5)
    bus.before_put = lambda b: b.seed(9)  # another replica writes generation 9 first
    publisher.offer(view("192.0.2.1"), change("10"))
    assert await publisher.flush() is Outcome.PUBLISHED
    assert bus.puts[-1].generation == 10


async def test_a_generation_never_goes_back_even_if_the_bucket_does(
    publisher: Publisher, bus: MemoryBus
) -> None:
    publisher.offer(view("192.0.2.1"), change("10"))
    await publisher.flush()
    bus.kv.clear()  # e.g. the key was purged
    publisher.offer(view("192.0.2.2"), change("11"))
    await publisher.flush()
    assert [s.generation for s in bus.puts] == [1, 2]


async def test_nats_down_keeps_the_latest_state_and_publishes_it_once_back(
    publisher: Publisher, bus: MemoryBus
) -> None:
    publisher.offer(view("192.0.2.1"), change("10"))
    await publisher.flush()
    bus.down = True
    publisher.offer(view("192.0.2.2"), change("11"))
    assert await publisher.flush() is Outcome.RETRY
    publisher.offer(view("192.0.2.3"), change("12"))
    assert await publisher.flush() is Outcome.RETRY
    assert publisher.pending
    bus.down = False
    assert await publisher.flush() is Outcome.PUBLISHED
    last = bus.puts[-1]
    assert (last.generation, [e.ip for e in last.apiserver_endpoints]) == (2, ["192.0.2.3"])
    assert {"EndpointSlice/default/kubernetes@11", "EndpointSlice/default/kubernetes@12"} <= set(
        last.resource_versions
    )
    assert not publisher.pending


async def test_the_run_loop_retries_with_backoff_until_nats_is_back(
    publisher: Publisher, bus: MemoryBus
) -> None:
    bus.down = True
    stop = asyncio.Event()
    task = asyncio.create_task(publisher.run(stop))
    publisher.offer(view("192.0.2.7"), change("10"))
    await asyncio.sleep(0.2)
    assert bus.puts == []
    bus.down = False
    for _ in range(50):
        if bus.puts:
            break
        await asyncio.sleep(0.02)
    stop.set()
    await asyncio.wait_for(task, 2)
    assert [e.ip for e in bus.puts[0].apiserver_endpoints] == ["192.0.2.7"]


async def test_a_follower_publishes_nothing_until_it_leads(
    bus: MemoryBus, registry: CollectorRegistry
) -> None:
    leading = False
    publisher = Publisher(
        cluster=KEY,
        bus=bus,
        metrics=DiscoveryMetrics(registry),
        sealer=Sealer(DISCOVERY, TTL),
        is_leader=lambda: leading,
    )
    bus.seed(7)
    publisher.offer(view("192.0.2.1"), change("10"))
    assert await publisher.flush() is Outcome.NOT_LEADER
    assert bus.puts == [] and bus.warnings == []
    leading = True
    publisher.wake()
    assert await publisher.flush() is Outcome.PUBLISHED
    assert bus.puts[-1].generation == 8


async def test_warnings_are_emitted_once_while_they_last(
    publisher: Publisher, bus: MemoryBus
) -> None:
    recorder = Recorder()
    publisher.recorder = recorder
    for rv in ("1", "2", "3"):
        publisher.offer(view("192.0.2.1", f"192.0.2.{rv}", ds=None), change(rv))
        await publisher.flush()
    assert [w.reason for w in bus.warnings] == [WarningReason.KUBE_PROXY_MISSING]
    assert [f.reason for f in recorder.recorded] == [WarningReason.KUBE_PROXY_MISSING]
    publisher.offer(view("192.0.2.1"), change("4"))  # kube-proxy is back
    await publisher.flush()
    publisher.offer(view("192.0.2.1", ds=None), change("5"))  # and gone again: warn again
    await publisher.flush()
    assert [w.reason for w in bus.warnings] == [WarningReason.KUBE_PROXY_MISSING] * 2
    assert bus.warnings[0].object_ref == "DaemonSet/kube-system/kube-proxy"


async def test_a_failed_kubernetes_event_does_not_hold_up_publishing_and_is_retried(
    bus: MemoryBus, registry: CollectorRegistry
) -> None:
    recorder = Recorder()
    recorder.fail = True
    publisher = Publisher(
        cluster=KEY,
        bus=bus,
        metrics=DiscoveryMetrics(registry),
        sealer=Sealer(DISCOVERY, TTL),
        recorder=recorder,
        coalesce_window=0.01,
        retry_initial=0.02,
        retry_max=0.05,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(publisher.run(stop))
    publisher.offer(view("192.0.2.1", ds=None), change("1"))
    await asyncio.sleep(0.1)
    assert len(bus.puts) == 1 and len(bus.warnings) == 1
    assert publisher.pending  # the view is not done while its Event is not recorded
    recorder.fail = False
    await asyncio.sleep(0.2)
    stop.set()
    await asyncio.wait_for(task, 2)
    assert [f.reason for f in recorder.recorded] == [WarningReason.KUBE_PROXY_MISSING]
    assert len(bus.puts) == 1 and len(bus.warnings) == 1
    assert not publisher.pending
    # Retrying the Event re-read the bucket and suppressed the snapshot: no publish failure.
    assert metric(registry, "apilane_discovery_publish_failures_total") == 0


async def test_latency_is_measured_from_the_trigger_time(
    publisher: Publisher, registry: CollectorRegistry
) -> None:
    now = datetime.now(UTC).timestamp()
    publisher.clock = lambda: now + 0.5
    publisher.offer(
        view("192.0.2.1"),
        change("1", trigger=datetime.fromtimestamp(now - 1.5, UTC), observed_at=now),
    )
    await publisher.flush()
    assert metric(registry, "apilane_discovery_change_to_publish_seconds_sum") == pytest.approx(2.0)


def test_a_trigger_time_in_the_future_falls_back_to_the_observation_time() -> None:
    observed = 1_000.0
    future = change("1", trigger=datetime.fromtimestamp(2_000.0, UTC), observed_at=observed)
    assert future.started_at == observed


async def test_a_coalesced_publish_continues_the_first_change_trace_and_links_every_change(
    publisher: Publisher, bus: MemoryBus, span_exporter: Any
) -> None:
    from opentelemetry import trace

    tracer = trace.get_tracer("test")
    contexts = []
    for rv, ips in (("10", ("192.0.2.1",)), ("11", ("192.0.2.1", "192.0.2.2"))):
        with tracer.start_as_current_span(
            "discovery observe", context=trace.set_span_in_context(trace.INVALID_SPAN)
        ) as span:
            contexts.append(span.get_span_context())
        observed = change(rv)
        publisher.offer(
            view(*ips),
            ObservedChange(
                object_ref=observed.object_ref,
                resource_version=rv,
                observed_at=observed.observed_at,
                span_context=span.get_span_context(),
            ),
        )
    assert await publisher.flush() is Outcome.PUBLISHED
    [publish] = [s for s in span_exporter.get_finished_spans() if s.name == "discovery publish"]
    assert publish.kind == trace.SpanKind.PRODUCER
    assert publish.context.trace_id == contexts[0].trace_id
    assert publish.parent is not None and publish.parent.span_id == contexts[0].span_id
    assert {link.context.span_id for link in publish.links} == {c.span_id for c in contexts}
    assert publish.attributes["apilane.generation"] == 1


def with_kube_proxy(labels: dict[str, str], *, ready: bool = True) -> SnapshotResult:
    return build_snapshot(
        service={
            "metadata": {"name": "kubernetes"},
            "spec": {
                "clusterIPs": ["10.96.0.1"],
                "ports": [{"name": "https", "port": 443, "targetPort": 6443}],
            },
        },
        endpoint_slices=[
            {
                "metadata": {"name": "kubernetes", "namespace": "default", "resourceVersion": "5"},
                "addressType": "IPv4",
                "endpoints": [{"addresses": ["192.0.2.1"]}],
                "ports": [{"name": "https", "port": 6443}],
            }
        ],
        kube_proxy={
            "metadata": {"name": "kube-proxy", "labels": labels},
            "status": {"desiredNumberScheduled": 2, "numberReady": 2 if ready else 1},
        },
        nodes=[],
    )


async def test_kube_proxy_becoming_externally_managed_is_a_new_generation_but_readiness_is_not(
    publisher: Publisher, bus: MemoryBus
) -> None:
    publisher.offer(with_kube_proxy({}), change("1"))
    assert await publisher.flush() is Outcome.PUBLISHED
    publisher.offer(with_kube_proxy({}, ready=False), change("2"))
    assert await publisher.flush() is Outcome.SUPPRESSED  # a warning, nothing to re-render
    publisher.offer(with_kube_proxy({"app.kubernetes.io/managed-by": "Helm"}), change("3"))
    assert await publisher.flush() is Outcome.PUBLISHED
    assert [s.generation for s in bus.puts] == [1, 2]
    assert bus.puts[0].digest == bus.puts[1].digest
    assert bus.puts[1].kube_proxy.managed_by == "label:app.kubernetes.io/managed-by=Helm"


# -- signing ------------------------------------------------------------------------------------

FORGER = SigningKey.generate()


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


def signed_publisher(bus: MemoryBus, registry: CollectorRegistry, clock: Clock) -> Publisher:
    return Publisher(
        cluster=KEY,
        bus=bus,
        metrics=DiscoveryMetrics(registry),
        sealer=Sealer(DISCOVERY, TTL, now=clock),
        coalesce_window=0.01,
    )


async def test_every_snapshot_is_sealed_with_discoverys_key_for_the_ttl(
    bus: MemoryBus, registry: CollectorRegistry
) -> None:
    clock = Clock()
    publisher = signed_publisher(bus, registry, clock)
    publisher.offer(view("192.0.2.1"), change("10"))
    assert await publisher.flush() is Outcome.PUBLISHED
    [signed] = bus.sealed
    assert signed.header.key_id == DISCOVERY.key_id
    assert (signed.header.issued_at, signed.header.expires_at) == (clock.now, clock.now + TTL)
    assert (signed.header.generation, signed.snapshot.generation) == (1, 1)


def tampered(value: bytes) -> bytes:
    """Discovery's own envelope with one address changed in the signed payload."""
    envelope = msgspec.json.decode(value, type=Envelope)
    payload = envelope.payload.replace(b"192.0.2.1", b"192.0.2.9")
    return msgspec.json.encode(
        Envelope(header=envelope.header, payload=payload, signature=envelope.signature)
    )


@pytest.mark.parametrize(
    ("forge", "reason"),
    [
        pytest.param(lambda s: seal(s, key=FORGER), "unknown-key", id="unknown-key"),
        pytest.param(events.encode, "unsigned", id="unsigned"),
        pytest.param(lambda s: tampered(seal(s, key=DISCOVERY)), "bad-signature", id="tampered"),
    ],
)
async def test_a_value_discovery_cannot_verify_is_replaced_whatever_it_claims(
    publisher: Publisher, bus: MemoryBus, registry: CollectorRegistry, forge: Any, reason: str
) -> None:
    # The forged value claims exactly the endpoints discovery sees, and an absurd generation.
    claimed = view("192.0.2.1").to_event(
        cluster=KEY, generation=2**62, observed_at=datetime.now(UTC)
    )
    bus.seed(1)
    bus.put_raw(forge(claimed))
    forged_revision = bus.revision
    publisher.offer(view("192.0.2.1"), change("10"))
    assert await publisher.flush() is Outcome.PUBLISHED  # not suppressed: it is not discovery's
    [published] = bus.puts
    # Above every generation the key may have held (each was written at a revision at least
    # as high), never taken from the number it did not sign.
    assert published.generation == forged_revision + 1
    assert open_snapshot(bus.kv[KEY][1], ITSELF).snapshot == published
    assert metric(registry, "apilane_discovery_untrusted_entries_total", {"reason": reason}) == 1


async def test_the_refresh_re_signs_the_same_generation_and_payload_with_a_later_expiry(
    bus: MemoryBus, registry: CollectorRegistry
) -> None:
    clock = Clock()
    publisher = signed_publisher(bus, registry, clock)
    publisher.offer(view("192.0.2.1"), change("10"))
    await publisher.flush()
    first = bus.sealed[-1]
    revision = bus.revision
    assert publisher.sealer.refresh_in(first) == TTL.total_seconds() / 2
    clock.now += TTL / 2
    assert publisher.sealer.refresh_in(first) == 0
    assert await publisher.refresh() is Outcome.REFRESHED
    refreshed = bus.sealed[-1]
    assert bus.revision == revision + 1  # written with compare-and-set on the revision it read
    assert refreshed.header.generation == first.header.generation == 1
    assert refreshed.opened.payload == first.opened.payload
    assert refreshed.header.expires_at == clock.now + TTL > first.header.expires_at
    assert len(bus.puts) == 1  # no new content, no new generation
    assert metric(registry, "apilane_discovery_refreshes_total") == 1
    assert bus.msg_ids[0] != bus.msg_ids[1]  # JetStream must not drop it as a duplicate


async def test_a_refresh_that_lost_the_race_reconciles_with_the_bucket_first(
    bus: MemoryBus, registry: CollectorRegistry
) -> None:
    clock = Clock()
    publisher = signed_publisher(bus, registry, clock)
    publisher.offer(view("192.0.2.1"), change("10"))
    await publisher.flush()
    bus.seed(5)  # another replica wrote other content meanwhile
    clock.now += TTL
    assert await publisher.refresh() is Outcome.IDLE
    assert publisher.pending
    assert await publisher.flush() is Outcome.PUBLISHED
    assert [s.generation for s in bus.puts] == [1, 6]


async def test_a_follower_re_signs_nothing(bus: MemoryBus, registry: CollectorRegistry) -> None:
    leading = True
    publisher = Publisher(
        cluster=KEY,
        bus=bus,
        metrics=DiscoveryMetrics(registry),
        sealer=Sealer(DISCOVERY, TTL),
        is_leader=lambda: leading,
    )
    publisher.offer(view("192.0.2.1"), change("10"))
    await publisher.flush()
    leading = False
    assert await publisher.refresh() is Outcome.RETRY
    assert len(bus.sealed) == 1


async def test_the_last_good_snapshot_is_kept_valid_while_the_view_has_no_endpoints(
    bus: MemoryBus, registry: CollectorRegistry
) -> None:
    clock = Clock()
    publisher = signed_publisher(bus, registry, clock)
    publisher.offer(view("192.0.2.1"), change("10"))
    await publisher.flush()
    publisher.wake()  # e.g. a new term: nothing known until the bucket is read again
    publisher.offer(view(), change("11"))
    assert await publisher.flush() is Outcome.REFUSED_EMPTY
    clock.now += TTL / 2
    assert await publisher.refresh() is Outcome.REFRESHED
    assert [e.ip for e in bus.sealed[-1].snapshot.apiserver_endpoints] == ["192.0.2.1"]


async def test_the_run_loop_re_signs_before_expiry(
    bus: MemoryBus, registry: CollectorRegistry
) -> None:
    publisher = Publisher(
        cluster=KEY,
        bus=bus,
        metrics=DiscoveryMetrics(registry),
        sealer=Sealer(DISCOVERY, timedelta(seconds=0.4)),
        coalesce_window=0.01,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(publisher.run(stop))
    publisher.offer(view("192.0.2.1"), change("10"))
    await asyncio.sleep(1.0)
    stop.set()
    await asyncio.wait_for(task, 2)
    assert len(bus.puts) == 1
    assert len(bus.sealed) >= 3  # the publish, then a refresh about every 0.2 s
    for earlier, later in zip(bus.sealed, bus.sealed[1:], strict=False):
        assert later.header.generation == earlier.header.generation
        # Each one is re-signed before the one before it expires.
        assert later.header.issued_at < earlier.header.expires_at


# -- anti-entropy: putting this term's snapshot back


async def test_a_deleted_key_gets_the_same_generation_back_re_sealed(
    bus: MemoryBus, registry: CollectorRegistry
) -> None:
    clock = Clock()
    publisher = signed_publisher(bus, registry, clock)
    assert publisher.asserted is None
    publisher.offer(view("192.0.2.1"), change("10"))
    await publisher.flush()
    first = bus.sealed[-1]
    asserted = publisher.asserted
    assert asserted is not None and asserted.revision == bus.revision
    del bus.kv[KEY]  # deleted (the memory bus keeps no marker)
    clock.now += timedelta(minutes=1)
    assessment = Assessment(Action.REASSERT, "missing")
    assert await publisher.reassert(None, assessment) is True
    again = bus.sealed[-1]
    assert again.header.generation == first.header.generation == 1
    assert again.opened.payload == first.opened.payload
    assert again.header.expires_at > first.header.expires_at
    assert len(bus.puts) == 1  # no new content: consumers see a refresh
    assert bus.msg_ids[-1] != bus.msg_ids[0]  # not dropped as a duplicate
    now_asserted = publisher.asserted
    assert now_asserted is not None and now_asserted.revision == bus.revision
    assert metric(registry, "apilane_discovery_reasserts_total", {"reason": "missing"}) == 1


async def test_a_reassertion_that_lost_the_race_writes_nothing(
    bus: MemoryBus, registry: CollectorRegistry
) -> None:
    publisher = signed_publisher(bus, registry, Clock())
    publisher.offer(view("192.0.2.1"), change("10"))
    await publisher.flush()
    bus.put_raw(b"garbage")
    stale = KvEntry(bucket="b", key=KEY, value=b"", revision=1)  # observed before the write
    assert await publisher.reassert(stale, Assessment(Action.REASSERT, "unsigned")) is False
    assert bus.kv[KEY][1] == b"garbage"
    assert metric(registry, "apilane_discovery_reasserts_total", {"reason": "unsigned"}) == 0


async def test_a_follower_puts_nothing_back(bus: MemoryBus, registry: CollectorRegistry) -> None:
    leading = True
    publisher = Publisher(
        cluster=KEY,
        bus=bus,
        metrics=DiscoveryMetrics(registry),
        sealer=Sealer(DISCOVERY, TTL),
        is_leader=lambda: leading,
    )
    publisher.offer(view("192.0.2.1"), change("10"))
    await publisher.flush()
    leading = False
    assert publisher.asserted is None
    del bus.kv[KEY]
    assert await publisher.reassert(None, Assessment(Action.REASSERT, "missing")) is False
    assert KEY not in bus.kv


@pytest.mark.parametrize(
    ("overwrite", "reason"),
    [
        pytest.param(lambda bus: bus.put_raw(b"garbage"), "unsigned", id="garbage"),
        pytest.param(lambda bus: bus.seed(1, view("192.0.2.1"), FORGER), "unknown-key", id="key"),
    ],
)
async def test_a_reconcile_after_a_foreign_write_puts_the_snapshot_back_when_nothing_changed(
    bus: MemoryBus, registry: CollectorRegistry, overwrite: Any, reason: str
) -> None:
    """The refresh lost its compare-and-set to a foreign value: the publisher reads the
    bucket, and since the view is what it published, puts the same generation back."""
    clock = Clock()
    publisher = signed_publisher(bus, registry, clock)
    publisher.offer(view("192.0.2.1"), change("10"))
    await publisher.flush()
    overwrite(bus)
    clock.now += TTL / 2
    assert await publisher.refresh() is Outcome.IDLE
    publisher.offer(view("192.0.2.1"), change("11"))  # an unrelated change, same inputs
    assert await publisher.flush() is Outcome.REASSERTED
    assert [s.header.generation for s in bus.sealed] == [1, 1]
    assert open_snapshot(bus.kv[KEY][1], ITSELF).header.generation == 1
    assert metric(registry, "apilane_discovery_reasserts_total", {"reason": reason}) == 1
    assert metric(registry, "apilane_discovery_publishes_total") == 1


async def test_an_older_snapshot_of_discoverys_put_back_is_replaced_by_the_newer_one(
    bus: MemoryBus, registry: CollectorRegistry
) -> None:
    clock = Clock()
    publisher = signed_publisher(bus, registry, clock)
    publisher.offer(view("192.0.2.1"), change("10"))
    await publisher.flush()
    old_value = bus.kv[KEY][1]
    publisher.offer(view("192.0.2.2"), change("11"))
    await publisher.flush()
    bus.put_raw(old_value)  # a replay of generation 1
    clock.now += TTL / 2
    assert await publisher.refresh() is Outcome.IDLE
    publisher.offer(view("192.0.2.2"), change("12"))
    assert await publisher.flush() is Outcome.REASSERTED
    held = open_snapshot(bus.kv[KEY][1], ITSELF)
    assert held.header.generation == 2
    assert [e.ip for e in held.snapshot.apiserver_endpoints] == ["192.0.2.2"]
    assert metric(registry, "apilane_discovery_reasserts_total", {"reason": "rollback"}) == 1


async def test_new_inputs_after_a_foreign_write_are_a_new_generation(
    bus: MemoryBus, registry: CollectorRegistry
) -> None:
    publisher = signed_publisher(bus, registry, Clock())
    publisher.offer(view("192.0.2.1"), change("10"))
    await publisher.flush()
    bus.put_raw(b"garbage")
    publisher.offer(view("192.0.2.2"), change("11"))
    assert await publisher.flush() is Outcome.PUBLISHED
    assert [s.generation for s in bus.puts] == [1, 3]  # above the garbage's revision
    assert metric(registry, "apilane_discovery_reasserts_total", {"reason": "unsigned"}) == 0


async def test_a_new_term_does_not_put_back_what_an_earlier_term_published(
    bus: MemoryBus, registry: CollectorRegistry
) -> None:
    """Another replica may have published since: only what the bucket holds now is known."""
    publisher = signed_publisher(bus, registry, Clock())
    publisher.offer(view("192.0.2.1"), change("10"))
    await publisher.flush()
    del bus.kv[KEY]
    publisher.wake()
    assert publisher.asserted is None
    assert await publisher.flush() is Outcome.PUBLISHED
    assert [s.generation for s in bus.puts] == [1, 2]
