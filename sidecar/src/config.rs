//! The sidecar's settings: flags, each with an `AGENTGATE_*` environment variable, read
//! once at start. Tests build [`Settings`] directly and never touch the environment.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use crate::audit::AuditSettings;
use clap::Parser;

/// agentgate sidecar: the per-pod gate between an AI agent and production resources.
///
/// Listens on 127.0.0.1 for every Connection in the Bundle, decides each request
/// against the AgentAccessPolicies that select this pod, forwards allowed ones with the
/// Connection's credentials, masks responses, and writes an audit record per request.
#[derive(Debug, Clone, Parser)]
#[command(name = "agentgate-sidecar", version)]
pub struct Settings {
    /// The Bundle (`bundle.json`) the operator renders for this namespace.
    #[arg(
        long,
        env = "AGENTGATE_BUNDLE",
        default_value = "/etc/agentgate/bundle/bundle.json"
    )]
    pub bundle: PathBuf,

    /// This pod's labels, as the downward API writes them (`key="value"` per line).
    #[arg(
        long,
        env = "AGENTGATE_POD_LABELS",
        default_value = "/etc/agentgate/podinfo/labels"
    )]
    pub pod_labels: PathBuf,

    /// This pod's name (downward API), recorded in audit events.
    #[arg(long, env = "AGENTGATE_POD_NAME", default_value = "")]
    pub pod_name: String,

    /// This pod's namespace (downward API), recorded in audit events.
    #[arg(long, env = "AGENTGATE_POD_NAMESPACE", default_value = "")]
    pub pod_namespace: String,

    /// The pod's service account (shown on its Approvals).
    #[arg(long, env = "AGENTGATE_SERVICE_ACCOUNT")]
    pub service_account: Option<String>,

    /// Where requests that need approval are held: `kubernetes` (an Approval object in
    /// the pod's namespace, through the in-cluster API or KUBECONFIG) or `off` (every
    /// such request is refused).
    #[arg(long, env = "AGENTGATE_APPROVALS", default_value = "kubernetes", value_parser = ["kubernetes", "off"])]
    pub approvals: String,

    /// The operator's ValidatingWebhookConfiguration. Before holding a request, and again
    /// before acting on an approval, the sidecar checks that its
    /// `approvals.agentgate.dev` webhook guards Approvals in this namespace; when it does
    /// not, requests that need approval are refused.
    #[arg(long, env = "AGENTGATE_APPROVAL_WEBHOOK", default_value = "agentgate")]
    pub approval_webhook: String,

    /// Where the Connections' Secrets are mounted: `<dir>/<secret-name>/<key>`, and
    /// service-account tokens at `<dir>/serviceaccount-<name>/token`.
    #[arg(
        long,
        env = "AGENTGATE_CREDENTIALS_DIR",
        default_value = "/var/run/agentgate/credentials"
    )]
    pub credentials_dir: PathBuf,

    /// Address the Connection listeners bind to (the agent's loopback).
    #[arg(long, env = "AGENTGATE_LISTEN_IP", default_value = "127.0.0.1")]
    pub listen_ip: IpAddr,

    /// Address of the admin server (`/metrics`, `/healthz`, `/readyz`).
    #[arg(long, env = "AGENTGATE_ADMIN_ADDR", default_value = "0.0.0.0:15020")]
    pub admin_addr: SocketAddr,

    /// The audit trail: its spool and where it is delivered.
    #[command(flatten)]
    pub audit: AuditSettings,

    /// Extra CA certificates (PEM) trusted for identity providers, upstreams and the
    /// audit sinks that speak TLS (an HTTP collector, Azure Blob), on top of the system
    /// roots.
    #[arg(long, env = "AGENTGATE_EXTRA_CA_FILE")]
    pub extra_ca_file: Option<PathBuf>,

    /// Key for the `hash` masking replacement; a random one per process when unset (so
    /// hashes are stable only within one sidecar's life).
    #[arg(long, env = "AGENTGATE_HASH_KEY_FILE")]
    pub hash_key_file: Option<PathBuf>,

    /// How often the Bundle and labels files are checked for changes.
    #[arg(long, env = "AGENTGATE_RELOAD_INTERVAL", default_value = "2s", value_parser = parse_duration)]
    pub reload_interval: Duration,

    /// How long upstreams may take.
    #[command(flatten)]
    pub timeouts: Timeouts,

    /// Whether this pod's sessions are reported as `AgentSession` objects
    /// (`kubernetes`, needs the Kubernetes API) or not (`off`).
    #[arg(long, env = "AGENTGATE_SESSIONS", default_value = "kubernetes", value_parser = ["kubernetes", "off"])]
    pub sessions: String,

    /// How often an AgentSession's status is written at most.
    #[arg(long, env = "AGENTGATE_SESSION_UPDATE_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub session_update_interval: Duration,

    /// How long a session may be idle before it ends (a later request starts a new one).
    #[arg(long, env = "AGENTGATE_SESSION_IDLE_TIMEOUT", default_value = "30m", value_parser = parse_duration)]
    pub session_idle_timeout: Duration,

    /// The largest response body buffered for JSON-structure masking when the policy
    /// sets no `limits.maxResponseBytes`.
    #[arg(long, env = "AGENTGATE_MAX_BUFFERED_BYTES", default_value_t = 16 << 20)]
    pub max_buffered_bytes: u64,

    /// Log level filter (`info`, `debug`, `agentgate_sidecar=debug,info`).
    #[arg(long, env = "AGENTGATE_LOG", default_value = "info")]
    pub log: String,
}

