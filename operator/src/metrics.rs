//! The operator's Prometheus metrics.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder,
};

/// Every metric the operator exports.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// Reconciles by result (`ok`, `error`).
    pub reconciles: IntCounterVec,
    /// Reconcile failures by reason.
    pub reconcile_errors: IntCounterVec,
    /// Objects found not Ready, by kind and reason.
    pub not_ready: IntCounterVec,
    /// Admission requests by webhook and outcome (`injected`, `skipped`, `error`, `allowed`, `denied`).
    pub admissions: IntCounterVec,
    /// Admission handling latency by webhook.
    pub admission_seconds: HistogramVec,
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
        let reconciles = counter(
            "agentgate_operator_reconciles_total",
            "Namespace reconciles by result.",
            &["result"],
        );
        let reconcile_errors = counter(
            "agentgate_operator_reconcile_errors_total",
            "Reconcile failures by reason.",
            &["reason"],
        );
        let not_ready = counter(
            "agentgate_operator_not_ready_total",
            "Objects found not Ready, by kind and reason.",
            &["kind", "reason"],
        );
        let admissions = counter(
            "agentgate_operator_admissions_total",
            "Admission requests by webhook and outcome.",
            &["webhook", "outcome"],
        );
        let admission_seconds = HistogramVec::new(
            HistogramOpts::new(
                "agentgate_operator_admission_duration_seconds",
                "Admission handling latency.",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5,
            ]),
            &["webhook"],
        )
        .unwrap_or_else(|e| unreachable!("histogram: {e}"));
        registry
            .register(Box::new(admission_seconds.clone()))
            .unwrap_or_else(|e| unreachable!("histogram: {e}"));
        Self {
            registry,
            reconciles,
            reconcile_errors,
            not_ready,
            admissions,
            admission_seconds,
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
