//! `AgentAccessPolicy`: who may do what, through which Connections, and what a human
//! must approve first.

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::Condition;

/// A Go-style duration (`90s`, `10m`, `1h30m`), as CEL's `duration()` reads it.
const DURATION_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$";

/// Rules are tried in order and the first match wins; `defaultAction` applies when
/// none matches. A pod that no policy selects is denied everything.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "agentgate.dev",
    version = "v1alpha1",
    kind = "AgentAccessPolicy",
    doc = "Who may do what through which Connections: per-request allow, deny or hold-for-approval rules for the agent pods it selects, plus masking, limits and recording.",
    namespaced,
    status = "AgentAccessPolicyStatus",
    shortname = "aap",
    category = "agentgate",
    printcolumn = r#"{"name":"Default","type":"string","jsonPath":".spec.defaultAction","description":"Action when no rule matches"}"#,
    printcolumn = r#"{"name":"Connections","type":"string","jsonPath":".spec.connections","priority":1,"description":"Connections the agents may use"}"#,
    printcolumn = r#"{"name":"Agents","type":"integer","jsonPath":".status.agentsMatched","description":"Pods this policy selects"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status","description":"Whether the policy compiled and its Connections resolved"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.rules.all(r, self.rules.exists_one(s, s.name == r.name))").message("rule names must be unique within a policy"))]
#[x_kube(validation = Rule::new("self.rules.all(r, !has(r.match.connections) || r.match.connections.all(c, c in self.connections))").message("a rule's match.connections may only name Connections listed in spec.connections"))]
#[x_kube(validation = Rule::new("self.defaultAction != 'approve' || has(self.defaultApproval)").message("defaultAction approve needs spec.defaultApproval (who approves, and how)"))]
pub struct AgentAccessPolicySpec {
    /// Selects the agent pods, in this namespace, that this policy governs.
    pub agent_selector: LabelSelector,
    /// How the identity of whoever launched the agent is validated. When unset, requests
    /// carry only the pod's workload identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<IdentitySpec>,
    /// Names of the Connections, in this namespace, the selected agents may use.
    #[schemars(length(min = 1, max = 64), inner(length(min = 1, max = 253)))]
    pub connections: Vec<String>,
    /// What happens when no rule matches: `allow`, `deny` (the default) or `approve`.
    #[serde(default)]
    pub default_action: Action,
    /// Approval settings used when `defaultAction` is `approve`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_approval: Option<ApprovalSettings>,
    /// Rules, tried in order; the first whose `match` (and `when`) holds decides.
    #[serde(default)]
    #[schemars(length(max = 256))]
    pub rules: Vec<PolicyRule>,
    /// What to mask in responses before the agent sees them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub masking: Option<Masking>,
    /// Per-query and per-session limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<Limits>,
    /// What of each request and response is kept in the audit record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recording: Option<Recording>,
}

/// How to validate the launching user's OIDC/JWT token.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct IdentitySpec {
    /// The token issuer (`iss`); its OIDC discovery document and JWKS are fetched from
    /// `<issuer>/.well-known/openid-configuration`. Must be an https URL.
    #[schemars(length(min = 1, max = 1024))]
    #[x_kube(validation = Rule::new("self.startsWith('https://')").message("identity.issuer must be an https:// URL"))]
    pub issuer: String,
    /// Accepted audiences (`aud`); the token must carry at least one of them.
    #[schemars(length(min = 1, max = 16), inner(length(min = 1, max = 1024)))]
    pub audiences: Vec<String>,
    /// The claim that holds the user's groups. Defaults to `groups`.
    #[serde(default = "default_groups_claim")]
    #[schemars(length(min = 1, max = 256))]
    pub groups_claim: String,
    /// When true (the default), a request without a valid token is denied. When false,
    /// such requests fall back to the pod's workload identity.
    #[serde(default = "default_true")]
    pub required: bool,
}

fn default_groups_claim() -> String {
    "groups".to_owned()
}

fn default_true() -> bool {
    true
}

/// What to do with a request: `allow`, `deny`, or `approve` (hold it for a human).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    #[default]
    Deny,
    Approve,
}

