{{/*
Names, labels, images and validation shared by every template (Bitnami conventions).
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "squint.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The prefix of every resource name: fullnameOverride, else "<release>-<chart>" (just the
release name when it already contains the chart name). 63 characters at most.
*/}}
{{- define "squint.fullname" -}}
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

{{/* The namespace of every resource: namespaceOverride, else the release's. */}}
{{- define "squint.namespace" -}}
{{- default .Release.Namespace .Values.namespaceOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* "<chart>-<version>" for the helm.sh/chart label. */}}
{{- define "squint.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The name of a component's resources: "<fullname>-<component>".
Usage: {{ include "squint.componentName" (dict "context" $ "component" "vision-worker") }}
*/}}
{{- define "squint.componentName" -}}
{{- printf "%s-%s" (include "squint.fullname" .context) .component | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Standard labels, the only place app.kubernetes.io/* labels are written.
Usage: {{ include "squint.labels" (dict "context" $ "component" "orchestrator") }}
"component" is optional; commonLabels are added.
*/}}
{{- define "squint.labels" -}}
{{- $ctx := .context -}}
helm.sh/chart: {{ include "squint.chart" $ctx }}
{{ include "squint.matchLabels" . }}
app.kubernetes.io/version: {{ $ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $ctx.Release.Service }}
app.kubernetes.io/part-of: squint
{{- with $ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
The immutable subset of the labels: Deployment/StatefulSet selectors, Service selectors,
NetworkPolicy and PodDisruptionBudget pod selectors.
Usage: {{ include "squint.matchLabels" (dict "context" $ "component" "orchestrator") }}
*/}}
{{- define "squint.matchLabels" -}}
app.kubernetes.io/name: {{ include "squint.name" .context }}
app.kubernetes.io/instance: {{ .context.Release.Name }}
{{- if .component }}
app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- end -}}

{{/*
commonAnnotations merged with a resource's own (own wins), as a YAML map; empty when none.
Usage: {{ include "squint.annotations" (dict "context" $ "annotations" .Values.x.service.annotations) }}
*/}}
{{- define "squint.annotations" -}}
{{- $all := merge (deepCopy (default (dict) .annotations)) (deepCopy (default (dict) .context.Values.commonAnnotations)) -}}
{{- if $all }}
{{- toYaml $all }}
{{- end }}
{{- end -}}

{{/*
A full image reference: <registry>/<repository>:<tag> or <registry>/<repository>@<digest>.
global.imageRegistry replaces the image's registry; an empty tag is the chart's appVersion.
Usage: {{ include "squint.image" (dict "image" .Values.orchestrator.image "context" $) }}
*/}}
{{- define "squint.image" -}}
{{- $registry := .image.registry -}}
{{- with .context.Values.global.imageRegistry }}{{ $registry = . }}{{ end -}}
{{- $name := .image.repository -}}
{{- if $registry }}{{ $name = printf "%s/%s" $registry .image.repository }}{{ end -}}
{{- if .image.digest -}}
{{- printf "%s@%s" $name .image.digest -}}
{{- else -}}
{{- printf "%s:%s" $name (default .context.Chart.AppVersion .image.tag | toString) -}}
{{- end -}}
{{- end -}}

{{/* imagePullSecrets from global.imagePullSecrets. */}}
{{- define "squint.imagePullSecrets" -}}
{{- with .Values.global.imagePullSecrets -}}
imagePullSecrets:
{{- range . }}
  - name: {{ . | quote }}
{{- end }}
{{- end -}}
{{- end -}}

{{/*
A settings value as its environment variable's text, the way squint.config.load_settings
parses it: lists comma-joined, whole numbers without an exponent (Helm reads numbers from
YAML as float64, and 268435456 would print as 2.68435456e+08), booleans true/false.
*/}}
{{- define "squint.envValue" -}}
{{- $v := . -}}
{{- if kindIs "slice" $v -}}
{{- $items := list -}}
{{- range $v }}{{ $items = append $items (include "squint.envValue" .) }}{{ end -}}
{{- join "," $items -}}
{{- else if kindIs "float64" $v -}}
{{- if eq $v (floor $v) }}{{ int64 $v }}{{ else }}{{ $v }}{{ end -}}
{{- else if kindIs "invalid" $v -}}
{{- else -}}
{{- $v -}}
{{- end -}}
{{- end -}}

