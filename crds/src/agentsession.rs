//! `AgentSession`: what one agent session did, as counted by its sidecar.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{AgentRef, RequesterIdentity};

/// The agent pod and identity this session belongs to.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "agentgate.dev",
    version = "v1alpha1",
    kind = "AgentSession",
    doc = "What one agent session did: one per agent identity and pod, kept current by the sidecar. status.audit holds the head of the audit hash chain, so tampering with the audit sink is detectable against etcd.",
    namespaced,
    status = "AgentSessionStatus",
    shortname = "as",
    category = "agentgate",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Pod","type":"string","jsonPath":".spec.agent.pod"}"#,
    printcolumn = r#"{"name":"Subject","type":"string","jsonPath":".spec.identity.subject","description":"Who launched the agent"}"#,
    printcolumn = r#"{"name":"Requests","type":"integer","jsonPath":".status.counters.requests"}"#,
    printcolumn = r#"{"name":"Denied","type":"integer","jsonPath":".status.counters.denied"}"#,
    printcolumn = r#"{"name":"Last-Activity","type":"date","jsonPath":".status.lastActivity"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self == oldSelf").message("an AgentSession's spec is immutable"))]
pub struct AgentSessionSpec {
    /// The agent pod.
    pub agent: AgentRef,
    /// Who launched the agent, when the session carried a validated token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<RequesterIdentity>,
}

/// What the session did so far.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentSessionStatus {
    /// `Active` while the pod runs, `Ended` after.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<SessionPhase>,
    /// The session's first request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    /// The session's latest request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_activity: Option<Time>,
    /// Running totals.
    #[serde(default)]
    pub counters: SessionCounters,
    /// Where the session's audit events are and the head of their hash chain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit: Option<AuditPointer>,
}

/// Phase of a session: `Active` or `Ended`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum SessionPhase {
    Active,
    Ended,
}

/// Running totals of a session.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionCounters {
    /// Requests seen.
    #[serde(default)]
    pub requests: i64,
    /// Requests allowed by a rule (including approved ones).
    #[serde(default)]
    pub allowed: i64,
    /// Requests denied.
    #[serde(default)]
    pub denied: i64,
    /// Approvals created.
    #[serde(default)]
    pub approvals_requested: i64,
    /// Approvals granted.
    #[serde(default)]
    pub approvals_granted: i64,
    /// Values masked in responses.
    #[serde(default)]
    pub masked_values: i64,
    /// Rows returned by queries.
    #[serde(default)]
    pub rows_returned: i64,
    /// Rows changed by INSERT/UPDATE/DELETE.
    #[serde(default)]
    pub rows_modified: i64,
}

/// Where the session's audit events are, and the head of their hash chain.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditPointer {
    /// The sink the events went to (e.g. `file:/var/log/agentgate/audit.jsonl`,
    /// `azureblob:container/path`).
    #[schemars(length(max = 1024))]
    pub sink: String,
    /// Sequence number of the session's first event.
    pub first_seq: i64,
    /// Sequence number of the session's latest event.
    pub last_seq: i64,
    /// Hash of the latest event (hex SHA-256), chaining every event before it.
    #[schemars(length(max = 128))]
    pub chain_head: String,
}