/// How long the sidecar waits for an upstream: one that accepts a connection and never
/// answers holds up only the requests sent to it, for at most these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Args)]
pub struct Timeouts {
    /// TCP connect and TLS handshake to an upstream, and a database login as a whole.
    #[arg(long = "upstream-connect-timeout", env = "AGENTGATE_UPSTREAM_CONNECT_TIMEOUT", default_value = "15s", value_parser = parse_duration)]
    pub connect: Duration,

    /// How long an HTTP upstream may take to begin its answer (status and headers);
    /// the body then streams for as long as it runs (watches, logs).
    #[arg(long = "upstream-response-timeout", env = "AGENTGATE_UPSTREAM_RESPONSE_TIMEOUT", default_value = "120s", value_parser = parse_duration)]
    pub response: Duration,

    /// The sidecar's own look-ups on a database: the catalog (which column a result's
    /// column is) and the impact preview's EXPLAIN. A look-up that times out masks
    /// every column it could not name, or shows no estimate.
    #[arg(long = "catalog-timeout", env = "AGENTGATE_CATALOG_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub catalog: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(15),
            response: Duration::from_secs(120),
            catalog: Duration::from_secs(2),
        }
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = agentgate_policy::parse_duration(s)?;
    if d.is_zero() {
        Err("must be more than 0s".to_owned())
    } else {
        Ok(d)
    }
}

impl agentgate_process::LogFilter for Settings {
    fn log_filter(&self) -> &str {
        &self.log
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{Fsync, Sink};

    #[test]
    fn defaults_and_bad_values() {
        let s = Settings::try_parse_from(["agentgate-sidecar"]).expect("defaults parse");
        assert_eq!(s.audit.sinks, vec![Sink::Stdout]);
        assert_eq!(s.audit.fsync, Fsync::Every(Duration::from_secs(1)));
        assert_eq!(s.listen_ip.to_string(), "127.0.0.1");
        assert_eq!(s.reload_interval, Duration::from_secs(2));
        let s = Settings::try_parse_from([
            "agentgate-sidecar",
            "--audit",
            "file:/tmp/a.jsonl,stdout",
            "--audit-fsync",
            "always",
        ])
        .expect("parses");
        assert_eq!(
            s.audit.sinks,
            vec![Sink::File("/tmp/a.jsonl".into()), Sink::Stdout]
        );
        assert_eq!(s.audit.fsync, Fsync::Always);
        for bad in [
            ["--audit", "syslog"],
            ["--audit-fsync", "sometimes"],
            ["--reload-interval", "0s"],
            ["--admin-addr", "nope"],
        ] {
            let err = Settings::try_parse_from(["agentgate-sidecar", bad[0], bad[1]])
                .expect_err("refused");
            assert!(err.to_string().contains(bad[1]), "{err}");
        }
    }
}
