//! The sidecar's configuration at run time: the Bundle, filtered to the policies that
//! select this pod, compiled, plus an upstream client per Connection. Reloaded when the
//! files change; an invalid new configuration never replaces the last good one.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use agentgate_crds::{Bundle, Protocol};
use agentgate_policy::{
    CompiledConnection, CompiledPolicy, PolicyError, compile, selector_matches,
};
use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};

use crate::config::Timeouts;
use crate::http::upstream::Upstream;
use crate::metrics::Metrics;
use crate::postgres::upstream::PgUpstream;

/// One loaded configuration.
#[derive(Debug)]
pub struct Runtime {
    /// The compiled policy (deny-all before the first valid bundle).
    pub policy: CompiledPolicy,
    /// Upstream per Connection, or why it cannot be reached (its requests are refused).
    pub upstreams: HashMap<String, Result<Arc<Upstream>, String>>,
    /// The same for postgres Connections.
    pub pg_upstreams: HashMap<String, Result<Arc<PgUpstream>, String>>,
    /// Hash of the files it was loaded from.
    pub source_hash: String,
    /// Whether a valid bundle is loaded.
    pub loaded: bool,
}

impl Runtime {
    /// Before any valid bundle: nothing is configured, so everything is denied.
    pub fn deny_all() -> Self {
        Self {
            policy: CompiledPolicy::deny_all(),
            upstreams: HashMap::new(),
            pg_upstreams: HashMap::new(),
            source_hash: String::new(),
            loaded: false,
        }
    }
}

/// Why a configuration was not loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A file could not be read.
    #[error("cannot read {path}: {error}")]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// The error.
        error: std::io::Error,
    },
    /// The bundle is not valid JSON of the Bundle shape.
    #[error("{path} is not a valid bundle: {error}")]
    BadBundle {
        /// The file.
        path: PathBuf,
        /// The error.
        error: serde_json::Error,
    },
    /// The policies do not compile.
    #[error("the bundle's policies do not compile: {}", agentgate_policy::describe(.0))]
    Invalid(Vec<PolicyError>),
}

/// Where the configuration comes from.
#[derive(Debug, Clone)]
pub struct Sources {
    /// `bundle.json`.
    pub bundle: PathBuf,
    /// The downward API labels file.
    pub labels: PathBuf,
    /// Where Connection Secrets are mounted.
    pub credentials_dir: PathBuf,
    /// Extra CA certificates for upstreams.
    pub extra_ca: Option<PathBuf>,
    /// The key of the `hash` masking replacement.
    pub hash_key: Vec<u8>,
    /// How long upstreams may take.
    pub timeouts: Timeouts,
}

fn read(path: &Path) -> Result<Vec<u8>, LoadError> {
    std::fs::read(path).map_err(|error| LoadError::Unreadable {
        path: path.to_owned(),
        error,
    })
}

/// The hash of the source files, to tell whether anything changed.
pub fn source_hash(sources: &Sources) -> Result<String, LoadError> {
    let mut h = Sha256::new();
    h.update(read(&sources.bundle)?);
    h.update([0]);
    h.update(read(&sources.labels)?);
    Ok(hex::encode(h.finalize()))
}

/// Loads and compiles the configuration.
pub fn load(sources: &Sources) -> Result<Runtime, LoadError> {
    let source_hash = source_hash(sources)?;
    let bundle: Bundle =
        serde_json::from_slice(&read(&sources.bundle)?).map_err(|error| LoadError::BadBundle {
            path: sources.bundle.clone(),
            error,
        })?;
    let labels = parse_labels(&String::from_utf8_lossy(&read(&sources.labels)?));
    let selected: Vec<_> = bundle
        .policies
        .into_iter()
        .filter(|p| selector_matches(&p.spec.agent_selector, &labels))
        .collect();
    let policy =
        compile(&selected, &bundle.connections, &sources.hash_key).map_err(LoadError::Invalid)?;
    let upstreams = policy
        .connections()
        .filter(|c| c.spec.protocol != Protocol::Postgres)
        .map(|c| (c.name.clone(), upstream_for(c, sources)))
        .collect();
    let pg_upstreams = policy
        .connections()
        .filter(|c| c.spec.protocol == Protocol::Postgres)
        .map(|c| {
            let upstream = PgUpstream::new(
                &c.spec,
                &sources.credentials_dir,
                sources.extra_ca.as_deref(),
                sources.timeouts.connect,
            )
            .map(Arc::new)
            .map_err(|e| format!("Connection {}: {e}", c.name));
            (c.name.clone(), upstream)
        })
        .collect();
    Ok(Runtime {
        policy,
        upstreams,
        pg_upstreams,
        source_hash,
        loaded: true,
    })
}

