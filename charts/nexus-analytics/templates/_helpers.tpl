{{/* Chart name. */}}
{{- define "nexus-analytics.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release-chart unless the release name already contains the chart name. */}}
{{- define "nexus-analytics.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "nexus-analytics.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "nexus-analytics.labels" -}}
helm.sh/chart: {{ include "nexus-analytics.chart" . }}
{{ include "nexus-analytics.baseSelectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: nexus
{{- end }}

{{- define "nexus-analytics.baseSelectorLabels" -}}
app.kubernetes.io/name: {{ include "nexus-analytics.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Selector labels of the consumer pods (the migration Job and test pods carry another component). */}}
{{- define "nexus-analytics.selectorLabels" -}}
{{ include "nexus-analytics.baseSelectorLabels" . }}
app.kubernetes.io/component: consumer
{{- end }}

{{/* ------------------------------------------------------------ query API */}}

{{/* "true" when the consumer pods serve the query API (api.enabled without api.deployment.enabled). */}}
{{- define "nexus-analytics.apiInConsumer" -}}
{{- if and .Values.api.enabled (not .Values.api.deployment.enabled) }}true{{ end }}
{{- end }}

{{/* "true" when the query API runs in its own pods (`nexus-analytics api`). */}}
{{- define "nexus-analytics.apiPods" -}}
{{- if and .Values.consumer.enabled .Values.api.enabled .Values.api.deployment.enabled }}true{{ end }}
{{- end }}

{{- define "nexus-analytics.apiName" -}}
{{- printf "%s-api" (include "nexus-analytics.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels of the API pods (component "api": never matched by the consumer's selectors). */}}
{{- define "nexus-analytics.apiSelectorLabels" -}}
{{ include "nexus-analytics.baseSelectorLabels" . }}
app.kubernetes.io/component: api
{{- end }}

{{/* API_TOKEN and API_DATABASE_URL from the Secret, for whichever pods serve the API. */}}
{{- define "nexus-analytics.apiSecretEnv" -}}
{{- $v := .Values }}
{{- if $v.api.requireToken }}
- name: API_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "nexus-analytics.secretName" . }}
      key: {{ $v.secretKeys.apiToken }}
{{- end }}
{{- if or $v.existingSecret $v.api.databaseUrl }}
- name: API_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "nexus-analytics.secretName" . }}
      key: {{ $v.secretKeys.apiDatabaseUrl }}
      {{- if $v.existingSecret }}
      # Without this key the API reads with DATABASE_URL.
      optional: true
      {{- end }}
{{- end }}
{{- end }}

{{- define "nexus-analytics.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "nexus-analytics.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Secret holding DATABASE_URL and the SASL credentials. */}}
{{- define "nexus-analytics.secretName" -}}
{{- default (include "nexus-analytics.fullname" .) .Values.existingSecret }}
{{- end }}

{{- define "nexus-analytics.image" -}}
{{- include "nexus-analytics.imageRef" (dict "global" .Values.global "image" .Values.image "defaultTag" .Chart.AppVersion) }}
{{- end }}

{{- define "nexus-analytics.kafkaTls" -}}
{{- if or (eq .Values.kafka.securityProtocol "SSL") (eq .Values.kafka.securityProtocol "SASL_SSL") }}true{{ end }}
{{- end }}

{{/* Label matchers for this release's series in PrometheusRule expressions. */}}
{{- define "nexus-analytics.promSelector" -}}
{{- if .Values.prometheusRule.selector }}
{{- .Values.prometheusRule.selector }}
{{- else }}
{{- printf "namespace=%q,job=%q" .Release.Namespace (include "nexus-analytics.fullname" .) }}
{{- end }}
{{- end }}

{{/*
Cross-field checks that values.schema.json cannot express. Rendering fails with
one clear message per problem.
*/}}
{{- define "nexus-analytics.validate" -}}
{{- $v := .Values }}
{{- $parts := int $v.kafka.topicPartitions }}
{{- if and $v.autoscaling.enabled (gt (int $v.autoscaling.maxReplicas) $parts) }}
{{- fail (printf "autoscaling.maxReplicas (%d) exceeds kafka.topicPartitions (%d): a consumer group cannot use more consumers than partitions, the extra pods would sit idle. Lower autoscaling.maxReplicas or set kafka.topicPartitions to the real partition count." (int $v.autoscaling.maxReplicas) $parts) }}
{{- end }}
{{- if and $v.autoscaling.enabled (gt (int $v.autoscaling.minReplicas) (int $v.autoscaling.maxReplicas)) }}
{{- fail (printf "autoscaling.minReplicas (%d) exceeds autoscaling.maxReplicas (%d)." (int $v.autoscaling.minReplicas) (int $v.autoscaling.maxReplicas)) }}
{{- end }}
{{- if and $v.autoscaling.enabled (eq $v.autoscaling.kind "hpa") (lt (int $v.autoscaling.minReplicas) 1) }}
{{- fail "autoscaling.minReplicas 0 needs autoscaling.kind=keda (an HPA cannot scale to zero)." }}
{{- end }}
{{- if and (not $v.autoscaling.enabled) (gt (int $v.replicaCount) $parts) }}
{{- fail (printf "replicaCount (%d) exceeds kafka.topicPartitions (%d): the extra consumers would sit idle." (int $v.replicaCount) $parts) }}
{{- end }}
{{- if le (int $v.terminationGracePeriodSeconds) (int $v.config.shutdownTimeoutSecs) }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed config.shutdownTimeoutSecs (%d), or the kubelet kills the pod in the middle of its drain." (int $v.terminationGracePeriodSeconds) (int $v.config.shutdownTimeoutSecs)) }}
{{- end }}
{{- if le (int $v.config.livenessStallSecs) (int $v.database.writeTimeoutSecs) }}
{{- fail (printf "config.livenessStallSecs (%d) must exceed database.writeTimeoutSecs (%d), or one slow write would fail /livez and restart the pod." (int $v.config.livenessStallSecs) (int $v.database.writeTimeoutSecs)) }}
{{- end }}
{{- if and (not $v.existingSecret) (not $v.database.url) }}
{{- fail "database.url is required (or set existingSecret to a Secret holding DATABASE_URL)." }}
{{- end }}
{{- if and $v.kafka.sasl.enabled (not $v.existingSecret) (or (not $v.kafka.sasl.username) (not $v.kafka.sasl.password)) }}
{{- fail "kafka.sasl.enabled needs kafka.sasl.username and kafka.sasl.password (or existingSecret)." }}
{{- end }}
{{- if and $v.kafka.sasl.enabled (not (hasPrefix "SASL_" $v.kafka.securityProtocol)) }}
{{- fail "kafka.sasl.enabled needs kafka.securityProtocol SASL_SSL or SASL_PLAINTEXT." }}
{{- end }}
{{- range $k, $_ := $v.kafka.properties }}
{{- if regexMatch "(password|secret|sasl\\.username|sasl\\.oauthbearer\\.config)" $k }}
{{- fail (printf "kafka.properties.%s looks like a credential: it would land in a ConfigMap. Use kafka.sasl.* (stored in the Secret) or existingSecret." $k) }}
{{- end }}
{{- end }}
{{- if $v.api.enabled }}
{{- if eq (int $v.api.port) (int $v.config.metricsPort) }}
{{- fail (printf "api.port (%d) must differ from config.metricsPort (%d)." (int $v.api.port) (int $v.config.metricsPort)) }}
{{- end }}
{{- if and $v.api.requireToken (not $v.existingSecret) (not $v.api.token) }}
{{- fail "api.enabled with api.requireToken needs api.token (or existingSecret holding secretKeys.apiToken); set api.requireToken=false to serve the API without authentication." }}
{{- end }}
{{- end }}
{{- if and $v.api.deployment.enabled (not $v.api.enabled) }}
{{- fail "api.deployment.enabled needs api.enabled (the API pods serve the query API)." }}
{{- end }}
{{- if and $v.api.deployment.autoscaling.enabled (gt (int $v.api.deployment.autoscaling.minReplicas) (int $v.api.deployment.autoscaling.maxReplicas)) }}
{{- fail (printf "api.deployment.autoscaling.minReplicas (%d) exceeds api.deployment.autoscaling.maxReplicas (%d)." (int $v.api.deployment.autoscaling.minReplicas) (int $v.api.deployment.autoscaling.maxReplicas)) }}
{{- end }}
{{- if and $v.api.token (not $v.api.requireToken) }}
{{- fail "api.token is set but api.requireToken is false: the token would not be used." }}
{{- end }}
{{- $ruleNames := dict }}
{{- range $i, $r := $v.routing.rules }}
{{- if hasKey $ruleNames $r.name }}
{{- fail (printf "routing.rules[%d]: duplicate rule name %q (names label analytics_routing_rule_hits_total)." $i $r.name) }}
{{- end }}
{{- $_ := set $ruleNames $r.name true }}
{{- if and (eq $r.action "forward") (has $r.topic $v.kafka.topics) }}
{{- fail (printf "routing.rules[%d] (%s) forwards to %q, a topic this consumer reads: every forwarded copy would be consumed and forwarded again." $i $r.name $r.topic) }}
{{- end }}
{{- end }}
{{- end }}

{{/* ------------------------------------------------------------ operator */}}

{{- define "nexus-analytics.operatorName" -}}
{{- printf "%s-operator" (include "nexus-analytics.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels of the operator pod (component "operator": never matched by the consumer's selectors). */}}
{{- define "nexus-analytics.operatorSelectorLabels" -}}
{{ include "nexus-analytics.baseSelectorLabels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{/*
RBAC rules of the operator: exactly the API calls of src/operator/mod.rs (run) and
src/operator/reconcile.rs, the same rules for the ClusterRole (all namespaces) and the
Role (operator.watchNamespace). Discovery of monitoring.coreos.com/v1 at start is a
non-resource URL granted to every authenticated user by the default system:discovery
ClusterRoleBinding, so it needs no rule here (and a Role could not hold one).
*/}}
{{- define "nexus-analytics.operatorRules" -}}
# AnalyticsPipelines: the controller's watcher (list + watch); the start-up check is a list
# with limit 1. The operator never gets, creates, updates or deletes them.
- apiGroups: ["analytics.nexuscore.io"]
  resources: ["analyticspipelines"]
  verbs: ["list", "watch"]
# Status: server-side apply on the status subresource (patch_status).
- apiGroups: ["analytics.nexuscore.io"]
  resources: ["analyticspipelines/status"]
  verbs: ["patch"]
# Owned kinds: watched (Controller::owns, list + watch) and server-side applied (patch; an
# apply that creates the object is also authorized as create).
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["list", "watch", "create", "patch"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["list", "watch", "create", "patch"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["list", "watch", "create", "patch"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["list", "watch", "create", "patch"]
# The HPA is also deleted when a pipeline is paused or replayed (consumers to zero).
- apiGroups: ["autoscaling"]
  resources: ["horizontalpodautoscalers"]
  verbs: ["list", "watch", "create", "patch", "delete"]
# Applied but not watched: ServiceMonitor (when spec.serviceMonitor and the API existed at
# start) and KEDA ScaledObject (autoscaling.kind keda; deleted on pause/replay like the HPA).
- apiGroups: ["monitoring.coreos.com"]
  resources: ["servicemonitors"]
  verbs: ["create", "patch"]
- apiGroups: ["keda.sh"]
  resources: ["scaledobjects"]
  verbs: ["create", "patch", "delete"]
# The scaler's credentials (SASL/TLS from spec.kafka.secretRef, by reference); deleted when the
# Secret no longer asks for any.
- apiGroups: ["keda.sh"]
  resources: ["triggerauthentications"]
  verbs: ["create", "patch", "delete"]
# Replays wait until no consumer pod is left: a list by label selector.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list"]
# spec.kafka.secretRef: read by name for the operator's own Kafka calls (partition counts,
# offset resets). get only: no list or watch.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
# Events (kube-runtime Recorder, events.k8s.io/v1): create, patch when an event repeats.
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}

{{/* Checks of the deployment modes (rendered from templates/validate.yaml). */}}
{{- define "nexus-analytics.validateModes" -}}
{{- $v := .Values }}
{{- if and (not $v.consumer.enabled) (not $v.operator.enabled) }}
{{- fail "consumer.enabled and operator.enabled are both false: nothing to deploy." }}
{{- end }}
{{- if and $v.operator.samplePipeline.enabled (not $v.operator.enabled) }}
{{- fail "operator.samplePipeline.enabled needs operator.enabled (nothing would reconcile the sample AnalyticsPipeline)." }}
{{- end }}
{{- end }}

{{/* ------------------------------------------------ production platforms */}}

{{/*
Image reference: [global.imageRegistry/]repository then @digest, else :tag (defaultTag when
empty). Argument: dict global, image ({repository, tag, digest}), defaultTag.
*/}}
{{- define "nexus-analytics.imageRef" -}}
{{- $repo := .image.repository }}
{{- with (.global | default dict).imageRegistry }}
{{- $repo = printf "%s/%s" (trimSuffix "/" .) $repo }}
{{- end }}
{{- if .image.digest }}
{{- printf "%s@%s" $repo .image.digest }}
{{- else }}
{{- printf "%s:%s" $repo (default .defaultTag .image.tag) }}
{{- end }}
{{- end }}

{{/* Mount points of the TLS material (kafka-ca keeps its original path). */}}
{{- define "nexus-analytics.kafkaCaDir" -}}/etc/nexus-analytics/kafka-ca{{- end }}
{{- define "nexus-analytics.kafkaClientDir" -}}/etc/nexus-analytics/kafka-client{{- end }}
{{- define "nexus-analytics.postgresTlsDir" -}}/etc/nexus-analytics/postgres-tls{{- end }}

{{/*
Environment of PostgreSQL TLS (database.tls): sqlx's PgConnectOptions reads PGSSLROOTCERT,
PGSSLCERT, PGSSLKEY and PGSSLMODE from the environment before the URL's query parameters
(sslrootcert, sslcert, sslkey, sslmode), which win. Used by the consumer, the migration Job
and any other pod that connects to the database.
*/}}
{{- define "nexus-analytics.postgresTlsEnv" -}}
{{- $t := .Values.database.tls }}
{{- $dir := include "nexus-analytics.postgresTlsDir" . }}
{{- if $t.secret }}
{{- with $t.caKey }}
- name: PGSSLROOTCERT
  value: {{ printf "%s/%s" $dir . | quote }}
{{- end }}
{{- if $t.certKey }}
- name: PGSSLCERT
  value: {{ printf "%s/%s" $dir $t.certKey | quote }}
- name: PGSSLKEY
  value: {{ printf "%s/%s" $dir $t.keyKey | quote }}
{{- end }}
{{- end }}
{{- with $t.sslMode }}
- name: PGSSLMODE
  value: {{ . | quote }}
{{- end }}
{{- end }}

{{/*
Volume mounts of the TLS Secrets: dict (root, kafka: whether the pod talks to Kafka).
extraVolumeMounts are added by the callers.
*/}}
{{- define "nexus-analytics.tlsVolumeMounts" -}}
{{- $v := .root.Values }}
{{- if and .kafka $v.kafka.tls.caSecret }}
- name: kafka-ca
  mountPath: {{ include "nexus-analytics.kafkaCaDir" .root }}
  readOnly: true
{{- end }}
{{- if and .kafka $v.kafka.tls.clientSecret }}
- name: kafka-client
  mountPath: {{ include "nexus-analytics.kafkaClientDir" .root }}
  readOnly: true
{{- end }}
{{- if $v.database.tls.secret }}
- name: postgres-tls
  mountPath: {{ include "nexus-analytics.postgresTlsDir" .root }}
  readOnly: true
{{- end }}
{{- end }}

{{/*
Volumes of the TLS Secrets: dict (root, kafka). Only the named keys are projected; the
client keys get mode 0440 (288): root-owned, group fsGroup, so the non-root user reads them.
*/}}
{{- define "nexus-analytics.tlsVolumes" -}}
{{- $v := .root.Values }}
{{- $k := $v.kafka.tls }}
{{- if and .kafka $k.caSecret }}
- name: kafka-ca
  secret:
    secretName: {{ $k.caSecret }}
    items:
      - key: {{ $k.caKey }}
        path: {{ $k.caKey }}
{{- end }}
{{- if and .kafka $k.clientSecret }}
- name: kafka-client
  secret:
    secretName: {{ $k.clientSecret }}
    defaultMode: 288
    items:
      - key: {{ $k.certKey }}
        path: {{ $k.certKey }}
      - key: {{ $k.keyKey }}
        path: {{ $k.keyKey }}
{{- end }}
{{- $p := $v.database.tls }}
{{- if $p.secret }}
- name: postgres-tls
  secret:
    secretName: {{ $p.secret }}
    defaultMode: 288
    items:
      {{- range compact (list $p.caKey $p.certKey $p.keyKey) }}
      - key: {{ . }}
        path: {{ . }}
      {{- end }}
{{- end }}
{{- end }}

{{/* Whether an alert of the PrometheusRule is rendered: list (root context, alert name). */}}
{{- define "nexus-analytics.alertEnabled" -}}
{{- $root := index . 0 }}
{{- $a := get ($root.Values.prometheusRule.alerts | default dict) (index . 1) | default dict }}
{{- if ne (toString (get $a "enabled")) "false" }}true{{ end }}
{{- end }}

{{/*
labels: and annotations: of one alert: list (root, name, severity, annotations dict). Order of
precedence: the chart's (severity, summary, description, runbook_url) < additionalAlertLabels /
additionalAlertAnnotations < prometheusRule.alerts.<name>.labels / annotations.
*/}}
{{- define "nexus-analytics.alertMeta" -}}
{{- $root := index . 0 }}
{{- $name := index . 1 }}
{{- $r := $root.Values.prometheusRule }}
{{- $a := get ($r.alerts | default dict) $name | default dict }}
{{- $labels := merge (deepCopy (get $a "labels" | default dict)) (deepCopy ($r.additionalAlertLabels | default dict)) (dict "severity" (index . 2)) }}
{{- $ann := deepCopy (index . 3) }}
{{- with $r.runbookBaseUrl }}
{{- $_ := set $ann "runbook_url" (printf "%s/%s.md" (trimSuffix "/" .) $name) }}
{{- end }}
{{- $ann = merge (deepCopy (get $a "annotations" | default dict)) (deepCopy ($r.additionalAlertAnnotations | default dict)) $ann }}
labels:
{{- range $k, $val := $labels }}
  {{ $k }}: {{ $val | toString | quote }}
{{- end }}
annotations:
{{- range $k, $val := $ann }}
  {{ $k }}: {{ $val | toString | quote }}
{{- end }}
{{- end }}

{{/* Checks of the TLS and extra values (rendered with the consumer Deployment). */}}
{{- define "nexus-analytics.validateProduction" -}}
{{- $v := .Values }}
{{- $k := $v.kafka.tls }}
{{- if and (or $k.caSecret $k.clientSecret) (not (include "nexus-analytics.kafkaTls" .)) }}
{{- fail (printf "kafka.tls.caSecret/clientSecret need kafka.securityProtocol SSL or SASL_SSL (it is %q): librdkafka would ignore the certificates." $v.kafka.securityProtocol) }}
{{- end }}
{{- if and $k.keyPasswordKey (not $k.clientSecret) }}
{{- fail "kafka.tls.keyPasswordKey needs kafka.tls.clientSecret (the Secret holding the key and its passphrase)." }}
{{- end }}
{{- $p := $v.database.tls }}
{{- if ne (not $p.certKey) (not $p.keyKey) }}
{{- fail "database.tls.certKey and database.tls.keyKey must be set together (sqlx: a client certificate needs its key)." }}
{{- end }}
{{- if and $p.certKey (not $p.secret) }}
{{- fail "database.tls.certKey/keyKey need database.tls.secret (the Secret holding the files)." }}
{{- end }}
{{- if $v.prometheusRule.enabled }}
{{- $on := 0 }}
{{- range $name, $a := $v.prometheusRule.alerts }}
{{- if include "nexus-analytics.alertEnabled" (list $ $name) }}{{ $on = add1 $on }}{{ end }}
{{- end }}
{{- if eq (int $on) 0 }}
{{- fail "prometheusRule.alerts disables every alert: set prometheusRule.enabled=false instead (a rule group needs a rule)." }}
{{- end }}
{{- end }}
{{- end }}
