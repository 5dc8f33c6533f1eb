//! Approvals on the Kubernetes API: a held request becomes an `Approval` object in the
//! pod's namespace; the sidecar follows it with a watch (not polling) until a human sets
//! `spec.decision` — the API server and the operator's webhooks decide who may — or the
//! policy's timeout passes, and records the outcome in the object's status.
//!
//! Grants: `once` covers the held request only; `fingerprint` lets the same normalized
//! statement (or the same Kubernetes verb, resource and name; the same HTTP method and
//! path) through on this Connection until `grantTTL`; `session` lets this requester's
//! requests on this Connection through until `grantTTL`.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentgate_crds::{
    AgentRef, Approval, ApprovalMode, ApprovalPhase, ApprovalSpec, ApprovalStatus, Classification,
    Decision, ExecutionResult, GrantScope, HeldRequest as Held, RequesterIdentity,
};
use agentgate_policy::Target;
use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, Client};
use serde_json::json;
use sha2::{Digest, Sha256};

use super::coverage::Coverage;
use super::{ApprovalHook, ApprovalOutcome, Executed, HeldRequest};

/// The approval hook backed by `Approval` objects.
#[derive(Debug)]
pub struct KubeApprovals {
    api: Api<Approval>,
    pod: String,
    namespace: String,
    service_account: Option<String>,
    /// Whether the approvals webhook guards this namespace, checked before each hold
    /// and before acting on each approval.
    coverage: Coverage,
    grants: Arc<Mutex<Vec<Grant>>>,
    /// `mode: retry`: the requests refused while their Approval is open, by request.
    retries: Arc<Mutex<HashMap<String, Retry>>>,
    /// The Approvals this sidecar created and may still write a result onto → UID.
    uids: Arc<Mutex<HashMap<String, String>>>,
}

/// Approvals whose result is still to be written, at most (a bound on `uids`).
const MAX_OPEN_APPROVALS: usize = 10_000;

/// Where a `mode: retry` request stands.
#[derive(Debug, Clone)]
enum Retry {
    /// Asked in this Approval; not decided yet.
    Pending(String),
    /// Approved in this Approval: the same request passes once when it comes back.
    Approved(String),
}

#[derive(Debug, Clone)]
struct Grant {
    connection: String,
    key: String,
    until: Instant,
    approval: String,
}

