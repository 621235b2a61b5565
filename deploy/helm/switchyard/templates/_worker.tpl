{{/* A consumer process (router, usage worker, audit writer, classifier): one Deployment,
     its metrics and health on one port. (dict "root" $ "component" "router" "section" "ROUTER"
     "values" .Values.router "args" (list "router") "env" "<extra env YAML>") */}}
{{- define "switchyard.workerDeployment" -}}
{{- $root := .root -}}
{{- $v := .values -}}
{{- include "switchyard.checkGrace" (dict "root" $root "component" .component "grace" $v.terminationGracePeriodSeconds "drain" $v.shutdownGraceS) -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "switchyard.fullname" $root }}-{{ .component }}
  labels:
    {{- include "switchyard.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
spec:
  {{- /* An autoscaler owns the count; a fixed one here would fight it at each upgrade. */}}
  {{- if not (and (hasKey $v "autoscaling") $v.autoscaling.enabled) }}
  replicas: {{ $v.replicas }}
  {{- end }}
  revisionHistoryLimit: 5
  selector:
    matchLabels:
      {{- include "switchyard.selectorLabels" (dict "root" $root "component" .component) | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "switchyard.labels" $root | nindent 8 }}
        app.kubernetes.io/component: {{ .component }}
      annotations:
        {{- include "switchyard.podAnnotations" (dict "root" $root "port" $v.metricsPort) | trim | nindent 8 }}
    spec:
      {{- include "switchyard.podSpecCommon" $root | nindent 6 }}
      terminationGracePeriodSeconds: {{ $v.terminationGracePeriodSeconds }}
      containers:
        - name: {{ .component }}
          image: {{ include "switchyard.image" $root | quote }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          args: {{ toJson .args }}
          ports:
            - name: metrics
              containerPort: {{ $v.metricsPort }}
              protocol: TCP
          env:
            {{- include "switchyard.commonEnv" (dict "root" $root "connections" (include "switchyard.connectionsSecret" $root)) | nindent 12 }}
            {{- include "switchyard.workerEnv" (dict "root" $root "section" .section "values" $v) | nindent 12 }}
            {{- with .env }}
            {{- . | nindent 12 }}
            {{- end }}
          {{- include "switchyard.probes" (dict "port" $v.metricsPort) | nindent 10 }}
          resources:
            {{- toYaml $v.resources | nindent 12 }}
          securityContext:
            {{- toYaml $root.Values.securityContext | nindent 12 }}
          volumeMounts:
            - name: tmp
              mountPath: /tmp
{{- end -}}

{{/* Scaling a consumer on its group's Kafka lag: an autoscaling/v2 HPA on the External metric
     switchyard_kafka_consumer_lag (served by a Prometheus adapter, docs/operations.md), or a
     KEDA ScaledObject when keda.enabled. (dict "root" $ "component" "router" "values" … "group" "router") */}}
{{- define "switchyard.lagScaler" -}}
{{- $root := .root -}}
{{- $v := .values -}}
{{- if $v.autoscaling.enabled }}
{{- if $root.Values.keda.enabled }}
apiVersion: keda.sh/v1alpha1
kind: ScaledObject
metadata:
  name: {{ include "switchyard.fullname" $root }}-{{ .component }}
  labels:
    {{- include "switchyard.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
spec:
  scaleTargetRef:
    name: {{ include "switchyard.fullname" $root }}-{{ .component }}
  minReplicaCount: {{ $v.autoscaling.minReplicas }}
  maxReplicaCount: {{ $v.autoscaling.maxReplicas }}
  pollingInterval: {{ $root.Values.keda.pollingInterval }}
  cooldownPeriod: {{ $root.Values.keda.cooldownPeriod }}
  triggers:
    - type: prometheus
      metadata:
        serverAddress: {{ $root.Values.keda.prometheusServerAddress | quote }}
        query: {{ printf "sum(switchyard_kafka_consumer_lag{group=%q})" .group | quote }}
        threshold: {{ $v.autoscaling.targetLagPerPod | quote }}
{{- else }}
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ include "switchyard.fullname" $root }}-{{ .component }}
  labels:
    {{- include "switchyard.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ include "switchyard.fullname" $root }}-{{ .component }}
  minReplicas: {{ $v.autoscaling.minReplicas }}
  maxReplicas: {{ $v.autoscaling.maxReplicas }}
  metrics:
    - type: External
      external:
        metric:
          name: switchyard_kafka_consumer_lag
          selector:
            matchLabels:
              group: {{ .group }}
        target:
          # The group's total lag divided by the replicas: messages waiting per consumer.
          type: AverageValue
          averageValue: {{ $v.autoscaling.targetLagPerPod | quote }}
  behavior:
    # A rebalance pauses the whole group: scale up at once, down slowly.
    scaleDown:
      stabilizationWindowSeconds: 300
{{- end }}
{{- end }}
{{- end -}}

{{- define "switchyard.pdb" -}}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "switchyard.fullname" .root }}-{{ .component }}
  labels:
    {{- include "switchyard.labels" .root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
spec:
  maxUnavailable: {{ .values.pdb.maxUnavailable }}
  selector:
    matchLabels:
      {{- include "switchyard.selectorLabels" (dict "root" .root "component" .component) | nindent 6 }}
{{- end -}}
