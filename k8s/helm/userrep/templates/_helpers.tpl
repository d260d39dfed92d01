{{- define "userrep.labels" -}}
app.kubernetes.io/part-of: userrep
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end }}
{{- /* Every pod's labels: the NetworkPolicies admit traffic by component (networkpolicy.yaml). */ -}}
{{- define "userrep.podLabels" -}}
app.kubernetes.io/part-of: userrep
app.kubernetes.io/component: {{ . }}
{{- end }}
{{- define "userrep.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end }}
{{- define "userrep.podSecurity" -}}
runAsNonRoot: true
runAsUser: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end }}
{{- define "userrep.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end }}
{{- define "userrep.skipImageChecks" -}}
checkov.io/skip1: CKV_K8S_43=the image is built from this repo's Dockerfile; pin a digest through image.tag when a registry holds it
checkov.io/skip2: CKV_K8S_15=pullPolicy is a value (IfNotPresent for kind/minikube, which load images without a registry)
{{- end }}
