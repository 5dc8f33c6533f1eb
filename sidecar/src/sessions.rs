//! The pod's agent sessions as the API server shows them: one `AgentSession` for each
//! identity that uses this pod, kept current from the audit trail as it is written —
//! counters per decision, rows, masked values, approvals, the last activity — and
//! anchored to it: `status.audit` holds the sequence and hash of the session's latest
//! event, so a trail cut short or edited before that point is found against etcd
//! (`kubectl agentgate audit verify --session`).
//!
//! Status is written at most every `--session-update-interval`; a session with no
//! activity for `--session-idle-timeout` ends (phase `Ended`), as every session does when
//! the sidecar stops; the operator deletes ended sessions after its retention. The API
//! server being unreachable delays this report, never a request: the trail itself is
//! the record.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentgate_crds::audit::{AuditEvent, EventKind, Head};
use agentgate_crds::{
    AgentRef, AgentSession, AgentSessionSpec, AgentSessionStatus, AuditPointer, RequesterIdentity,
    SessionPhase,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client};

use crate::audit::Observer;

/// Sessions tracked at once: a pod used by more identities than this reports the first
/// ones (the trail still records every request).
const MAX_SESSIONS: usize = 1000;
/// The label that names an AgentSession's pod.
pub const POD_LABEL: &str = "agentgate.dev/pod";

/// Who a session belongs to: the token's issuer and subject (empty without a token).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    issuer: String,
    subject: String,
}

#[derive(Debug)]
struct Tracked {
    identity: Option<RequesterIdentity>,
    /// The AgentSession's name, once created.
    name: Option<String>,
    status: AgentSessionStatus,
    last_activity: Instant,
    /// Changed since it was last written.
    dirty: bool,
}

/// The sessions of this pod, counted from the trail.
#[derive(Debug)]
pub struct Sessions {
    tracked: Mutex<HashMap<Key, Tracked>>,
    sinks: String,
}

