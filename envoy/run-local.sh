#!/usr/bin/env bash
# The docker-compose demo without Docker: two simulated neurons (beast and
# rig2, as in docker-compose.yaml), cortex-extproc and a locally installed
# Envoy (>= 1.31), all on 127.0.0.1. Ctrl-C stops them all.
#
#   envoy/run-local.sh                       # from any directory
#   ENVOY=/opt/envoy/bin/envoy envoy/run-local.sh
#   BIN_DIR=/tmp/bin envoy/run-local.sh      # use cortex-extproc and neuron-sim from there instead of building them
#   envoy/run-local.sh --print-commands      # print each process's command line (tab-separated) and exit
#
# Ports, as compose publishes them on the host (so stop compose first):
# Envoy 8080 (admin 9901), cortex-extproc 9002 (admin 9090), beast 13131,
# rig2 13132. Configs: envoy/envoy-local.yaml, envoy/local/cortex-extproc.toml
# and compose's catalogue, deploy/compose/models.toml (edits reload live).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
catalogue=$root/deploy/compose/models.toml
config=$here/local/cortex-extproc.toml
envoy_config=$here/envoy-local.yaml
envoy_bin=${ENVOY:-envoy}
ports="8080 9901 9002 9090 13131 13132"

usage() {
	sed -n '2,14s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
}

die() {
	echo "run-local.sh: $*" >&2
	exit 1
}

# commands sets one array per process; $1 is prepended to the names of
# cortex-extproc and neuron-sim (their directory, with a trailing slash).
commands() {
	beast=("${1}neuron-sim" --listen=127.0.0.1:13131 --name=beast --devices=24564,24564
		--models=Qwen/Qwen3-1.7B "--catalogue=$catalogue"
		--load-latency=5s --token-interval=200ms --max-in-flight=4)
	rig2=("${1}neuron-sim" --listen=127.0.0.1:13132 --name=rig2 --devices=16384
		--models=Qwen/Qwen3-4B --unloaded=unsloth/Qwen3-0.6B-GGUF "--catalogue=$catalogue"
		--load-latency=3s --token-interval=200ms --max-in-flight=2)
	cortex=("${1}cortex-extproc" serve --config "$config")
	# No hot restart: it would claim shared memory another Envoy on this
	# machine may be using.
	envoy=("$envoy_bin" -c "$envoy_config" --disable-hot-restart --log-level warn)
}

case "${1:-}" in
"") ;;
--print-commands)
	commands "${BIN_DIR:+$BIN_DIR/}"
	(
		IFS=$'\t'
		printf '%s\t%s\n' beast "${beast[*]}" rig2 "${rig2[*]}" cortex-extproc "${cortex[*]}" envoy "${envoy[*]}"
	)
	exit 0
	;;
-h | --help)
	usage
	exit 0
	;;
*)
	usage >&2
	die "unknown argument \"$1\" (see above)"
	;;
esac