/// A rule: when its `match` (and `when`) hold, its `action` decides the request.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.action != 'approve' || has(self.approval)").message("a rule with action approve needs approval settings (approval.approvers)"))]
#[x_kube(validation = Rule::new("!has(self.approval) || self.action == 'approve'").message("approval settings are only allowed on a rule with action approve"))]
pub struct PolicyRule {
    /// Name of the rule, unique in the policy; it appears in denials, Approvals and
    /// audit records. Lower-case letters, digits and `-`.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Which requests this rule is about. An empty match matches every request.
    #[serde(default, rename = "match")]
    pub match_: RuleMatch,
    /// An optional CEL condition over `request` (e.g.
    /// `request.identity.groups.exists(g, g == "sre")`); the rule matches only when it is
    /// true. Compiled when the policy is loaded: a bad expression makes the policy not
    /// Ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub when: Option<String>,
    /// What to do with a matching request: `allow`, `deny` or `approve`.
    pub action: Action,
    /// Who approves and how, for `action: approve`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<ApprovalSettings>,
}

/// Request attributes a rule matches on. All given fields must match; within a list, any
/// entry may match. At most one of `sql`, `kubernetes`, `http` is set.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.sql), has(self.kubernetes), has(self.http)].filter(x, x).size() <= 1").message("a rule's match may hold at most one of sql, kubernetes, http"))]
pub struct RuleMatch {
    /// Connections this rule applies to; all of the policy's Connections when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 253)))]
    pub connections: Vec<String>,
    /// SQL statements (postgres Connections).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sql: Option<SqlMatch>,
    /// Kubernetes API requests (kubernetes Connections).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<KubernetesMatch>,
    /// HTTP requests (http Connections).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpMatch>,
}

/// Matches SQL statements by kind and by the tables they touch. A multi-statement string
/// is decided statement by statement and the riskiest decision wins.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SqlMatch {
    /// Statement kinds; any kind when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub statements: Vec<SqlStatementKind>,
    /// Tables as `schema.table` globs (`public.*`, `*.audit_log`); a statement matches
    /// only when every table it touches matches one of them. Any table when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(length(min = 1, max = 256)))]
    pub tables: Vec<String>,
    /// Functions, beyond agentgate's built-in list of side-effect-free ones (`lower`,
    /// `count`, `now`, …; see `docs/postgres.md`), that a statement this rule allows may
    /// call: names as written in SQL, globs allowed (`reporting.monthly_*`). Only for
    /// `action: allow`: an allow rule does not allow a statement that calls any other
    /// function (it falls through to the next rule). Functions that reach outside the
    /// database (`pg_read_file`, `dblink`, `query_to_xml`, `set_config`, …) are never
    /// allowed without approval, even when named here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(length(min = 1, max = 256)))]
    pub functions: Vec<String>,
}

/// A kind of SQL statement: `select`, `insert`, `update`, `delete`, `merge`, `copy`,
/// `ddl` (CREATE/ALTER/DROP/TRUNCATE/…), `dcl` (GRANT/REVOKE/roles), `transaction`
/// (BEGIN/COMMIT/ROLLBACK/SAVEPOINT), `set` (SET/RESET/SHOW), `call`, `do` (anonymous
/// code blocks), `explain`, `other` (anything else, including text the parser rejects).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SqlStatementKind {
    Select,
    Insert,
    Update,
    Delete,
    Merge,
    Copy,
    Ddl,
    Dcl,
    Transaction,
    Set,
    Call,
    Do,
    Explain,
    #[default]
    Other,
}

/// Matches Kubernetes API requests the way the API server's RBAC sees them.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KubernetesMatch {
    /// Verbs: get, list, watch, create, update, patch, delete, deletecollection; any
    /// when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(min = 1, max = 32)))]
    pub verbs: Vec<String>,
    /// API groups (`""` for the core group, `apps`, …); any when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(max = 253)))]
    pub api_groups: Vec<String>,
    /// Resources, optionally with a subresource (`pods`, `pods/exec`, `deployments/scale`);
    /// any when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 253)))]
    pub resources: Vec<String>,
    /// Namespaces (globs allowed); any when empty. Cluster-scoped requests match only
    /// when this is empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 63)))]
    pub namespaces: Vec<String>,
    /// Object names (globs allowed); any when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 253)))]
    pub names: Vec<String>,
}

/// Matches HTTP requests.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpMatch {
    /// Methods (upper case); any when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(regex(pattern = r"^[A-Z]+$")))]
    pub methods: Vec<String>,
    /// Path globs on the normalized path: `*` is one segment, `**` any number
    /// (`/subscriptions/*/**`); any path when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 64),
        inner(length(min = 1, max = 1024), regex(pattern = r"^/"))
    )]
    pub paths: Vec<String>,
}

