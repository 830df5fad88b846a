{{/* Names, labels and small shared pieces. Every object goes through these so names stay <= 63 chars. */}}

{{- define "loraplane.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "loraplane.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "loraplane.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Standard labels; call with (dict "ctx" $ "component" "operator"). */}}
{{- define "loraplane.labels" -}}
helm.sh/chart: {{ include "loraplane.chart" .ctx }}
{{ include "loraplane.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: loraplane
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels: stable across upgrades (never include the version). */}}
{{- define "loraplane.selectorLabels" -}}
app.kubernetes.io/name: {{ include "loraplane.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- with .pool }}
loraplane.io/pool: {{ . }}
{{- end }}
{{- end -}}

{{- define "loraplane.operator.fullname" -}}
{{- printf "%s-operator" (include "loraplane.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Call with (dict "ctx" $ "pool" $pool). */}}
{{- define "loraplane.worker.fullname" -}}
{{- printf "%s-worker-%s" (include "loraplane.fullname" .ctx) .pool.name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "loraplane.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create -}}
{{- default (include "loraplane.operator.fullname" .) .Values.operator.serviceAccount.name -}}
{{- else -}}
{{- required "operator.serviceAccount.name is required when operator.serviceAccount.create is false" .Values.operator.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "loraplane.worker.serviceAccountName" -}}
{{- if .Values.worker.serviceAccount.create -}}
{{- default (printf "%s-worker" (include "loraplane.fullname" .) | trunc 63 | trimSuffix "-") .Values.worker.serviceAccount.name -}}
{{- else -}}
{{- required "worker.serviceAccount.name is required when worker.serviceAccount.create is false" .Values.worker.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* repository:tag or repository@digest; call with (dict "ctx" $ "image" $image). */}}
{{- define "loraplane.image" -}}
{{- if .image.digest -}}
{{- printf "%s@%s" .image.repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository (default .ctx.Chart.AppVersion .image.tag) -}}
{{- end -}}
{{- end -}}

{{/* The namespaces adapters are watched in when not cluster-wide (default: the release namespace). */}}
{{- define "loraplane.watchNamespaces" -}}
{{- if .Values.watch.namespaces -}}
{{- toJson .Values.watch.namespaces -}}
{{- else -}}
{{- toJson (list .Release.Namespace) -}}
{{- end -}}
{{- end -}}

{{/* The operator's namespaces when not cluster-wide: the watched ones plus the release namespace (LoRAWorker reports). */}}
{{- define "loraplane.operatorNamespaces" -}}
{{- $watched := include "loraplane.watchNamespaces" . | fromJsonArray -}}
{{- append $watched .Release.Namespace | uniq | toJson -}}
{{- end -}}

{{/* Checks the schema cannot express; each message names the key and the fix. */}}
{{- define "loraplane.validate" -}}
{{- $seen := dict -}}
{{- range $i, $p := .Values.workerPools -}}
{{- $pool := include "loraplane.pool" (dict "ctx" $ "pool" $p) | fromJson -}}
{{- if hasKey $seen $pool.name -}}
{{- fail (printf "workerPools[%d].name %q is used twice: every pool needs its own name" $i $pool.name) -}}
{{- end -}}
{{- $_ := set $seen $pool.name true -}}
{{- if lt (int $pool.maxCpuLoras) (int $pool.maxLoras) -}}
{{- fail (printf "workerPools[%d] (%s): maxCpuLoras (%d) must be >= maxLoras (%d): every adapter on the device is also held in CPU memory" $i $pool.name (int $pool.maxCpuLoras) (int $pool.maxLoras)) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.watch.clusterWide .Values.watch.namespaces -}}
{{- fail "watch.namespaces is set but watch.clusterWide is true: set watch.clusterWide=false to watch only those namespaces, or empty watch.namespaces" -}}
{{- end -}}
{{- end -}}

{{/*
One pool merged over workerPoolDefaults, as JSON (callers: fromJson, then `int` on numbers).
resources, nodeSelector, tolerations and affinity are taken whole from the pool when it sets them:
a CPU pool must not inherit a GPU request by a deep merge.
*/}}
{{- define "loraplane.pool" -}}
{{- $defaults := deepCopy .ctx.Values.workerPoolDefaults -}}
{{- range $key := list "resources" "nodeSelector" "tolerations" "affinity" -}}
{{- if hasKey $.pool $key -}}
{{- $_ := unset $defaults $key -}}
{{- end -}}
{{- end -}}
{{- $pool := merge (deepCopy .pool) $defaults -}}
{{- $_ := set $pool "image" (merge (deepCopy ($pool.image | default dict)) .ctx.Values.worker.image) -}}
{{- toJson $pool -}}
{{- end -}}
