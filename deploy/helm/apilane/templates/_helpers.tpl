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

{{/* The bundled NATS servers' per-pod DNS names: (list $ port). */}}
{{- define "apilane.natsServers" -}}
{{- $root := index . 0 -}}
{{- $port := index . 1 -}}
{{- $servers := list -}}
{{- range $i := until (int $root.Values.nats.bundled.replicas) -}}
{{- $servers = append $servers (printf "nats://nats-%d.nats-headless.%s.svc:%d" $i (include "apilane.namespace" $root) (int $port)) -}}
{{- end -}}
{{- join "," $servers -}}
{{- end }}

{{- define "apilane.natsUrls" -}}
{{- if .Values.nats.urls -}}
{{- join "," .Values.nats.urls -}}
{{- else if .Values.nats.bundled.enabled -}}
{{- include "apilane.natsServers" (list . 4222) -}}
{{- else -}}
{{- fail "nats.urls must list the NATS servers when nats.bundled.enabled is false" -}}
{{- end -}}
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
{{- if eq $namespace .Values.renderer.target.namespace -}}
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

{{/* NATS credentials and CA for one service: env entries. (list $ "<credentialsKeys key>"). */}}
{{- define "apilane.natsAuthEnv" -}}
{{- $root := index . 0 -}}
{{- $service := index . 1 -}}
{{- $nats := $root.Values.nats -}}
{{- if $nats.credentialsSecret }}
- name: APILANE_NATS_NKEY_SEED_FILE
  value: /etc/apilane/nats/{{ required (printf "nats.credentialsKeys.%s must be set" $service) (index $nats.credentialsKeys $service) }}
{{- end }}
{{- if $nats.tls.caSecret }}
- name: APILANE_NATS_TLS_CA_FILE
  value: /etc/apilane/nats-tls/{{ $nats.tls.caKey }}
{{- end }}
{{- end }}

{{- define "apilane.natsAuthMounts" -}}
{{- if .Values.nats.credentialsSecret }}
- name: nats-credentials
  mountPath: /etc/apilane/nats
  readOnly: true
{{- end }}
{{- if .Values.nats.tls.caSecret }}
- name: nats-tls
  mountPath: /etc/apilane/nats-tls
  readOnly: true
{{- end }}
{{- end }}

{{- define "apilane.natsAuthVolumes" -}}
{{- if .Values.nats.credentialsSecret }}
- name: nats-credentials
  secret:
    secretName: {{ .Values.nats.credentialsSecret }}
    defaultMode: 0440
{{- end }}
{{- if .Values.nats.tls.caSecret }}
- name: nats-tls
  secret:
    secretName: {{ .Values.nats.tls.caSecret }}
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
