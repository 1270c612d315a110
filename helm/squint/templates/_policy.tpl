{{/*
The HorizontalPodAutoscaler, PodDisruptionBudget and the pieces of NetworkPolicies that
orchestrator, vision and llm share. Each component's hpa.yaml / pdb.yaml includes these.
*/}}

{{/*
Usage: {{ include "squint.hpa" (dict "context" $ "key" "vision" "component" "vision-worker") }}
*/}}
{{- define "squint.hpa" -}}
{{- $ctx := .context -}}
{{- $values := index $ctx.Values .key -}}
{{- $hpa := $values.autoscaling -}}
{{- if $hpa.enabled }}
{{- $name := include "squint.componentName" (dict "context" $ctx "component" .component) }}
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ $name }}
  namespace: {{ include "squint.namespace" $ctx | quote }}
  labels:
    {{- include "squint.labels" (dict "context" $ctx "component" .component) | nindent 4 }}
  {{- with include "squint.annotations" (dict "context" $ctx) }}
  annotations:
    {{- . | nindent 4 }}
  {{- end }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ $name }}
  minReplicas: {{ $hpa.minReplicas }}
  maxReplicas: {{ $hpa.maxReplicas }}
  metrics:
    {{- if $hpa.targetCPU }}
    - type: Resource
      resource:
        name: cpu
        target:
          type: Utilization
          averageUtilization: {{ $hpa.targetCPU }}
    {{- end }}
    {{- if $hpa.targetMemory }}
    - type: Resource
      resource:
        name: memory
        target:
          type: Utilization
          averageUtilization: {{ $hpa.targetMemory }}
    {{- end }}
    {{- with $hpa.metrics }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $hpa.behavior }}
  behavior:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
{{- end -}}

{{/*
Usage: {{ include "squint.pdb" (dict "context" $ "key" "vision" "component" "vision-worker") }}
*/}}
{{- define "squint.pdb" -}}
{{- $ctx := .context -}}
{{- $pdb := (index $ctx.Values .key).pdb -}}
{{- if $pdb.create }}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "squint.componentName" (dict "context" $ctx "component" .component) }}
  namespace: {{ include "squint.namespace" $ctx | quote }}
  labels:
    {{- include "squint.labels" (dict "context" $ctx "component" .component) | nindent 4 }}
  {{- with include "squint.annotations" (dict "context" $ctx) }}
  annotations:
    {{- . | nindent 4 }}
  {{- end }}
spec:
  {{- include "squint.pdbSpec" $pdb | nindent 2 }}
  selector:
    matchLabels:
      {{- include "squint.matchLabels" (dict "context" $ctx "component" .component) | nindent 6 }}
{{- end }}
{{- end -}}

{{/* The NetworkPolicyPeer of a component's pods. Usage: (dict "context" $ "component" "orchestrator") */}}
{{- define "squint.networkPolicy.peer" -}}
- podSelector:
    matchLabels:
      {{- include "squint.matchLabels" . | nindent 6 }}
{{- end -}}

{{/* An ingress rule for the metrics port: from networkPolicy.metricsFrom, or from anywhere. */}}
{{- define "squint.networkPolicy.metricsIngress" -}}
- ports:
    - port: {{ .port }}
      protocol: TCP
  {{- with .context.Values.networkPolicy.metricsFrom }}
  from:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}

{{/*
policyTypes and the egress of a component when networkPolicy.allowExternalEgress is false:
DNS, the given peers (a list of {component, port}) and networkPolicy.extraEgress.
Usage: {{ include "squint.networkPolicy.egress" (dict "context" $ "peers" (list (dict "component" "redis" "port" 6379))) }}
*/}}
{{- define "squint.networkPolicy.egress" -}}
{{- $ctx := .context -}}
{{- if $ctx.Values.networkPolicy.allowExternalEgress -}}
policyTypes:
  - Ingress
{{- else -}}
policyTypes:
  - Ingress
  - Egress
egress:
  - ports:
      - port: 53
        protocol: UDP
      - port: 53
        protocol: TCP
  {{- range .peers }}
  - ports:
      - port: {{ .port }}
        protocol: TCP
    to:
      {{- include "squint.networkPolicy.peer" (dict "context" $ctx "component" .component) | nindent 6 }}
  {{- end }}
  {{- with $ctx.Values.networkPolicy.extraEgress }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}
{{- end -}}
