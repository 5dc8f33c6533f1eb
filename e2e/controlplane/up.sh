#!/usr/bin/env bash
# up.sh DIR — starts etcd and kube-apiserver on loopback, with state, certificates and
# logs in DIR, waits until the API server is ready, and prints the kubeconfig path.
#
# DIR/kubeconfig has one context per user of DIR/tokens.csv (token authentication):
#   admin   (system:masters; the default context)
#   alice   (groups: dba-oncall)       — an approver in the approval tests
#   bob     (groups: developers)       — an ordinary user outside the approver group
#   carol   (groups: dba-oncall, developers)
# When AGENTGATE_CP_OWNER_PID is set, a watchdog stops everything (down.sh --purge)
# once that process exits, so a test binary that dies never leaves servers behind.
# Stop it yourself with down.sh DIR.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dir=${1:?usage: up.sh DIR}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
bin=$("$here/build.sh")

log() { echo "controlplane-up: $*" >&2; }
for tool in openssl python3; do
  command -v "$tool" >/dev/null || { log "$tool is required (make deps installs it)"; exit 1; }
done

# --- ports: ask the kernel for free loopback ports --------------------------------------
read -r etcd_port etcd_peer_port api_port < <(python3 - <<'PY'
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
PY
)

# --- certificates: a CA, the API server's serving cert, the service-account key pair ------
pki=$dir/pki
mkdir -p "$pki"
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=agentgate-test-ca" \
  -keyout "$pki/ca.key" -out "$pki/ca.crt" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" \
  -keyout "$pki/apiserver.key" -out "$pki/apiserver.csr" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc\nextendedKeyUsage=serverAuth\n' > "$pki/apiserver.ext"
openssl x509 -req -in "$pki/apiserver.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" \
  -CAcreateserial -days 2 -extfile "$pki/apiserver.ext" -out "$pki/apiserver.crt" 2>/dev/null
openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null

# --- users: static tokens (user,uid,groups) ------------------------------------------------
# name|groups. "oidc:carol@example.com" is carol as an API server configured for OIDC with
# the username prefix "oidc:" names her.
users=("admin|system:masters" "alice|dba-oncall" "bob|developers" "carol|dba-oncall,developers"
       "oidc:carol@example.com|dba-oncall")
: > "$dir/tokens.csv"
declare -A token
for entry in "${users[@]}"; do
  name=${entry%%|*}; groups=${entry#*|}
  token[$name]=$(openssl rand -hex 24)
  echo "${token[$name]},$name,uid-$name,\"$groups\"" >> "$dir/tokens.csv"
done

# --- etcd ----------------------------------------------------------------------------------
"$bin/etcd" --data-dir "$dir/etcd" --name agentgate-test \
  --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
  --listen-peer-urls "http://127.0.0.1:$etcd_peer_port" \
  --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer_port" \
  --initial-cluster "agentgate-test=http://127.0.0.1:$etcd_peer_port" \
  --unsafe-no-fsync --log-level warn </dev/null >"$dir/etcd.log" 2>&1 &
echo $! > "$dir/etcd.pid"

# --- kube-apiserver ------------------------------------------------------------------------
# ServiceAccount admission is off because no controller-manager creates the tokens it wants.
"$bin/kube-apiserver" \
  --etcd-servers "http://127.0.0.1:$etcd_port" \
  --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$api_port" \
  --cert-dir "$dir/certs" --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
  --service-cluster-ip-range 10.0.0.0/24 \
  --service-account-issuer "https://127.0.0.1:$api_port" \
  --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
  --authorization-mode RBAC --token-auth-file "$dir/tokens.csv" \
  --allow-privileged=true --disable-admission-plugins ServiceAccount \
  --profiling=false </dev/null >"$dir/apiserver.log" 2>&1 &
echo $! > "$dir/apiserver.pid"

# --- kubeconfig ----------------------------------------------------------------------------
ca_data=$(base64 -w0 < "$pki/ca.crt")
{
  echo "apiVersion: v1"
  echo "kind: Config"
  echo "clusters:"
  echo "- name: agentgate-test"
  echo "  cluster: { server: \"https://127.0.0.1:$api_port\", certificate-authority-data: \"$ca_data\" }"
  echo "users:"
  for entry in "${users[@]}"; do
    name=${entry%%|*}
    echo "- name: \"$name\""
    echo "  user: { token: \"${token[$name]}\" }"
  done
  echo "contexts:"
  for entry in "${users[@]}"; do
    name=${entry%%|*}
    echo "- name: \"$name\""
    echo "  context: { cluster: agentgate-test, user: \"$name\", namespace: default }"
  done
  echo "current-context: admin"
} > "$dir/kubeconfig"
chmod 600 "$dir/kubeconfig" "$dir/tokens.csv"

if [ -n "${AGENTGATE_CP_OWNER_PID:-}" ]; then
  owner=$AGENTGATE_CP_OWNER_PID
  setsid bash -c "while kill -0 $owner 2>/dev/null; do sleep 1; done; exec '$here/down.sh' --purge '$dir'" \
    </dev/null >/dev/null 2>&1 &
  echo $! > "$dir/watchdog.pid"
fi

# --- wait for /readyz ----------------------------------------------------------------------
for _ in $(seq 1 120); do
  if "$bin/kubectl" --kubeconfig "$dir/kubeconfig" get --raw /readyz >/dev/null 2>&1; then
    log "ready: https://127.0.0.1:$api_port (logs in $dir)"
    echo "$dir/kubeconfig"
    exit 0
  fi
  for p in etcd apiserver; do
    if ! kill -0 "$(cat "$dir/$p.pid")" 2>/dev/null; then
      log "$p exited; last lines of $dir/$p.log:"; tail -20 "$dir/$p.log" >&2
      "$here/down.sh" "$dir" || true
      exit 1
    fi
  done
  sleep 0.5
done
log "kube-apiserver not ready after 60s; last lines of $dir/apiserver.log:"
tail -20 "$dir/apiserver.log" >&2
"$here/down.sh" "$dir" || true
exit 1