fn upstream_for(c: &CompiledConnection, sources: &Sources) -> Result<Arc<Upstream>, String> {
    Upstream::new(
        &c.name,
        &c.spec,
        &sources.credentials_dir,
        sources.extra_ca.as_deref(),
        &sources.timeouts,
    )
    .map(Arc::new)
    .map_err(|e| e.to_string())
}

/// Parses the downward API's labels file: one `key="value"` per line, values quoted as
/// Go's `%q` does.
pub fn parse_labels(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|line| {
            let (key, value) = line.split_once('=')?;
            let value = value.trim().strip_prefix('"')?.strip_suffix('"')?;
            let mut out = String::with_capacity(value.len());
            let mut chars = value.chars();
            while let Some(c) = chars.next() {
                if c == '\\' {
                    match chars.next() {
                        Some('n') => out.push('\n'),
                        Some('t') => out.push('\t'),
                        Some(other) => out.push(other),
                        None => {}
                    }
                } else {
                    out.push(c);
                }
            }
            Some((key.trim().to_owned(), out))
        })
        .collect()
}

/// Checks the sources every `interval`; applies a changed, valid configuration, and keeps
/// the last good one (saying so in the log and `agentgate_sidecar_config_reloads_total`)
/// when the new one is invalid. Calls `on_applied` after each applied change. Each tick
/// also re-reads the Connections' credential files, so a rotated credential is used
/// from the next request on. File reads and policy compilation run off the async
/// workers: a slow disk or a large bundle never stalls a request.
pub async fn watch(
    sources: Sources,
    current: Arc<ArcSwap<Runtime>>,
    metrics: Metrics,
    interval: std::time::Duration,
    on_applied: impl Fn(&Runtime) + Send + 'static,
) {
    let sources = Arc::new(sources);
    let mut last_seen = current.load().source_hash.clone();
    loop {
        tokio::time::sleep(interval).await;
        let loaded = {
            let (sources, current) = (sources.clone(), current.load_full());
            let last_seen = last_seen.clone();
            tokio::task::spawn_blocking(move || -> Result<_, LoadError> {
                for upstream in current.upstreams.values().flatten() {
                    upstream.refresh();
                }
                let hash = source_hash(&sources)?;
                if hash == last_seen {
                    return Ok((hash, None));
                }
                Ok((hash, Some(load(&sources))))
            })
            .await
        };
        let (hash, loaded) = match loaded {
            Ok(Ok(checked)) => checked,
            Ok(Err(e)) => {
                if last_seen != "unreadable" {
                    tracing::error!(error = %e, "configuration unreadable; keeping the last good one");
                    metrics
                        .config_reloads
                        .with_label_values(&["unreadable"])
                        .inc();
                    last_seen = "unreadable".into();
                }
                continue;
            }
            Err(e) => {
                tracing::error!(error = %e, "the configuration check failed; keeping the last good one");
                continue;
            }
        };
        last_seen = hash;
        match loaded {
            None => {}
            Some(Ok(runtime)) => {
                tracing::info!(hash = %runtime.source_hash, connections = runtime.policy.connections().count(), "configuration applied");
                metrics.config_reloads.with_label_values(&["applied"]).inc();
                metrics.bundle_loaded.set(1);
                // Swap first, so a new listener never serves the old configuration.
                let runtime = Arc::new(runtime);
                current.store(runtime.clone());
                on_applied(&runtime);
            }
            Some(Err(e)) => {
                tracing::error!(error = %e, "new configuration is invalid; keeping the last good one");
                metrics.config_reloads.with_label_values(&["invalid"]).inc();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn downward_api_labels() {
        let labels =
            parse_labels("agentgate.dev/agent=\"claude\"\napp=\"a \\\"quoted\\\" one\"\nbroken\n");
        assert_eq!(
            labels.get("agentgate.dev/agent").map(String::as_str),
            Some("claude")
        );
        assert_eq!(
            labels.get("app").map(String::as_str),
            Some("a \"quoted\" one")
        );
        assert_eq!(labels.len(), 2);
    }
}
