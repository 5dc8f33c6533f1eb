//! agentgate's sidecar proxy, one per agent pod: every request the agent makes to a
//! `Connection` passes through it — identity, classification, the policy decision, the
//! approval hold, credential injection, response masking and the audit record, in that
//! order — written once in [`pipeline`], shared by the protocol front ends [`http`] and
//! [`postgres`] (see `docs/architecture.md` for the module map).
//!
//! It must never forward a request it could not decide, never let a credential or an
//! unmasked secret reach the agent, a log line or an audit record.

pub mod admin;
pub mod approval;
pub mod audit;
pub mod config;
pub mod http;
pub mod identity;
pub mod metrics;
pub mod pipeline;
pub mod postgres;
pub mod refusal;
pub mod runtime;
pub mod sessions;
pub mod tls;

use std::collections::HashMap;
use std::io::Read as _;
use std::sync::{Arc, Mutex};

use agentgate_crds::{Protocol, TlsMode};
use arc_swap::ArcSwap;

use crate::approval::coverage::Coverage;
use crate::approval::kubernetes::KubeApprovals;
use crate::approval::{ApprovalHook, NotConfigured};
use crate::audit::Audit;
use crate::config::Settings;
use crate::identity::IdentityValidator;
use crate::metrics::Metrics;
use crate::pipeline::{Gateway, RequestIds, audit_masking};
use crate::runtime::{Runtime, Sources};

/// How long a stopping sidecar tries to mark its sessions ended.
const SESSIONS_END_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// How long a stopping sidecar waits for its sinks to deliver the rest of the trail.
const AUDIT_CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Why the sidecar could not start. Each is a configuration problem (exit code 64).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The audit spool or a sink cannot be opened.
    #[error("cannot open the audit trail: {0}")]
    Audit(std::io::Error),
    /// The hash key file cannot be read.
    #[error("cannot read the hash key: {0}")]
    HashKey(std::io::Error),
    /// The extra CA file is unusable.
    #[error("{0}")]
    Tls(#[from] tls::TlsError),
    /// A port cannot be bound.
    #[error("cannot listen on {addr}: {error}")]
    Bind {
        /// The address.
        addr: String,
        /// The error.
        error: std::io::Error,
    },
}

/// Each Connection's listener (by name and port), or why it could not bind.
type Listeners = HashMap<(String, u16), Result<tokio::task::JoinHandle<()>, String>>;

/// A running sidecar: the pipeline, its front ends and the listeners bound for them.
#[derive(Debug)]
pub struct Sidecar {
    /// The request pipeline's shared state.
    pub gateway: Arc<Gateway>,
    http: Arc<http::Front>,
    postgres: Arc<postgres::Front>,
    listen_ip: std::net::IpAddr,
    listeners: Mutex<Listeners>,
}

impl Sidecar {
    /// Binds a listener for every Connection of `runtime` that has none yet. A Connection that disappears keeps its listener, whose requests are then
    /// denied as not configured.
    fn ensure_listeners(&self, runtime: &Runtime) {
        let mut listeners = self
            .listeners
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for c in runtime.policy.connections() {
            let key = (c.name.clone(), c.spec.listen.port);
            if listeners.get(&key).is_some_and(Result::is_ok) {
                continue;
            }
            let addr = std::net::SocketAddr::new(self.listen_ip, c.spec.listen.port);
            let bound = std::net::TcpListener::bind(addr)
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .and_then(tokio::net::TcpListener::from_std);
            let entry = match bound {
                Ok(listener) => {
                    tracing::info!(connection = %c.name, %addr, protocol = ?c.spec.protocol, "listening");
                    let name = c.name.clone();
                    Ok(match c.spec.protocol {
                        Protocol::Postgres => {
                            tokio::spawn(postgres::serve(listener, name, self.postgres.clone()))
                        }
                        Protocol::Http | Protocol::Kubernetes => {
                            tokio::spawn(http::serve(listener, name, self.http.clone()))
                        }
                    })
                }
                Err(e) => {
                    tracing::error!(connection = %c.name, %addr, error = %e, "cannot listen");
                    Err(format!(
                        "cannot listen on {addr} for Connection {}: {e}",
                        c.name
                    ))
                }
            };
            listeners.insert(key, entry);
        }
    }

    /// Why the sidecar is not ready, or `None` when it is.
    pub fn not_ready_reason(&self) -> Option<String> {
        if !self.gateway.config.load().loaded {
            return Some("no valid bundle loaded yet".into());
        }
        let listeners = self
            .listeners
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        listeners.values().find_map(|l| l.as_ref().err().cloned())
    }
}

/// A client of the pod's Kubernetes API, when approvals or sessions need one and one
/// can be configured.
async fn kube_client(settings: &Settings) -> Option<kube::Client> {
    if settings.approvals == "off" && settings.sessions == "off" {
        return None;
    }
    match kube::Client::try_default().await {
        Ok(client) => Some(client),
        Err(e) => {
            tracing::error!(error = %e, "no Kubernetes API: requests that need approval are refused and sessions are not reported");
            None
        }
    }
}

/// The approval hook: `Approval` objects when a Kubernetes API is reachable; otherwise
/// (or with `--approvals off`) every request that needs approval is refused.
fn approval_hook(
    settings: &Settings,
    client: Option<kube::Client>,
    metrics: &Metrics,
) -> Arc<dyn ApprovalHook> {
    if settings.approvals == "off" {
        return Arc::new(NotConfigured);
    }
    match client {
        Some(client) => {
            let coverage = Coverage::new(
                client.clone(),
                &settings.pod_namespace,
                &settings.approval_webhook,
                metrics.approval_webhook_guards.clone(),
            );
            let approvals = Arc::new(KubeApprovals::new(
                client,
                &settings.pod_namespace,
                &settings.pod_name,
                settings.service_account.clone(),
                coverage.clone(),
            ));
            tokio::spawn({
                let approvals = approvals.clone();
                async move {
                    // Said at start, for whoever installs it; checked again at each hold.
                    match coverage.check().await {
                        Ok(()) => {
                            tracing::info!("agentgate's approval webhook guards this namespace")
                        }
                        Err(why) => {
                            tracing::error!(%why, "requests that need approval will be refused")
                        }
                    }
                    approvals.recover().await
                }
            });
            approvals
        }
        None => Arc::new(NotConfigured),
    }
}

