//! The request pipeline every protocol shares, written once: identity → decide
//! (evaluate → limits → approve) → record, then — after the front end has forwarded and
//! masked — the completion record. Nothing here knows a wire format: each front end
//! (`http`, `postgres`) decodes and classifies its protocol into [`RequestAttrs`],
//! implements [`FrontEnd`] for what only it can do (an impact preview, what an approver
//! is shown, its own session limits), and renders a [`Refusal`] in its one function.
//!
//! The order is the architecture's, for its reasons: identity first, because every later
//! step depends on who asked; the decision before any byte reaches the upstream; limits
//! before a human is asked (no one approves what a limit would refuse anyway); approval
//! only for what the policy holds; the decision recorded before forwarding, so nothing
//! happens unrecorded.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use agentgate_crds::{IdentitySpec, Impact};
use agentgate_policy::masking::{MaskReport, MaskingProfile};
use agentgate_policy::{CompiledPolicy, Decision, Evaluation, Identity, RequestAttrs, evaluate};
use arc_swap::ArcSwap;
use serde_json::json;

use crate::approval::{ApprovalHook, ApprovalOutcome, Executed, HeldRequest};
use agentgate_crds::audit::{AuditEvent, EventKind};

use crate::audit::Audit;
use crate::identity::IdentityValidator;
use crate::metrics::Metrics;
use crate::refusal::Refusal;
use crate::runtime::Runtime;

/// What every front end shares: configuration, identity, approvals, audit, metrics. No
/// protocol's state lives here.
#[derive(Debug)]
pub struct Gateway {
    /// This pod's name.
    pub pod: String,
    /// This pod's namespace.
    pub namespace: String,
    /// The current configuration.
    pub config: Arc<ArcSwap<Runtime>>,
    /// Token validation.
    pub identity: IdentityValidator,
    /// The audit sink.
    pub audit: Audit,
    /// Metrics.
    pub metrics: Metrics,
    /// The approval step.
    pub approvals: Arc<dyn ApprovalHook>,
    /// What is always masked in audit records, whatever the policies mask: the
    /// `secrets` and `credentials` detector sets.
    pub audit_masking: MaskingProfile,
    /// Request ids.
    pub ids: RequestIds,
}

/// The masking every audit record gets, whatever the policies say.
pub fn audit_masking() -> MaskingProfile {
    let spec = agentgate_crds::Masking {
        detectors: vec![
            agentgate_crds::DetectorSet::Secrets,
            agentgate_crds::DetectorSet::Credentials,
        ],
        ..Default::default()
    };
    MaskingProfile::compile(&spec, b"")
        .unwrap_or_else(|_| unreachable!("the built-in detector sets compile"))
}

/// Request ids unique across restarts and pods, in ULID form (26 characters of
/// Crockford base32, sortable by time): 48 bits of milliseconds since the epoch, then
/// 48 bits drawn at random when the process starts, then a 32-bit counter.
#[derive(Debug)]
pub struct RequestIds {
    nonce: u64,
    counter: AtomicU64,
}

impl Default for RequestIds {
    fn default() -> Self {
        let mut raw = [0u8; 8];
        // Without randomness the id is still unique within the process (the counter)
        // and across processes in time, which is all a record needs to be found.
        let _ = getrandom::fill(&mut raw);
        Self {
            nonce: u64::from_be_bytes(raw) & 0xffff_ffff_ffff,
            counter: AtomicU64::new(0),
        }
    }
}

impl RequestIds {
    /// The next id.
    pub fn next(&self) -> String {
        let millis = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
            & 0xffff_ffff_ffff;
        let count = self.counter.fetch_add(1, Ordering::Relaxed) & 0xffff_ffff;
        let value = (u128::from(millis) << 80) | (u128::from(self.nonce) << 32) | u128::from(count);
        const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
        (0..26)
            .map(|i| CROCKFORD[((value >> (125 - 5 * i)) & 0x1f) as usize] as char)
            .collect()
    }
}

