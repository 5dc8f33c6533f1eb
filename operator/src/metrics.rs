//! The operator's Prometheus metrics.

use agentgate_process::{counter, histogram};
use prometheus::{HistogramVec, IntCounterVec, Registry};

/// Every metric the operator exports.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// Reconciles by result (`ok`, `error`).
    pub reconciles: IntCounterVec,
    /// Reconcile failures by reason.
    pub reconcile_errors: IntCounterVec,
    /// Reconcile latency by result (`ok`, `error`), every reconcile.
    pub reconcile_seconds: HistogramVec,
    /// Watch events of the kinds whose changes mostly do not matter (pods, service
    /// accounts), by kind and whether they trigger a reconcile (`reconcile`, `ignored`).
    pub watch_events: IntCounterVec,
    /// Objects found not Ready, by kind and reason.
    pub not_ready: IntCounterVec,
    /// Admission requests by webhook and outcome (`injected`, `skipped`, `error`).
    pub admissions: IntCounterVec,
    /// Admission handling latency by webhook.
    pub admission_seconds: HistogramVec,
}

impl Metrics {
    /// Registers every metric in a fresh registry.
    pub fn new() -> Self {
        let r = Registry::new();
        Self {
            reconciles: counter(
                &r,
                "agentgate_operator_reconciles_total",
                "Namespace reconciles by result.",
                &["result"],
            ),
            reconcile_errors: counter(
                &r,
                "agentgate_operator_reconcile_errors_total",
                "Reconcile failures by reason.",
                &["reason"],
            ),
            reconcile_seconds: histogram(
                &r,
                "agentgate_operator_reconcile_duration_seconds",
                "Namespace reconcile latency by result.",
                vec![
                    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                ],
                &["result"],
            ),
            watch_events: counter(
                &r,
                "agentgate_operator_watch_events_total",
                "Pod and service account watch events by kind and whether they trigger a reconcile.",
                &["kind", "outcome"],
            ),
            not_ready: counter(
                &r,
                "agentgate_operator_not_ready_total",
                "Objects found not Ready, by kind and reason.",
                &["kind", "reason"],
            ),
            admissions: counter(
                &r,
                "agentgate_operator_admissions_total",
                "Admission requests by webhook and outcome.",
                &["webhook", "outcome"],
            ),
            admission_seconds: histogram(
                &r,
                "agentgate_operator_admission_duration_seconds",
                "Admission handling latency.",
                vec![
                    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5,
                ],
                &["webhook"],
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
