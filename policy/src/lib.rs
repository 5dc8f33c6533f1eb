//! agentgate's decision core: compiles `AgentAccessPolicy` and `Connection` objects into
//! a checked policy, classifies requests, evaluates them to allow / deny / require
//! approval, and masks responses.
//!
//! It must stay pure: no I/O, no async runtime, no Kubernetes client. The sidecar and
//! the operator both call it, so a policy the sidecar would reject is rejected by the
//! operator before it ships.

mod attrs;
pub mod classify;
mod compile;
mod evaluate;
mod glob;
pub mod masking;
mod selector;

pub use attrs::{
    HttpRequest, Identity, KubernetesRequest, RequestAttrs, SqlRequest, SqlStatement, Target,
};
pub use compile::{
    ApprovalPolicy, CompiledAction, CompiledConnection, CompiledPolicy, EffectiveLimits,
    PolicyError, compile, describe, parse_duration, parse_quantity,
};
pub use evaluate::{DISCOVERY_RULE, Decision, Evaluation, evaluate, session_is_read_only};
pub use selector::selector_matches;
