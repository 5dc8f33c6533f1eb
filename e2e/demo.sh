#!/usr/bin/env bash
# demo.sh up|down DIR — the `make demo` walk-through: a local kube-apiserver + etcd, the
# agentgate CRDs and examples applied, and what a user would look at.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
action=${1:?usage: demo.sh up|down DIR}
dir=${2:?usage: demo.sh up|down DIR}

if [ "$action" = down ]; then
  if [ -f "$dir/operator.pid" ]; then kill "$(cat "$dir/operator.pid")" 2>/dev/null || true; fi
  "$here/controlplane/down.sh" --purge "$dir"
  echo "demo control plane stopped"
  exit 0
fi

bin=$("$here/controlplane/build.sh")
kubectl() { "$bin/kubectl" --kubeconfig "$dir/kubeconfig" "$@"; }
show() { printf '\n\033[1m$ kubectl %s\033[0m\n' "$*"; kubectl "$@" || true; }

if [ -f "$dir/apiserver.pid" ] && kill -0 "$(cat "$dir/apiserver.pid")" 2>/dev/null; then
  echo "reusing the demo control plane in $dir"
else
  "$here/controlplane/down.sh" --purge "$dir"
  "$here/controlplane/up.sh" "$dir" >/dev/null
fi

kubectl apply --server-side -f "$root/crds/manifests" >/dev/null
kubectl wait --for=condition=Established --timeout=60s \
  crd/connections.agentgate.dev crd/agentaccesspolicies.agentgate.dev \
  crd/approvals.agentgate.dev crd/agentsessions.agentgate.dev >/dev/null
kubectl apply -f "$root/examples" >/dev/null
# Start from the story's beginning when the demo is run again.
kubectl delete serviceaccount agent-k8s-reader -n agents --ignore-not-found >/dev/null

# The operator, as a local process against the demo API server.
echo "building and starting the operator (the first build takes a few minutes)..."
(cd "$root" && cargo build --quiet -p agentgate-operator --bin agentgate-operator)
if ! { [ -f "$dir/operator.pid" ] && kill -0 "$(cat "$dir/operator.pid")" 2>/dev/null; }; then
  kubectl create namespace agentgate-system >/dev/null 2>&1 || true
  ports=$(python3 -c 'import socket
s=[socket.socket() for _ in range(2)]
[x.bind(("127.0.0.1",0)) for x in s]
print(*(x.getsockname()[1] for x in s))')
  read -r webhook_port admin_port <<<"$ports"
  KUBECONFIG="$dir/kubeconfig" nohup "${CARGO_TARGET_DIR:-$root/target}/debug/agentgate-operator" \
    --namespace agentgate-system --webhook-hosts 127.0.0.1 --leader-election=false \
    --webhook-addr "127.0.0.1:$webhook_port" --admin-addr "127.0.0.1:$admin_port" \
    </dev/null >"$dir/operator.log" 2>&1 &
  echo $! > "$dir/operator.pid"
fi
kubectl wait --for=condition=Ready=False connection/prod-cluster -n agents --timeout=60s >/dev/null

echo
echo "The operator checked every Connection and policy. prod-cluster names a service account that does not exist,"
echo "so it is not Ready — and neither is the policy that uses it:"
show get agentgate -n agents
show get connection prod-cluster -n agents -o jsonpath='{.status.conditions[0].message}{"\n"}'

echo
echo "Create the service account, and both become Ready; the policy reaches the sidecars' bundle:"
kubectl create serviceaccount agent-k8s-reader -n agents >/dev/null 2>&1 || true
kubectl wait --for=condition=Ready agentaccesspolicy/prod-agents -n agents --timeout=60s >/dev/null
show get agentgate -n agents
show get configmap agentgate-bundle -n agents -o jsonpath='{.metadata.annotations}{"\n"}'
show explain agentaccesspolicy.spec.rules
echo
echo "The API server itself rejects a policy that asks for approval without saying who approves:"
show apply -f - <<'YAML'
apiVersion: agentgate.dev/v1alpha1
kind: AgentAccessPolicy
metadata: { name: broken, namespace: agents }
spec:
  agentSelector: { matchLabels: { agentgate.dev/agent: claude } }
  connections: [ orders-db ]
  rules:
  - { name: writes, match: { sql: { statements: [ delete ] } }, action: approve }
YAML

cat <<MSG

The demo control plane keeps running. Try it yourself:
  export KUBECONFIG=$dir/kubeconfig PATH=$bin:\$PATH
  kubectl get agentgate -A
  kubectl --context bob get approvals -n agents     # bob is an ordinary user: RBAC says no
The operator's log: $dir/operator.log
Stop it all with: make demo-down
MSG