/// Who approves a held request, and what the approval grants.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalSettings {
    /// Who may decide.
    pub approvers: Approvers,
    /// How long a request waits for a decision before it is denied, as a duration
    /// (`30s`, `10m`, `1h`; at most 24h). Defaults to `10m`.
    #[serde(default = "default_timeout")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    #[x_kube(validation = Rule::new("duration(self) > duration('0s') && duration(self) <= duration('24h')").message("approval.timeout must be more than 0s and at most 24h"))]
    pub timeout: String,
    /// `hold` (the default): keep the agent's request open until decided. `retry`:
    /// refuse at once, naming the Approval, and let the same request through once it is
    /// approved.
    #[serde(default)]
    pub mode: ApprovalMode,
    /// What an approval covers: `once` (this one request; the default), `fingerprint`
    /// (the same normalized request until `grantTTL`), `session` (every request of
    /// this rule in the agent's session until `grantTTL`).
    #[serde(default)]
    pub grant: GrantScope,
    /// How long a `fingerprint` or `session` grant lasts, as a duration. Defaults to
    /// `30m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    #[serde(rename = "grantTTL")]
    pub grant_ttl: Option<String>,
    /// Deny at once, without asking anyone, when the impact preview estimates more rows
    /// than this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub max_estimated_rows: Option<i64>,
}

fn default_timeout() -> String {
    "10m".to_owned()
}

/// Who may decide an Approval. The decider's groups come from the Kubernetes API
/// server's authentication of the `kubectl patch`, never from the client.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Approvers {
    /// Kubernetes groups whose members may approve or deny.
    #[schemars(length(min = 1, max = 32), inner(length(min = 1, max = 256)))]
    pub groups: Vec<String>,
}

/// How a held request waits: `hold` or `retry`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ApprovalMode {
    #[default]
    Hold,
    Retry,
}

/// What an approval covers: `once`, `fingerprint` or `session`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum GrantScope {
    #[default]
    Once,
    Fingerprint,
    Session,
}

/// Masking applied to responses before the agent sees them (and before anything is
/// recorded).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Masking {
    /// Built-in detector sets: `secrets` (keys, tokens, connection strings), `credentials`
    /// (password/secret/token fields in JSON), `pii` (e-mail, phone, card numbers, IBAN,
    /// SSN).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub detectors: Vec<DetectorSet>,
    /// SQL result columns to mask, as `table.column` globs (`customers.email`, `*.ssn`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(length(min = 1, max = 256)))]
    pub columns: Vec<String>,
    /// JSON paths to mask in JSON responses (`$..password`, `$.items[*].data`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 256),
        inner(length(min = 1, max = 1024), regex(pattern = r"^\$"))
    )]
    pub json_paths: Vec<String>,
    /// Custom regular expressions to mask wherever they appear.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub patterns: Vec<MaskPattern>,
    /// How a masked value is replaced: `redact` (the default), `hash` (a keyed hash, so
    /// equal values stay equal) or `partial` (keep a few characters at the ends).
    #[serde(default)]
    pub replacement: Replacement,
}

/// A built-in set of detectors: `secrets`, `credentials` or `pii`.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum DetectorSet {
    Secrets,
    Credentials,
    Pii,
}

/// A named custom masking pattern.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MaskPattern {
    /// Name reported in audit records when this pattern masks something.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// Regular expression (Rust `regex` syntax, no look-around); compiled when the
    /// policy loads.
    #[schemars(length(min = 1, max = 1024))]
    pub regex: String,
}

/// How masked values are replaced: `redact`, `hash` or `partial`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Replacement {
    #[default]
    Redact,
    Hash,
    Partial,
}

/// Limits on what one query or one session may do.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Limits {
    /// Rows one query may return; the result ends with an error after this many.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_rows_per_query: Option<i64>,
    /// Bytes one response may carry (a quantity: `10Mi`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_response_bytes: Option<Quantity>,
    /// Rows INSERT/UPDATE/DELETE may change in one session; further writes are denied
    /// once it is reached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub max_rows_modified_per_session: Option<i64>,
}

/// What the audit record keeps.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Recording {
    /// Keep the (masked) response body in the audit record. Defaults to true.
    #[serde(default = "default_true")]
    pub capture_responses: bool,
    /// At most this much of each (masked) response is kept (a quantity: `64Ki`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_captured_bytes: Option<Quantity>,
}

/// What the operator observed about a policy.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentAccessPolicyStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`: the policy compiled and all its Connections resolved; when not, the
    /// message names the broken rule or Connection and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// How many of `spec.connections` exist and are Ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections_resolved: Option<i32>,
    /// How many pods in the namespace this policy selects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agents_matched: Option<i32>,
}
