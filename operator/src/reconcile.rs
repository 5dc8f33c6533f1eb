//! The reconciler: one pass per namespace reads the namespace's Connections, policies,
//! Secret key names, service accounts and pod labels, [`plan`]s, and writes the result —
//! each object's `Ready` condition (server-side apply, status subresource), the bundle
//! ConfigMap (only when its content hash changed), and Events on transitions.
//!
//! Connections, policies, service accounts and pods are read from the reflector stores
//! of the watches that trigger the reconciles ([`Caches`]), never listed per reconcile:
//! a LIST per namespace per pod change is what an API server of a busy cluster cannot
//! afford. Secrets are the exception: their watch is metadata-only (the operator never
//! streams Secret values), and only a GET tells which keys a Secret holds.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentgate_crds::{
    AgentAccessPolicy, AgentAccessPolicyStatus, BUNDLE_KEY, Condition, Connection,
    ConnectionStatus, Protocol,
};
use futures::future::{BoxFuture, Shared};
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;

use crate::inject::{BUNDLE_CONFIGMAP, KUBECONFIG_KEY};
use crate::metrics::Metrics;
use crate::plan::{NamespaceObjects, Readiness, plan};
use crate::triggers::{Relevant, Triggers};

/// The field manager of everything the operator writes.
pub const MANAGER: &str = "agentgate-operator";
/// The label on every object the operator renders.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "agentgate");
/// The annotation carrying a bundle's content hash.
pub const HASH_ANNOTATION: &str = "agentgate.dev/bundle-hash";
/// A namespace label that asks for a bundle even before it has agentgate objects, so
/// injected pods there get a (deny-all) configuration and become ready.
pub const NAMESPACE_INJECTION_LABEL: &str = "agentgate.dev/injection";
/// How long a reconcile waits for the caches' first complete list before it fails (and
/// is retried with backoff).
const CACHE_SYNC_TIMEOUT: Duration = Duration::from_secs(30);

/// What the reconciler needs.
pub struct Context {
    /// The API client.
    pub client: Client,
    /// Event recorder.
    pub recorder: Recorder,
    /// Metrics.
    pub metrics: Metrics,
    /// What the watches have seen, read instead of listing.
    pub caches: Caches,
    /// Consecutive failures per namespace, for the retry backoff.
    pub failures: std::sync::Mutex<BTreeMap<String, u32>>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").finish_non_exhaustive()
    }
}

/// The reflector stores the reconciler reads, filled by the watches [`run`] starts. Pods
/// and service accounts are kept as their name, namespace, uid and labels only.
#[derive(Clone)]
pub struct Caches {
    connections: Store<Connection>,
    policies: Store<AgentAccessPolicy>,
    service_accounts: Store<PartialObjectMeta<ServiceAccount>>,
    pods: Store<PartialObjectMeta<Pod>>,
    /// Resolves once every store has completed its first list (or with the kind whose
    /// writer went away). One future shared by every reconcile: a store's own readiness
    /// future wakes only the task that polled it last, so reconciles of several namespaces
    /// waiting on the stores directly would sleep through the sync until their timeout.
    synced: Shared<BoxFuture<'static, Result<(), &'static str>>>,
    /// The kind whose first list `synced` is waiting for.
    awaiting: Arc<std::sync::Mutex<&'static str>>,
}

impl std::fmt::Debug for Caches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Caches")
            .field("connections", &self.connections.len())
            .field("policies", &self.policies.len())
            .field("service_accounts", &self.service_accounts.len())
            .field("pods", &self.pods.len())
            .finish_non_exhaustive()
    }
}

/// The writing halves of [`Caches`], handed to [`run`].
#[derive(Debug)]
pub struct CacheWriters {
    connections: reflector::store::Writer<Connection>,
    policies: reflector::store::Writer<AgentAccessPolicy>,
    service_accounts: reflector::store::Writer<PartialObjectMeta<ServiceAccount>>,
    pods: reflector::store::Writer<PartialObjectMeta<Pod>>,
}

