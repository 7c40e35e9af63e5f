{{/*
Shared pieces of the apilane chart. Object names are fixed (apilane-discovery, ...), not
derived from the release name: apilane is one install per cluster (its RBAC lives in
fixed namespaces such as default and kube-system, and it patches one calico-node).
*/}}

{{- define "apilane.namespace" -}}
{{- required "namespace.name must be set" .Values.namespace.name -}}
{{- end }}

{{/* An image reference: (list $ .Values.<service>.image). Empty fields fall back to .Values.image. */}}
{{- define "apilane.image" -}}
{{- $root := index . 0 -}}
{{- $image := index . 1 -}}
{{- $registry := $image.registry | default $root.Values.image.registry -}}
{{- $tag := $image.tag | default $root.Values.image.tag | default $root.Chart.AppVersion -}}
{{- if $registry }}{{ $registry }}/{{ end }}{{ required "an image repository must be set" $image.repository }}:{{ $tag }}
{{- end }}

{{- define "apilane.pullPolicy" -}}
{{- $root := index . 0 -}}
{{- $image := index . 1 -}}
{{- $image.pullPolicy | default $root.Values.image.pullPolicy -}}
{{- end }}

{{/* The bundled NATS servers' per-pod DNS names: (list $ port scheme). */}}
{{- define "apilane.natsServers" -}}
{{- $root := index . 0 -}}
{{- $port := index . 1 -}}
{{- $scheme := index . 2 -}}
{{- $servers := list -}}
{{- range $i := until (int $root.Values.nats.bundled.replicas) -}}
{{- $servers = append $servers (printf "%s://nats-%d.nats-headless.%s.svc:%d" $scheme $i (include "apilane.namespace" $root) (int $port)) -}}
{{- end -}}
{{- join "," $servers -}}
{{- end }}

{{/* The bundled servers take TLS only (tls://); listed servers are taken as given. */}}
{{- define "apilane.natsUrls" -}}
{{- if .Values.nats.urls -}}
{{- join "," .Values.nats.urls -}}
{{- else if .Values.nats.bundled.enabled -}}
{{- include "apilane.natsServers" (list . 4222 "tls") -}}
{{- else -}}
{{- fail "nats.urls must list the NATS servers when nats.bundled.enabled is false" -}}
{{- end -}}
{{- end }}

{{/* "true" when the services reach NATS over TLS (the bundled servers, or a tls:// URL). */}}
{{- define "apilane.natsTls" -}}
{{- if contains "tls://" (include "apilane.natsUrls" .) }}true{{ end -}}
{{- end }}

{{/* A list of names as the renderer reads it: comma-separated, "-" for none. */}}
{{- define "apilane.nameList" -}}
{{- if . }}{{ join "," . }}{{ else }}-{{ end -}}
{{- end }}

{{/* Checks across values; each value on its own is checked by values.schema.json. */}}
{{- define "apilane.validate" -}}
{{- $namespace := include "apilane.namespace" . -}}
{{- if has $namespace (list "default" "kube-system") -}}
{{- fail (printf "namespace.name %q: discovery's Roles in default and kube-system would collide with its own; install into a namespace of its own" $namespace) -}}
{{- end -}}
{{- if eq $namespace (include "apilane.rendererTarget" . | fromJson).namespace -}}
{{- fail (printf "renderer.target.namespace %q is apilane's own namespace: the renderer's two Roles would collide" $namespace) -}}
{{- end -}}
{{- end }}

{{/*
Environment common to discovery and the renderer: leader election, the Lease in the pod's
own namespace, the replica's identity. (list $ "<service>").
*/}}
{{- define "apilane.leaderEnv" -}}
{{- $root := index . 0 -}}
{{- $election := $root.Values.leaderElection -}}
- name: APILANE_LEADER_ELECTION
  value: {{ $election.enabled | toString | quote }}
- name: APILANE_LEASE_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: APILANE_POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
{{- with $election.leaseDuration }}
- name: APILANE_LEASE_DURATION
  value: {{ . | quote }}
{{- end }}
{{- with $election.renewInterval }}
- name: APILANE_LEASE_RENEW_INTERVAL
  value: {{ . | quote }}
{{- end }}
{{- with $election.retryInterval }}
- name: APILANE_LEASE_RETRY_INTERVAL
  value: {{ . | quote }}
{{- end }}
{{- end }}