/// What is known about a request so far, for its audit events.
#[derive(Debug, Clone)]
pub struct Record {
    pub(crate) started: Instant,
    pub(crate) event: AuditEvent,
    /// The Approval whose status records this request's outcome: the one a human
    /// approved for it (not one whose grant covered it).
    pub(crate) approval: Option<String>,
}

/// What a finished (or abandoned) response reports.
#[derive(Debug, Default)]
pub struct Completion {
    /// Bytes sent to the agent.
    pub bytes: u64,
    /// Values masked.
    pub report: MaskReport,
    /// Why the response ended early, if it did.
    pub error: Option<String>,
}

/// What the pipeline asks of a protocol front end while it decides one request.
pub(crate) trait FrontEnd {
    /// The request as the policy sees it (identity included).
    fn attrs(&self) -> &RequestAttrs;

    /// The policy's verdict. A front end whose request is also another one (a
    /// server-side apply is a create too) decides on the stricter of both.
    fn evaluate(&self, policy: &CompiledPolicy) -> Evaluation {
        evaluate(policy, self.attrs())
    }

    /// Whether a hold is asked later, when the request really runs (a Postgres
    /// `Parse` runs nothing; its `Execute` is held).
    fn defers_approval(&self) -> bool {
        false
    }

    /// The front end's own limits (a session's write budget, its cursors); checked
    /// before a human is asked, and again once one has approved.
    fn limits(&self, _evaluation: &Evaluation) -> Result<(), Refusal> {
        Ok(())
    }

    /// What running the request would touch, shown to the approver; an error is why it
    /// cannot be held. Called only for a request about to be held.
    fn preview(
        &mut self,
        evaluation: &Evaluation,
    ) -> impl Future<Output = Result<Option<Impact>, Refusal>> + Send;

    /// What the approver is shown of the request (the pipeline masks it again like an
    /// audit record). Called only for a request about to be held.
    fn summary(&self, evaluation: &Evaluation) -> String;
}

impl Gateway {
    /// A new request on `connection`, with a fresh request id.
    pub(crate) fn record(&self, connection: &str, request: serde_json::Value) -> Record {
        Record {
            started: Instant::now(),
            event: AuditEvent {
                request_id: self.ids.next(),
                pod: self.pod.clone(),
                namespace: self.namespace.clone(),
                connection: connection.to_owned(),
                request,
                ..Default::default()
            },
            approval: None,
        }
    }

    /// The identity step: the launching user's token validated against the identity
    /// settings of the policies governing the Connection. No settings: the policy decides
    /// without an identity, and a token means nothing. Settings but no token: no
    /// identity (a policy that needs one then denies).
    pub(crate) async fn identify(
        &self,
        token: Option<&str>,
        accepted: &[IdentitySpec],
        record: &mut Record,
    ) -> Result<Option<Identity>, Refusal> {
        let identity = match token {
            Some(token) if !accepted.is_empty() => {
                match self.identity.validate(token, accepted).await {
                    Ok(identity) => Some(identity),
                    Err(e) => {
                        self.metrics
                            .jwt_failures
                            .with_label_values(&[e.reason()])
                            .inc();
                        return Err(Refusal::Identity(e));
                    }
                }
            }
            _ => None,
        };
        record.event.identity = identity_json(identity.as_ref());
        Ok(identity)
    }

