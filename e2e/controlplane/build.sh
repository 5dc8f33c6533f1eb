#!/usr/bin/env bash
# Builds kube-apiserver, kubectl and etcd from the upstream Go modules at the pinned
# versions and prints the directory holding them (one line, on stdout).
#
# The binaries are cached outside the work tree, keyed by version:
#   ${AGENTGATE_CACHE:-$HOME/.cache/agentgate}/controlplane/<kube>-<etcd>/
# When KUBEBUILDER_ASSETS is set and already holds kube-apiserver, etcd and kubectl,
# that directory is used as it is and nothing is built.
#
# `go install k8s.io/kubernetes/cmd/kube-apiserver@v…` is refused because upstream's
# go.mod replaces its staging modules with local paths, so we build through a wrapper
# module that pins every one of those staging modules to its published v0.x version.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
. "$here/versions.env"

log() { echo "controlplane-build: $*" >&2; }

if [ -n "${KUBEBUILDER_ASSETS:-}" ] \
   && [ -x "$KUBEBUILDER_ASSETS/kube-apiserver" ] && [ -x "$KUBEBUILDER_ASSETS/etcd" ] \
   && [ -x "$KUBEBUILDER_ASSETS/kubectl" ]; then
  log "using KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS"
  echo "$KUBEBUILDER_ASSETS"
  exit 0
fi

cache=${AGENTGATE_CACHE:-$HOME/.cache/agentgate}/controlplane/$KUBE_VERSION-$ETCD_VERSION
if [ -x "$cache/kube-apiserver" ] && [ -x "$cache/etcd" ] && [ -x "$cache/kubectl" ]; then
  echo "$cache"
  exit 0
fi

command -v go >/dev/null || { log "go is required to build the control plane"; exit 1; }
export GOTOOLCHAIN=local GOFLAGS=-mod=mod CGO_ENABLED=0
mkdir -p "$cache"
wrapper=$cache/wrapper
rm -rf "$wrapper"
mkdir -p "$wrapper"

log "building kube-apiserver $KUBE_VERSION, kubectl and etcd $ETCD_VERSION into $cache (cold: several minutes)"
upstream_mod=$(go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" \
  | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')
[ -f "$upstream_mod" ] || { log "could not download k8s.io/kubernetes@$KUBE_VERSION"; exit 1; }

staging_version="v0.${KUBE_VERSION#v1.}"
go_line=$(grep -m1 '^go ' "$upstream_mod")
godebug_line=$(grep -m1 '^godebug ' "$upstream_mod" || true)
{
  echo "module agentgate.dev/e2e/controlplane-wrapper"
  echo
  echo "$go_line"
  [ -n "$godebug_line" ] && echo "$godebug_line"
  echo
  echo "require ("
  echo "	k8s.io/kubernetes $KUBE_VERSION"
  echo "	go.etcd.io/etcd/server/v3 $ETCD_VERSION"
  echo ")"
  echo
  echo "replace ("
  # Every module upstream replaces with ./staging/... is published as v0.<minor>.<patch>.
  sed -n 's|^[[:space:]]*\(k8s.io/[^ ]*\) => ./staging/.*$|\1|p' "$upstream_mod" \
    | while read -r m; do echo "	$m => $m $staging_version"; done
  echo ")"
} > "$wrapper/go.mod"

cd "$wrapper"
ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$KUBE_VERSION"
ldflags+=" -X k8s.io/component-base/version.gitMajor=1"
minor=${KUBE_VERSION#v1.}; minor=${minor%%.*}
ldflags+=" -X k8s.io/component-base/version.gitMinor=$minor"
ldflags+=" -X k8s.io/client-go/pkg/version.gitVersion=$KUBE_VERSION"
ldflags+=" -X k8s.io/client-go/pkg/version.gitMajor=1 -X k8s.io/client-go/pkg/version.gitMinor=$minor"

go build -trimpath -ldflags "$ldflags" -o "$cache/kube-apiserver.tmp" k8s.io/kubernetes/cmd/kube-apiserver
go build -trimpath -ldflags "$ldflags" -o "$cache/kubectl.tmp" k8s.io/kubernetes/cmd/kubectl
go build -trimpath -ldflags "-s -w" -o "$cache/etcd.tmp" go.etcd.io/etcd/server/v3
for b in kube-apiserver kubectl etcd; do mv "$cache/$b.tmp" "$cache/$b"; done
log "done: $("$cache/kube-apiserver" --version), etcd $("$cache/etcd" --version | head -1)"
echo "$cache"
