//! The sidecar's Prometheus metrics. Label values are bounded: connection names, decision
//! kinds, detector names and fixed reasons — never a path, a statement or a user.

use agentgate_process::{counter, gauge, histogram};
use prometheus::{HistogramVec, IntCounterVec, IntGauge, Registry};

/// Every metric the sidecar exports.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// Requests by connection and decision (`allow`, `deny`, `error`).
    pub requests: IntCounterVec,
    /// Request latency by connection, from arrival to the end of the response.
    pub request_seconds: HistogramVec,
    /// Values masked in responses, by detector.
    pub masked_values: IntCounterVec,
    /// Bundle reloads by result (`applied`, `invalid`, `unreadable`).
    pub config_reloads: IntCounterVec,
    /// Rejected identity tokens by reason.
    pub jwt_failures: IntCounterVec,
    /// Audit events that could not be written (the request was refused).
    pub audit_failures: IntCounterVec,
    /// Refusals by kind (`denied`, `not_approved`, `identity`, `limit`, …).
    pub refusals: IntCounterVec,
    /// Responses cut off by `limits.maxResponseBytes`, or refused because they could not
    /// be masked, by reason.
    pub responses_refused: IntCounterVec,
    /// 1 while a valid bundle is loaded.
    pub bundle_loaded: IntGauge,
    /// 1 when the last check found the approvals webhook guarding this namespace.
    pub approval_webhook_guards: IntGauge,
}

impl Metrics {
    /// Registers every metric in a fresh registry.
    pub fn new() -> Self {
        let r = Registry::new();
        Self {
            requests: counter(
                &r,
                "agentgate_sidecar_requests_total",
                "Requests by connection and decision.",
                &["connection", "decision"],
            ),
            request_seconds: histogram(
                &r,
                "agentgate_sidecar_request_duration_seconds",
                "Request latency through the sidecar.",
                vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
                ],
                &["connection"],
            ),
            masked_values: counter(
                &r,
                "agentgate_sidecar_masked_values_total",
                "Values masked in responses, by detector.",
                &["detector"],
            ),
            config_reloads: counter(
                &r,
                "agentgate_sidecar_config_reloads_total",
                "Bundle reloads by result.",
                &["result"],
            ),
            jwt_failures: counter(
                &r,
                "agentgate_sidecar_jwt_failures_total",
                "Rejected identity tokens by reason.",
                &["reason"],
            ),
            audit_failures: counter(
                &r,
                "agentgate_sidecar_audit_failures_total",
                "Audit events that could not be written.",
                &["sink"],
            ),
            refusals: counter(
                &r,
                "agentgate_sidecar_refusals_total",
                "Requests refused, by kind of refusal.",
                &["kind"],
            ),
            responses_refused: counter(
                &r,
                "agentgate_sidecar_responses_refused_total",
                "Responses cut off or refused, by reason.",
                &["reason"],
            ),
            bundle_loaded: gauge(
                &r,
                "agentgate_sidecar_bundle_loaded",
                "1 while a valid bundle is loaded.",
            ),
            approval_webhook_guards: gauge(
                &r,
                "agentgate_sidecar_approval_webhook_guards",
                "1 when the last check found agentgate's approval webhook guarding this namespace; 0 when requests needing approval are refused.",
            ),
            registry: r,
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        agentgate_process::render(&self.registry)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
