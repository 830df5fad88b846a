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
{{- /* The cache volume holds the adapter cache and, for a Hub source, the base model's download. */ -}}
{{- $cache := $pool.cache -}}
{{- $pvc := eq ($cache.type | default "emptyDir") "pvc" -}}
{{- $volumeKey := ternary "cache.pvc.size" "cache.sizeLimit" $pvc -}}
{{- $volume := ternary ($cache.pvc | default dict).size $cache.sizeLimit $pvc | default (ternary "100Gi" "50Gi" $pvc) -}}
{{- $volumeBytes := include "loraplane.quantity" $volume | float64 -}}
{{- $local := hasPrefix "/" $pool.baseModel.source -}}
{{- if and (not $local) (not (hasKey $pool.baseModel "sizeBytes")) -}}
{{- fail (printf "workerPools[%d] (%s): baseModel.sizeBytes is required for the Hub source %q: its download lands on the cache volume next to the adapter cache, so the chart counts it against %s; set it to the checkpoint's size in bytes (safetensors files plus tokenizer)" $i $pool.name $pool.baseModel.source $volumeKey) -}}
{{- end -}}
{{- $baseBytes := ternary 0.0 (float64 ($pool.baseModel.sizeBytes | default 0)) $local -}}
{{- $budget := float64 $cache.budgetBytes -}}
{{- if gt (addf $budget $baseBytes) $volumeBytes -}}
{{- fail (printf "workerPools[%d] (%s): cache.budgetBytes (%.0f) plus the base model download (baseModel.sizeBytes %.0f) is %.0f bytes, above %s %v (%.0f bytes): the volume would fill before the cache evicts; lower cache.budgetBytes or raise %s" $i $pool.name $budget $baseBytes (addf $budget $baseBytes) $volumeKey $volume $volumeBytes $volumeKey) -}}
{{- end -}}
{{- $gpus := include "loraplane.gpus" $pool | float64 -}}
{{- $engine := $pool.engine | default "builtin" -}}
{{- if and (gt $gpus 1.0) (ne $engine "vllm") -}}
{{- fail (printf "workerPools[%d] (%s): asks for %.0f GPUs, but the %s engine runs on one device: the other GPUs would sit idle. Set the GPU request to 1, or use an engine with tensor parallelism (engine: vllm)" $i $pool.name $gpus $engine) -}}
{{- end -}}
{{- if and $pool.toolCallParser (ne $engine "vllm") -}}
{{- fail (printf "workerPools[%d] (%s): toolCallParser %q needs engine: vllm (the %s engine implements no tool calling)" $i $pool.name $pool.toolCallParser $engine) -}}
{{- end -}}
{{- $signing := $.Values.worker.signing -}}
{{- if and $pool.requireSignatures (not (or $signing.trust.publicKeys $signing.trust.certificateChain $signing.sigstore.identity)) -}}
{{- fail (printf "workerPools[%d] (%s): requireSignatures needs trust material: set worker.signing.trust.publicKeys or certificateChain (with secretName or configMapName), or worker.signing.sigstore" $i $pool.name) -}}
{{- end -}}
{{- end -}}
{{- with .Values.worker.signing -}}
{{- if and .trust.secretName .trust.configMapName -}}
{{- fail "worker.signing.trust: set secretName or configMapName, not both" -}}
{{- end -}}
{{- if and (or .trust.publicKeys .trust.certificateChain) (not (or .trust.secretName .trust.configMapName)) -}}
{{- fail "worker.signing.trust.publicKeys/certificateChain name keys of a Secret or ConfigMap: set worker.signing.trust.secretName or configMapName" -}}
{{- end -}}
{{- if ne (empty .sigstore.identity) (empty .sigstore.oidcIssuer) -}}
{{- fail "worker.signing.sigstore: identity and oidcIssuer go together: set both or neither" -}}
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

{{/* imagePullSecrets of every pod: global.imagePullSecrets and imagePullSecrets, names or {name: x}. */}}
{{- define "loraplane.imagePullSecrets" -}}
{{- $names := list -}}
{{- $global := (.Values.global | default dict).imagePullSecrets | default list -}}
{{- range (concat $global (.Values.imagePullSecrets | default list)) -}}
{{- if kindIs "string" . -}}
{{- $names = append $names . -}}
{{- else -}}
{{- $names = append $names .name -}}
{{- end -}}
{{- end -}}
{{- with ($names | uniq) }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end -}}
{{- end -}}

{{/* A Kubernetes quantity (50Gi, 1.5G, 40e9, or a number) as a float64 count. */}}
{{- define "loraplane.quantity" -}}
{{- if or (kindIs "float64" .) (kindIs "int64" .) (kindIs "int" .) -}}
{{- float64 . -}}
{{- else -}}
{{- $q := toString . -}}
{{- $num := regexFind "^[0-9]*\\.?[0-9]*" $q -}}
{{- $suffix := trimPrefix $num $q -}}
{{- $units := dict "" 1.0 "m" 0.001 "k" 1e3 "M" 1e6 "G" 1e9 "T" 1e12 "P" 1e15 "E" 1e18 "Ki" 1024.0 "Mi" 1048576.0 "Gi" 1073741824.0 "Ti" 1099511627776.0 "Pi" 1125899906842624.0 "Ei" 1152921504606846976.0 -}}
{{- $value := float64 $num -}}
{{- if regexMatch "^[eE][+]?[0-9]+$" $suffix -}}
{{- range until (int (regexFind "[0-9]+" $suffix)) -}}{{- $value = mulf $value 10 -}}{{- end -}}
{{- else -}}
{{- $value = mulf $value (get $units $suffix) -}}
{{- end -}}
{{- $value -}}
{{- end -}}
{{- end -}}

{{/* GPUs a pool asks for: the larger of its nvidia.com/gpu (or amd.com/gpu) limit and request. */}}
{{- define "loraplane.gpus" -}}
{{- $res := .resources | default dict -}}
{{- $n := 0.0 -}}
{{- range $part := list ($res.limits | default dict) ($res.requests | default dict) -}}
{{- range $key := list "nvidia.com/gpu" "amd.com/gpu" -}}
{{- if hasKey $part $key -}}
{{- $n = maxf $n (include "loraplane.quantity" (get $part $key) | float64) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $n -}}
{{- end -}}

{{/* A probe: the chart's default with the user's fields merged over it (their handler replaces ours). */}}
{{- define "loraplane.probe" -}}
{{- $user := deepCopy (.user | default dict) -}}
{{- $default := deepCopy .default -}}
{{- if or (hasKey $user "exec") (hasKey $user "tcpSocket") (hasKey $user "grpc") -}}
{{- $_ := unset $default "httpGet" -}}
{{- end -}}
{{- toYaml (merge $user $default) -}}
{{- end -}}
