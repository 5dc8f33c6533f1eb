//! The Bundle: what the operator hands the sidecars of one namespace (ConfigMap
//! `agentgate-bundle`, key `bundle.json`). It holds the Ready policies and connections of
//! the namespace as the user wrote them, and never a secret value — only the names of the
//! Secrets the sidecar finds mounted.

use serde::{Deserialize, Serialize};

use crate::{AgentAccessPolicySpec, ConnectionSpec};

/// The ConfigMap key that holds the bundle.
pub const BUNDLE_KEY: &str = "bundle.json";

/// The sidecar configuration of one namespace.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Bundle {
    /// Namespace the bundle was rendered for.
    pub namespace: String,
    /// Content hash of `connections` and `policies`, so a reload of the same content is a
    /// no-op and logs can say which configuration decided.
    #[serde(default)]
    pub hash: String,
    /// Every Ready Connection of the namespace.
    #[serde(default)]
    pub connections: Vec<BundleEntry<ConnectionSpec>>,
    /// Every Ready AgentAccessPolicy of the namespace; each sidecar keeps those whose
    /// `agentSelector` matches its own pod.
    #[serde(default)]
    pub policies: Vec<BundleEntry<AgentAccessPolicySpec>>,
}

/// One named object of a bundle.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BundleEntry<T> {
    /// The object's name.
    pub name: String,
    /// The `metadata.generation` the entry was rendered from.
    #[serde(default)]
    pub generation: i64,
    /// The object's spec.
    pub spec: T,
}
