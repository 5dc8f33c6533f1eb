//! `Connection`: a production resource (a database, a cluster, an HTTP API) an agent may
//! reach through its sidecar, and where the sidecar finds the credentials for it.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Condition, SecretKeyRef};

/// How agents reach this resource: the sidecar listens on `127.0.0.1:<listen.port>`
/// inside the agent pod and forwards to `upstream` with the credentials named in
/// `credentials`, which the agent never sees.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "agentgate.dev",
    version = "v1alpha1",
    kind = "Connection",
    doc = "A production resource (a PostgreSQL database, a Kubernetes cluster, an HTTP API) that agents reach only through their agentgate sidecar, which holds the credentials.",
    namespaced,
    status = "ConnectionStatus",
    shortname = "conn",
    category = "agentgate",
    printcolumn = r#"{"name":"Protocol","type":"string","jsonPath":".spec.protocol","description":"postgres, http or kubernetes"}"#,
    printcolumn = r#"{"name":"Upstream","type":"string","jsonPath":".spec.upstream.address","description":"Where the sidecar forwards to"}"#,
    printcolumn = r#"{"name":"Port","type":"integer","jsonPath":".spec.listen.port","description":"Loopback port the agent connects to"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status","description":"Whether the operator resolved this Connection"}"#,
    printcolumn = r#"{"name":"Search path","type":"string","priority":1,"jsonPath":".status.searchPath","description":"The search_path agent sessions are pinned to (postgres)"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.protocol != 'postgres' || has(self.upstream.database)").message("a postgres Connection needs spec.upstream.database"))]
#[x_kube(validation = Rule::new("self.protocol != 'postgres' || !self.upstream.address.contains('://')").message("a postgres Connection's spec.upstream.address is host:port, not a URL"))]
#[x_kube(validation = Rule::new("self.protocol == 'postgres' || self.upstream.address.startsWith('https://') || self.upstream.address.startsWith('http://')").message("an http or kubernetes Connection's spec.upstream.address is a URL (https://host[:port][/base])"))]
#[x_kube(validation = Rule::new("self.protocol == 'postgres' || !has(self.upstream.database)").message("spec.upstream.database is only for postgres Connections"))]
#[x_kube(validation = Rule::new("self.protocol == 'postgres' || !has(self.upstream.searchPath)").message("spec.upstream.searchPath is only for postgres Connections"))]
#[x_kube(validation = Rule::new("!has(self.upstream.searchPath) || self.upstream.searchPath.all(s, !s.startsWith('pg_'))").message("spec.upstream.searchPath names plain schemas: pg_catalog is always searched first, and pg_temp or other pg_ schemas may not be listed"))]
#[x_kube(validation = Rule::new("!has(self.credentials.serviceAccount) || self.protocol == 'kubernetes'").message("credentials.serviceAccount is only for kubernetes Connections"))]
#[x_kube(validation = Rule::new("!has(self.credentials.azureWorkloadIdentity) || self.protocol != 'kubernetes'").message("credentials.azureWorkloadIdentity is for postgres and http Connections"))]
pub struct ConnectionSpec {
    /// Wire protocol the agent speaks to the sidecar and the sidecar speaks to the
    /// upstream: `postgres` (PostgreSQL v3 wire protocol), `http` (an HTTP API such as
    /// Azure Resource Manager) or `kubernetes` (a Kubernetes API server).
    pub protocol: Protocol,
    /// Where the sidecar forwards the agent's requests.
    pub upstream: Upstream,
    /// The credentials the sidecar presents to the upstream. Exactly one source is set.
    /// They are mounted into the sidecar container only; the agent never holds them.
    pub credentials: Credentials,
    /// Where the agent reaches this Connection inside its pod.
    pub listen: Listen,
}

/// Wire protocol of a Connection: `postgres`, `http` or `kubernetes`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Postgres,
    Http,
    Kubernetes,
}