impl KubeApprovals {
    /// Approvals in `namespace` for the agent pod `pod`, trusted while `coverage` passes.
    pub fn new(
        client: Client,
        namespace: &str,
        pod: &str,
        service_account: Option<String>,
        coverage: Coverage,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            pod: pod.to_owned(),
            namespace: namespace.to_owned(),
            service_account,
            coverage,
            grants: Arc::default(),
            retries: Arc::default(),
            uids: Arc::default(),
        }
    }

    fn uids(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.uids
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn grants(&self) -> std::sync::MutexGuard<'_, Vec<Grant>> {
        self.grants
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The key a grant of `scope` matches requests by.
    fn grant_key(scope: GrantScope, request: &HeldRequest<'_>) -> Option<String> {
        let subject = request
            .attrs
            .identity
            .as_ref()
            .map_or("", |i| i.subject.as_str());
        match scope {
            GrantScope::Once => None,
            GrantScope::Fingerprint => Some(format!(
                "fingerprint:{subject}:{}",
                fingerprint(&request.attrs.target)
            )),
            GrantScope::Session => Some(format!("session:{subject}")),
        }
    }

    fn granted(&self, request: &HeldRequest<'_>) -> Option<String> {
        let now = Instant::now();
        let mut grants = self.grants();
        grants.retain(|g| g.until > now);
        let keys: Vec<String> = [GrantScope::Fingerprint, GrantScope::Session]
            .into_iter()
            .filter_map(|s| Self::grant_key(s, request))
            .collect();
        grants
            .iter()
            .find(|g| g.connection == request.attrs.connection && keys.contains(&g.key))
            .map(|g| g.approval.clone())
    }

    fn approval_object(&self, name: &str, request: &HeldRequest<'_>) -> Approval {
        let identity = request.attrs.identity.clone().unwrap_or_default();
        let expires = Timestamp::now()
            .checked_add(
                SignedDuration::try_from(request.approval.timeout).unwrap_or(SignedDuration::MAX),
            )
            .unwrap_or(Timestamp::MAX);
        let spec = ApprovalSpec {
            connection: request.attrs.connection.clone(),
            policy: request.policy.unwrap_or("unknown").to_owned(),
            rule: request.rule.unwrap_or("defaultAction").to_owned(),
            agent: AgentRef {
                pod: self.pod.clone(),
                service_account: self.service_account.clone(),
                namespace: self.namespace.clone(),
            },
            requester: RequesterIdentity {
                subject: if identity.subject.is_empty() {
                    "unknown (no token)".to_owned()
                } else {
                    identity.subject
                },
                issuer: (!identity.issuer.is_empty()).then_some(identity.issuer),
                email: identity.email,
                groups: identity.groups,
            },
            request: Held {
                protocol: request.attrs.target.protocol(),
                summary: truncate(request.summary, 4096),
                fingerprint: truncate(&fingerprint(&request.attrs.target), 128),
                classification: classification(&request.attrs.target),
                impact: request.impact.clone(),
            },
            approvers: request.approval.settings.approvers.clone(),
            grant: request.approval.settings.grant,
            expires_at: Time(expires),
            decision: None,
            reason: None,
            decided_by: None,
            decided_by_groups: Vec::new(),
        };
        let mut approval = Approval::new(name, spec);
        approval.metadata.labels = Some(
            [("agentgate.dev/pod".to_owned(), truncate(&self.pod, 63))]
                .into_iter()
                .collect(),
        );
        approval
    }

    fn retries(&self) -> std::sync::MutexGuard<'_, HashMap<String, Retry>> {
        self.retries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn hold(&self, request: HeldRequest<'_>) -> ApprovalOutcome {
        if let Some(approval) = self.granted(&request) {
            return ApprovalOutcome::Approved {
                approval,
                by_grant: true,
            };
        }
        let settings = &request.approval.settings;
        let approvers = settings.approvers.groups.join(", ");
        // `mode: retry`: the same request (same text and parameters, requester and
        // Connection) is refused until its Approval is approved, then passes once.
        let retry_key = (settings.mode == ApprovalMode::Retry).then(|| {
            let subject = request
                .attrs
                .identity
                .as_ref()
                .map_or("", |i| i.subject.as_str());
            let digest = Sha256::digest(request.summary.as_bytes());
            format!(
                "{}:{subject}:{}",
                request.attrs.connection,
                hex::encode(&digest[..16])
            )
        });
        if let Some(key) = &retry_key {
            // (The guard must be gone before the match arms lock again.)
            let state = self.retries().get(key).cloned();
            match state {
                Some(Retry::Approved(name)) => {
                    self.retries().remove(key);
                    return ApprovalOutcome::Approved {
                        approval: name,
                        by_grant: false,
                    };
                }
                Some(Retry::Pending(name)) => {
                    return ApprovalOutcome::Refused {
                        reason: format!(
                            "still waiting for Approval {name}; retry this request after it is approved"
                        ),
                    };
                }
                None => {}
            }
        }
        if let Err(why) = self.coverage.check().await {
            tracing::error!(%why, "refusing to hold a request: approvals are not guarded");
            return ApprovalOutcome::Refused {
                reason: format!(
                    "this request needs a human's approval (approvers: {approvers}), but {why}; the request was not run. An administrator must install agentgate's webhooks for namespace {}",
                    self.namespace
                ),
            };
        }
        let name = approval_name();
        let object = self.approval_object(&name, &request);
        let created = match self.api.create(&PostParams::default(), &object).await {
            Ok(created) => created,
            Err(e) => {
                tracing::error!(error = %e, "cannot create an Approval");
                return ApprovalOutcome::Refused {
                    reason: format!(
                        "this request needs a human's approval (approvers: {approvers}), but the Approval could not be created: {e}"
                    ),
                };
            }
        };
        // Only the object this sidecar created counts: a decision on another object of
        // the same name (deleted and re-created) is never acted on.
        let Some(uid) = created.metadata.uid.clone() else {
            return ApprovalOutcome::Refused {
                reason: format!(
                    "the API server created Approval {name} without a UID; the request was not run"
                ),
            };
        };
        set_status(&self.api, &name, &uid, &phase(ApprovalPhase::Pending, None)).await;
        {
            let mut uids = self.uids();
            if uids.len() >= MAX_OPEN_APPROVALS {
                // Results of the oldest are then not written; the requests are unaffected.
                uids.clear();
            }
            uids.insert(name.clone(), uid.clone());
        }
        tracing::info!(approval = %name, connection = %request.attrs.connection, "request held for approval");
        let settle = Settle {
            api: self.api.clone(),
            grants: self.grants.clone(),
            coverage: self.coverage.clone(),
            name: name.clone(),
            uid,
            uids: self.uids.clone(),
            requester: object.spec.requester.clone(),
            approver_groups: settings.approvers.groups.clone(),
            timeout: request.approval.timeout,
            approvers: approvers.clone(),
            grant: Self::grant_key(settings.grant, &request).map(|key| {
                (
                    request.attrs.connection.clone(),
                    key,
                    request.approval.grant_ttl,
                )
            }),
        };
        let Some(key) = retry_key else {
            return settle.run().await;
        };
        self.retries()
            .insert(key.clone(), Retry::Pending(name.clone()));
        let retries = self.retries.clone();
        tokio::spawn(async move {
            let outcome = settle.run().await;
            let mut retries = retries
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match outcome {
                ApprovalOutcome::Approved { approval, .. } => {
                    retries.insert(key, Retry::Approved(approval));
                }
                ApprovalOutcome::Refused { .. } => {
                    retries.remove(&key);
                }
            }
        });
        ApprovalOutcome::Refused {
            reason: format!(
                "held for approval in Approval {name} (approvers: {approvers}); retry this request after it is approved"
            ),
        }
    }
}

