//! The sidecar's Prometheus metrics. Label values are bounded: connection names, decision
//! kinds, detector names and fixed reasons — never a path, a statement or a user.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

/// Every metric the sidecar exports.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// Requests by connection and decision (`allow`, `deny`, `approve`, `error`).
    pub requests: IntCounterVec,
    /// Request latency by connection, from arrival to the end of the response.
    pub request_seconds: HistogramVec,
    /// Values masked in responses, by detector.
    pub masked_values: IntCounterVec,
    /// Bundle reloads by result (`applied`, `unchanged`, `invalid`, `unreadable`).
    pub config_reloads: IntCounterVec,
    /// Rejected identity tokens by reason.
    pub jwt_failures: IntCounterVec,
    /// Audit events that could not be written (the request was refused).
    pub audit_failures: IntCounterVec,
    /// Responses cut off by `limits.maxResponseBytes`, or refused because they could not
    /// be masked, by reason.
    pub responses_refused: IntCounterVec,
    /// 1 while a valid bundle is loaded.
    pub bundle_loaded: IntGauge,
}

impl Metrics {
    /// Registers every metric in a fresh registry.
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels)
                .unwrap_or_else(|e| unreachable!("{name}: {e}"));
            registry
                .register(Box::new(c.clone()))
                .unwrap_or_else(|e| unreachable!("{name}: {e}"));
            c
        };
        let requests = counter(
            "agentgate_sidecar_requests_total",
            "Requests by connection and decision.",
            &["connection", "decision"],
        );
        let masked_values = counter(
            "agentgate_sidecar_masked_values_total",
            "Values masked in responses, by detector.",
            &["detector"],
        );
        let config_reloads = counter(
            "agentgate_sidecar_config_reloads_total",
            "Bundle reloads by result.",
            &["result"],
        );
        let jwt_failures = counter(
            "agentgate_sidecar_jwt_failures_total",
            "Rejected identity tokens by reason.",
            &["reason"],
        );
        let audit_failures = counter(
            "agentgate_sidecar_audit_failures_total",
            "Audit events that could not be written.",
            &["sink"],
        );
        let responses_refused = counter(
            "agentgate_sidecar_responses_refused_total",
            "Responses cut off or refused, by reason.",
            &["reason"],
        );
        let request_seconds = HistogramVec::new(
            HistogramOpts::new(
                "agentgate_sidecar_request_duration_seconds",
                "Request latency through the sidecar.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
            ]),
            &["connection"],
        )
        .unwrap_or_else(|e| unreachable!("histogram: {e}"));
        registry
            .register(Box::new(request_seconds.clone()))
            .unwrap_or_else(|e| unreachable!("histogram: {e}"));
        let bundle_loaded = IntGauge::new(
            "agentgate_sidecar_bundle_loaded",
            "1 while a valid bundle is loaded.",
        )
        .unwrap_or_else(|e| unreachable!("gauge: {e}"));
        registry
            .register(Box::new(bundle_loaded.clone()))
            .unwrap_or_else(|e| unreachable!("gauge: {e}"));
        Self {
            registry,
            requests,
            request_seconds,
            masked_values,
            config_reloads,
            jwt_failures,
            audit_failures,
            responses_refused,
            bundle_loaded,
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metrics.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