fn hash_key(settings: &Settings) -> Result<Vec<u8>, StartError> {
    match &settings.hash_key_file {
        Some(path) => std::fs::read(path).map_err(StartError::HashKey),
        None => {
            let mut key = vec![0u8; 32];
            std::fs::File::open("/dev/urandom")
                .and_then(|mut f| f.read_exact(&mut key))
                .map_err(StartError::HashKey)?;
            Ok(key)
        }
    }
}

/// Starts the sidecar: loads the configuration (denying everything until a valid one
/// loads), binds the listeners and the admin server, and watches for changes. Returns
/// when `shutdown` completes.
pub async fn run(
    settings: Settings,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), StartError> {
    let metrics = Metrics::new();
    let sinks: Vec<String> = settings.audit.sinks.iter().map(audit::Sink::name).collect();
    let sessions = Arc::new(sessions::Sessions::new(&sinks.join(",")));
    let audit = Audit::open(
        &settings.audit,
        settings.extra_ca_file.as_deref(),
        &metrics,
        agentgate_crds::audit::AuditEvent {
            pod: settings.pod_name.clone(),
            namespace: settings.pod_namespace.clone(),
            ..Default::default()
        },
        Some(sessions.clone()),
    )
    .map_err(StartError::Audit)?;
    let extra: Vec<&std::path::Path> = settings
        .extra_ca_file
        .iter()
        .map(std::path::PathBuf::as_path)
        .collect();
    let identity_client = tls::http_client(
        tls::root_store(&extra)?,
        TlsMode::VerifyFull,
        None,
        settings.timeouts.connect,
    )?;
    let sources = Sources {
        bundle: settings.bundle.clone(),
        labels: settings.pod_labels.clone(),
        credentials_dir: settings.credentials_dir.clone(),
        extra_ca: settings.extra_ca_file.clone(),
        hash_key: hash_key(&settings)?,
        timeouts: settings.timeouts,
    };
    let initial = match runtime::load(&sources) {
        Ok(r) => {
            metrics.bundle_loaded.set(1);
            metrics.config_reloads.with_label_values(&["applied"]).inc();
            tracing::info!(hash = %r.source_hash, "configuration loaded");
            r
        }
        Err(e) => {
            metrics.config_reloads.with_label_values(&["invalid"]).inc();
            tracing::error!(error = %e, "no valid configuration; denying every request until one loads");
            Runtime::deny_all()
        }
    };
    let config = Arc::new(ArcSwap::from_pointee(initial));
    let client = kube_client(&settings).await;
    let reporting = sessions::Reporting {
        agent: agentgate_crds::AgentRef {
            pod: settings.pod_name.clone(),
            service_account: settings.service_account.clone(),
            namespace: settings.pod_namespace.clone(),
        },
        interval: settings.session_update_interval,
        idle: settings.session_idle_timeout,
    };
    let reporter = match (&client, settings.sessions.as_str()) {
        (Some(client), "kubernetes") => Some(tokio::spawn(sessions::report(
            sessions.clone(),
            client.clone(),
            reporting.clone(),
        ))),
        _ => None,
    };
    let gateway = Arc::new(Gateway {
        pod: settings.pod_name.clone(),
        namespace: settings.pod_namespace.clone(),
        config: config.clone(),
        identity: IdentityValidator::new(identity_client),
        audit,
        metrics: metrics.clone(),
        approvals: approval_hook(&settings, client.clone(), &metrics),
        audit_masking: audit_masking(),
        ids: RequestIds::default(),
    });
    let sidecar = Arc::new(Sidecar {
        http: Arc::new(http::Front {
            gateway: gateway.clone(),
            max_buffered_bytes: settings.max_buffered_bytes,
        }),
        postgres: Arc::new(postgres::Front::new(
            gateway.clone(),
            settings.timeouts.catalog,
        )),
        gateway,
        listen_ip: settings.listen_ip,
        listeners: Mutex::new(HashMap::new()),
    });
    sidecar.ensure_listeners(&config.load());

    let admin = tokio::net::TcpListener::bind(settings.admin_addr)
        .await
        .map_err(|error| StartError::Bind {
            addr: settings.admin_addr.to_string(),
            error,
        })?;
    tracing::info!(addr = %settings.admin_addr, "admin server listening");
    let admin = tokio::spawn(admin::serve(admin, sidecar.clone()));
    let watcher = {
        let sidecar = sidecar.clone();
        tokio::spawn(runtime::watch(
            sources,
            config,
            metrics,
            settings.reload_interval,
            move |r| sidecar.ensure_listeners(r),
        ))
    };
    shutdown.await;
    tracing::info!("shutting down");
    admin.abort();
    watcher.abort();
    if let (Some(reporter), Some(client)) = (reporter, client) {
        reporter.abort();
        sessions::end_all(&sessions, client, &reporting, SESSIONS_END_TIMEOUT).await;
    }
    // The trail ends with a `shutdown` event, delivered to every sink that can take it.
    let gateway = sidecar.gateway.clone();
    let _ = tokio::task::spawn_blocking(move || gateway.audit.close(AUDIT_CLOSE_TIMEOUT)).await;
    Ok(())
}
