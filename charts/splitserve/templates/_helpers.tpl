{{/* Names and labels. */}}
{{- define "splitserve.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "splitserve.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "splitserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "splitserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "splitserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "splitserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: splitserve
{{- end -}}

{{- define "splitserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "splitserve.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "splitserve.peeringName" -}}
{{- include "splitserve.fullname" . -}}
{{- end -}}

{{/*
Permissions the operator uses in every namespace it manages: exactly the calls it makes
(tests/operator/test_chart.py checks the rendered rules against every request the operator sent).
*/}}
{{- define "splitserve.namespacedRules" -}}
- apiGroups: ["splitserve.io"]
  resources: ["inferencepools"]
  verbs: ["list", "watch", "patch"]
- apiGroups: ["splitserve.io"]
  resources: ["inferencepools/status"]
  verbs: ["patch"]
- apiGroups: [""]
  resources: ["configmaps", "services", "persistentvolumeclaims"]
  verbs: ["list", "watch", "get", "create", "patch"]
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["list", "watch", "get", "create", "patch"]
# Deleted when podMonitor.namespace moves a pool's PodMonitor out of the pool's namespace.
- apiGroups: ["monitoring.coreos.com"]
  resources: ["podmonitors"]
  verbs: ["list", "watch", "get", "create", "patch", "delete"]
# Deleted when a pool turns its disruption budget off.
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["list", "watch", "get", "create", "patch", "delete"]
# Decode pods get controller.kubernetes.io/pod-deletion-cost before a scale-down.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "patch"]
# Only to check that a pool's hub token Secret exists and has its key; never listed or watched.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end -}}