{{/* The names of the components' Services. */}}
{{- define "squint.orchestrator.fullname" -}}{{ include "squint.componentName" (dict "context" . "component" "orchestrator") }}{{- end -}}
{{- define "squint.vision.fullname" -}}{{ include "squint.componentName" (dict "context" . "component" "vision-worker") }}{{- end -}}
{{- define "squint.vision.headlessServiceName" -}}{{ printf "%s-headless" (include "squint.vision.fullname" .) | trunc 63 | trimSuffix "-" }}{{- end -}}
{{- define "squint.llm.fullname" -}}{{ include "squint.componentName" (dict "context" . "component" "llm-worker") }}{{- end -}}
{{- define "squint.llm.headlessServiceName" -}}{{ printf "%s-headless" (include "squint.llm.fullname" .) | trunc 63 | trimSuffix "-" }}{{- end -}}
{{- define "squint.redis.fullname" -}}{{ include "squint.componentName" (dict "context" . "component" "redis") }}{{- end -}}

{{/*
The name of the vision workers' gRPC port, in their headless Service and in the EndpointSlices
Kubernetes derives from it. The orchestrator's discovery picks the port by this name
(SQUINT_ORCHESTRATOR_DISCOVERY_KUBERNETES_PORT_NAME).
*/}}
{{- define "squint.vision.portName" -}}grpc{{- end -}}

{{/* The same for the LLM workers' headless Service: Triton's KServe gRPC port. */}}
{{- define "squint.llm.portName" -}}grpc{{- end -}}

{{/* The orchestrator's ServiceAccount. */}}
{{- define "squint.orchestrator.serviceAccountName" -}}
{{- if .Values.orchestrator.serviceAccount.create -}}
{{- default (include "squint.orchestrator.fullname" .) .Values.orchestrator.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.orchestrator.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Whether the orchestrator needs the Kubernetes API (EndpointSlice discovery). */}}
{{- define "squint.orchestrator.usesKubernetesApi" -}}
{{- if eq .Values.orchestrator.discovery.mode "kubernetes" }}true{{ end -}}
{{- end -}}

{{/* The Redis URL the vision workers use: bundled, external, or empty (in-process cache). */}}
{{- define "squint.redis.url" -}}
{{- if .Values.redis.enabled -}}
{{- printf "redis://%s:%d/%d" (include "squint.redis.fullname" .) (int .Values.redis.service.ports.redis) (int .Values.redis.database) -}}
{{- else -}}
{{- .Values.redis.external.url -}}
{{- end -}}
{{- end -}}

{{/* The Triton gRPC address the orchestrator calls. */}}
{{- define "squint.llm.grpcAddress" -}}
{{- printf "%s:%d" (include "squint.llm.fullname" .) (int .Values.llm.service.ports.grpc) -}}
{{- end -}}

{{/* tritonserver --model-config-name, from llm.triton.modelConfigName ("auto": gpu with a GPU). */}}
{{- define "squint.llm.modelConfigName" -}}
{{- $name := .Values.llm.triton.modelConfigName -}}
{{- if eq $name "auto" -}}
{{- if .Values.llm.gpu.enabled }}gpu{{ end -}}
{{- else -}}
{{- $name -}}
{{- end -}}
{{- end -}}

{{/*
Resources with the GPU added to requests and limits when the component has one.
Usage: {{ include "squint.resources" (dict "resources" .Values.vision.resources "gpu" .Values.vision.gpu) }}
*/}}
{{- define "squint.resources" -}}
{{- $resources := deepCopy (default (dict) .resources) -}}
{{- if and .gpu .gpu.enabled -}}
{{- $requests := default (dict) $resources.requests -}}
{{- $limits := default (dict) $resources.limits -}}
{{- $_ := set $requests .gpu.resourceName (int .gpu.count) -}}
{{- $_ := set $limits .gpu.resourceName (int .gpu.count) -}}
{{- $_ := set $resources "requests" $requests -}}
{{- $_ := set $resources "limits" $limits -}}
{{- end -}}
{{- toYaml $resources -}}
{{- end -}}