# listening reports whether something accepts connections on 127.0.0.1:$1.
listening() {
	(exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# --- Before starting anything: every check that can fail early.

command -v "$envoy_bin" >/dev/null 2>&1 ||
	die "Envoy not found (\"$envoy_bin\"): install Envoy >= 1.31 (https://www.envoyproxy.io/docs/envoy/latest/start/install, or func-e) and put it on PATH, or set ENVOY=/path/to/envoy. With Docker, \`docker compose up\` runs the same demo."
# `envoy --version` prints …/<major.minor.patch>/<status>/<mode>/<TLS>.
version=$("$envoy_bin" --version 2>&1 | sed -n 's#.*/\([0-9][0-9]*\)\.\([0-9][0-9]*\)\.[0-9][0-9]*[^/]*/.*#\1 \2#p' | head -n 1)
if [ -n "$version" ]; then
	set -- $version
	if [ "$1" -lt 1 ] || { [ "$1" -eq 1 ] && [ "$2" -lt 31 ]; }; then
		die "$envoy_bin is Envoy $1.$2; envoy-local.yaml needs Envoy >= 1.31 (route_cache_action): install a newer one or set ENVOY"
	fi
fi
if ! out=$("$envoy_bin" --mode validate -c "$envoy_config" 2>&1); then
	echo "$out" >&2
	die "Envoy rejects $envoy_config (its message is above); it needs Envoy >= 1.31"
fi

for p in $ports; do
	if listening "$p"; then
		die "127.0.0.1:$p is already in use (the docker compose demo? \`docker compose down\` stops it); free it and run again"
	fi
done

work=$(mktemp -d "${TMPDIR:-/tmp}/cortex-local.XXXXXX")
pids=()
labels=()

stop() {
	trap - EXIT INT TERM
	local i
	# Envoy first, then cortex-extproc, then the neurons.
	for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
		kill -TERM "${pids[i]}" 2>/dev/null || true
	done
	for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
		wait "${pids[i]}" 2>/dev/null || true
	done
	rm -rf "$work"
	[ ${#pids[@]} -eq 0 ] || echo "run-local.sh: stopped ${labels[*]}" >&2
}
trap stop EXIT
trap 'exit 130' INT TERM

if [ -n "${BIN_DIR:-}" ]; then
	bin=$BIN_DIR
	for b in cortex-extproc neuron-sim; do
		[ -x "$bin/$b" ] || die "BIN_DIR=$bin has no executable $b: go build -o $bin/ ./cmd/cortex-extproc ./cmd/neuron-sim"
	done
else
	command -v go >/dev/null 2>&1 ||
		die "go not found: install Go (https://go.dev/dl/), or build cortex-extproc and neuron-sim elsewhere and set BIN_DIR to their directory"
	bin=$work
	echo "run-local.sh: building cortex-extproc and neuron-sim" >&2
	(cd "$root" && go build -o "$bin/" ./cmd/cortex-extproc ./cmd/neuron-sim) ||
		die "go build failed (output above)"
fi
commands "$bin/"

"${cortex[0]}" validate --config "$config" >&2 ||
	die "$config has the problems listed above"

# start LABEL COMMAND...: runs it in the background, each output line
# prefixed with [LABEL]. Job control is on just for the fork, which gives
# the process a process group of its own: Ctrl-C then reaches only this
# script, whose stop signals them in turn, Envoy first, and waits for
# them. (On for longer, it would put the script's own foreground commands
# in groups of their own too, and Ctrl-C would go to those instead.)
start() {
	local label=$1
	shift
	set -m
	"$@" > >(
		trap '' INT
		while IFS= read -r line; do printf '[%s] %s\n' "$label" "$line"; done
	) 2>&1 &
	pids+=($!)
	set +m
	labels+=("$label")
}

# exited I: the message for process I, which has exited.
exited() {
	local status=0
	wait "${pids[$1]}" 2>/dev/null || status=$?
	echo "${labels[$1]} exited with status $status (its output is above)"
}

# await WHAT CHECK...: polls CHECK until it succeeds, failing when a
# process already started has exited or after 60 s.
await() {
	local what=$1 i n
	shift
	for ((n = 0; n < 120; n++)); do
		"$@" && return 0
		for i in "${!pids[@]}"; do
			kill -0 "${pids[i]}" 2>/dev/null || die "$(exited "$i") while waiting for $what"
		done
		sleep 0.5
	done
	die "$what: not there after 60 s"
}

ready() {
	if command -v curl >/dev/null 2>&1; then
		curl -fsS -o /dev/null http://127.0.0.1:9090/readyz 2>/dev/null
	else
		listening 9002
	fi
}

start beast "${beast[@]}"
start rig2 "${rig2[@]}"
start cortex-extproc "${cortex[@]}"
await "cortex-extproc to be ready (catalogue read, first poll done)" ready
start envoy "${envoy[@]}"
await "Envoy's listener on 127.0.0.1:8080" listening 8080

cat >&2 <<'EOF'

run-local.sh: ready. Envoy on localhost:8080, cortex-extproc's admin on localhost:9090; Ctrl-C stops everything.
  curl -s localhost:8080/v1/models | jq '.data[] | {id, loaded}'
  curl -si localhost:8080/v1/chat/completions -H 'content-type: application/json' \
    -d '{"model":"helexa/small","messages":[{"role":"user","content":"hi"}]}'
  curl -s localhost:9090/debug/fleet | jq

EOF

# Keep running until Ctrl-C, or until one of the processes exits.
while :; do
	for i in "${!pids[@]}"; do
		kill -0 "${pids[i]}" 2>/dev/null || die "$(exited "$i"); stopping the others"
	done
	sleep 1
done
