{{- define "agentgate.labels" -}}
app.kubernetes.io/name: agentgate
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "agentgate.selector" -}}
app.kubernetes.io/name: agentgate
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "agentgate.webhookHost" -}}
agentgate-webhook.{{ .Release.Namespace }}.svc
{{- end }}