{{/*
Tolerations of a component: its own, plus its GPU's when the GPU is enabled.
Usage: {{ include "squint.tolerations" (dict "tolerations" .Values.vision.tolerations "gpu" .Values.vision.gpu) }}
*/}}
{{- define "squint.tolerations" -}}
{{- $all := default (list) .tolerations -}}
{{- if and .gpu .gpu.enabled -}}
{{- $all = concat $all (default (list) .gpu.tolerations) -}}
{{- end -}}
{{- if $all -}}
{{- toYaml $all -}}
{{- end -}}
{{- end -}}

{{/* Node selector of a component: its own, plus its GPU's when the GPU is enabled. */}}
{{- define "squint.nodeSelector" -}}
{{- $all := deepCopy (default (dict) .nodeSelector) -}}
{{- if and .gpu .gpu.enabled -}}
{{- $all = merge $all (deepCopy (default (dict) .gpu.nodeSelector)) -}}
{{- end -}}
{{- if $all -}}
{{- toYaml $all -}}
{{- end -}}
{{- end -}}

{{/* A securityContext without the chart's "enabled" switch. */}}
{{- define "squint.securityContext" -}}
{{- toYaml (omit . "enabled") -}}
{{- end -}}

{{/*
The probe timing fields of a values probe (without "enabled").
Usage: {{ include "squint.probeTiming" .Values.vision.livenessProbe | nindent 12 }}
*/}}
{{- define "squint.probeTiming" -}}
{{- toYaml (omit . "enabled") -}}
{{- end -}}

{{/*
How kubelet checks a Squint gRPC server: the gRPC health service (grpc.health.v1), or a TCP
connect when the server serves TLS (kubelet's gRPC probes speak plaintext only). "service" names
the health status asked for ("": the process's own).
Usage: {{ include "squint.grpcProbeAction" (dict "config" .Values.vision.config) }}
*/}}
{{- define "squint.grpcProbeAction" -}}
{{- if dig "grpc" "tls" "certFile" "" .config -}}
tcpSocket:
  port: grpc
{{- else -}}
grpc:
  port: {{ int .config.grpc.port }}
  service: {{ default "" .service | quote }}
{{- end -}}
{{- end -}}

{{/*
The volume of the model pack: the read-only PersistentVolumeClaim, or the emptyDir the
init container fills.
*/}}
{{- define "squint.pack.volume" -}}
- name: pack
{{- if eq .Values.pack.source "pvc" }}
  persistentVolumeClaim:
    claimName: {{ .Values.pack.pvc.claimName | quote }}
    readOnly: true
{{- else }}
  emptyDir:
    sizeLimit: {{ .Values.pack.initContainer.sizeLimit | quote }}
{{- end }}
{{- end -}}

{{/* The pack's mount in a Squint container: always read-only. */}}
{{- define "squint.pack.volumeMount" -}}
- name: pack
  mountPath: {{ .Values.pack.mountPath | quote }}
  readOnly: true
{{- if and (eq .Values.pack.source "pvc") .Values.pack.pvc.subPath }}
  subPath: {{ .Values.pack.pvc.subPath | quote }}
{{- end }}
{{- end -}}