impl Caches {
    /// Empty stores, and their writers.
    pub fn new() -> (Self, CacheWriters) {
        let (connections, connections_writer) = reflector::store();
        let (policies, policies_writer) = reflector::store();
        let (service_accounts, service_accounts_writer) = reflector::store();
        let (pods, pods_writer) = reflector::store();
        let waits: [(&'static str, BoxFuture<'static, _>); 4] = [
            ("Connections", ready(&connections)),
            ("AgentAccessPolicies", ready(&policies)),
            ("ServiceAccounts", ready(&service_accounts)),
            ("Pods", ready(&pods)),
        ];
        let awaiting = Arc::new(std::sync::Mutex::new(waits[0].0));
        let synced = {
            let awaiting = awaiting.clone();
            async move {
                for (kind, wait) in waits {
                    *awaiting
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = kind;
                    wait.await.map_err(|_| kind)?;
                }
                Ok(())
            }
            .boxed()
            .shared()
        };
        (
            Self {
                connections,
                policies,
                service_accounts,
                pods,
                synced,
                awaiting,
            },
            CacheWriters {
                connections: connections_writer,
                policies: policies_writer,
                service_accounts: service_accounts_writer,
                pods: pods_writer,
            },
        )
    }

    /// Waits until every store holds a complete list. Reading one before would plan from
    /// nothing: every Connection and policy would drop out of the bundle at start.
    async fn synced(&self, timeout: Duration) -> Result<(), ReconcileError> {
        match tokio::time::timeout(timeout, self.synced.clone()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(kind)) => Err(ReconcileError::NotSynced { kind }),
            Err(_) => Err(ReconcileError::NotSynced {
                kind: *self
                    .awaiting
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            }),
        }
    }
}

/// A store's first complete list, as a future owning its handle.
fn ready<K>(store: &Store<K>) -> BoxFuture<'static, Result<(), reflector::store::WriterDropped>>
where
    K: Resource + Clone + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
{
    let store = store.clone();
    async move { store.wait_until_ready().await }.boxed()
}

/// Why a reconcile failed (it is retried with backoff).
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The API server refused or failed a call.
    #[error("{action}: {source}")]
    Api {
        /// What was being done.
        action: String,
        /// The error.
        #[source]
        source: kube::Error,
    },
    /// A cache has not completed its first list (yet).
    #[error("the cache of {kind} has not completed its first list from the API server")]
    NotSynced {
        /// The kind of the cache.
        kind: &'static str,
    },
}

impl ReconcileError {
    fn reason(&self) -> &'static str {
        match self {
            ReconcileError::Api {
                source: kube::Error::Api(s),
                ..
            } if s.code == 409 => "conflict",
            ReconcileError::Api {
                source: kube::Error::Api(s),
                ..
            } if s.code == 403 => "forbidden",
            ReconcileError::Api { .. } => "api",
            ReconcileError::NotSynced { .. } => "not_synced",
        }
    }
}

fn api_err(action: impl Into<String>) -> impl FnOnce(kube::Error) -> ReconcileError {
    let action = action.into();
    move |source| ReconcileError::Api { action, source }
}

