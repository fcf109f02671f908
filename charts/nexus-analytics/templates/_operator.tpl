{{/* Names used by the operator templates (operator-*.yaml). */}}

{{/* The operator's ServiceAccount: operator.serviceAccount.name, else the operator name when
the chart creates it, else "default". */}}
{{- define "nexus-analytics.operatorServiceAccountName" -}}
{{- $sa := .Values.operator.serviceAccount -}}
{{- if $sa.create -}}
{{- default (include "nexus-analytics.operatorName" .) $sa.name -}}
{{- else -}}
{{- default "default" $sa.name -}}
{{- end -}}
{{- end }}

{{/* The leader-election Lease (coordination.k8s.io/v1), in the release namespace. */}}
{{- define "nexus-analytics.operatorLeaseName" -}}
{{- include "nexus-analytics.operatorName" . -}}
{{- end }}
