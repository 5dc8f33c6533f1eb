//! agentgate's public contract with its users: the custom resources (`Connection`,
//! `AgentAccessPolicy`, `Approval`, `AgentSession`) as Rust types, from which the CRD
//! manifests are generated (`make crds`).
//!
//! Everything a user can express is described here, field by field, because the
//! descriptions are what `kubectl explain` shows. Validation that the schema alone cannot
//! say is written as CEL rules (`x-kubernetes-validations`) next to the field it guards,
//! so the API server itself rejects a bad object with a message that says what to fix.
//!
//! It also holds the audit trail's contract (`audit`): the event schema, the hash chain,
//! and its verification, shared by the sidecar that writes a trail and whoever reads it.
//!
//! This crate must never do I/O or hold secret values: it is types, schema and the
//! manifest rendering that `crdgen` and the drift test share.

mod agentsession;
mod approval;
pub mod audit;
mod bundle;
mod common;
mod connection;
mod manifests;
mod policy;

pub use agentsession::*;
pub use approval::*;
pub use bundle::*;
pub use common::*;
pub use connection::*;
pub use manifests::{CrdManifest, RenderError, all_crds, render_manifest};
pub use policy::*;

/// The API group of every agentgate resource.
pub const GROUP: &str = "agentgate.dev";
/// The API version of every agentgate resource.
pub const VERSION: &str = "v1alpha1";
/// The `kubectl get agentgate` category that lists every agentgate resource.
pub const CATEGORY: &str = "agentgate";

#[cfg(test)]
mod tests;
