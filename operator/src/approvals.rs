//! Admission for `Approval` decisions — what makes a decision trustworthy. Pure: the
//! webhook server hands in the admission request and the time.
//!
//! - [`stamp`] (mutating): whenever a decision is being set, `spec.decidedBy` becomes the
//!   admission request's user, whatever the client sent.
//! - [`check`] (validating): the decider must be in `spec.approvers.groups`; the
//!   requester cannot decide their own request; no service account of the agent's
//!   namespace can decide; a decision cannot change; an expired Approval cannot be
//!   approved; `decidedBy` must be the decider.

use agentgate_crds::{Approval, Decision};
use k8s_openapi::jiff::Timestamp;
use kube::core::admission::AdmissionRequest;
use serde_json::json;

/// Who is deciding: the admission request's user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decider {
    /// The user name (`alice`, `system:serviceaccount:agents:claude`, an e-mail, …).
    pub username: String,
    /// The user's groups.
    pub groups: Vec<String>,
}

impl Decider {
    /// From an admission request.
    pub fn of(request: &AdmissionRequest<Approval>) -> Self {
        Self {
            username: request.user_info.username.clone().unwrap_or_default(),
            groups: request.user_info.groups.clone().unwrap_or_default(),
        }
    }
}

/// Whether this write sets a decision that was not there before.
fn decides(new: &Approval, old: Option<&Approval>) -> bool {
    new.spec.decision.is_some() && old.is_none_or(|o| o.spec.decision.is_none())
}

/// The JSON patch that stamps `spec.decidedBy`, when this write sets a decision.
pub fn stamp(
    new: &Approval,
    old: Option<&Approval>,
    decider: &Decider,
) -> Option<json_patch::Patch> {
    if !decides(new, old) {
        return None;
    }
    let patch = json!([{ "op": "add", "path": "/spec/decidedBy", "value": decider.username }]);
    serde_json::from_value(patch).ok()
}

/// Why this write may not happen, or `Ok` when it may.
pub fn check(
    new: &Approval,
    old: Option<&Approval>,
    decider: &Decider,
    now: Timestamp,
) -> Result<(), String> {
    if let Some(previous) = old.and_then(|o| o.spec.decision)
        && new.spec.decision != Some(previous)
    {
        return Err(format!(
            "this Approval was already decided ({previous:?}); a decision cannot be changed or cleared"
        ));
    }
    if !decides(new, old) {
        return Ok(());
    }
    let spec = &new.spec;
    let agent_accounts = format!("system:serviceaccount:{}:", spec.agent.namespace);
    if decider.username.starts_with(&agent_accounts) {
        return Err(format!(
            "{} is a service account of the agent's namespace {}; an agent's side cannot approve its own requests",
            decider.username, spec.agent.namespace
        ));
    }
    let requester = &spec.requester;
    let is_requester = decider.username == requester.subject
        || requester
            .email
            .as_deref()
            .is_some_and(|e| e.eq_ignore_ascii_case(&decider.username));
    if is_requester {
        return Err(format!(
            "{} requested this and cannot decide it; another member of {} must",
            decider.username,
            spec.approvers.groups.join(", ")
        ));
    }
    if !decider
        .groups
        .iter()
        .any(|g| spec.approvers.groups.contains(g))
    {
        return Err(format!(
            "{} is not in the approver groups of this Approval ({})",
            decider.username,
            spec.approvers.groups.join(", ")
        ));
    }
    let expired_phase =
        new.status.as_ref().and_then(|s| s.phase) == Some(agentgate_crds::ApprovalPhase::Expired);
    if spec.decision == Some(Decision::Approved) && (spec.expires_at.0 <= now || expired_phase) {
        return Err(format!(
            "this Approval expired (at {}, or its sidecar gave up on it); the agent was refused and must ask again",
            spec.expires_at.0
        ));
    }
    if spec.decided_by.as_deref() != Some(decider.username.as_str()) {
        return Err(
            "spec.decidedBy must be the deciding user (the mutating webhook sets it)".into(),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests;
