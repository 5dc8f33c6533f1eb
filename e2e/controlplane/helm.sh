#!/usr/bin/env bash
# Builds helm at the pinned version from the Go module proxy (cached outside the work
# tree, like the control plane) and prints the path of the binary.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
. "$here/versions.env"
cache=${AGENTGATE_CACHE:-$HOME/.cache/agentgate}/helm/$HELM_VERSION
if [ ! -x "$cache/helm" ]; then
  echo "helm-build: building helm $HELM_VERSION into $cache" >&2
  mkdir -p "$cache"
  GOTOOLCHAIN=local CGO_ENABLED=0 GOBIN=$cache \
    go install -trimpath -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
    "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
fi
echo "$cache/helm"
