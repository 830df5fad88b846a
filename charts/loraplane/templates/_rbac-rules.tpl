{{/*
The rule lists, in one place. Keep them to what the code calls: tests/chart/test_rbac.py fails on a
rule that was never used as well as on a call no rule allows.
*/}}

{{/* Operator, where adapters live. */}}
{{- define "loraplane.operator.adapterRules" -}}
- apiGroups: [loraplane.io]
  resources: [loraadapters]
  verbs: [get, list, watch, patch]
- apiGroups: [loraplane.io]
  resources: [loraadapters/status]
  verbs: [patch]
- apiGroups: [""]
  resources: [events]
  verbs: [create]
{{- end -}}

{{/* Operator, in the release namespace: the ID ledger, worker reports, worker pods. */}}
{{- define "loraplane.operator.homeRules" -}}
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, create, update]
- apiGroups: [loraplane.io]
  resources: [loraworkers]
  verbs: [list, watch]
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch]
{{- end -}}

{{/* Operator, cluster-scoped. */}}
{{- define "loraplane.operator.clusterRules" -}}
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [list, watch]
{{- end -}}

{{/* Worker, where adapters live: read them. */}}
{{- define "loraplane.worker.adapterRules" -}}
- apiGroups: [loraplane.io]
  resources: [loraadapters]
  verbs: [list, watch]
{{- end -}}

{{/* Worker, in the release namespace: its own LoRAWorker report and its own Pod (for the ownerReference). */}}
{{- define "loraplane.worker.homeRules" -}}
- apiGroups: [loraplane.io]
  resources: [loraworkers]
  verbs: [get, create, patch]
- apiGroups: [loraplane.io]
  resources: [loraworkers/status]
  verbs: [patch]
- apiGroups: [""]
  resources: [pods]
  verbs: [get]
{{- end -}}