impl KubeApprovals {
    /// After a restart: this pod's Approvals still `Pending` belong to requests whose
    /// agent connections died with the old process. They can no longer run, so they
    /// are marked `Expired`, saying why; a decision made later changes nothing.
    pub async fn recover(&self) {
        let selector = format!("agentgate.dev/pod={}", truncate(&self.pod, 63));
        let list = match self
            .api
            .list(&kube::api::ListParams::default().labels(&selector))
            .await
        {
            Ok(list) => list,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list this pod's Approvals after a restart");
                return;
            }
        };
        for approval in list {
            let pending = approval.status.as_ref().and_then(|s| s.phase)
                == Some(agentgate_crds::ApprovalPhase::Pending);
            if !pending {
                continue;
            }
            let Some(name) = approval.metadata.name else {
                continue;
            };
            let Some(uid) = approval.metadata.uid else {
                continue;
            };
            tracing::info!(approval = %name, "marking a request held before a restart Expired");
            set_status(
                &self.api,
                &name,
                &uid,
                &phase(
                    ApprovalPhase::Expired,
                    Some("the sidecar restarted while the request was held; the agent's connection ended and it must ask again"),
                ),
            )
            .await;
        }
    }
}

impl ApprovalHook for KubeApprovals {
    fn decide<'a>(
        &'a self,
        request: HeldRequest<'a>,
    ) -> Pin<Box<dyn Future<Output = ApprovalOutcome> + Send + 'a>> {
        Box::pin(self.hold(request))
    }

    fn executed(&self, approval: &str, outcome: Executed) {
        let (api, name) = (self.api.clone(), approval.to_owned());
        let Some(uid) = self.uids().remove(approval) else {
            tracing::warn!(
                approval,
                "not recording the result: this sidecar did not create that Approval (or forgot it)"
            );
            return;
        };
        let phase = if outcome.error.is_some() {
            ApprovalPhase::Failed
        } else {
            ApprovalPhase::Executed
        };
        let status = ApprovalStatus {
            phase: Some(phase),
            executed_at: Some(Time(Timestamp::now())),
            result: Some(ExecutionResult {
                rows_affected: outcome.rows_affected,
                http_status: outcome.http_status,
                message: outcome.error.map(|m| truncate(&m, 1024)),
            }),
            ..ApprovalStatus::default()
        };
        tokio::spawn(async move { set_status(&api, &name, &uid, &status).await });
    }
}

/// A status of `phase`, with a message (shortened to what the schema holds).
fn phase(phase: ApprovalPhase, message: Option<&str>) -> ApprovalStatus {
    ApprovalStatus {
        phase: Some(phase),
        result: message.map(|m| ExecutionResult {
            message: Some(truncate(m, MAX_STATUS_MESSAGE)),
            ..ExecutionResult::default()
        }),
        ..ApprovalStatus::default()
    }
}

/// `status.result.message`'s schema limit.
const MAX_STATUS_MESSAGE: usize = 4096;

