//! agentgate's decision core: compiles `AgentAccessPolicy` and `Connection` objects into
//! a checked policy, classifies requests, evaluates them to allow / deny / require
//! approval, and masks responses.
//!
//! It must stay pure: no I/O, no async runtime, no Kubernetes client. The sidecar and
//! the operator both call it, so a policy the sidecar would reject is rejected by the
//! operator before it ships.
