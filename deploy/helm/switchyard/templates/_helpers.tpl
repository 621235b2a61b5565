{{/* Names and labels. */}}
{{- define "switchyard.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "switchyard.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "switchyard.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "switchyard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: switchyard
{{- end -}}

{{/* Selector labels of one component: (dict "root" $ "component" "router"). */}}
{{- define "switchyard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "switchyard.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "switchyard.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* Secret names: the operator's existing ones, else the chart's. */}}
{{- define "switchyard.connectionsSecret" -}}
{{- .Values.connections.existingSecret | default (printf "%s-connections" (include "switchyard.fullname" .)) -}}
{{- end -}}
{{- define "switchyard.keysSecret" -}}
{{- .Values.secrets.existingSecret | default (printf "%s-keys" (include "switchyard.fullname" .)) -}}
{{- end -}}
{{- define "switchyard.providerKeysSecret" -}}
{{- .Values.providerKeys.existingSecret | default (printf "%s-provider-keys" (include "switchyard.fullname" .)) -}}
{{- end -}}
{{/* The migrations Job runs before any normal resource exists (pre-install hook): it reads
     its connection strings from a hook Secret of its own, unless the operator's exist. */}}
{{- define "switchyard.initSecret" -}}
{{- printf "%s-init" (include "switchyard.fullname" .) -}}
{{- end -}}

{{/* One env entry from a Secret key. */}}
{{- define "switchyard.secretEnv" -}}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ .secret }}
      key: {{ .name }}
      {{- if .optional }}
      optional: true
      {{- end }}
{{- end -}}

{{/* What every Switchyard process gets (the migrations Job too): the services, logging,
     shutdown, tracing. (dict "root" $ "connections" SECRET) */}}
{{- define "switchyard.commonEnv" -}}
{{- $v := .root.Values -}}
- name: SWITCHYARD_KAFKA__BOOTSTRAP_SERVERS
  value: {{ $v.kafka.bootstrapServers | quote }}
{{ include "switchyard.secretEnv" (dict "name" "SWITCHYARD_REDIS__URL" "secret" .connections) }}
{{ include "switchyard.secretEnv" (dict "name" "SWITCHYARD_POSTGRES__DSN" "secret" .connections) }}
- name: SWITCHYARD_LOG_LEVEL
  value: {{ $v.logLevel | quote }}
- name: SWITCHYARD_LOG_FORMAT
  value: {{ $v.logFormat | quote }}
- name: SWITCHYARD_SHUTDOWN_CLOSE_TIMEOUT_S
  value: {{ $v.shutdownCloseTimeoutS | quote }}
- name: SWITCHYARD_TRACE_CONTENT
  value: {{ $v.traceContent | quote }}
{{- with (include "switchyard.fallbackUrl" .root) }}
- name: SWITCHYARD_FALLBACK_UPSTREAM_URL
  value: {{ . | quote }}
{{- end }}
{{- range $name, $value := $v.otel }}
{{- if not (hasPrefix "OTEL_" $name) }}
{{- fail (printf "otel.%s: only OTEL_* variables go here (others: env)" $name) }}
{{- end }}
{{- if ne (toString $value) "" }}
- name: {{ $name }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- end }}
{{- range $name, $value := $v.env }}
- name: {{ $name }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- end -}}

{{- define "switchyard.fallbackUrl" -}}
{{- if .Values.fakeUpstream.enabled -}}
http://{{ include "switchyard.fullname" . }}-fake-upstream:{{ .Values.fakeUpstream.port }}/v1
{{- else -}}
{{- .Values.fallbackUpstreamUrl -}}
{{- end -}}
{{- end -}}

{{/* A worker's metrics/health server and drain: (dict "root" $ "section" "ROUTER" "values" .Values.router) */}}
{{- define "switchyard.workerEnv" -}}
- name: SWITCHYARD_{{ .section }}__METRICS_PORT
  value: {{ .values.metricsPort | quote }}
- name: SWITCHYARD_{{ .section }}__METRICS_HOST
  value: {{ .root.Values.metricsHost | quote }}
- name: SWITCHYARD_{{ .section }}__SHUTDOWN_GRACE_S
  value: {{ .values.shutdownGraceS | quote }}
{{- end -}}

{{/* The vault's master keys (ingress and routers). */}}
{{- define "switchyard.vaultEnv" -}}
{{ include "switchyard.secretEnv" (dict "name" "SWITCHYARD_VAULT__MASTER_KEYS" "secret" (include "switchyard.keysSecret" .) "optional" true) }}
{{- with .Values.vault.activeKeyId }}
- name: SWITCHYARD_VAULT__ACTIVE_KEY_ID
  value: {{ . | quote }}
{{- end }}
{{- end -}}

{{/* The grace period a pod needs: its drain + the close budget + 1 s (+ a preStop sleep). */}}
{{- define "switchyard.checkGrace" -}}
{{- $need := add1 (ceil (addf .drain .root.Values.shutdownCloseTimeoutS)) -}}
{{- if lt (float64 .grace) (float64 $need) -}}
{{- fail (printf "%s.terminationGracePeriodSeconds (%v) is below its drain + shutdownCloseTimeoutS + 1 s (%v): Kubernetes would SIGKILL a draining process" .component .grace $need) -}}
{{- end -}}
{{- end -}}

{{/* Pod-level settings every Switchyard pod shares. */}}
{{- define "switchyard.podSpecCommon" -}}
automountServiceAccountToken: false
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
volumes:
  # The root filesystem is read-only; Python and the libraries get a scratch /tmp.
  - name: tmp
    emptyDir:
      sizeLimit: 64Mi
{{- end -}}

{{/* Pod annotations: Prometheus scraping and a checksum of the Secrets the chart makes, so a
     changed key rolls the pods. (dict "root" $ "port" 9101) */}}
{{- define "switchyard.podAnnotations" -}}
{{- $root := .root -}}
{{- if $root.Values.prometheusScrape }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .port | quote }}
prometheus.io/path: /metrics
{{- end }}
checksum/secrets: {{ include (print $root.Template.BasePath "/secrets.yaml") $root | sha256sum }}
{{- with $root.Values.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* HTTP probes on the contract's paths: /healthz for liveness, /readyz for readiness, and a
     startup probe so loading (the classifier's model, joining the consumer group) never
     counts against liveness. (dict "port" "metrics") */}}
{{- define "switchyard.probes" -}}
startupProbe:
  httpGet: {path: /healthz, port: {{ .port }}}
  periodSeconds: 2
  failureThreshold: 60
livenessProbe:
  httpGet: {path: /healthz, port: {{ .port }}}
  periodSeconds: 10
  timeoutSeconds: 3
  failureThreshold: 3
readinessProbe:
  httpGet: {path: /readyz, port: {{ .port }}}
  periodSeconds: 5
  timeoutSeconds: 3
  failureThreshold: 2
{{- end -}}