/// Writes `status` onto the Approval `name` — only if it is still the object with `uid`
/// (the UID in the patch is a precondition: the API server refuses it for a deleted
/// and re-created object of the same name).
async fn set_status(api: &Api<Approval>, name: &str, uid: &str, status: &ApprovalStatus) {
    let patch = Patch::Merge(json!({ "metadata": { "uid": uid }, "status": status }));
    if let Err(e) = api
        .patch_status(name, &PatchParams::default(), &patch)
        .await
    {
        tracing::warn!(approval = name, error = %e, "cannot record the Approval's status");
    }
}

/// How waiting on an Approval ended.
enum Waited {
    Decided(Box<Approval>),
    /// The object was deleted (or replaced by another of the same name).
    Deleted,
    TimedOut,
}

/// Waits on a watch of `name` until the object with `uid` carries a decision.
async fn wait(api: &Api<Approval>, name: &str, uid: &str, timeout: Duration) -> Waited {
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let decided = async {
        let mut events = std::pin::pin!(watcher(api.clone(), config));
        while let Some(event) = events.next().await {
            match event {
                Ok(watcher::Event::Apply(a) | watcher::Event::InitApply(a)) => {
                    if a.metadata.uid.as_deref() != Some(uid) {
                        return Waited::Deleted;
                    }
                    if a.spec.decision.is_some() {
                        return Waited::Decided(Box::new(a));
                    }
                }
                Ok(watcher::Event::Delete(_)) => return Waited::Deleted,
                Ok(_) => {}
                // The watcher retries by itself; keep waiting until the timeout.
                Err(e) => tracing::debug!(approval = name, error = %e, "approval watch error"),
            }
        }
        Waited::Deleted
    };
    tokio::time::timeout(timeout, decided)
        .await
        .unwrap_or(Waited::TimedOut)
}

/// Why a decision is not one the sidecar may act on, if it is not: an approval must
/// carry the admission webhook's stamp (who decided, with their groups), name a decider
/// in an approver group, and not be the requester's own under any spelling of their
/// name. A denial needs nothing: refusing is always safe.
fn unverifiable(
    decided: &Approval,
    requester: &RequesterIdentity,
    approvers: &[String],
) -> Option<String> {
    if decided.spec.decision != Some(Decision::Approved) {
        return None;
    }
    let Some(by) = decided.spec.decided_by.as_deref().filter(|b| !b.is_empty()) else {
        return Some("it has no decidedBy stamp".into());
    };
    if requester.is_user(by, &[]) {
        return Some(format!("it was approved by {by}, the requester"));
    }
    if !decided
        .spec
        .decided_by_groups
        .iter()
        .any(|g| approvers.contains(g))
    {
        return Some(format!(
            "its stamp does not put {by} in an approver group ({})",
            approvers.join(", ")
        ));
    }
    None
}

/// What settling an Approval needs, owned, so it can run after the request was refused
/// (`mode: retry`).
struct Settle {
    api: Api<Approval>,
    grants: Arc<Mutex<Vec<Grant>>>,
    coverage: Coverage,
    name: String,
    /// The UID of the object the sidecar created.
    uid: String,
    /// The sidecar's open Approvals: a refused one has no result to write.
    uids: Arc<Mutex<HashMap<String, String>>>,
    requester: RequesterIdentity,
    approver_groups: Vec<String>,
    timeout: Duration,
    approvers: String,
    /// The grant an approval gives, if any: (Connection, key, lifetime).
    grant: Option<(String, String, Duration)>,
}

