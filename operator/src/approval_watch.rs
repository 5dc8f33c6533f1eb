//! What the operator does with `Approval` objects after admission: a Kubernetes Event on
//! every decision (published once: the Approval is then annotated), and the clean-up of
//! finished Approvals after `--approval-retention`. Runs on the leader only.

use std::time::Duration;

use agentgate_crds::{Approval, ApprovalPhase, Decision};
use futures::StreamExt;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;

/// Set on an Approval once its decision's Event is published.
pub const EVENT_PUBLISHED: &str = "agentgate.dev/decision-event";

/// The Event for a decision not yet published, if there is one.
pub fn decision_event(approval: &Approval) -> Option<Event> {
    let decision = approval.spec.decision?;
    if approval.annotations().contains_key(EVENT_PUBLISHED) {
        return None;
    }
    let by = approval.spec.decided_by.as_deref().unwrap_or("unknown");
    let reason = approval.spec.reason.as_deref().unwrap_or("no reason given");
    let (type_, verb) = match decision {
        Decision::Approved => (EventType::Normal, "Approved"),
        Decision::Denied => (EventType::Warning, "Denied"),
    };
    let summary: String = approval.spec.request.summary.chars().take(200).collect();
    Some(Event {
        type_,
        reason: verb.into(),
        note: Some(format!(
            "{verb} by {by} ({reason}): {summary} — requested by {} on {}",
            approval.spec.requester.subject, approval.spec.connection
        )),
        action: "Decide".into(),
        secondary: None,
    })
}

/// Whether a finished Approval is past the retention period. Pending and approved-but-
/// not-yet-run Approvals are kept whatever their age.
pub fn expired_for_cleanup(approval: &Approval, now: Timestamp, retention: Duration) -> bool {
    let finished = matches!(
        approval.status.as_ref().and_then(|s| s.phase),
        Some(
            ApprovalPhase::Executed
                | ApprovalPhase::Failed
                | ApprovalPhase::Denied
                | ApprovalPhase::Expired
        )
    );
    let Some(created) = approval.metadata.creation_timestamp.as_ref() else {
        return false;
    };
    finished && crate::retention::older_than(created.0, now, retention)
}

/// Publishes decision Events and cleans up, until the task is dropped.
pub async fn run(client: Client, recorder: Recorder, retention: Duration) {
    let api: Api<Approval> = Api::all(client.clone());
    let cleanup = crate::retention::clean_up(client.clone(), "finished Approval", |a, now| {
        expired_for_cleanup(a, now, retention)
    });
    let events = watcher(api, watcher::Config::default())
        .default_backoff()
        .applied_objects()
        .for_each(|approval| {
            let (client, recorder) = (client.clone(), recorder.clone());
            async move {
                let Ok(approval) = approval else { return };
                let Some(event) = decision_event(&approval) else { return };
                if let Err(e) = recorder.publish(&event, &approval.object_ref(&())).await {
                    tracing::warn!(error = %e, "cannot publish a decision Event");
                    return;
                }
                let (Some(ns), name) = (approval.namespace(), approval.name_any()) else { return };
                let patch = json!({ "metadata": { "annotations": { EVENT_PUBLISHED: "true" } } });
                if let Err(e) = Api::<Approval>::namespaced(client, &ns)
                    .patch(&name, &PatchParams::default(), &Patch::Merge(patch))
                    .await
                {
                    tracing::warn!(approval = %name, error = %e, "cannot mark a decision's Event published");
                }
            }
        });
    tokio::join!(cleanup, events);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn approval(decision: Option<&str>, phase: Option<&str>, created: &str) -> Approval {
        let mut v = json!({
            "apiVersion": "agentgate.dev/v1alpha1", "kind": "Approval",
            "metadata": { "name": "apr-x7k2", "namespace": "agents", "creationTimestamp": created },
            "spec": {
                "connection": "orders-db", "policy": "p", "rule": "r",
                "agent": { "pod": "claude", "namespace": "agents" },
                "requester": { "subject": "carol" },
                "request": { "protocol": "postgres", "summary": "DELETE FROM orders WHERE id = 42", "fingerprint": "f" },
                "approvers": { "groups": ["dba-oncall"] },
                "expiresAt": "2030-01-01T00:00:00Z",
                "decidedBy": "alice", "reason": "ticket 4711"
            }
        });
        match decision {
            Some(d) => v["spec"]["decision"] = json!(d),
            None => {
                let spec = v["spec"].as_object_mut().unwrap();
                spec.remove("decidedBy");
            }
        }
        if let Some(p) = phase {
            v["status"] = json!({ "phase": p });
        }
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn one_event_per_decision() {
        let decided = approval(Some("Approved"), None, "2026-01-01T00:00:00Z");
        let event = decision_event(&decided).unwrap();
        assert_eq!(event.reason, "Approved");
        let note = event.note.unwrap();
        assert!(
            note.contains("alice") && note.contains("ticket 4711") && note.contains("carol"),
            "{note}"
        );
        assert!(decision_event(&approval(None, None, "2026-01-01T00:00:00Z")).is_none());
        let mut published = decided.clone();
        published
            .annotations_mut()
            .insert(EVENT_PUBLISHED.into(), "true".into());
        assert!(decision_event(&published).is_none());
        assert_eq!(
            decision_event(&approval(Some("Denied"), None, "2026-01-01T00:00:00Z"))
                .unwrap()
                .type_,
            EventType::Warning
        );
    }

    #[test]
    fn only_finished_approvals_past_retention_are_cleaned_up() {
        let now: Timestamp = "2026-11-22T00:00:00Z".parse().unwrap();
        let week = Duration::from_secs(7 * 86_400);
        let old = "2026-11-01T00:00:00Z";
        assert!(expired_for_cleanup(
            &approval(Some("Approved"), Some("Executed"), old),
            now,
            week
        ));
        assert!(expired_for_cleanup(
            &approval(Some("Denied"), Some("Denied"), old),
            now,
            week
        ));
        assert!(expired_for_cleanup(
            &approval(None, Some("Expired"), old),
            now,
            week
        ));
        assert!(!expired_for_cleanup(
            &approval(None, Some("Pending"), old),
            now,
            week
        ));
        assert!(!expired_for_cleanup(
            &approval(Some("Approved"), Some("Approved"), old),
            now,
            week
        ));
        assert!(!expired_for_cleanup(
            &approval(Some("Approved"), Some("Executed"), "2026-11-20T00:00:00Z"),
            now,
            week
        ));
    }
}
