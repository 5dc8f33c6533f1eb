//! Deleting what agentgate leaves behind once it is past its retention: finished
//! Approvals (`--approval-retention`) and ended AgentSessions (`--session-retention`).
//! One LIST of the kind every ten minutes; runs on the leader only.

use std::fmt::Debug;
use std::time::Duration;

use agentgate_crds::{AgentSession, SessionPhase};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;

/// How often expired objects are looked for.
const INTERVAL: Duration = Duration::from_secs(600);

/// Whether `since` lies at least `retention` before `now`.
pub fn older_than(since: Timestamp, now: Timestamp, retention: Duration) -> bool {
    let age = now.duration_since(since);
    age.as_secs() >= 0 && age.unsigned_abs() >= retention
}

/// Whether an AgentSession has ended and its last activity is past the retention.
/// Active sessions are kept whatever their age.
pub fn session_expired(session: &AgentSession, now: Timestamp, retention: Duration) -> bool {
    let Some(status) = &session.status else {
        return false;
    };
    let since = status
        .last_activity
        .as_ref()
        .or(session.metadata.creation_timestamp.as_ref());
    status.phase == Some(SessionPhase::Ended)
        && since.is_some_and(|t| older_than(t.0, now, retention))
}

/// Deletes, every ten minutes until the task is dropped, each `K` for which `expired`
/// says so. `what` names the kind in logs.
pub async fn clean_up<K>(
    client: Client,
    what: &'static str,
    expired: impl Fn(&K, Timestamp) -> bool,
) where
    K: Resource<Scope = kube::core::NamespaceResourceScope> + Clone + DeserializeOwned + Debug,
    K::DynamicType: Default,
{
    let all: Api<K> = Api::all(client.clone());
    loop {
        match all.list(&ListParams::default()).await {
            Ok(list) => {
                let now = Timestamp::now();
                for object in list.items.iter().filter(|o| expired(o, now)) {
                    let (Some(ns), name) = (object.namespace(), object.name_any()) else {
                        continue;
                    };
                    match Api::<K>::namespaced(client.clone(), &ns)
                        .delete(&name, &DeleteParams::default())
                        .await
                    {
                        Ok(_) => {
                            tracing::info!(namespace = %ns, name = %name, "{what} past its retention deleted")
                        }
                        Err(e) => {
                            tracing::warn!(namespace = %ns, name = %name, error = %e, "cannot delete {what} past its retention")
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot list {what} for clean-up"),
        }
        tokio::time::sleep(INTERVAL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn session(phase: &str, last: &str) -> AgentSession {
        serde_json::from_value(json!({
            "apiVersion": "agentgate.dev/v1alpha1", "kind": "AgentSession",
            "metadata": { "name": "claude-x", "namespace": "agents", "creationTimestamp": "2026-01-01T00:00:00Z" },
            "spec": { "agent": { "pod": "claude", "namespace": "agents" } },
            "status": { "phase": phase, "lastActivity": last }
        }))
        .unwrap()
    }

    #[test]
    fn only_ended_sessions_past_retention_are_cleaned_up() {
        let now: Timestamp = "2026-01-10T00:00:00Z".parse().unwrap();
        let week = Duration::from_secs(7 * 86400);
        assert!(session_expired(
            &session("Ended", "2026-01-02T00:00:00Z"),
            now,
            week
        ));
        assert!(!session_expired(
            &session("Ended", "2026-01-05T00:00:00Z"),
            now,
            week
        ));
        assert!(!session_expired(
            &session("Active", "2026-01-01T00:00:00Z"),
            now,
            week
        ));
    }
}