impl Settle {
    /// Waits for the decision and records it: status, grant, and what the agent is told.
    async fn run(self) -> ApprovalOutcome {
        let (name, uids) = (self.name.clone(), self.uids.clone());
        let outcome = self.settle().await;
        if let ApprovalOutcome::Refused { .. } = outcome {
            uids.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&name);
        }
        outcome
    }

    async fn settle(self) -> ApprovalOutcome {
        let name = self.name;
        let uid = self.uid;
        let decided = match wait(&self.api, &name, &uid, self.timeout).await {
            Waited::Decided(a) => a,
            Waited::Deleted => {
                // Nothing is written: the object there now (if any) is not this one.
                return ApprovalOutcome::Refused {
                    reason: format!(
                        "Approval {name} was deleted before it was decided; the request was not run. Ask again"
                    ),
                };
            }
            Waited::TimedOut => {
                set_status(&self.api, &name, &uid, &phase(ApprovalPhase::Expired, None)).await;
                return ApprovalOutcome::Refused {
                    reason: format!(
                        "Approval {name} was not decided within {}s; the request was not run. Ask again when an approver ({}) is available",
                        self.timeout.as_secs(),
                        self.approvers
                    ),
                };
            }
        };
        let now = Time(Timestamp::now());
        let mut why = unverifiable(&decided, &self.requester, &self.approver_groups);
        if why.is_none() && decided.spec.decision == Some(Decision::Approved) {
            // The stamp is only as good as the webhook that wrote it: is it still there?
            why = self.coverage.check().await.err();
        }
        if let Some(why) = why {
            tracing::warn!(approval = %name, %why, "refusing a decision that cannot be verified");
            let message = format!("the decision could not be verified: {why}");
            set_status(
                &self.api,
                &name,
                &uid,
                &phase(ApprovalPhase::Failed, Some(&message)),
            )
            .await;
            return ApprovalOutcome::Refused {
                reason: format!(
                    "Approval {name} carries a decision agentgate cannot verify ({why}); the request was not run. An approver ({}) must decide it through the webhook-checked API",
                    self.approvers
                ),
            };
        }
        let by = decided.spec.decided_by.clone().unwrap_or_default();
        let reason = decided.spec.reason.clone().unwrap_or_default();
        if decided.spec.decision == Some(Decision::Approved) {
            set_status(
                &self.api,
                &name,
                &uid,
                &ApprovalStatus {
                    decided_at: Some(now.clone()),
                    ..phase(ApprovalPhase::Approved, None)
                },
            )
            .await;
            if let Some((connection, key, ttl)) = self.grant {
                self.grants
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(Grant {
                        connection,
                        key,
                        until: Instant::now() + ttl,
                        approval: name.clone(),
                    });
            }
            ApprovalOutcome::Approved {
                approval: name,
                by_grant: false,
            }
        } else {
            set_status(
                &self.api,
                &name,
                &uid,
                &ApprovalStatus {
                    decided_at: Some(now),
                    ..phase(ApprovalPhase::Denied, None)
                },
            )
            .await;
            ApprovalOutcome::Refused {
                reason: format!("Approval {name} was denied by {by}: {reason}"),
            }
        }
    }
}

/// `apr-` and six random lower-case letters and digits: short enough to type.
fn approval_name() -> String {
    format!("apr-{}", name_suffix())
}

/// Six random lower-case letters and digits (none that read alike) for an object's
/// name: short enough to type.
pub(crate) fn name_suffix() -> String {
    const ALPHABET: &[u8] = b"abcdefghijkmnpqrstuvwxyz23456789";
    let mut raw = [0u8; 6];
    let _ = getrandom::fill(&mut raw);
    raw.iter()
        .map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()] as char)
        .collect()
}

fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max.saturating_sub(3);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

/// What a `fingerprint` grant matches: the normalized statement; the Kubernetes verb,
/// resource and name; the HTTP method and path.
fn fingerprint(target: &Target) -> String {
    match target {
        Target::Postgres(sql) => sql.fingerprint.clone(),
        Target::Kubernetes(k) => format!(
            "{} {}/{} {}/{}",
            k.verb, k.api_group, k.resource, k.namespace, k.name
        ),
        Target::Http(h) => format!("{} {}", h.method, h.path),
    }
}

fn classification(target: &Target) -> Classification {
    match target {
        Target::Postgres(sql) => {
            let mut tables: Vec<String> = sql
                .statements
                .iter()
                .flat_map(|s| s.tables.iter().cloned())
                .collect();
            tables.sort();
            tables.dedup();
            Classification {
                statements: sql.statements.iter().map(|s| s.kind).collect(),
                tables,
                ..Default::default()
            }
        }
        Target::Kubernetes(k) => Classification {
            verb: Some(k.verb.clone()),
            resource: Some(if k.subresource.is_empty() {
                k.resource.clone()
            } else {
                format!("{}/{}", k.resource, k.subresource)
            }),
            namespace: (!k.namespace.is_empty()).then(|| k.namespace.clone()),
            name: (!k.name.is_empty()).then(|| k.name.clone()),
            ..Default::default()
        },
        Target::Http(h) => Classification {
            verb: Some(h.method.clone()),
            resource: Some(truncate(&h.path, 2048)),
            ..Default::default()
        },
    }
}