{{/*
NATS: each service connects as its own identity, an nkey seed in a Secret of its own
(<credentialsSecretPrefix>-discovery, -renderer: seed.nk; -node-loader: one <node name>.nk per
node, of which each pod mounts only its own node's), with the servers' CA beside it (ca.crt)
unless nats.tls.caSecret names another Secret for it. (list $ "<service>"), the service being
discovery, renderer or node-loader.
*/}}
{{- define "apilane.natsAuthEnv" -}}
{{- $root := index . 0 -}}
{{- $nats := $root.Values.nats -}}
{{- if $nats.credentialsSecretPrefix }}
# Its own NATS identity (Secret {{ $nats.credentialsSecretPrefix }}-{{ index . 1 }}): see deploy/README.md, "NATS".
- name: APILANE_NATS_NKEY_SEED_FILE
  value: /etc/apilane/nats/seed.nk
{{- end }}
{{- if include "apilane.natsTls" $root }}
{{- if $nats.tls.caSecret }}
- name: APILANE_NATS_TLS_CA_FILE
  value: /etc/apilane/nats-tls/{{ $nats.tls.caKey }}
{{- else if $nats.credentialsSecretPrefix }}
# The CA that signed the NATS servers' certificates.
- name: APILANE_NATS_TLS_CA_FILE
  value: /etc/apilane/nats/ca.crt
{{- end }}
{{- end }}
{{- end }}

{{- define "apilane.natsAuthMounts" -}}
{{- $root := index . 0 -}}
{{- $service := index . 1 -}}
{{- $nats := $root.Values.nats -}}
{{- if and $nats.credentialsSecretPrefix (eq $service "node-loader") }}
# The one key named after this pod's node, never the whole Secret.
- name: nats-credentials
  mountPath: /etc/apilane/nats/seed.nk
  subPathExpr: $(APILANE_NODE_NAME).nk
  readOnly: true
{{- if and (include "apilane.natsTls" $root) (not $nats.tls.caSecret) }}
- name: nats-credentials
  mountPath: /etc/apilane/nats/ca.crt
  subPath: ca.crt
  readOnly: true
{{- end }}
{{- else if $nats.credentialsSecretPrefix }}
- name: nats-credentials
  mountPath: /etc/apilane/nats
  readOnly: true
{{- end }}
{{- if and $nats.tls.caSecret (include "apilane.natsTls" $root) }}
- name: nats-tls
  mountPath: /etc/apilane/nats-tls
  readOnly: true
{{- end }}
{{- end }}

{{- define "apilane.natsAuthVolumes" -}}
{{- $root := index . 0 -}}
{{- $service := index . 1 -}}
{{- $nats := $root.Values.nats -}}
{{- with $nats.credentialsSecretPrefix }}
- name: nats-credentials
  secret:
    secretName: {{ . }}-{{ $service }}
    {{- if eq $service "node-loader" }}
    defaultMode: 0400
    {{- else }}
    defaultMode: 0440  # readable by the fsGroup the service runs with
    {{- end }}
{{- end }}
{{- if and $nats.tls.caSecret (include "apilane.natsTls" $root) }}
- name: nats-tls
  secret:
    secretName: {{ $nats.tls.caSecret }}
{{- end }}
{{- end }}

{{- define "apilane.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* nodeSelector, tolerations and affinity of one workload: (dict with those keys). */}}
{{- define "apilane.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* The trusted keys of a snapshot consumer (renderer, node-loader): env, mount, volume. */}}
{{- define "apilane.trustedKeysEnv" -}}
{{- with .Values.signing.trustedKeysConfigMap }}
# The public keys snapshots must be signed with (deploy/README.md: "Signing keys").
- name: APILANE_TRUSTED_KEYS_FILE
  value: /etc/apilane/trusted/{{ $.Values.signing.trustedKeysConfigMapKey }}
{{- end }}
{{- end }}

{{- define "apilane.trustedKeysMounts" -}}
{{- if .Values.signing.trustedKeysConfigMap }}
- name: trusted-keys
  mountPath: /etc/apilane/trusted
  readOnly: true
{{- end }}
{{- end }}

{{- define "apilane.trustedKeysVolumes" -}}
{{- with .Values.signing.trustedKeysConfigMap }}
- name: trusted-keys
  configMap:
    name: {{ . }}
{{- end }}
{{- end }}

{{/*
The renderer's target: the preset's layout (operator: calico-system/calico-node with the
ebpf-bootstrap init container; manifest: kube-system/calico-node, no init container), each
field overridden by renderer.target when set (an empty list: none of that kind). As JSON.
*/}}
{{- define "apilane.rendererTarget" -}}
{{- $target := .Values.renderer.target -}}
{{- $presets := dict
  "operator" (dict "namespace" "calico-system" "initContainers" (list "ebpf-bootstrap") "containers" (list "calico-node"))
  "manifest" (dict "namespace" "kube-system" "initContainers" (list) "containers" (list "calico-node")) -}}
{{- $preset := get $presets ($target.preset | default "operator") -}}
{{- $init := $preset.initContainers -}}
{{- if not (kindIs "invalid" $target.initContainers) }}{{ $init = $target.initContainers }}{{ end -}}
{{- $containers := $preset.containers -}}
{{- if not (kindIs "invalid" $target.containers) }}{{ $containers = $target.containers }}{{ end -}}
{{- dict "preset" ($target.preset | default "operator") "namespace" ($target.namespace | default $preset.namespace) "daemonSet" ($target.daemonSet | default "calico-node") "initContainers" $init "containers" $containers | toJson -}}
{{- end }}