    /// The decision step: the policy's verdict, the front end's limits, and — for what the
    /// policy holds — a human's decision; then the allowed decision recorded. `Err` is
    /// the refusal to record (with [`Self::refuse`]) and render.
    pub(crate) async fn decide(
        &self,
        runtime: &Runtime,
        front: &mut impl FrontEnd,
        record: &mut Record,
    ) -> Result<Evaluation, Refusal> {
        let evaluation = front.evaluate(&runtime.policy);
        record.event.policy = evaluation.policy.clone();
        record.event.rule = evaluation.decision.rule().map(str::to_owned);
        match &evaluation.decision {
            Decision::Allow { .. } => front.limits(&evaluation)?,
            Decision::Deny { rule, reason } => {
                return Err(Refusal::Denied {
                    rule: rule.clone(),
                    policy: evaluation.policy.clone(),
                    reason: reason.clone(),
                });
            }
            Decision::RequireApproval { .. } if front.defers_approval() => {
                front.limits(&evaluation)?;
                record.event.reason =
                    Some("needs approval; it is asked when the statement is executed".into());
            }
            Decision::RequireApproval { .. } => {
                front.limits(&evaluation)?;
                self.approve(&evaluation, front, record).await?;
                front.limits(&evaluation)?;
            }
        }
        self.record_allowed(record).await?;
        Ok(evaluation)
    }

    /// The approval step: the preview, the estimate's bound, the hold recorded, then
    /// the approval hook.
    async fn approve(
        &self,
        evaluation: &Evaluation,
        front: &mut impl FrontEnd,
        record: &mut Record,
    ) -> Result<(), Refusal> {
        let Decision::RequireApproval { rule, approval } = &evaluation.decision else {
            return Ok(());
        };
        let not_approved = |reason| Refusal::NotApproved {
            rule: rule.clone(),
            reason,
        };
        // What the preview says is shown like an audit record (an error message can
        // quote a value).
        let impact = front.preview(evaluation).await?.map(|mut impact| {
            impact.detail = self.mask_for_record(&impact.detail);
            impact
        });
        let estimate = impact.as_ref().and_then(|i| i.estimated_rows);
        if let (Some(max), Some(rows)) = (approval.settings.max_estimated_rows, estimate)
            && rows > max
        {
            return Err(not_approved(format!(
                "the impact preview estimates this changes {rows} rows or objects, more than approval.maxEstimatedRows ({max}) lets anyone approve; narrow it down"
            )));
        }
        // Held: recorded before anyone is asked, so a request that never comes back (a
        // crash, a timeout) still has its trace.
        let mut held_event = record.event.clone();
        held_event.kind = EventKind::Held;
        held_event.decision = "approve".into();
        held_event.impact = impact.clone();
        if let Err(e) = self.audit.durable(&held_event).await {
            self.audit_failed(&e, "refusing a request because its hold cannot be recorded");
            return Err(Refusal::AuditUnavailable(e.to_string()));
        }
        let summary = self.mask_for_record(&front.summary(evaluation));
        let held = HeldRequest {
            attrs: front.attrs(),
            rule: rule.as_deref(),
            policy: evaluation.policy.as_deref(),
            approval,
            summary: &summary,
            impact,
        };
        match self.approvals.decide(held).await {
            ApprovalOutcome::Approved { approval, by_grant } => {
                record.event.reason = Some(if by_grant {
                    format!("covered by the grant of {approval}")
                } else {
                    format!("approved in {approval}")
                });
                record.event.approval = Some(approval.clone());
                // Only the request a human approved is recorded on the Approval.
                record.approval = (!by_grant).then_some(approval);
                Ok(())
            }
            ApprovalOutcome::Refused { reason } => Err(not_approved(reason)),
        }
    }

    /// Records an allowed request's decision before anything is forwarded: a decision
    /// that cannot be recorded is the refusal returned.
    async fn record_allowed(&self, record: &mut Record) -> Result<(), Refusal> {
        record.event.decision = "allow".into();
        record.event.kind = EventKind::Decision;
        if let Err(e) = self.audit.durable(&record.event).await {
            self.audit_failed(
                &e,
                "refusing a request because its decision cannot be recorded",
            );
            return Err(Refusal::AuditUnavailable(e.to_string()));
        }
        Ok(())
    }

