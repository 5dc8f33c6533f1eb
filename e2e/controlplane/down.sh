#!/usr/bin/env bash
# down.sh [--purge] DIR — stops the kube-apiserver and etcd that up.sh DIR started
# (SIGTERM, then SIGKILL after 10s). With --purge, removes DIR too.
set -uo pipefail
purge=false
if [ "${1:-}" = "--purge" ]; then purge=true; shift; fi
dir=${1:?usage: down.sh [--purge] DIR}
[ -d "$dir" ] || exit 0

stop() {
  local pidfile=$dir/$1.pid pid
  [ -f "$pidfile" ] || return 0
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}
# The API server first, so it does not spend its last seconds retrying a dead etcd.
stop apiserver
stop etcd
# The watchdog (unless it is this very process, exec'd by it) has nothing left to watch.
if [ -f "$dir/watchdog.pid" ]; then
  wpid=$(cat "$dir/watchdog.pid")
  [ "$wpid" != "$$" ] && kill "$wpid" 2>/dev/null
  rm -f "$dir/watchdog.pid"
fi
if $purge && [ "${AGENTGATE_KEEP_CONTROLPLANE:-}" != "1" ]; then rm -rf "$dir"; fi
exit 0
