{{/*
The alerting rules, one source for both outputs: the PrometheusRule (prometheusrule.yaml,
behind alerts.prometheusRule.enabled) and the plain rules file deploy/alerts/apilane-rules.yaml
(`make manifests` writes it from this template's default rendering).

Every expression reads a metric the services export (deploy/README.md lists where each is
defined). Aggregations keep `namespace`, so one Prometheus can watch several installs; a
scrape without that label still works (it is then empty on both sides).
*/}}
{{- define "apilane.alertGroups" -}}
{{- $alerts := .Values.alerts -}}
{{- $extra := $alerts.labels | default dict -}}
- name: apilane
  rules:
    - alert: ApilaneProgrammingLatencyHigh
      # From the EndpointSlice change to the map write on the nodes (node-loader histogram).
      expr: |
        histogram_quantile({{ $alerts.programmingLatency.quantile }},
          sum by (namespace, le) (rate(apilane_node_programming_latency_seconds_bucket[5m]))
        ) > {{ $alerts.programmingLatency.objectiveSeconds }}
      for: {{ $alerts.programmingLatency.for }}
      labels:
        severity: {{ $alerts.programmingLatency.severity }}
        {{- with $extra }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      annotations:
        summary: API server endpoint changes reach the nodes' maps too slowly
        description: >-
          The {{ $alerts.programmingLatency.quantile }} quantile of programming latency (EndpointSlice change to
          eBPF map write) in namespace {{`{{ $labels.namespace }}`}} is
          {{`{{ $value | humanizeDuration }}`}}, over the objective of
          {{ $alerts.programmingLatency.objectiveSeconds }}s. Look at discovery's
          change-to-publish latency and the node-loaders' apply duration.
    - alert: ApilaneNodeBehind
      # A node's applied generation below the newest one any node or the renderer holds: the
      # newer snapshot was published, and this node has not applied it.
      expr: |
        apilane_node_applied_generation
          < on (namespace) group_left ()
        max by (namespace) (
          {__name__=~"apilane_node_applied_generation|apilane_renderer_applied_generation"}
        )
      for: {{ $alerts.nodeBehind.for }}
      labels:
        severity: {{ $alerts.nodeBehind.severity }}
        {{- with $extra }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      annotations:
        summary: A node-loader holds an older snapshot than the cluster
        description: >-
          node-loader {{`{{ $labels.instance }}`}} has held generation {{`{{ $value }}`}},
          older than the newest published one, for {{ $alerts.nodeBehind.for }}. The node
          keeps its last good maps; check its logs, its NATS connection and
          apilane_node_apply_failures_total.
    - alert: ApilaneNodeRefusedSnapshots
      # Snapshots a node-loader refused (bad signature, unknown key, malformed, ...).
      expr: |
        increase(apilane_node_snapshots_refused_total[{{ $alerts.snapshotsRefused.window }}]) > 0
      labels:
        severity: {{ $alerts.snapshotsRefused.severity }}
        {{- with $extra }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      annotations:
        summary: A node-loader refused snapshots
        description: >-
          node-loader {{`{{ $labels.instance }}`}} refused
          {{`{{ $value | humanize }}`}} snapshot(s) in the last
          {{ $alerts.snapshotsRefused.window }}, reason {{`{{ $labels.reason }}`}}. Its maps
          keep the last good snapshot. A bad signature or unknown key means someone other
          than discovery wrote the snapshot key, or the trusted keys are out of date.
    - alert: ApilaneRendererRefusedSnapshots
      expr: |
        increase(apilane_renderer_snapshots_refused_total[{{ $alerts.snapshotsRefused.window }}]) > 0
      labels:
        severity: {{ $alerts.snapshotsRefused.severity }}
        {{- with $extra }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      annotations:
        summary: The renderer refused snapshots
        description: >-
          renderer {{`{{ $labels.instance }}`}} refused {{`{{ $value | humanize }}`}}
          snapshot(s) in the last {{ $alerts.snapshotsRefused.window }}, reason
          {{`{{ $labels.reason }}`}}; calico-node keeps its last rendered environment.
    - alert: ApilaneDiscoveryFailStatic
      # discovery saw no API server endpoint (or no Service address) and kept the last good
      # snapshot instead of publishing an empty one.
      expr: |
        increase(apilane_discovery_refused_empty_total[{{ $alerts.failStatic.window }}]) > 0
      labels:
        severity: {{ $alerts.failStatic.severity }}
        {{- with $extra }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      annotations:
        summary: "Fail static engaged: discovery keeps the last good API server set"
        description: >-
          discovery ({{`{{ $labels.instance }}`}}) refused to publish a snapshot without
          endpoints in the last {{ $alerts.failStatic.window }}: the EndpointSlices of
          Service default/kubernetes list no ready API server. Every node keeps the last good
          set; check the API servers and the endpoint reconciler.
    - alert: ApilaneSnapshotKeyReasserted
      # The snapshot key did not hold discovery's snapshot (removed, purged, overwritten,
      # or a stale copy): discovery healed it, but something else writes there.
      expr: |
        sum by (namespace, reason) (increase(apilane_discovery_reasserts_total[{{ $alerts.snapshotKeyReasserted.window }}])) > 0
      labels:
        severity: {{ $alerts.snapshotKeyReasserted.severity }}
        {{- with $extra }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      annotations:
        summary: "The snapshot key was changed by someone other than discovery"
        description: >-
          discovery put its snapshot back into the KV key in the last
          {{ $alerts.snapshotKeyReasserted.window }} (reason {{`{{ $labels.reason }}`}}).
          Nodes kept their maps; find who writes to or purges the snapshot bucket.
    - alert: ApilaneNodeFailStatic
      # A node-loader rejected a snapshot without endpoints and kept its maps.
      expr: |
        increase(apilane_node_apply_failures_total{reason="NoReadyEndpoints"}[{{ $alerts.failStatic.window }}]) > 0
      labels:
        severity: {{ $alerts.failStatic.severity }}
        {{- with $extra }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      annotations:
        summary: "Fail static engaged: a node kept its maps instead of programming no API server"
        description: >-
          node-loader {{`{{ $labels.instance }}`}} received a snapshot without API server
          endpoints in the last {{ $alerts.failStatic.window }} and kept its last good maps.
    - alert: ApilaneBackendsUnhealthy
      # A node's probes fail for an API server backend: it is out of that node's maps (or,
      # when every backend fails, all are kept: apilane_node_health_fail_static).
      expr: |
        min by (namespace, instance, backend) (apilane_node_backend_healthy) == 0
      for: {{ $alerts.backendsUnhealthy.for }}
      labels:
        severity: {{ $alerts.backendsUnhealthy.severity }}
        {{- with $extra }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      annotations:
        summary: A node cannot reach an API server backend
        description: >-
          node-loader {{`{{ $labels.instance }}`}} has found API server backend
          {{`{{ $labels.backend }}`}} unhealthy for {{ $alerts.backendsUnhealthy.for }}: it is
          left out of that node's maps, unless every backend fails, when the node keeps them
          all (apilane_node_health_fail_static is 1). Check the node's path to that API server.
    - alert: ApilaneLeaderMissing
      # Replicas are running, and none of them holds the Lease.
      expr: |
        max by (namespace, lease) (apilane_leader) == 0
      for: {{ $alerts.leaderMissing.for }}
      labels:
        severity: {{ $alerts.leaderMissing.severity }}
        {{- with $extra }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      annotations:
        summary: No replica leads {{`{{ $labels.lease }}`}}
        description: >-
          None of the running replicas has held Lease {{`{{ $labels.namespace }}`}}/{{`{{ $labels.lease }}`}}
          for {{ $alerts.leaderMissing.for }}: nothing publishes snapshots (discovery) or
          patches calico-node (renderer). Check the replicas' logs and their access to the
          API server (RBAC on leases).
{{- end }}
