{{/* Object names: the release name, or <release>-cortex-extproc when the release name does not say cortex-extproc. */}}
{{- define "cortex-extproc.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels every object carries; "name" is the component (cortex-extproc or cortex-envoy). */}}
{{- define "cortex-extproc.labels" -}}
app.kubernetes.io/name: {{ .name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* Labels selectors match: stable across upgrades. */}}
{{- define "cortex-extproc.selectorLabels" -}}
app.kubernetes.io/name: {{ .name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- end -}}

{{- define "cortex-extproc.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* A size in MiB from "512Mi", "1Gi", "900MiB" or "2GiB"; -1 for any other spelling (no check). */}}
{{- define "cortex-extproc.mebibytes" -}}
{{- $s := toString . -}}
{{- if regexMatch "^[0-9]+GiB?$" $s -}}{{ mul (regexFind "^[0-9]+" $s | atoi) 1024 }}
{{- else if regexMatch "^[0-9]+MiB?$" $s -}}{{ regexFind "^[0-9]+" $s | atoi }}
{{- else -}}-1{{- end -}}
{{- end -}}

{{/* Go duration ("20s", "1m30s", "2m") in seconds, for the checks below; -1 if not understood. */}}
{{- define "cortex-extproc.seconds" -}}
{{- $s := toString . -}}
{{- if regexMatch "^([0-9]+h)?([0-9]+m)?([0-9]+s)?$" $s -}}
{{- $h := regexFind "[0-9]+h" $s | trimSuffix "h" | default "0" | atoi -}}
{{- $m := regexFind "[0-9]+m" $s | trimSuffix "m" | default "0" | atoi -}}
{{- $sec := regexFind "[0-9]+s" $s | trimSuffix "s" | default "0" | atoi -}}
{{- add (mul $h 3600) (mul $m 60) $sec -}}
{{- else -}}-1{{- end -}}
{{- end -}}

{{/* Refuse values that would break a rolling restart or the pod. */}}
{{- define "cortex-extproc.validate" -}}
{{- $delay := include "cortex-extproc.seconds" .Values.config.shutdownDelay | atoi -}}
{{- $drain := include "cortex-extproc.seconds" .Values.config.drainTimeout | atoi -}}
{{- if or (lt $delay 0) (lt $drain 0) -}}
{{- fail (printf "config.shutdownDelay %q and config.drainTimeout %q must be Go durations in whole seconds, minutes or hours, such as 20s, 1m30s or 2m" (toString .Values.config.shutdownDelay) (toString .Values.config.drainTimeout)) -}}
{{- end -}}
{{- $need := add $delay $drain 15 -}}
{{- if lt (int .Values.terminationGracePeriodSeconds) $need -}}
{{- fail (printf "terminationGracePeriodSeconds %d is shorter than cortex-extproc's shutdown: config.shutdownDelay + config.drainTimeout + 15s = %ds; raise it, or the kubelet kills requests held for cold loads" (int .Values.terminationGracePeriodSeconds) $need) -}}
{{- end -}}
{{- $limit := include "cortex-extproc.mebibytes" .Values.resources.limits.memory | atoi -}}
{{- $soft := include "cortex-extproc.mebibytes" .Values.goMemLimit | atoi -}}
{{- if and (gt $limit 0) (gt $soft 0) (ge $soft $limit) -}}
{{- fail (printf "goMemLimit %s is not below resources.limits.memory %s: set it to about 90%% of the limit (e.g. %dMiB) so the Go GC acts before the OOM killer" (toString .Values.goMemLimit) (toString .Values.resources.limits.memory) (div (mul $limit 9) 10)) -}}
{{- end -}}
{{- if not .Values.neurons -}}
{{- fail "neurons is empty: list the GPU hosts (name, endpoint http://host:port), or every request gets 503" -}}
{{- end -}}
{{- if and .Values.tls.secretName .Values.envoy.enabled -}}
{{- fail "tls.secretName is set but the Envoy this chart renders speaks plain HTTP/2 to cortex-extproc: set envoy.enabled=false and give your own Envoy's extproc cluster an UpstreamTlsContext" -}}
{{- end -}}
{{- end -}}