impl Sessions {
    /// Sessions whose events go to `sinks` (named in `status.audit.sink`).
    pub fn new(sinks: &str) -> Self {
        Self {
            tracked: Mutex::new(HashMap::new()),
            sinks: sinks.to_owned(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Tracked>> {
        self.tracked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn int(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Observer for Sessions {
    /// Counts one written event into its identity's session.
    fn observe(&self, event: &AuditEvent, head: &Head) {
        if !matches!(
            event.kind,
            EventKind::Decision | EventKind::Held | EventKind::Completed
        ) {
            return;
        }
        let field = |name: &str| {
            event
                .identity
                .as_ref()
                .and_then(|i| i[name].as_str())
                .map(str::to_owned)
        };
        let key = Key {
            issuer: field("issuer").unwrap_or_default(),
            subject: field("subject").unwrap_or_default(),
        };
        let mut tracked = self.lock();
        if !tracked.contains_key(&key) && tracked.len() >= MAX_SESSIONS {
            return;
        }
        let now = Time(Timestamp::now());
        let session = tracked.entry(key.clone()).or_insert_with(|| Tracked {
            identity: (!key.subject.is_empty()).then(|| RequesterIdentity {
                subject: key.subject.clone(),
                issuer: field("issuer"),
                email: field("email"),
                groups: Vec::new(),
            }),
            name: None,
            status: AgentSessionStatus {
                phase: Some(SessionPhase::Active),
                started_at: Some(now.clone()),
                audit: Some(AuditPointer {
                    sink: self.sinks.clone(),
                    first_seq: int(head.seq),
                    last_seq: int(head.seq),
                    chain_head: head.hash.clone(),
                }),
                ..Default::default()
            },
            last_activity: Instant::now(),
            dirty: true,
        });
        let counters = &mut session.status.counters;
        match event.kind {
            EventKind::Decision => {
                counters.requests += 1;
                match event.decision.as_str() {
                    "allow" => {
                        counters.allowed += 1;
                        if event.approval.is_some() {
                            counters.approvals_granted += 1;
                        }
                    }
                    _ => counters.denied += 1,
                }
            }
            EventKind::Held => counters.approvals_requested += 1,
            _ => {
                counters.rows_returned += int(event.rows_returned.unwrap_or(0));
                counters.rows_modified += int(event.rows_affected.unwrap_or(0));
                counters.masked_values += int(event.masked.values().sum());
            }
        }
        session.status.last_activity = Some(now);
        if let Some(audit) = &mut session.status.audit {
            audit.last_seq = int(head.seq);
            audit.chain_head = head.hash.clone();
        }
        session.last_activity = Instant::now();
        session.dirty = true;
    }
}

/// How the sessions are reported.
#[derive(Debug, Clone)]
pub struct Reporting {
    /// The pod the sessions belong to.
    pub agent: AgentRef,
    /// How often status is written at most.
    pub interval: Duration,
    /// How long a session may be idle before it ends.
    pub idle: Duration,
}

/// Keeps the AgentSessions current until the task is dropped.
pub async fn report(sessions: Arc<Sessions>, client: Client, reporting: Reporting) {
    let api: Api<AgentSession> = Api::namespaced(client, &reporting.agent.namespace);
    loop {
        tokio::time::sleep(reporting.interval).await;
        write(&sessions, &api, &reporting, false).await;
    }
}

/// Ends every session (the sidecar is stopping), within `timeout`.
pub async fn end_all(
    sessions: &Sessions,
    client: Client,
    reporting: &Reporting,
    timeout: Duration,
) {
    let api: Api<AgentSession> = Api::namespaced(client, &reporting.agent.namespace);
    let _ = tokio::time::timeout(timeout, write(sessions, &api, reporting, true)).await;
}

/// A session whose status is to be written.
struct Due {
    key: Key,
    name: Option<String>,
    identity: Option<RequesterIdentity>,
    status: AgentSessionStatus,
    ends: bool,
}

/// Writes what changed: creates new sessions' objects, patches their status, ends the
/// idle ones (or all, when `ending`) and forgets them.
async fn write(sessions: &Sessions, api: &Api<AgentSession>, reporting: &Reporting, ending: bool) {
    let due: Vec<Due> = {
        let mut tracked = sessions.lock();
        tracked
            .iter_mut()
            .filter_map(|(key, s)| {
                let ends = ending || s.last_activity.elapsed() >= reporting.idle;
                if ends {
                    s.status.phase = Some(SessionPhase::Ended);
                }
                (s.dirty || ends).then(|| {
                    s.dirty = false;
                    Due {
                        key: key.clone(),
                        name: s.name.clone(),
                        identity: s.identity.clone(),
                        status: s.status.clone(),
                        ends,
                    }
                })
            })
            .collect()
    };
    for Due {
        key,
        name,
        identity,
        status,
        ends,
    } in due
    {
        let name = match name {
            Some(name) => name,
            None => match create(api, reporting, identity).await {
                Ok(name) => {
                    if let Some(s) = sessions.lock().get_mut(&key) {
                        s.name = Some(name.clone());
                    }
                    name
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot create the AgentSession; will try again");
                    if let Some(s) = sessions.lock().get_mut(&key) {
                        s.dirty = true;
                    }
                    continue;
                }
            },
        };
        let patch = Patch::Merge(serde_json::json!({ "status": status }));
        if let Err(e) = api
            .patch_status(&name, &PatchParams::default(), &patch)
            .await
        {
            tracing::warn!(session = %name, error = %e, "cannot update the AgentSession's status; will try again");
            if let Some(s) = sessions.lock().get_mut(&key) {
                s.dirty = true;
            }
            continue;
        }
        if ends {
            // A later request of the same identity starts a new session.
            sessions.lock().remove(&key);
        }
    }
}

/// Creates the AgentSession of a new session: `<pod>-<6 random>`.
async fn create(
    api: &Api<AgentSession>,
    reporting: &Reporting,
    identity: Option<RequesterIdentity>,
) -> Result<String, kube::Error> {
    let pod: String = reporting.agent.pod.chars().take(48).collect();
    let name = format!(
        "{}-{}",
        pod.trim_end_matches(['-', '.']),
        crate::approval::kubernetes::name_suffix()
    );
    let labels = [(
        POD_LABEL.to_owned(),
        reporting.agent.pod.chars().take(63).collect::<String>(),
    )];
    let object = AgentSession {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels: Some(labels.into_iter().collect()),
            ..Default::default()
        },
        spec: AgentSessionSpec {
            agent: reporting.agent.clone(),
            identity,
        },
        status: None,
    };
    api.create(&PostParams::default(), &object).await?;
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: EventKind, decision: &str, subject: &str) -> AuditEvent {
        AuditEvent {
            kind,
            decision: decision.into(),
            identity: Some(
                serde_json::json!({ "issuer": "https://idp", "subject": subject, "email": null }),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn each_identity_is_a_session_counted_from_its_events() {
        let sessions = Sessions::new("stdout");
        let head = |seq: u64| Head {
            seq,
            hash: format!("{seq:064}"),
        };
        sessions.observe(&event(EventKind::Decision, "allow", "alice"), &head(1));
        sessions.observe(&event(EventKind::Decision, "deny", "alice"), &head(2));
        sessions.observe(&event(EventKind::Held, "approve", "alice"), &head(3));
        let mut approved = event(EventKind::Decision, "allow", "alice");
        approved.approval = Some("apr-x".into());
        sessions.observe(&approved, &head(4));
        let mut done = event(EventKind::Completed, "allow", "alice");
        done.rows_returned = Some(7);
        done.rows_affected = Some(2);
        done.masked = [("email".to_owned(), 3)].into_iter().collect();
        sessions.observe(&done, &head(5));
        sessions.observe(&event(EventKind::Decision, "allow", "bob"), &head(6));
        sessions.observe(
            &AuditEvent {
                kind: EventKind::Restart,
                ..Default::default()
            },
            &head(7),
        );

        let tracked = sessions.lock();
        assert_eq!(tracked.len(), 2, "alice and bob; a restart is no one's");
        let alice = &tracked[&Key {
            issuer: "https://idp".into(),
            subject: "alice".into(),
        }];
        let c = &alice.status.counters;
        assert_eq!(
            (
                c.requests,
                c.allowed,
                c.denied,
                c.approvals_requested,
                c.approvals_granted
            ),
            (3, 2, 1, 1, 1)
        );
        assert_eq!(
            (c.rows_returned, c.rows_modified, c.masked_values),
            (7, 2, 3)
        );
        let audit = alice.status.audit.as_ref().unwrap();
        assert_eq!((audit.first_seq, audit.last_seq), (1, 5));
        assert_eq!(audit.chain_head, format!("{:064}", 5));
        assert_eq!(alice.identity.as_ref().unwrap().subject, "alice");
    }
}
