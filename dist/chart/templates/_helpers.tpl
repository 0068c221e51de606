{{/* Labels Helm adds to every object of the release, and to the pods:
the version's makes every upgrade replace the pods, even one whose
images did not change. */}}
{{- define "layercache.labels" -}}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "layercache.image" -}}
{{ .repository }}{{ if .digest }}@{{ .digest }}{{ else }}:{{ .tag }}{{ end }}
{{- end -}}

{{/* The registry flags, shared by the manager and the node agent. */}}
{{- define "layercache.registryArgs" -}}
{{- with .Values.registry }}
{{- if .url }}
- --registry={{ .url }}
{{- if .insecure }}
- --registry-insecure
{{- end }}
{{- if .authSecret }}
- --registry-auth-file=/etc/layercache/registry/.dockerconfigjson
{{- end }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "layercache.registryMount" -}}
{{- if and .Values.registry.url .Values.registry.authSecret }}
- name: registry-auth
  mountPath: /etc/layercache/registry
  readOnly: true
{{- end }}
{{- end -}}

{{- define "layercache.registryVolume" -}}
{{- if and .Values.registry.url .Values.registry.authSecret }}
- name: registry-auth
  secret:
    secretName: {{ .Values.registry.authSecret }}
{{- end }}
{{- end -}}
