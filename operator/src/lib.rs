//! agentgate's operator: reconciles `Connection` and `AgentAccessPolicy` objects into
//! the per-namespace sidecar Bundle, injects the sidecar into opted-in pods, and serves
//! the admission webhooks that make `Approval` decisions trustworthy.
//!
//! It must never copy a Secret's value into a Bundle, a status or a log: it checks that
//! referenced Secrets exist with the right keys and hands the sidecar only their names.

pub mod admin;
pub mod approval_watch;
pub mod approvals;
pub mod certs;
pub mod config;
pub mod inject;
pub mod leader;
pub mod metrics;
pub mod plan;
pub mod reconcile;
pub mod retention;
pub mod triggers;
pub mod webhook;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Client;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::{WatchStreamExt, reflector, watcher};

use crate::config::Settings;
use crate::inject::InjectConfig;
use crate::metrics::Metrics;

/// How often the webhook certificate is checked for renewal and the caBundle republished.
const CERT_CHECK_INTERVAL: Duration = Duration::from_secs(600);

/// Why the operator stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// No usable Kubernetes client configuration.
    #[error("cannot configure the Kubernetes client: {0}")]
    Client(String),
    /// The webhook TLS material.
    #[error(transparent)]
    Certs(#[from] certs::CertError),
    /// A port cannot be bound.
    #[error("cannot listen on {0}: {1}")]
    Bind(std::net::SocketAddr, std::io::Error),
    /// Leadership was lost; the process exits so that it restarts as a candidate.
    #[error(transparent)]
    LostLease(#[from] leader::LostLease),
}

/// Runs the operator until `shutdown` completes.
pub async fn run(
    settings: Settings,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) -> Result<(), RunError> {
    let shutdown = futures::FutureExt::shared(Box::pin(shutdown));
    let client = Client::try_default()
        .await
        .map_err(|e| RunError::Client(e.to_string()))?;
    let metrics = Metrics::new();
    let ready = Arc::new(AtomicBool::new(false));

    let admin = tokio::net::TcpListener::bind(settings.admin_addr)
        .await
        .map_err(|e| RunError::Bind(settings.admin_addr, e))?;
    tokio::spawn(admin::serve(admin, metrics.clone(), ready.clone()));

    // Webhook TLS: every replica serves the certificate kept in the Secret.
    let self_managed = settings.webhook_certs == "self";
    let tls = certs::ensure(
        &client,
        &settings.namespace,
        &settings.webhook_tls_secret,
        &settings.webhook_hosts,
        self_managed,
    )
    .await?;
    if self_managed
        && !certs::publish_ca(
            &client,
            &settings.mutating_webhook,
            &settings.validating_webhook,
            &tls.ca_pem,
        )
        .await?
    {
        tracing::warn!(mutating = %settings.mutating_webhook, validating = %settings.validating_webhook,
            "a webhook configuration does not exist yet; its caBundle is published when it does");
    }
    let resolver = Arc::new(certs::RotatingCert::new(&tls)?);
    let server_config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap_or_else(|e| unreachable!("ring supports the default protocol versions: {e}"))
    .with_no_client_auth()
    .with_cert_resolver(resolver.clone());
    tokio::spawn(keep_certs_current(
        client.clone(),
        settings.clone(),
        resolver,
    ));

    // The bundles every namespace has, for injection.
    let (bundles, writer) = reflector::store();
    let bundle_watch = watcher(
        kube::Api::<ConfigMap>::all(client.clone()),
        watcher::Config::default().labels(&format!(
            "{}={}",
            reconcile::MANAGED_BY.0,
            reconcile::MANAGED_BY.1
        )),
    )
    .default_backoff()
    .reflect(writer)
    .for_each(|_| async {});
    tokio::spawn(bundle_watch);

    let state = Arc::new(webhook::WebhookState {
        bundles,
        inject: InjectConfig::new(
            settings.sidecar_image.clone(),
            settings.validating_webhook.clone(),
        ),
        metrics: metrics.clone(),
        identity: crate::approvals::IdentityModel {
            username_prefixes: settings.username_prefixes.clone(),
        },
    });
    let listener = tokio::net::TcpListener::bind(settings.webhook_addr)
        .await
        .map_err(|e| RunError::Bind(settings.webhook_addr, e))?;
    tracing::info!(addr = %settings.webhook_addr, "webhook serving");
    tokio::spawn(webhook::serve(
        listener,
        tokio_rustls::TlsAcceptor::from(Arc::new(server_config)),
        state,
    ));
    ready.store(true, Ordering::Relaxed);

    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: reconcile::MANAGER.into(),
            instance: Some(settings.pod_name.clone()),
        },
    );
    let watch_approvals = approval_watch::run(
        client.clone(),
        recorder.clone(),
        settings.approval_retention,
    );
    let session_retention = settings.session_retention;
    let clean_up_sessions =
        retention::clean_up(client.clone(), "ended AgentSession", move |s, now| {
            retention::session_expired(s, now, session_retention)
        });
    let (caches, cache_writers) = reconcile::Caches::new();
    let ctx = Arc::new(reconcile::Context {
        client: client.clone(),
        recorder,
        metrics,
        caches,
        failures: Default::default(),
    });
    if !settings.leader_election {
        tokio::select! {
            () = reconcile::run(ctx, cache_writers, shutdown) => {}
            () = watch_approvals => {}
            () = clean_up_sessions => {}
        }
        return Ok(());
    }
    let elector = leader::LeaderElector::new(
        client,
        &settings.namespace,
        "agentgate-operator",
        &settings.pod_name,
        settings.lease_duration,
    );
    tokio::select! {
        () = elector.acquire() => {}
        () = shutdown.clone() => return Ok(()),
    }
    tokio::select! {
        lost = elector.hold() => Err(lost.into()),
        () = reconcile::run(ctx, cache_writers, shutdown) => Ok(()),
        () = watch_approvals => Ok(()),
        () = clean_up_sessions => Ok(()),
    }
}

/// Renews the certificate before it expires and keeps the caBundle published.
async fn keep_certs_current(
    client: Client,
    settings: Settings,
    resolver: Arc<certs::RotatingCert>,
) {
    let self_managed = settings.webhook_certs == "self";
    loop {
        tokio::time::sleep(CERT_CHECK_INTERVAL).await;
        match certs::ensure(
            &client,
            &settings.namespace,
            &settings.webhook_tls_secret,
            &settings.webhook_hosts,
            self_managed,
        )
        .await
        {
            Ok(tls) => {
                if let Err(e) = resolver.swap(&tls) {
                    tracing::error!(error = %e, "cannot load the renewed webhook certificate");
                    continue;
                }
                // Published on every check, not only on change: the configuration may
                // have been (re)installed since.
                if self_managed
                    && let Err(e) = certs::publish_ca(
                        &client,
                        &settings.mutating_webhook,
                        &settings.validating_webhook,
                        &tls.ca_pem,
                    )
                    .await
                {
                    tracing::error!(error = %e, "cannot publish the caBundle");
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot check the webhook certificate"),
        }
    }
}
