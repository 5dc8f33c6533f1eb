//! Small types shared by several resources.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The port of the sidecar's admin server (`/metrics`, `/healthz`, `/readyz`) inside the
/// agent pod. A Connection may not listen on it; the CEL rule on `listen.port` says so.
pub const SIDECAR_ADMIN_PORT: u16 = 15020;

/// The standard Kubernetes condition (`type`, `status`, `reason`, `message`,
/// `observedGeneration`, `lastTransitionTime`).
pub use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

/// A key in a Secret of the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret, in the same namespace as the object that refers to it.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key inside the Secret's data.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// The agent pod a request came from, as the sidecar saw it (downward API).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentRef {
    /// Name of the agent pod.
    #[schemars(length(min = 1, max = 253))]
    pub pod: String,
    /// Service account the agent pod runs as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub service_account: Option<String>,
    /// Namespace of the agent pod.
    #[schemars(length(min = 1, max = 63))]
    pub namespace: String,
}

/// The person or service that launched the agent, from its validated OIDC/JWT token.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RequesterIdentity {
    /// The token's `sub` claim.
    #[schemars(length(min = 1, max = 1024))]
    pub subject: String,
    /// The token's `iss` claim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub issuer: Option<String>,
    /// The token's e-mail (or preferred username) claim, when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 320))]
    pub email: Option<String>,
    /// Groups from the policy's `identity.groupsClaim`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(length(max = 256)))]
    pub groups: Vec<String>,
}

impl RequesterIdentity {
    /// Whether the Kubernetes user `username` may be this requester, however the API
    /// server spells the user of a token: the identity model shared by the admission
    /// webhook (who may decide) and the sidecar (whose decision it accepts).
    ///
    /// An API server configured for OIDC names a user by a claim (`sub`, `email`, …)
    /// behind a prefix: the configured `prefixes` (`--oidc-username-prefix`, the
    /// structured authentication `claimMappings.username.prefix`), any `name:` prefix
    /// (`oidc:carol@example.com`), or the issuer and `#` (`https://issuer#u-42`). Every
    /// such reading is compared with the token's subject and e-mail, case-insensitively
    /// (e-mail addresses are). Reading too many spellings as the requester only refuses
    /// a self-approval more; reading too few would let one through.
    pub fn is_user(&self, username: &str, prefixes: &[String]) -> bool {
        let mut candidates: Vec<&str> = vec![username];
        candidates.extend(
            prefixes
                .iter()
                .filter_map(|p| username.strip_prefix(p.as_str())),
        );
        if let Some((_, rest)) = username.rsplit_once('#') {
            candidates.push(rest);
        }
        if !username.starts_with("system:")
            && let Some((_, rest)) = username.split_once(':')
        {
            candidates.push(rest);
        }
        candidates.iter().any(|c| {
            let c = c.trim();
            !c.is_empty()
                && (c.eq_ignore_ascii_case(&self.subject)
                    || self
                        .email
                        .as_deref()
                        .is_some_and(|e| c.eq_ignore_ascii_case(e)))
        })
    }
}