{{/*
The init container that writes the pack when pack.source is initContainer; nothing otherwise.
Its securityContext is the component's container securityContext.
Usage: {{ include "squint.pack.initContainers" (dict "context" $ "securityContext" .Values.vision.containerSecurityContext) }}
*/}}
{{- define "squint.pack.initContainers" -}}
{{- $ctx := .context -}}
{{- if eq $ctx.Values.pack.source "initContainer" }}
{{- $init := $ctx.Values.pack.initContainer -}}
{{- $image := $init.image -}}
{{- if not $image.repository -}}
{{- $image = merge (dict "pullPolicy" $init.image.pullPolicy) $ctx.Values.orchestrator.image -}}
{{- end -}}
- name: pack
  image: {{ include "squint.image" (dict "image" $image "context" $ctx) }}
  imagePullPolicy: {{ $image.pullPolicy }}
  command:
    {{- toYaml $init.command | nindent 4 }}
  env:
    - name: PACK_DIR
      value: {{ $ctx.Values.pack.mountPath | quote }}
    - name: HOME
      value: /tmp
    - name: HF_HUB_OFFLINE
      value: "1"
    {{- with $init.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  resources:
    {{- toYaml $init.resources | nindent 4 }}
  {{- if .securityContext.enabled }}
  securityContext:
    {{- include "squint.securityContext" .securityContext | nindent 4 }}
  {{- end }}
  volumeMounts:
    - name: pack
      mountPath: {{ $ctx.Values.pack.mountPath | quote }}
    - name: tmp
      mountPath: /tmp
{{- end }}
{{- end -}}

{{/*
The environment every Squint process gets besides its settings: a writable HOME and caches
on the /tmp emptyDir (the root filesystem is read-only), and no model hub at run time (packs
are local folders).
*/}}
{{- define "squint.runtimeEnv" -}}
HOME: "/tmp"
XDG_CACHE_HOME: "/tmp/.cache"
HF_HOME: "/tmp/.cache/huggingface"
HF_HUB_OFFLINE: "1"
PYTHONUNBUFFERED: "1"
{{- end -}}

{{/*
A PodDisruptionBudget's spec fields from a pdb value: minAvailable, else maxUnavailable, else maxUnavailable 1.
*/}}
{{- define "squint.pdbSpec" -}}
{{- if not (eq (toString .minAvailable) "") -}}
minAvailable: {{ .minAvailable }}
{{- else if not (eq (toString .maxUnavailable) "") -}}
maxUnavailable: {{ .maxUnavailable }}
{{- else -}}
maxUnavailable: 1
{{- end -}}
{{- end -}}

{{/*
Cross-field checks the schema cannot express. Each failure names the value and the --set
that fixes it; all of them are reported at once.
*/}}
{{- define "squint.validateValues" -}}
{{- $messages := list -}}
{{- $messages = append $messages (include "squint.validateValues.pack" .) -}}
{{- $messages = append $messages (include "squint.validateValues.listen" .) -}}
{{- $messages = append $messages (include "squint.validateValues.redis" .) -}}
{{- $messages = append $messages (include "squint.validateValues.autoscaling" .) -}}
{{- $messages = append $messages (include "squint.validateValues.grace" .) -}}
{{- $messages = append $messages (include "squint.validateValues.ports" .) -}}
{{- $messages = without $messages "" -}}
{{- $message := join "\n" $messages -}}
{{- if $message -}}
{{- printf "\nVALUES VALIDATION:\n%s" $message | fail -}}
{{- end -}}
{{- end -}}

{{- define "squint.validateValues.pack" -}}
{{- if and (eq .Values.pack.source "pvc") (not .Values.pack.pvc.claimName) }}
squint: pack.pvc.claimName
    pack.source is pvc but no claim is named. Name the PersistentVolumeClaim holding the
    model pack (--set pack.pvc.claimName=my-pack) or let an init container write it
    (--set pack.source=initContainer).
{{- end }}
{{- if and (eq .Values.pack.source "initContainer") (not .Values.pack.initContainer.command) }}
squint: pack.initContainer.command
    pack.source is initContainer but the command is empty. Give the command that writes
    the pack into $PACK_DIR (--set 'pack.initContainer.command={sh,-c,cp -r /src/. "$PACK_DIR"}').
{{- end }}
{{- end -}}

{{- define "squint.validateValues.listen" -}}
{{- range $key := list "orchestrator" "vision" -}}
{{- $host := (index $.Values $key).config.grpc.host -}}
{{- if has $host (list "127.0.0.1" "localhost" "::1") }}
squint: {{ $key }}.config.grpc.host
    {{ $host }} is reachable from inside the pod only: probes and peers would never
    connect. Listen on every address (--set {{ $key }}.config.grpc.host=0.0.0.0).
{{- end }}
{{- $metricsHost := dig "metrics" "host" "" (index $.Values $key).config -}}
{{- if and (dig "metrics" "enabled" false (index $.Values $key).config) (has $metricsHost (list "127.0.0.1" "localhost" "::1")) }}
squint: {{ $key }}.config.metrics.host
    {{ $metricsHost }} hides /metrics from Prometheus. Listen on every address
    (--set {{ $key }}.config.metrics.host=0.0.0.0) or turn metrics off
    (--set {{ $key }}.config.metrics.enabled=false).
{{- end }}
{{- end -}}
{{- end -}}

{{- define "squint.validateValues.redis" -}}
{{- if and .Values.redis.enabled (or .Values.redis.external.url .Values.redis.external.existingSecret) }}
squint: redis.external
    redis.enabled deploys a bundled Redis, and redis.external names another one: pick one.
    Use the external Redis (--set redis.enabled=false) or drop it (--set redis.external.url=).
{{- end }}
{{- end -}}

{{- define "squint.validateValues.autoscaling" -}}
{{- range $key := list "orchestrator" "vision" "llm" -}}
{{- $hpa := (index $.Values $key).autoscaling -}}
{{- if and $hpa.enabled (gt (int $hpa.minReplicas) (int $hpa.maxReplicas)) }}
squint: {{ $key }}.autoscaling
    minReplicas ({{ $hpa.minReplicas }}) is above maxReplicas ({{ $hpa.maxReplicas }})
    (--set {{ $key }}.autoscaling.maxReplicas={{ $hpa.minReplicas }}).
{{- end }}
{{- if and $hpa.enabled (not $hpa.targetCPU) (not $hpa.targetMemory) (not $hpa.metrics) }}
squint: {{ $key }}.autoscaling
    autoscaling is enabled without a metric. Set a target (--set {{ $key }}.autoscaling.targetCPU=80)
    or give {{ $key }}.autoscaling.metrics.
{{- end }}
{{- end -}}
{{- end -}}

{{- define "squint.validateValues.grace" -}}
{{- range $key := list "orchestrator" "vision" -}}
{{- $component := index $.Values $key -}}
{{- if le (int $component.terminationGracePeriodSeconds) (int (ceil $component.config.grpc.shutdownGraceSeconds)) }}
squint: {{ $key }}.terminationGracePeriodSeconds
    Kubernetes kills the pod {{ $component.terminationGracePeriodSeconds }} s after SIGTERM, before the
    {{ $component.config.grpc.shutdownGraceSeconds }} s the server gives in-flight calls
    (--set {{ $key }}.terminationGracePeriodSeconds={{ add (int (ceil $component.config.grpc.shutdownGraceSeconds)) 5 }}).
{{- end }}
{{- end -}}
{{- if le (int .Values.llm.terminationGracePeriodSeconds) (int .Values.llm.triton.exitTimeoutSeconds) }}
squint: llm.terminationGracePeriodSeconds
    Kubernetes kills Triton {{ .Values.llm.terminationGracePeriodSeconds }} s after SIGTERM, before its
    --exit-timeout-secs of {{ .Values.llm.triton.exitTimeoutSeconds }} s
    (--set llm.terminationGracePeriodSeconds={{ add (int .Values.llm.triton.exitTimeoutSeconds) 10 }}).
{{- end }}
{{- end -}}

{{- define "squint.validateValues.ports" -}}
{{- range $key := list "orchestrator" "vision" -}}
{{- $config := (index $.Values $key).config -}}
{{- if and (dig "metrics" "enabled" false $config) (eq (int $config.grpc.port) (int (dig "metrics" "port" 0 $config))) }}
squint: {{ $key }}.config.metrics.port
    gRPC and /metrics both want port {{ $config.grpc.port }}
    (--set {{ $key }}.config.metrics.port={{ add (int $config.grpc.port) 1000 }}).
{{- end }}
{{- end -}}
{{- $ports := .Values.llm.containerPorts -}}
{{- if or (eq (int $ports.http) (int $ports.grpc)) (eq (int $ports.http) (int $ports.metrics)) (eq (int $ports.grpc) (int $ports.metrics)) }}
squint: llm.containerPorts
    Triton's http, grpc and metrics ports must differ (they are {{ $ports.http }}, {{ $ports.grpc }}, {{ $ports.metrics }}).
{{- end }}
{{- end -}}
