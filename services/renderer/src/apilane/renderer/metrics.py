"""The renderer's Prometheus metrics, registered on a registry the caller chooses (a registry
per instance lets tests run two renderers in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Every `reason` of apilane_renderer_snapshots_refused_total: SignatureError.reason values,
# judge's Refused reasons, and the renderer's own (another cluster's snapshot, a payload
# that does not decode).
REFUSAL_REASONS = (
    "unsigned",
    "unknown-key",
    "bad-signature",
    "mismatch",
    "expired",
    "not-yet-valid",
    "rollback",
    "equivocation",
    "other-cluster",
    "malformed",
)


class RendererMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.renders = Counter(
            "apilane_renderer_renders_total",
            "Render results published, by outcome.",
            ["outcome"],
            registry=registry,
        )
        self.patches = Counter(
            "apilane_renderer_patches_total",
            "DaemonSet patches accepted by the API server (dry runs excluded): each one rolls"
            " calico-node.",
            registry=registry,
        )
        self.configmap_writes = Counter(
            "apilane_renderer_configmap_writes_total",
            "Writes of the endpoints ConfigMap accepted by the API server (configmap mode; dry"
            " runs excluded): each one rolls nothing.",
            registry=registry,
        )
        self.noop = Counter(
            "apilane_renderer_noop_total",
            "Snapshots that needed no patch: the live DaemonSet already held their env.",
            registry=registry,
        )
        self.failures = Counter(
            "apilane_renderer_failures_total",
            "Snapshots that could not be rendered or applied, and malformed bus messages.",
            ["stage"],
            registry=registry,
        )
        self.refused = Counter(
            "apilane_renderer_snapshots_refused_total",
            "Snapshots refused before anything else (unsigned, untrusted key, bad signature,"
            " an older generation, the held one with other content, expired), by reason.",
            ["reason"],
            registry=registry,
        )
        self.refreshes = Counter(
            "apilane_renderer_refreshes_total",
            "Re-signed copies of the held generation, taken without a patch.",
            registry=registry,
        )
        self.latency = Histogram(
            "apilane_renderer_snapshot_to_patch_seconds",
            "From a snapshot's observed_at to the accepted patch.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=registry,
        )
        self.applied_generation = Gauge(
            "apilane_renderer_applied_generation",
            "The snapshot generation the DaemonSet holds, as far as this replica knows.",
            registry=registry,
        )
        for outcome in ("applied", "unchanged", "dry-run", "failed", "ignored", "waiting"):
            self.renders.labels(outcome)
        for stage in ("decode", "render", "apply", "publish"):
            self.failures.labels(stage)
        for reason in REFUSAL_REASONS:
            self.refused.labels(reason)
