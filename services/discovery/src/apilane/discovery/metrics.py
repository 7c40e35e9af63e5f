"""discovery's Prometheus metrics, registered on a registry the caller chooses.

A registry per service instance lets tests run two replicas in one process; `__main__`
passes the default registry so `/metrics` serves them.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from apilane.kube import watch

# Latency buckets from 5 ms (a change coalesced on its own) to 2 min (NATS was down).
LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    120.0,
)
WATCHED_RESOURCES = ("services", "endpointslices", "daemonsets", "nodes")


class DiscoveryMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.publishes = Counter(
            "apilane_discovery_publishes_total",
            "Endpoint snapshots written to the KV bucket.",
            registry=registry,
        )
        self.suppressed = Counter(
            "apilane_discovery_suppressed_total",
            "Observed changes that did not change the digest, so nothing was published.",
            registry=registry,
        )
        self.coalesced = Counter(
            "apilane_discovery_coalesced_total",
            "Observed changes folded into another change's publish by the coalescing window.",
            registry=registry,
        )
        self.refused_empty = Counter(
            "apilane_discovery_refused_empty_total",
            "Snapshots not published because they had no endpoints (the last good one stays).",
            registry=registry,
        )
        self.refreshes = Counter(
            "apilane_discovery_refreshes_total",
            "Snapshots re-signed with a later expiry (same generation and content).",
            registry=registry,
        )
        self.untrusted_entries = Counter(
            "apilane_discovery_untrusted_entries_total",
            "KV values discovery read back and could not verify as its own, by reason (its next"
            " publish replaces them).",
            ["reason"],
            registry=registry,
        )
        self.reasserts = Counter(
            "apilane_discovery_reasserts_total",
            "Times the leader put its snapshot back into the KV key (same generation, re-sealed)"
            " because the key was missing, deleted, purged or held something else, by reason.",
            ["reason"],
            registry=registry,
        )
        self.publish_failures = Counter(
            "apilane_discovery_publish_failures_total",
            "Publish attempts that failed (NATS unreachable, compare-and-set lost repeatedly).",
            registry=registry,
        )
        self.warnings = Counter(
            "apilane_discovery_warnings_total",
            "Warnings emitted, by reason.",
            ["reason"],
            registry=registry,
        )
        self.change_to_publish = Histogram(
            "apilane_discovery_change_to_publish_seconds",
            "From an EndpointSlice change (its last-change-trigger-time, else when observed) to"
            " the KV write that published it.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        registry.register(_WatchRestarts())


class _WatchRestarts(Collector):
    """apilane_discovery_watch_restarts_total, read from `watching`'s own process-wide counter
    for the resources discovery watches (so restarts are counted in one place)."""

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "apilane_discovery_watch_restarts",
            "Watch restarts of discovery's four watches, by resource and reason.",
            labels=["resource", "reason"],
        )
        for metric in watch.WATCH_RESTARTS.collect():
            for sample in metric.samples:
                if not sample.name.endswith("_total"):
                    continue
                resource = sample.labels.get("resource", "")
                if resource in WATCHED_RESOURCES:
                    family.add_metric([resource, sample.labels.get("reason", "")], sample.value)
        yield family

    def describe(self) -> Iterator[CounterMetricFamily]:
        # Registering must not call collect() (the counter may not exist yet in tests).
        yield CounterMetricFamily(
            "apilane_discovery_watch_restarts",
            "Watch restarts of discovery's four watches, by resource and reason.",
            labels=["resource", "reason"],
        )
