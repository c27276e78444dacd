{{/* The release's name for its objects: "<release>-parallama", or the release alone if it
says parallama already; 63 characters at most (a DNS label). */}}
{{- define "parallama.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "parallama.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "parallama.labels" -}}
{{ include "parallama.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* repository:tag, or repository@digest when a digest pins it. */}}
{{- define "parallama.image" -}}
{{- if .digest -}}
{{- printf "%s@%s" .repository .digest -}}
{{- else -}}
{{- printf "%s:%s" .repository .tag -}}
{{- end -}}
{{- end -}}

{{- define "parallama.secretName" -}}
{{- .Values.secrets.existingSecret | default (include "parallama.fullname" .) -}}
{{- end -}}

{{- define "parallama.redisName" -}}
{{- printf "%s-redis" (include "parallama.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Redis's own labels: none of the gateway's selector, so that neither its Service nor the
ServiceMonitor picks Redis up. */}}
{{- define "parallama.redisSelectorLabels" -}}
app.kubernetes.io/name: {{ include "parallama.redisName" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "parallama.redisLabels" -}}
{{ include "parallama.redisSelectorLabels" . }}
app.kubernetes.io/component: redis
app.kubernetes.io/part-of: {{ include "parallama.fullname" . }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* The pods' shared security settings: not root, nothing written but /tmp, no privilege. */}}
{{- define "parallama.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}
