//! `Approval`: one agent request held for a human decision.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{AgentRef, RequesterIdentity};
use crate::connection::Protocol;
use crate::policy::{Approvers, GrantScope, SqlStatementKind};

/// The held request and its decision. Everything but `decision` and `reason` is
/// written by the sidecar and immutable; `decidedBy` is stamped by the API server's
/// admission webhook from the authenticated user.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "agentgate.dev",
    version = "v1alpha1",
    kind = "Approval",
    doc = "One agent request held for a human decision. The sidecar creates it; a member of spec.approvers.groups decides by setting spec.decision once (kubectl agentgate approve NAME, or kubectl patch).",
    namespaced,
    status = "ApprovalStatus",
    shortname = "apr",
    category = "agentgate",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase","description":"Pending, Approved, Denied, Expired, Executed or Failed"}"#,
    printcolumn = r#"{"name":"Connection","type":"string","jsonPath":".spec.connection"}"#,
    printcolumn = r#"{"name":"Rule","type":"string","jsonPath":".spec.rule","description":"The policy rule that asked for approval"}"#,
    printcolumn = r#"{"name":"Requester","type":"string","jsonPath":".spec.requester.subject","description":"Who launched the agent"}"#,
    printcolumn = r#"{"name":"Summary","type":"string","jsonPath":".spec.request.summary","description":"The request (masked)"}"#,
    printcolumn = r#"{"name":"Est-Rows","type":"integer","jsonPath":".spec.request.impact.estimatedRows","description":"Rows the planner estimates the statement changes, or objects a deletecollection deletes"}"#,
    printcolumn = r#"{"name":"Impact","type":"string","jsonPath":".spec.request.impact.detail","description":"What the impact preview says the request would do","priority":1}"#,
    printcolumn = r#"{"name":"Decided-By","type":"string","jsonPath":".spec.decidedBy","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(oldSelf.decision) || (has(self.decision) && self.decision == oldSelf.decision)").message("spec.decision can be set once and never changed or cleared"))]
#[x_kube(validation = Rule::new("!has(oldSelf.decision) || self == oldSelf").message("a decided Approval is final: its spec can no longer change"))]
#[x_kube(validation = Rule::new("self.connection == oldSelf.connection && self.policy == oldSelf.policy && self.rule == oldSelf.rule && self.agent == oldSelf.agent && self.requester == oldSelf.requester && self.request == oldSelf.request && self.approvers == oldSelf.approvers && self.grant == oldSelf.grant && self.expiresAt == oldSelf.expiresAt").message("only spec.decision and spec.reason of an Approval can change; the request it describes is immutable"))]
#[x_kube(validation = Rule::new("!has(self.decidedBy) || has(self.decision)").message("spec.decidedBy is only set together with spec.decision"))]
pub struct ApprovalSpec {
    /// The Connection the held request was made on.
    #[schemars(length(min = 1, max = 253))]
    pub connection: String,
    /// The AgentAccessPolicy whose rule asked for approval.
    #[schemars(length(min = 1, max = 253))]
    pub policy: String,
    /// The rule that asked for approval.
    #[schemars(length(min = 1, max = 63))]
    pub rule: String,
    /// The agent pod that made the request.
    pub agent: AgentRef,
    /// Who launched the agent, from the validated token. Members of the approver groups
    /// who are this same subject cannot decide.
    pub requester: RequesterIdentity,
    /// The request, as the sidecar classified it (masked).
    pub request: HeldRequest,
    /// Who may decide.
    pub approvers: Approvers,
    /// What an approval covers: `once`, `fingerprint` or `session`.
    #[serde(default)]
    pub grant: GrantScope,
    /// When the request stops waiting; undecided by then, it is denied.
    pub expires_at: Time,
    /// The human decision: `Approved` or `Denied`. Set once; it can never change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<Decision>,
    /// Why the decider decided (a ticket, a note). Recorded in the audit trail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub reason: Option<String>,
    /// The user who set `decision`, stamped by agentgate's admission webhook from the
    /// authenticated request; a value sent by a client is overwritten.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub decided_by: Option<String>,
    /// The groups of the user who set `decision`, stamped by the admission webhook
    /// with `decidedBy`. The sidecar runs an approved request only when they include
    /// an approver group.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(length(max = 256)))]
    pub decided_by_groups: Vec<String>,
}

/// A human decision on an Approval: `Approved` or `Denied`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Decision {
    Approved,
    Denied,
}

/// The request that waits for a decision, masked as the agent would see it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HeldRequest {
    /// Protocol of the Connection.
    pub protocol: Protocol,
    /// Human-readable request, masked: the SQL statement, `DELETE pods/web-0 -n prod`, or
    /// `PUT /subscriptions/…`.
    #[schemars(length(min = 1, max = 4096))]
    pub summary: String,
    /// Hash of the normalized request (SQL with literals removed; verb, resource and
    /// name), used by `fingerprint` grants.
    #[schemars(length(min = 1, max = 128))]
    pub fingerprint: String,
    /// What the classifier found.
    #[serde(default)]
    pub classification: Classification,
    /// What running it would touch, estimated before it runs (for SQL UPDATE and
    /// DELETE: the planner's row estimate from `EXPLAIN`, never `EXPLAIN ANALYZE`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub impact: Option<Impact>,
}

/// An estimate of what a held request would touch.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Impact {
    /// Rows the statement would change, as the planner estimates them; for a Kubernetes
    /// `deletecollection`, the objects the API server's dry run would delete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimated_rows: Option<i64>,
    /// How the estimate was made, what the API server's dry run says a Kubernetes write
    /// would do, or why there is no preview.
    #[schemars(length(max = 1024))]
    pub detail: String,
}

/// Protocol-specific facts about a request.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Classification {
    /// SQL statement kinds, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub statements: Vec<SqlStatementKind>,
    /// Tables touched, as `schema.table`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(length(max = 256)))]
    pub tables: Vec<String>,
    /// Kubernetes or HTTP verb (`delete`, `PUT`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    pub verb: Option<String>,
    /// Kubernetes resource (with subresource) or HTTP path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    pub resource: Option<String>,
    /// Kubernetes namespace of the target object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub namespace: Option<String>,
    /// Name of the target object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub name: Option<String>,
}

/// Where an Approval is in its life.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalStatus {
    /// `Pending`, `Approved`, `Denied`, `Expired` (nobody decided in time), `Executed`
    /// (approved and run) or `Failed` (approved, but the upstream refused or errored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<ApprovalPhase>,
    /// When the decision was seen by the sidecar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_at: Option<Time>,
    /// When the approved request ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub executed_at: Option<Time>,
    /// What running the approved request did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<ExecutionResult>,
}

/// Phase of an Approval: `Pending`, `Approved`, `Denied`, `Expired`, `Executed` or
/// `Failed`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ApprovalPhase {
    Pending,
    Approved,
    Denied,
    Expired,
    Executed,
    Failed,
}

/// The outcome of an executed request.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExecutionResult {
    /// Rows the statement changed (postgres).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows_affected: Option<i64>,
    /// Response status (http and kubernetes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<i32>,
    /// The upstream's error, masked, when the request failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub message: Option<String>,
}
