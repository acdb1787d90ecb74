{{- define "kubeinfer.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kubeinfer.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- printf "%s-operator" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s-operator" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kubeinfer.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubeinfer.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "kubeinfer.labels" -}}
{{ include "kubeinfer.selectorLabels" . }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "kubeinfer.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kubeinfer.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "kubeinfer.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/*
The operator's permissions: exactly the verbs kubeinfer/operator/apply.py and kopf use.
*/}}
{{- define "kubeinfer.rules" -}}
- apiGroups: ["kubeinfer.io"]
  resources: ["inferenceservices"]
  verbs: ["get", "list", "watch", "patch"]     # patch: kopf's progress annotations, autoscaling's spec.replicas
- apiGroups: ["kubeinfer.io"]
  resources: ["inferenceservices/status"]
  verbs: ["patch"]
- apiGroups: ["kubeinfer.io"]
  resources: ["inferenceservices/finalizers"]
  verbs: ["update"]                             # ownerReferences with blockOwnerDeletion
- apiGroups: ["apps"]
  resources: ["deployments", "statefulsets"]
  verbs: ["get", "list", "watch", "create", "update", "delete"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "list", "watch", "create", "update", "delete"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "list", "watch", "create", "update", "delete"]
- apiGroups: ["leaderworkerset.x-k8s.io"]
  resources: ["leaderworkersets"]
  verbs: ["get", "list", "watch", "create", "update", "delete"]
- apiGroups: ["inference.networking.k8s.io"]
  resources: ["inferencepools"]
  verbs: ["get", "list", "create", "update", "delete"]   # spec.router inference-pool
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "update", "delete"]   # spec.model.cache's download Job
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["get", "list", "watch", "create", "update", "delete"]   # spec.model.cache's claim
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]                      # status: which pods are ready, and why not
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "create"]                      # pipeline > 1: NAME-node-secret, made once
- apiGroups: [""]
  resources: ["pods/log"]
  verbs: ["get"]                                # the download Job's progress line
{{- if eq .Values.autoscaling.scrapeVia "apiserver" }}
- apiGroups: [""]
  resources: ["pods/proxy"]
  verbs: ["get"]                                # spec.autoscaling reads engine /metrics through it
{{- end }}
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end -}}
