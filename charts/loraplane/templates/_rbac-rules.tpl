{{/*
The rule lists, in one place. They hold exactly the calls the code makes: tests/chart/test_rbac.py runs
the operator and a worker as these service accounts and fails on a call no rule allows as well as on a
rule nothing used.
*/}}

{{/*
Operator, where it watches (cluster-wide, or each watched namespace): kopf lists and watches adapters
and worker reports; IDs and status are written with a resourceVersion-checked PUT of /status (a merge
patch could not carry the precondition); an Event on each transition.
*/}}
{{- define "loraplane.operator.adapterRules" -}}
- apiGroups: [loraplane.io]
  resources: [loraadapters, loraworkers]
  verbs: [list, watch]
- apiGroups: [loraplane.io]
  resources: [loraadapters/status]
  verbs: [update]
- apiGroups: [""]
  resources: [events]
  verbs: [create]
{{- end -}}

{{/* The ID ledger's name: the operator's --ledger-name and the one ConfigMap its rules name. */}}
{{- define "loraplane.ledgerName" -}}loraplane-id-ledger{{- end -}}

{{/*
Operator, in the release namespace: the ID ledger ConfigMap (read, created once, CAS-updated per block),
and the worker pods (a report whose pod is gone stops counting). Reads and updates are limited to the
ledger by resourceNames; create cannot be (Kubernetes does not restrict create by name). In namespaced
mode the operator also watches the release namespace, where the workers' LoRAWorker
reports live (unless that namespace is a watched one, whose Role already covers it).
*/}}
{{- define "loraplane.operator.homeRules" -}}
- apiGroups: [""]
  resources: [configmaps]
  resourceNames: [{{ include "loraplane.ledgerName" . }}]
  verbs: [get, update]
- apiGroups: [""]
  resources: [configmaps]
  verbs: [create]
- apiGroups: [""]
  resources: [pods]
  verbs: [get]
{{- if and (not .Values.watch.clusterWide) (not (has .Release.Namespace (include "loraplane.watchNamespaces" . | fromJsonArray))) }}
- apiGroups: [loraplane.io]
  resources: [loraadapters, loraworkers]
  verbs: [list, watch]
{{- end }}
{{- end -}}

{{/* The namespace of the body-based-routing ConfigMaps (bodyBasedRouting.namespace, or the release's). */}}
{{- define "loraplane.bbrNamespace" -}}{{ .Values.bodyBasedRouting.namespace | default .Release.Namespace }}{{- end -}}

{{/*
Operator, in the body-based-routing namespace (only with bodyBasedRouting.enabled): list its own
ConfigMaps (label-selected) at start, on each resync and after a write conflict, create one per base
model, update it with a resourceVersion-checked PUT, delete it when its base model is gone.
ConfigMap names follow the base models, so resourceNames cannot narrow these.
*/}}
{{- define "loraplane.operator.bbrRules" -}}
- apiGroups: [""]
  resources: [configmaps]
  verbs: [list, create, update, delete]
{{- end -}}

{{/* Worker, where adapters live: list then watch them. */}}
{{- define "loraplane.worker.adapterRules" -}}
- apiGroups: [loraplane.io]
  resources: [loraadapters]
  verbs: [list, watch]
{{- end -}}

{{/*
Worker, in the release namespace: create its own LoRAWorker (owned by its Pod, which it reads for the
ownerReference), or patch it when a restarted container finds it there; report through /status; delete
it on a clean shutdown.
*/}}
{{- define "loraplane.worker.homeRules" -}}
- apiGroups: [loraplane.io]
  resources: [loraworkers]
  verbs: [create, patch, delete]
- apiGroups: [loraplane.io]
  resources: [loraworkers/status]
  verbs: [patch]
- apiGroups: [""]
  resources: [pods]
  verbs: [get]
{{- end -}}
