//! The operator's settings: flags, each with an `AGENTGATE_*` environment variable.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;

/// agentgate operator: reconciles Connections and AgentAccessPolicies into per-namespace
/// sidecar bundles and injects the agentgate sidecar into opted-in pods.
#[derive(Debug, Clone, Parser)]
#[command(name = "agentgate-operator", version)]
pub struct Settings {
    /// The namespace the operator runs in (its Lease and webhook TLS Secret live there).
    #[arg(long, env = "AGENTGATE_NAMESPACE", default_value = "agentgate-system")]
    pub namespace: String,

    /// This replica's name (the Lease holder identity; Events' reporting instance).
    #[arg(long, env = "AGENTGATE_POD_NAME", default_value = "agentgate-operator")]
    pub pod_name: String,

    /// Address of the admission webhook server (HTTPS).
    #[arg(long, env = "AGENTGATE_WEBHOOK_ADDR", default_value = "0.0.0.0:9443")]
    pub webhook_addr: SocketAddr,

    /// Address of the admin server (`/metrics`, `/healthz`, `/readyz`).
    #[arg(long, env = "AGENTGATE_ADMIN_ADDR", default_value = "0.0.0.0:8080")]
    pub admin_addr: SocketAddr,

    /// DNS names (and IP addresses) the webhook serving certificate is valid for.
    #[arg(
        long,
        env = "AGENTGATE_WEBHOOK_HOSTS",
        value_delimiter = ',',
        default_value = "agentgate-webhook.agentgate-system.svc,agentgate-webhook.agentgate-system.svc.cluster.local"
    )]
    pub webhook_hosts: Vec<String>,

    /// The Secret holding the webhook's CA and serving certificate.
    #[arg(
        long,
        env = "AGENTGATE_WEBHOOK_TLS_SECRET",
        default_value = "agentgate-webhook-tls"
    )]
    pub webhook_tls_secret: String,

    /// Who manages the webhook certificate: `self` (the operator creates, rotates and
    /// publishes it in the webhook configurations' caBundle) or `cert-manager` (the Secret
    /// is cert-manager's, and its CA injector sets the caBundle).
    #[arg(long, env = "AGENTGATE_WEBHOOK_CERTS", default_value = "self", value_parser = ["self", "cert-manager"])]
    pub webhook_certs: String,

    /// The MutatingWebhookConfiguration whose caBundle the operator keeps current.
    #[arg(long, env = "AGENTGATE_MUTATING_WEBHOOK", default_value = "agentgate")]
    pub mutating_webhook: String,

    /// The ValidatingWebhookConfiguration (Approval decisions) whose caBundle the
    /// operator keeps current.
    #[arg(
        long,
        env = "AGENTGATE_VALIDATING_WEBHOOK",
        default_value = "agentgate"
    )]
    pub validating_webhook: String,

    /// The sidecar image injected into agent pods.
    #[arg(
        long,
        env = "AGENTGATE_SIDECAR_IMAGE",
        default_value = "ghcr.io/agentgate-dev/agentgate-sidecar:0.1.0"
    )]
    pub sidecar_image: String,

    /// Run the reconcilers only while holding the Lease (webhooks are served regardless).
    #[arg(long, env = "AGENTGATE_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_election: bool,

    /// How long a Lease is valid without renewal.
    #[arg(long, env = "AGENTGATE_LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    pub lease_duration: Duration,

    /// Username prefixes the API server puts before token users (its
    /// `--oidc-username-prefix`, or structured authentication's
    /// `claimMappings.username.prefix`), comma-separated: a decider `oidc:carol@…` is
    /// then recognized as requester `carol@…`. `name:` and `issuer#` prefixes are
    /// recognized without it.
    #[arg(long, env = "AGENTGATE_USERNAME_PREFIXES", value_delimiter = ',')]
    pub username_prefixes: Vec<String>,

    /// How long finished Approvals (executed, failed, denied, expired) are kept.
    #[arg(long, env = "AGENTGATE_APPROVAL_RETENTION", default_value = "168h", value_parser = parse_duration)]
    pub approval_retention: Duration,

    /// How long ended AgentSessions are kept after their last activity.
    #[arg(long, env = "AGENTGATE_SESSION_RETENTION", default_value = "168h", value_parser = parse_duration)]
    pub session_retention: Duration,

    /// Log level filter.
    #[arg(long, env = "AGENTGATE_LOG", default_value = "info")]
    pub log: String,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = agentgate_policy::parse_duration(s)?;
    if d < Duration::from_secs(2) {
        Err("must be at least 2s".into())
    } else {
        Ok(d)
    }
}

impl agentgate_process::LogFilter for Settings {
    fn log_filter(&self) -> &str {
        &self.log
    }
}
