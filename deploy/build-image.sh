#!/usr/bin/env bash
# Build (and with --push, push) the cortex-extproc image of this checkout:
#
#   ghcr.io/helexa/cortex-extproc:<version>
#
# <version> is `git describe --tags --always --dirty` without its leading
# "v". On a release tag vX.Y.Z it is X.Y.Z: the tag deploy/kubernetes and
# the Helm chart pin (Chart.yaml appVersion). Between releases it says how
# far from the last one (0.1.0-3-gabc1234), and no manifest refers to it.
#
# Releasing X.Y.Z: set appVersion (and the chart's version) in
# deploy/helm/cortex-extproc/Chart.yaml and the image in
# deploy/kubernetes/*.yaml to X.Y.Z (`go test ./deploy/` checks they
# agree), commit, tag vX.Y.Z, then run this with --push. A release tag that
# does not match appVersion is refused.
#
# Usage: deploy/build-image.sh [--push] [--dry-run]
#   --push      push the image after building it
#   --dry-run   print the docker commands instead of running them
#   IMAGE=repo/name   build into another repository
#   VERSION=vX.Y.Z    use this instead of git describe
#
# Needs Docker with BuildKit (the Dockerfile uses RUN --mount).
set -euo pipefail
cd "$(dirname "$0")/.."

push=false
dry=false
for arg in "$@"; do
  case "$arg" in
    --push) push=true ;;
    --dry-run) dry=true ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-image.sh: unknown argument \"$arg\"; use --push and/or --dry-run (--help explains)" >&2; exit 2 ;;
  esac
done

image="${IMAGE:-ghcr.io/helexa/cortex-extproc}"
describe="${VERSION:-$(git describe --tags --always --dirty 2>/dev/null || true)}"
if [ -z "$describe" ]; then
  echo "build-image.sh: git describe found no commit; run it in a git checkout, or set VERSION=vX.Y.Z" >&2
  exit 1
fi
version="${describe#v}"
commit="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
go_version="$(sed -n 's/^go \([0-9.]*\)$/\1/p' go.mod)"
chart=deploy/helm/cortex-extproc/Chart.yaml
app_version="$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' "$chart")"

if [[ "$describe" =~ ^v[0-9]+\.[0-9]+\.[0-9]+(-rc\.[0-9]+)?$ ]]; then
  if [ "$version" != "$app_version" ]; then
    echo "build-image.sh: release tag $describe, but $chart has appVersion \"$app_version\": set appVersion, the chart's version and the image in deploy/kubernetes/*.yaml to $version first (go test ./deploy/ checks they agree)" >&2
    exit 1
  fi
else
  echo "build-image.sh: $describe is not a release tag (vX.Y.Z): $image:$version is for testing; the manifests pin $image:$app_version" >&2
fi

run() {
  if $dry; then
    printf '%q ' "$@"; echo
  else
    "$@"
  fi
}

run env DOCKER_BUILDKIT=1 docker build -f deploy/Dockerfile --target cortex-extproc \
  --build-arg "GO_VERSION=$go_version" --build-arg "VERSION=$describe" --build-arg "COMMIT=$commit" \
  -t "$image:$version" .
if $push; then
  run docker push "$image:$version"
fi
echo "built $image:$version" >&2