/// Runs the reconciler until `shutdown` completes, filling the stores of `ctx.caches`
/// through `writers`.
pub async fn run(
    ctx: Arc<Context>,
    writers: CacheWriters,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let to_namespace = |ns: Option<String>| ns.map(|ns| ObjectRef::<Namespace>::new(&ns));
    let connections = watcher(
        Api::<Connection>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(writers.connections)
    .touched_objects();
    let policies = watcher(
        Api::<AgentAccessPolicy>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(writers.policies)
    .touched_objects();
    // Metadata only: the operator never streams Secret values.
    let secrets = watcher(
        Api::<PartialObjectMeta<Secret>>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .touched_objects();
    let service_accounts = watcher(
        Api::<PartialObjectMeta<ServiceAccount>>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .modify(identity_and_labels)
    .reflect(writers.service_accounts);
    let pods = watcher(
        Api::<PartialObjectMeta<Pod>>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .modify(identity_and_labels)
    .reflect(writers.pods);
    Controller::new(
        Api::<Namespace>::all(client.clone()),
        watcher::Config::default(),
    )
    .watches_stream(connections, move |c| to_namespace(c.namespace()))
    .watches_stream(policies, move |p| to_namespace(p.namespace()))
    .watches_stream(secrets, move |s| to_namespace(s.namespace()))
    .reconcile_on(namespaces_to_reconcile(
        service_accounts,
        "ServiceAccount",
        crate::triggers::existence,
        &ctx.metrics,
    ))
    .reconcile_on(namespaces_to_reconcile(
        pods,
        "Pod",
        crate::triggers::labels,
        &ctx.metrics,
    ))
    .graceful_shutdown_on(shutdown)
    .run(reconcile, error_policy, ctx)
    .for_each(|result| async move {
        if let Err(e) = result {
            tracing::debug!(error = %e, "reconcile stream");
        }
    })
    .await;
}

/// Keeps of a pod's or service account's metadata only what the reconciler reads (and
/// the store needs): the rest — annotations, managed fields, owners — would only take
/// memory, once for every pod of the cluster.
fn identity_and_labels<K>(object: &mut PartialObjectMeta<K>) {
    let meta = std::mem::take(&mut object.metadata);
    object.metadata = ObjectMeta {
        name: meta.name,
        namespace: meta.namespace,
        uid: meta.uid,
        resource_version: meta.resource_version,
        labels: meta.labels,
        ..Default::default()
    };
}

/// The namespaces a watch of `kind` asks to reconcile: see [`crate::triggers`]. Every
/// object event is counted, as triggering a reconcile or ignored.
fn namespaces_to_reconcile<K>(
    events: impl futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    kind: &'static str,
    relevant: Relevant<K>,
    metrics: &Metrics,
) -> impl futures::Stream<Item = ObjectRef<Namespace>> + Send + 'static
where
    K: Resource + Send + 'static,
{
    let mut triggers = Triggers::new(relevant);
    let reconcile = metrics.watch_events.with_label_values(&[kind, "reconcile"]);
    let ignored = metrics.watch_events.with_label_values(&[kind, "ignored"]);
    events.flat_map(move |event| {
        let namespaces = match event {
            Ok(event) => {
                let decision = triggers.on_event(&event);
                ignored.inc_by(decision.ignored);
                reconcile.inc_by(decision.namespaces.len() as u64);
                decision.namespaces
            }
            Err(e) => {
                // Retried with backoff; until then the cache keeps what it had.
                tracing::warn!(kind, error = %e, "watch failed");
                Vec::new()
            }
        };
        futures::stream::iter(
            namespaces
                .into_iter()
                .map(|ns| ObjectRef::<Namespace>::new(&ns)),
        )
    })
}

fn error_policy(ns: Arc<Namespace>, error: &ReconcileError, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconciles.with_label_values(&["error"]).inc();
    ctx.metrics
        .reconcile_errors
        .with_label_values(&[error.reason()])
        .inc();
    let mut failures = ctx
        .failures
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let count = failures.entry(ns.name_any()).or_default();
    *count = count.saturating_add(1);
    let delay = backoff(*count);
    tracing::warn!(namespace = %ns.name_any(), error = %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// 1s, 2s, 4s, … up to 256s.
fn backoff(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.saturating_sub(1).min(8))
}

/// Reconciles one namespace, timing it whatever the outcome.
#[tracing::instrument(skip_all, fields(namespace = %ns.name_any()))]
pub async fn reconcile(ns: Arc<Namespace>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let started = Instant::now();
    let result = reconcile_namespace(&ns, &ctx).await;
    ctx.metrics
        .reconcile_seconds
        .with_label_values(&[if result.is_ok() { "ok" } else { "error" }])
        .observe(started.elapsed().as_secs_f64());
    result
}

async fn reconcile_namespace(ns: &Namespace, ctx: &Context) -> Result<Action, ReconcileError> {
    let namespace = ns.name_any();
    ctx.caches.synced(CACHE_SYNC_TIMEOUT).await?;
    let objects = read_namespace(&ctx.client, &ctx.caches, &namespace).await?;
    let wants_bundle = ns
        .labels()
        .get(NAMESPACE_INJECTION_LABEL)
        .is_some_and(|v| v == "enabled");
    if objects.connections.is_empty() && objects.policies.is_empty() && !wants_bundle {
        return Ok(Action::await_change());
    }
    let planned = plan(&objects);
    for (connection, readiness) in objects
        .connections
        .iter()
        .zip(sorted(&planned.connections, &objects.connections))
    {
        let status = ConnectionStatus {
            observed_generation: connection.metadata.generation,
            conditions: vec![condition(
                readiness,
                connection.status.as_ref().map(|s| &s.conditions[..]),
            )],
            search_path: match connection.spec.protocol {
                Protocol::Postgres => connection.spec.upstream.effective_search_path(),
                _ => Vec::new(),
            },
        };
        write_status(ctx, connection, &status, readiness, "Connection").await?;
    }
    for policy in &objects.policies {
        let Some(p) = planned
            .policies
            .iter()
            .find(|p| p.readiness.name == policy.name_any())
        else {
            continue;
        };
        let status = AgentAccessPolicyStatus {
            observed_generation: policy.metadata.generation,
            conditions: vec![condition(
                &p.readiness,
                policy.status.as_ref().map(|s| &s.conditions[..]),
            )],
            connections_resolved: Some(p.connections_resolved),
            agents_matched: Some(p.agents_matched),
        };
        write_status(ctx, policy, &status, &p.readiness, "AgentAccessPolicy").await?;
    }
    write_bundle(ctx, &namespace, &objects, &planned).await?;
    write_service_account_tokens(ctx, &namespace, &objects.connections).await?;
    ctx.metrics.reconciles.with_label_values(&["ok"]).inc();
    ctx.failures
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .remove(&namespace);
    Ok(Action::requeue(Duration::from_secs(300)))
}

/// The plan's readiness entries in the order of `connections`.
fn sorted<'a>(readiness: &'a [Readiness], connections: &[Connection]) -> Vec<&'a Readiness> {
    connections
        .iter()
        .filter_map(|c| readiness.iter().find(|r| r.name == c.name_any()))
        .collect()
}

/// The namespace's objects of `store`, by name (the order a LIST gives).
fn cached<K>(store: &Store<K>, namespace: &str) -> Vec<Arc<K>>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    let mut objects = store.state_filter(|o| o.meta().namespace.as_deref() == Some(namespace));
    objects.sort_by(|a, b| a.meta().name.cmp(&b.meta().name));
    objects
}

async fn read_namespace(
    client: &Client,
    caches: &Caches,
    namespace: &str,
) -> Result<NamespaceObjects, ReconcileError> {
    let connections: Vec<Connection> = cached(&caches.connections, namespace)
        .into_iter()
        .map(Arc::unwrap_or_clone)
        .collect();
    let policies = cached(&caches.policies, namespace)
        .into_iter()
        .map(Arc::unwrap_or_clone)
        .collect();
    // Only the Secrets the Connections name, and only their key names: the values are
    // dropped here and never leave this function.
    let referenced: BTreeSet<&String> = connections
        .iter()
        .flat_map(|c| {
            let ca = c
                .spec
                .upstream
                .tls
                .as_ref()
                .and_then(|t| t.ca_secret_ref.as_ref())
                .map(|r| &r.name);
            c.spec
                .credentials
                .secret_ref
                .as_ref()
                .map(|r| &r.name)
                .into_iter()
                .chain(ca)
        })
        .collect();
    let secret_api = Api::<Secret>::namespaced(client.clone(), namespace);
    let mut secrets = BTreeMap::new();
    for name in referenced {
        if let Some(secret) = secret_api
            .get_opt(name)
            .await
            .map_err(api_err(format!("read Secret {name}")))?
        {
            let keys: BTreeSet<String> = secret
                .data
                .iter()
                .flat_map(|d| d.keys().cloned())
                .chain(secret.string_data.iter().flat_map(|d| d.keys().cloned()))
                .collect();
            secrets.insert(name.clone(), keys);
        }
    }
    let service_accounts = cached(&caches.service_accounts, namespace)
        .iter()
        .map(|sa| sa.name_any())
        .collect();
    let pods = cached(&caches.pods, namespace)
        .iter()
        .map(|p| p.metadata.labels.clone().unwrap_or_default())
        .collect();
    Ok(NamespaceObjects {
        namespace: namespace.to_owned(),
        connections,
        policies,
        secrets,
        service_accounts,
        pods,
    })
}

/// The `Ready` condition, keeping the last transition time while the status stays.
fn condition(readiness: &Readiness, previous: Option<&[Condition]>) -> Condition {
    let (status, reason, message) = match &readiness.ready {
        Ok(message) => ("True", "Ready".to_owned(), message.clone()),
        Err((reason, message)) => ("False", reason.clone(), message.clone()),
    };
    let previous = previous.and_then(|c| c.iter().find(|c| c.type_ == "Ready"));
    let last_transition_time = match previous {
        Some(p) if p.status == status => p.last_transition_time.clone(),
        _ => Time(Timestamp::now()),
    };
    Condition {
        type_: "Ready".into(),
        status: status.into(),
        reason,
        message,
        observed_generation: readiness.generation,
        last_transition_time,
    }
}

async fn write_status<K>(
    ctx: &Context,
    object: &K,
    status: &impl serde::Serialize,
    readiness: &Readiness,
    kind: &str,
) -> Result<(), ReconcileError>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
{
    let current = serde_json::to_value(object)
        .ok()
        .and_then(|v| v.get("status").cloned())
        .unwrap_or_default();
    let desired = serde_json::to_value(status).unwrap_or_default();
    if current == desired {
        return Ok(());
    }
    let was_ready = current["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "Ready"))
        .map(|c| c["status"] == "True");
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &object.namespace().unwrap_or_default());
    let patch =
        json!({ "apiVersion": K::api_version(&()), "kind": K::kind(&()), "status": desired });
    api.patch_status(
        &object.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(api_err(format!(
        "write the status of {kind} {}",
        object.name_any()
    )))?;
    let is_ready = readiness.ready.is_ok();
    if was_ready != Some(is_ready) {
        let (type_, reason, note) = match &readiness.ready {
            Ok(message) => (EventType::Normal, "Ready".to_owned(), message.clone()),
            Err((reason, message)) => {
                ctx.metrics
                    .not_ready
                    .with_label_values(&[kind, reason])
                    .inc();
                (EventType::Warning, reason.clone(), message.clone())
            }
        };
        let event = Event {
            type_,
            reason,
            note: Some(note),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&event, &object.object_ref(&())).await {
            tracing::warn!(error = %e, "cannot publish an Event");
        }
    }
    Ok(())
}

/// For each `credentials.serviceAccount`, a service-account token Secret (filled by the
/// API server's token controller) that the injection mounts into the sidecar. Owned by
/// the Connection, so it goes with it.
async fn write_service_account_tokens(
    ctx: &Context,
    namespace: &str,
    connections: &[Connection],
) -> Result<(), ReconcileError> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    for c in connections {
        let Some(sa) = &c.spec.credentials.service_account else {
            continue;
        };
        let name = crate::inject::service_account_token_secret(&sa.name);
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(namespace.into()),
                labels: Some(BTreeMap::from([(
                    MANAGED_BY.0.to_owned(),
                    MANAGED_BY.1.to_owned(),
                )])),
                annotations: Some(BTreeMap::from([(
                    "kubernetes.io/service-account.name".to_owned(),
                    sa.name.clone(),
                )])),
                owner_references: c.controller_owner_ref(&()).map(|mut o| {
                    o.controller = Some(false);
                    vec![o]
                }),
                ..Default::default()
            },
            type_: Some("kubernetes.io/service-account-token".into()),
            ..Default::default()
        };
        api.patch(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&secret),
        )
        .await
        .map_err(api_err(format!("write the token Secret {name}")))?;
    }
    Ok(())
}

