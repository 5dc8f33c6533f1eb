//! agentgate's operator: reconciles `Connection` and `AgentAccessPolicy` objects into
//! the per-namespace sidecar Bundle, injects the sidecar into opted-in pods, and serves
//! the admission webhooks that make `Approval` decisions trustworthy.
//!
//! It must never copy a Secret's value into a Bundle, a status or a log: it checks that
//! referenced Secrets exist with the right keys and hands the sidecar only their names.