/// The production endpoint behind a Connection.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Upstream {
    /// `host:port` for postgres (e.g. `orders.postgres.database.azure.com:5432`); a URL
    /// for http and kubernetes (e.g. `https://management.azure.com`).
    #[schemars(length(min = 1, max = 2048))]
    pub address: String,
    /// Database name, for postgres Connections (required there, rejected elsewhere).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub database: Option<String>,
    /// TLS from the sidecar to the upstream. Defaults to `verify-full` with the system
    /// roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<UpstreamTls>,
    /// For postgres Connections: the `search_path` every agent session runs with. The
    /// sidecar pins it at login and refuses every way to change it, and resolves
    /// unqualified table names in the agent's SQL through it, so policy rules on
    /// `schema.table` mean what the server runs. Plain schema names only
    /// (`pg_catalog` is always searched first for `pg_*` names). Defaults to `public`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 8),
        inner(length(min = 1, max = 63), regex(pattern = r"^[a-z_][a-z0-9_]*$"))
    )]
    pub search_path: Vec<String>,
}

impl Upstream {
    /// The search path a postgres session is pinned to.
    pub fn effective_search_path(&self) -> Vec<String> {
        if self.search_path.is_empty() {
            vec!["public".to_owned()]
        } else {
            self.search_path.clone()
        }
    }
}

/// TLS settings for the sidecar → upstream leg.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.mode != 'disable' || (!has(self.caSecretRef) && !has(self.serverName))").message("tls.caSecretRef and tls.serverName need tls.mode require or verify-full"))]
pub struct UpstreamTls {
    /// `disable` (plain text; only for upstreams on a trusted network), `require`
    /// (encrypted, certificate not verified) or `verify-full` (encrypted, certificate
    /// chain and host name verified; the default).
    #[serde(default)]
    pub mode: TlsMode,
    /// CA bundle (PEM) to verify the upstream's certificate with, instead of the system
    /// roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretKeyRef>,
    /// Host name to verify the upstream's certificate against (and send as SNI), when it
    /// differs from the host in `upstream.address`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub server_name: Option<String>,
}

/// TLS mode toward the upstream: `disable`, `require` or `verify-full`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum TlsMode {
    Disable,
    Require,
    #[default]
    VerifyFull,
}

/// Where the sidecar gets the credentials it presents upstream. Set exactly one.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.secretRef), has(self.azureWorkloadIdentity), has(self.serviceAccount)].filter(x, x).size() == 1").message("set exactly one of credentials.secretRef, credentials.azureWorkloadIdentity, credentials.serviceAccount"))]
pub struct Credentials {
    /// A Secret in the Connection's namespace. postgres: keys `username` and `password`;
    /// http: key `token` (sent as a bearer token) or `header` and `value`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretRef>,
    /// Azure AD workload identity: the sidecar exchanges its projected service-account
    /// token for an Entra access token for `scope`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub azure_workload_identity: Option<AzureWorkloadIdentity>,
    /// kubernetes only: the sidecar uses a token of this dedicated service account
    /// (never the agent pod's own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<ServiceAccountRef>,
}

/// A whole Secret of the Connection's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Azure AD (Entra) workload identity federation settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AzureWorkloadIdentity {
    /// Client (application) ID of the managed identity or app registration.
    #[schemars(length(min = 1, max = 64))]
    pub client_id: String,
    /// Entra tenant ID.
    #[schemars(length(min = 1, max = 64))]
    pub tenant_id: String,
    /// OAuth scope to request, e.g. `https://management.azure.com/.default`.
    #[schemars(length(min = 1, max = 512))]
    pub scope: String,
}

/// A service account in the Connection's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAccountRef {
    /// Name of the service account.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// The loopback listener inside the agent pod.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Listen {
    /// Port on `127.0.0.1` in the agent pod, 1024–65535, unique per pod, and not the
    /// sidecar's admin port 15020.
    #[schemars(with = "i32", range(min = 1024, max = 65535))]
    #[x_kube(validation = Rule::new("self != 15020").message("listen.port 15020 is reserved for the sidecar's admin server (metrics, health); pick another port"))]
    pub port: u16,
}

/// What the operator observed about a Connection.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`: the referenced Secrets exist with the keys this protocol needs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// For postgres Connections: the `search_path` the sidecar pins every agent session
    /// to, and through which it resolves unqualified table names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search_path: Vec<String>,
}