async fn write_bundle(
    ctx: &Context,
    namespace: &str,
    objects: &NamespaceObjects,
    planned: &crate::plan::Plan,
) -> Result<(), ReconcileError> {
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), namespace);
    let existing = api
        .get_opt(BUNDLE_CONFIGMAP)
        .await
        .map_err(api_err("read the bundle"))?;
    if existing
        .as_ref()
        .and_then(|c| c.annotations().get(HASH_ANNOTATION))
        == Some(&planned.bundle.hash)
    {
        return Ok(());
    }
    // Owned by every Ready object it renders, so it goes when they all do.
    let owners: Vec<OwnerReference> = objects
        .connections
        .iter()
        .filter(|c| {
            planned
                .bundle
                .connections
                .iter()
                .any(|b| b.name == c.name_any())
        })
        .filter_map(|c| c.controller_owner_ref(&()))
        .chain(
            objects
                .policies
                .iter()
                .filter(|p| {
                    planned
                        .bundle
                        .policies
                        .iter()
                        .any(|b| b.name == p.name_any())
                })
                .filter_map(|p| p.controller_owner_ref(&())),
        )
        .map(|mut o| {
            o.controller = Some(false);
            o
        })
        .collect();
    let mut data = BTreeMap::from([(
        BUNDLE_KEY.to_owned(),
        serde_json::to_string_pretty(&planned.bundle).unwrap_or_default(),
    )]);
    if let Some(kubeconfig) = &planned.kubeconfig {
        data.insert(KUBECONFIG_KEY.to_owned(), kubeconfig.clone());
    }
    let configmap = ConfigMap {
        metadata: ObjectMeta {
            name: Some(BUNDLE_CONFIGMAP.into()),
            namespace: Some(namespace.into()),
            labels: Some(BTreeMap::from([(
                MANAGED_BY.0.to_owned(),
                MANAGED_BY.1.to_owned(),
            )])),
            annotations: Some(BTreeMap::from([(
                HASH_ANNOTATION.to_owned(),
                planned.bundle.hash.clone(),
            )])),
            owner_references: (!owners.is_empty()).then_some(owners),
            ..Default::default()
        },
        data: Some(data),
        ..Default::default()
    };
    api.patch(
        BUNDLE_CONFIGMAP,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&configmap),
    )
    .await
    .map_err(api_err("write the bundle"))?;
    tracing::info!(namespace, hash = %planned.bundle.hash, policies = planned.bundle.policies.len(),
        connections = planned.bundle.connections.len(), "bundle rendered");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reconciles of several namespaces wait for the caches at once (at start, every
    /// namespace is queued): every one of them must wake when the caches sync.
    #[tokio::test]
    async fn every_waiting_reconcile_wakes_when_the_caches_sync() {
        let (caches, mut writers) = Caches::new();
        let caches = Arc::new(caches);
        let waiting: Vec<_> = (0..8)
            .map(|_| {
                let caches = caches.clone();
                tokio::spawn(async move { caches.synced(CACHE_SYNC_TIMEOUT).await })
            })
            .collect();
        // Every reconcile is waiting before the caches sync.
        tokio::time::sleep(Duration::from_millis(100)).await;
        writers
            .connections
            .apply_watcher_event(&watcher::Event::InitDone);
        writers
            .policies
            .apply_watcher_event(&watcher::Event::InitDone);
        writers
            .service_accounts
            .apply_watcher_event(&watcher::Event::InitDone);
        writers.pods.apply_watcher_event(&watcher::Event::InitDone);
        for reconcile in waiting {
            tokio::time::timeout(Duration::from_secs(5), reconcile)
                .await
                .expect("woken when the caches synced")
                .expect("not panicked")
                .expect("synced");
        }
    }

    #[tokio::test]
    async fn a_reconcile_does_not_plan_from_caches_that_never_synced() {
        let (caches, mut writers) = Caches::new();
        writers
            .connections
            .apply_watcher_event(&watcher::Event::InitDone);
        let err = caches
            .synced(Duration::from_millis(100))
            .await
            .expect_err("the policies never synced");
        assert!(
            matches!(
                err,
                ReconcileError::NotSynced {
                    kind: "AgentAccessPolicies"
                }
            ),
            "{err}"
        );
        assert_eq!(err.reason(), "not_synced");
    }

    #[test]
    fn retries_back_off_exponentially_and_cap() {
        let delays: Vec<u64> = (1..=11).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 64, 128, 256, 256, 256]);
        assert_eq!(backoff(u32::MAX), Duration::from_secs(256));
    }
}
