//! Admission for `Approval` decisions — what makes a decision trustworthy. Pure: the
//! webhook server hands in the admission request and the time.
//!
//! Every fact it decides on is one the writer cannot choose: the Approval's own
//! namespace and the authenticated user and groups of the admission request — never
//! `spec.agent.namespace` alone, which the creator writes.
//!
//! - [`stamp`] (mutating): whenever a decision is being set, `spec.decidedBy` and
//!   `spec.decidedByGroups` become the admission request's user and groups, whatever the
//!   client sent.
//! - [`check`] (validating): an Approval is created by a service account of its own
//!   namespace (or a cluster admin), for an agent of that namespace, and never decided;
//!   the decider must be in `spec.approvers.groups`; the requester cannot decide their
//!   own request under any spelling of their name ([`RequesterIdentity::is_user`]); no
//!   service account of the Approval's namespace can decide; a decision cannot change;
//!   an expired Approval cannot be approved; the stamp must be the decider's.
//!
//! [`RequesterIdentity::is_user`]: agentgate_crds::RequesterIdentity::is_user

use agentgate_crds::{Approval, Decision};
use k8s_openapi::jiff::Timestamp;
use kube::core::admission::AdmissionRequest;
use serde_json::json;

/// Who is writing, and where: the admission request's authenticated user and the
/// namespace of the object written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decider {
    /// The user name (`alice`, `system:serviceaccount:agents:claude`, an e-mail, …).
    pub username: String,
    /// The user's groups.
    pub groups: Vec<String>,
    /// The Approval's namespace, as the API server routes the request.
    pub namespace: String,
}

impl Decider {
    /// From an admission request.
    pub fn of(request: &AdmissionRequest<Approval>) -> Self {
        Self {
            username: request.user_info.username.clone().unwrap_or_default(),
            groups: request.user_info.groups.clone().unwrap_or_default(),
            namespace: request.namespace.clone().unwrap_or_default(),
        }
    }
}

/// The identity settings the webhook compares deciders with requesters by.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdentityModel {
    /// Username prefixes the API server adds to token users (`oidc:`, `aad:`).
    pub username_prefixes: Vec<String>,
}

/// Cluster administrators: RBAC lets them do anything, so they may also create
/// Approvals (break-glass and tests); they still cannot decide their own requests.
const CLUSTER_ADMINS: &str = "system:masters";

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
    let patch = json!([
        { "op": "add", "path": "/spec/decidedBy", "value": decider.username },
        { "op": "add", "path": "/spec/decidedByGroups", "value": decider.groups },
    ]);
    serde_json::from_value(patch).ok()
}

/// Why this write may not happen, or `Ok` when it may.
pub fn check(
    new: &Approval,
    old: Option<&Approval>,
    decider: &Decider,
    identity: &IdentityModel,
    now: Timestamp,
) -> Result<(), String> {
    let own_accounts = format!("system:serviceaccount:{}:", decider.namespace);
    if old.is_none() {
        let spec = &new.spec;
        if spec.decision.is_some()
            || spec.decided_by.is_some()
            || !spec.decided_by_groups.is_empty()
        {
            return Err(
                "an Approval is created undecided; a decision is set afterwards by an approver"
                    .into(),
            );
        }
        if spec.agent.namespace != decider.namespace {
            return Err(format!(
                "spec.agent.namespace {} is not this Approval's namespace {}; Approvals are created in the agent's own namespace",
                spec.agent.namespace, decider.namespace
            ));
        }
        let admin = decider.groups.iter().any(|g| g == CLUSTER_ADMINS);
        let sidecar = match &spec.agent.service_account {
            Some(sa) => decider.username == format!("{own_accounts}{sa}"),
            None => decider.username.starts_with(&own_accounts),
        };
        if !admin && !sidecar {
            return Err(format!(
                "{} may not create Approvals here: only the agent's sidecar (its service account in {}) holds requests",
                decider.username, decider.namespace
            ));
        }
    }
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
    if decider.username.starts_with(&own_accounts) || decider.username.starts_with(&agent_accounts)
    {
        return Err(format!(
            "{} is a service account of the agent's namespace {}; an agent's side cannot approve its own requests",
            decider.username, decider.namespace
        ));
    }
    if spec
        .requester
        .is_user(&decider.username, &identity.username_prefixes)
    {
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
    if spec.decided_by.as_deref() != Some(decider.username.as_str())
        || spec.decided_by_groups != decider.groups
    {
        return Err(
            "spec.decidedBy and spec.decidedByGroups must be the deciding user's (the mutating webhook sets them)".into(),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests;
