#!/usr/bin/env bash
# Installs what building and testing agentgate needs on a fresh Debian machine, and
# nothing when it is all there already. Go and Rust (cargo) must be installed.
set -euo pipefail
log() { echo "deps: $*" >&2; }

for tool in go cargo; do
  command -v "$tool" >/dev/null || { log "$tool is required but not installed"; exit 1; }
done
for component in fmt clippy; do
  cargo "$component" --version >/dev/null 2>&1 \
    || { log "cargo $component is required: rustup component add ${component/fmt/rustfmt}"; exit 1; }
done

# command → Debian package
declare -A packages=(
  [openssl]=openssl
  [python3]=python3
  [setsid]=util-linux
)
missing=()
for cmd in "${!packages[@]}"; do
  command -v "$cmd" >/dev/null || missing+=("${packages[$cmd]}")
done
[ -f /etc/ssl/certs/ca-certificates.crt ] || missing+=(ca-certificates)
# PostgreSQL's own parser (the pg_query crate) is C, bound with bindgen: a C compiler
# and libclang.
command -v cc >/dev/null || missing+=(gcc libc6-dev)
compgen -G "/usr/lib/llvm-*/lib/libclang.so" >/dev/null || missing+=(libclang-dev)
# The Postgres gateway's tests run a real server with psql and pgbench as clients;
# `make bench` compares against pgbouncer.
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
command -v psql >/dev/null || missing+=(postgresql-client)
command -v pgbouncer >/dev/null || [ -x /usr/sbin/pgbouncer ] || missing+=(pgbouncer)

if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  log "installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# The Azure Blob audit sink's tests run Azurite (a real implementation of the Blob
# API) from npm, installed outside the work tree at a path the tests know:
# ~/.cache/agentgate/npm/bin/azurite-blob (AGENTGATE_NPM_PREFIX overrides the prefix).
AZURITE_VERSION=3.37.0
npm_prefix="${AGENTGATE_NPM_PREFIX:-$HOME/.cache/agentgate/npm}"
if ! "$npm_prefix/bin/azurite-blob" --version 2>/dev/null | grep -qx "$AZURITE_VERSION"; then
  if ! command -v npm >/dev/null; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    log "installing nodejs npm"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends nodejs npm
  fi
  log "installing azurite@$AZURITE_VERSION into $npm_prefix"
  mkdir -p "$npm_prefix"
  npm install --global --prefix "$npm_prefix" --no-fund --no-audit --loglevel=error "azurite@$AZURITE_VERSION" >&2
fi