    /// Records, counts and logs a refusal, whatever the protocol; the front end then
    /// renders it.
    pub(crate) fn refuse(&self, record: &mut Record, refusal: &Refusal) {
        // A reason can quote what an upstream said: records show it masked.
        let reason = self.mask_for_record(&refusal.reason());
        if let Some(approval) = &record.approval {
            self.approvals.executed(
                approval,
                Executed {
                    error: Some(reason.clone()),
                    ..Default::default()
                },
            );
        }
        record.event.kind = EventKind::Decision;
        record.event.decision = refusal.decision().into();
        record.event.rule = refusal
            .rule()
            .map(str::to_owned)
            .or(record.event.rule.take());
        if record.event.policy.is_none() {
            record.event.policy = refusal.policy().map(str::to_owned);
        }
        record.event.reason = Some(reason.clone());
        record.event.status = Some(refusal.status().as_u16());
        record.event.latency_ms = Some(record.started.elapsed().as_secs_f64() * 1000.0);
        self.audit.queue(record.event.clone());
        self.metrics
            .refusals
            .with_label_values(&[refusal.kind()])
            .inc();
        self.count(record, refusal.decision());
        tracing::info!(request_id = %record.event.request_id, connection = %record.event.connection,
            decision = refusal.decision(), refusal = refusal.kind(), rule = refusal.rule(), reason = %reason, "request refused");
    }

    /// Records a completed request (`status` for HTTP), its masking and any cut-off.
    pub(crate) fn complete(
        &self,
        mut record: Record,
        status: Option<http::StatusCode>,
        mut done: Completion,
    ) {
        // An error text can quote a value (a database's "invalid input syntax for type
        // integer: …"): it reaches the audit trail and the Approval masked.
        done.error = done.error.map(|e| self.mask_for_record(&e));
        record.event.kind = EventKind::Completed;
        record.event.status = status.map(|s| s.as_u16());
        if let Some(approval) = &record.approval {
            self.approvals.executed(
                approval,
                Executed {
                    rows_affected: record
                        .event
                        .rows_affected
                        .and_then(|n| i64::try_from(n).ok()),
                    http_status: status.map(|s| i32::from(s.as_u16())),
                    error: done.error.clone(),
                },
            );
        }
        record.event.bytes = Some(done.bytes);
        record.event.latency_ms = Some(record.started.elapsed().as_secs_f64() * 1000.0);
        record.event.masked = done.report.counts().clone();
        for (detector, n) in done.report.counts() {
            self.metrics
                .masked_values
                .with_label_values(&[detector.as_str()])
                .inc_by(*n);
        }
        if let Some(error) = &done.error {
            record.event.reason = Some(error.clone());
            self.metrics
                .responses_refused
                .with_label_values(&["cut_off"])
                .inc();
        }
        self.count(&record, "allow");
        self.audit.queue(record.event);
    }

    /// Records an event that is neither a decision nor a completion (a session's start).
    pub(crate) fn record_event(&self, event: AuditEvent) {
        self.audit.queue(event);
    }

    /// `text` as every record (audit event, Approval, log) may show it: masked with the
    /// audit profile, whatever the policy's own masking is.
    pub(crate) fn mask_for_record(&self, text: &str) -> String {
        let mut report = MaskReport::default();
        String::from_utf8_lossy(&self.audit_masking.mask_bytes(text.as_bytes(), &mut report))
            .into_owned()
    }

    fn count(&self, record: &Record, decision: &str) {
        let connection = record.event.connection.as_str();
        self.metrics
            .requests
            .with_label_values(&[connection, decision])
            .inc();
        self.metrics
            .request_seconds
            .with_label_values(&[connection])
            .observe(record.started.elapsed().as_secs_f64());
    }

    fn audit_failed(&self, error: &crate::audit::AuditError, what: &str) {
        tracing::error!(error = %error, "{what}");
    }
}

/// The identity as audit records show it.
pub(crate) fn identity_json(identity: Option<&Identity>) -> Option<serde_json::Value> {
    identity.map(|i| json!({ "issuer": i.issuer, "subject": i.subject, "email": i.email }))
}

pub(crate) mod trace;

#[cfg(test)]
mod tests;
