#!/usr/bin/env bash
# demo.sh up|down DIR — the `make demo` walk-through: a local kube-apiserver + etcd, the
# agentgate CRDs and examples applied, and what a user would look at.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
action=${1:?usage: demo.sh up|down DIR}
dir=${2:?usage: demo.sh up|down DIR}

if [ "$action" = down ]; then
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

show get agentgate -n agents
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
Stop it with: make demo-down
MSG
