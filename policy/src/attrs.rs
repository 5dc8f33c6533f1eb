//! `RequestAttrs`: what every protocol front end knows about a request, in one shape, so
//! one evaluation serves them all.

use agentgate_crds::{Protocol, SqlStatementKind};
use serde::Serialize;

/// Everything the policy engine looks at for one request.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestAttrs {
    /// The Connection the request came in on.
    pub connection: String,
    /// The validated identity of whoever launched the agent, if the request carried one.
    pub identity: Option<Identity>,
    /// The protocol-specific facts.
    pub target: Target,
}

impl RequestAttrs {
    /// A request with no connection, identity or facts: what conditions are checked
    /// against when a policy loads.
    pub(crate) fn empty() -> Self {
        Self {
            connection: String::new(),
            identity: None,
            target: Target::Http(HttpRequest::default()),
        }
    }
}

/// A validated identity (from the launching user's JWT).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Identity {
    /// `iss`.
    pub issuer: String,
    /// `sub`.
    pub subject: String,
    /// `email` (or `preferred_username`), when present.
    pub email: Option<String>,
    /// Groups from the policy's groups claim.
    pub groups: Vec<String>,
}

/// Protocol-specific request facts.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase", tag = "protocol")]
pub enum Target {
    /// An HTTP API request.
    Http(HttpRequest),
    /// A Kubernetes API request.
    Kubernetes(KubernetesRequest),
    /// One or more SQL statements (one simple-protocol query string, or one Parse).
    Postgres(SqlRequest),
}

impl Target {
    /// The Connection protocol this target belongs to.
    pub fn protocol(&self) -> Protocol {
        match self {
            Target::Http(_) => Protocol::Http,
            Target::Kubernetes(_) => Protocol::Kubernetes,
            Target::Postgres(_) => Protocol::Postgres,
        }
    }
}

/// An HTTP request after path normalization.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRequest {
    /// Upper-case method.
    pub method: String,
    /// Host the agent addressed (without port), lower case.
    pub host: String,
    /// Percent-decoded (once), dot-segment-free path.
    pub path: String,
    /// Raw query string, without `?`.
    pub query: String,
}

/// A Kubernetes API request as the API server's request-info logic reads it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KubernetesRequest {
    /// Whether the path names an API resource (`/api/...`, `/apis/...`) rather than a
    /// non-resource URL (`/version`, `/healthz`, discovery).
    pub is_resource_request: bool,
    /// RBAC verb: get, list, watch, create, update, patch, delete, deletecollection, proxy;
    /// for non-resource requests the lower-case HTTP method.
    pub verb: String,
    /// API group (`""` for the core group).
    pub api_group: String,
    /// API version.
    pub api_version: String,
    /// Resource (plural).
    pub resource: String,
    /// Subresource (`exec`, `log`, `status`, …).
    pub subresource: String,
    /// Namespace, empty for cluster-scoped requests.
    pub namespace: String,
    /// Object name, empty for collections.
    pub name: String,
    /// The request path.
    pub path: String,
}

/// The statements of one SQL request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SqlRequest {
    /// Each statement, in order. Text the parser rejects is one statement of kind `other`.
    pub statements: Vec<SqlStatement>,
    /// Hash of the normalized text (literals removed).
    pub fingerprint: String,
    /// The text with every literal replaced by a placeholder (`$1`, `$2`, …): what audit
    /// records and approvals show, so values typed into a statement are not kept.
    /// `None` when the text does not parse.
    pub normalized: Option<String>,
}

/// One classified SQL statement.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SqlStatement {
    /// Statement kind: the riskiest of the statement itself and of everything nested in
    /// it (`WITH d AS (DELETE …) SELECT …` is a `delete`; `SELECT … FOR UPDATE` an
    /// `update`).
    pub kind: SqlStatementKind,
    /// Every table touched, as `schema.table`. An unqualified name is listed under every
    /// schema it may resolve to (the Connection's search path, and `pg_catalog` for
    /// `pg_*` names), so a rule must allow all of them.
    pub tables: Vec<String>,
    /// For UPDATE/DELETE: whether every UPDATE and DELETE in it has a WHERE clause.
    pub has_where: bool,
    /// Every function called, as written (`lower`, `pg_catalog.lower`, `app.report`).
    pub functions: Vec<String>,
    /// Functions called (and catalog relations read: `relation pg_catalog.pg_stats`)
    /// that are never allowed without approval (`pg_read_file`, `dblink`,
    /// `table_to_xml`, statistics samples, other sessions' SQL, …).
    pub dangerous_functions: Vec<String>,
    /// Settings the statement changes (lower-case; `transaction_read_only` for `BEGIN
    /// READ WRITE` and the like; `*` for `set_config`, which may change any).
    pub settings: Vec<String>,
    /// The cursor a `FETCH`/`MOVE` reads from; what it reads is decided by the
    /// cursor's `DECLARE`.
    pub cursor: Option<String>,
    /// The cursor a `DECLARE` opens.
    pub declares: Option<String>,
    /// The prepared statement a SQL-level `PREPARE`/`DEALLOCATE` creates or drops
    /// (`*`: all of them, `DEALLOCATE ALL`, `DISCARD ALL`): it shares the namespace of
    /// protocol-level statements.
    pub prepared_statement: Option<String>,
    /// The cursor (portal) a `CLOSE` closes (`*`: all, `CLOSE ALL`, `DISCARD ALL`).
    pub closes: Option<String>,
    /// Whether it ends a transaction or rolls back to a savepoint (`COMMIT`, `ROLLBACK`,
    /// `ROLLBACK TO`, `PREPARE TRANSACTION`): the server drops portals and cursors then.
    pub ends_transaction: bool,
    /// Column names that a reference outside a plain output column may carry (in an
    /// expression, a condition, a cast, a function, an aggregate, a row value; through
    /// subqueries' renamings too); `*` for a star or a whole-row reference. A masked
    /// column among them would reach the agent in another form, so such statements are
    /// refused (`docs/postgres.md`).
    #[serde(skip)]
    pub expression_columns: Vec<String>,
    /// Whether it writes rows the server's completion tag does not count (a write in a
    /// CTE, under EXPLAIN ANALYZE or in COPY's query).
    pub uncounted_writes: bool,
}
