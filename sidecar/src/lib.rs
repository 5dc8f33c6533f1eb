//! agentgate's sidecar proxy, one per agent pod: every request the agent makes to a
//! `Connection` passes through it — identity, classification, the policy decision, the
//! approval hold, credential injection, response masking and the audit record, in that
//! order (see `docs/architecture.md`).
//!
//! It must never forward a request it could not decide, never let a credential or an
//! unmasked secret reach the agent, a log line or an audit record.
