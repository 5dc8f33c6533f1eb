//! The HTTP / Kubernetes gateway: one listener per Connection, and the request pipeline.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use agentgate_crds::Protocol;
use agentgate_policy::classify::{classify_http, classify_kubernetes};
use agentgate_policy::masking::{LiteralMask, MaskReport, MaskStream, MaskingProfile};
use agentgate_policy::{
    Decision, EffectiveLimits, Evaluation, KubernetesRequest, RequestAttrs, Target, evaluate,
};
use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::json;
use tokio::net::TcpListener;

use crate::approval::{ApprovalHook, ApprovalOutcome, Executed, HeldRequest};
use crate::audit::{Audit, AuditEvent};
use crate::body::{Body, BodyError, BodyMasks, Completion, MaskedBody, Mode};
use crate::dry_run;
use crate::headers;
use crate::identity::IdentityValidator;
use crate::metrics::Metrics;
use crate::refusal::{Refusal, refusal_response};
use crate::runtime::Runtime;
use crate::upstream::Upstream;

/// Everything the pipeline needs, shared by every listener.
#[derive(Debug)]
pub struct Gateway {
    /// This pod's name.
    pub pod: String,
    /// This pod's namespace.
    pub namespace: String,
    /// The largest body buffered for JSON-structure masking without a policy limit.
    pub max_buffered_bytes: u64,
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
    /// Request counter, for request ids.
    pub requests: AtomicU64,
    /// What the Postgres sessions share (cancel keys, catalog).
    pub postgres: crate::postgres::Shared,
}

/// hyper's limits on a request head: above [`headers::MAX_HEAD_BYTES`] and
/// [`headers::MAX_HEADERS`], so the gateway sees (and refuses readably) heads up to
/// these; only a head larger still gets hyper's bare 431.
const HYPER_MAX_HEAD_BYTES: usize = 4 * 1024 * 1024;
const HYPER_MAX_HEADERS: usize = 1000;

/// Serves one Connection's listener until the task is dropped.
pub async fn serve(listener: TcpListener, connection: String, gateway: Arc<Gateway>) {
    let connection: Arc<str> = connection.into();
    loop {
        let stream = agentgate_process::accept(&listener, &connection).await;
        let (gateway, connection) = (gateway.clone(), connection.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let (gateway, connection) = (gateway.clone(), connection.clone());
                async move { Ok::<_, Infallible>(handle(gateway, connection, req).await) }
            });
            // HTTP/1.1 and h2c (prior knowledge) on the same port. hyper's own head
            // limits sit well above the gateway's, so that an oversized head is refused
            // by `handle` in the protocol's shape rather than by hyper with a bare 431.
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .max_buf_size(HYPER_MAX_HEAD_BYTES)
                .max_headers(HYPER_MAX_HEADERS);
            builder
                .http2()
                .max_header_list_size(HYPER_MAX_HEAD_BYTES as u32);
            if let Err(e) = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, "agent connection ended with an error");
            }
        });
    }
}

/// What is known about a request so far, for its audit events.
#[derive(Debug, Clone)]
pub(crate) struct Record {
    pub(crate) started: Instant,
    pub(crate) event: AuditEvent,
    /// The Approval whose status records this request's outcome: the one a human
    /// approved for it (not one whose grant covered it).
    pub(crate) approval: Option<String>,
}

impl Record {
    /// A new request on `connection`, with the next request id.
    pub(crate) fn new(gw: &Gateway, connection: &str, request: serde_json::Value) -> Self {
        let seq = gw.requests.fetch_add(1, Ordering::Relaxed);
        Record {
            started: Instant::now(),
            event: AuditEvent {
                request_id: format!("{}-{seq}", std::process::id()),
                pod: gw.pod.clone(),
                namespace: gw.namespace.clone(),
                connection: connection.to_owned(),
                request,
                ..Default::default()
            },
            approval: None,
        }
    }
}

/// The request pipeline, in the order ARCHITECTURE.md gives and for the reasons it
/// gives: identity first, because every later step depends on who asked; classification
/// and the decision before any byte reaches the upstream; approval only for what the
/// policy holds; the decision recorded before forwarding, so nothing happens unrecorded;
/// masking before the agent — or the completion record — sees the response.
pub async fn handle(
    gw: Arc<Gateway>,
    connection: Arc<str>,
    req: Request<Incoming>,
) -> Response<Body> {
    let runtime = gw.config.load_full();
    let mut record = Record::new(&gw, &connection, json!({ "method": req.method().as_str() }));
    let Some(conn) = runtime.policy.connection(&connection) else {
        let reason = format!(
            "Connection {connection} is not configured for this pod; no request on it is allowed"
        );
        return gw.refuse(
            record,
            Protocol::Http,
            Refusal::Denied {
                rule: None,
                policy: None,
                reason,
            },
        );
    };
    let protocol = conn.spec.protocol;
    // Before anything reads a header: a head too large to be handled is refused.
    if let Some(reason) = headers::head_too_large(req.headers()) {
        return gw.refuse(record, protocol, Refusal::HeadTooLarge(reason));
    }

    // 1. identity (only where a policy says how to validate it; elsewhere a token means
    // nothing, and the policy decides without one)
    let token = if conn.identities.is_empty() {
        None
    } else {
        bearer_token(req.headers(), protocol)
    };
    let identity = match token {
        None => None,
        Some(token) => match gw.identity.validate(&token, &conn.identities).await {
            Ok(identity) => Some(identity),
            Err(e) => {
                gw.metrics
                    .jwt_failures
                    .with_label_values(&[e.reason()])
                    .inc();
                return gw.refuse(record, protocol, Refusal::Identity(e));
            }
        },
    };
    record.event.identity = identity
        .as_ref()
        .map(|i| json!({ "issuer": i.issuer, "subject": i.subject, "email": i.email }));

    // 2. classify
    let target = match classify(protocol, &req) {
        Ok(t) => t,
        Err(e) => return gw.refuse(record, protocol, Refusal::Unclassifiable(e)),
    };
    record.event.request = request_summary(&target, &gw.audit_masking);
    let is_watch = matches!(&target, Target::Kubernetes(k) if k.verb == "watch");
    let attrs = RequestAttrs {
        connection: connection.to_string(),
        identity,
        target,
    };

    // 3. decide (a server-side apply as both the patch it is and the create it can be)
    let evaluation = match apply_as_create(&attrs, req.headers()) {
        Some(create) => stricter(
            evaluate(&runtime.policy, &attrs),
            evaluate(&runtime.policy, &create),
        ),
        None => evaluate(&runtime.policy, &attrs),
    };
    record.event.policy = evaluation.policy.clone();
    record.event.rule = evaluation.decision.rule().map(str::to_owned);

    // 4. approve
    let (mut req, impact) = match (&evaluation.decision, &attrs.target) {
        (Decision::RequireApproval { rule, .. }, Target::Kubernetes(k)) if dry_run::previews(k) => {
            match gw.preview_write(&runtime, &connection, k, req).await {
                Ok((req, impact)) => (req, Some(impact)),
                Err(reason) => {
                    let refusal = Refusal::Denied {
                        rule: rule.clone(),
                        policy: evaluation.policy.clone(),
                        reason,
                    };
                    return gw.refuse(record, protocol, refusal);
                }
            }
        }
        _ => (req.map(|body| body.map_err(BodyError::from).boxed()), None),
    };
    // The approver sees the method and path, masked like an audit record (a path can
    // carry a key).
    let summary = || gw.mask_for_record(&format!("{} {}", req.method(), req.uri().path()));
    if let Err(refusal) = gw
        .approve(&evaluation, &attrs, summary, impact, &mut record)
        .await
    {
        return gw.refuse(record, protocol, refusal);
    }
    if let Err(refusal) = gw.record_allowed(&mut record) {
        return gw.refuse(record, protocol, refusal);
    }

    // 5. forward
    let upstream = match runtime.upstreams.get(&*connection) {
        Some(Ok(u)) => u.clone(),
        Some(Err(e)) => return gw.refuse(record, protocol, Refusal::Upstream(e.clone())),
        None => {
            return gw.refuse(
                record,
                protocol,
                Refusal::Upstream("this connection has no upstream in this sidecar".into()),
            );
        }
    };
    let agent_upgrade = is_upgrade(req.headers()).then(|| hyper::upgrade::on(&mut req));
    let upstream_request = match upstream_request(req, &upstream) {
        Ok(r) => r,
        Err(refusal) => return gw.refuse(record, protocol, refusal),
    };
    // What the response must not contain: the credential just injected, however the
    // upstream echoes it.
    let credential = match upstream_request_credential(&upstream) {
        Ok(c) => c,
        Err(refusal) => return gw.refuse(record, protocol, refusal),
    };
    let mut response = match upstream.client.request(upstream_request).await {
        Ok(r) => r,
        Err(e) => {
            return gw.refuse(
                record,
                protocol,
                Refusal::Upstream(format!("the upstream request failed: {e}")),
            );
        }
    };
    if let Some(agent_upgrade) = agent_upgrade
        && response.status() == StatusCode::SWITCHING_PROTOCOLS
    {
        return gw.relay(record, agent_upgrade, response);
    }

    // 6. mask, 7. record (when the body ends). The codings are checked before the
    // hop-by-hop headers (Transfer-Encoding among them) are gone.
    if let Err(reason) = headers::check_codings(response.headers()) {
        gw.metrics
            .responses_refused
            .with_label_values(&["unmaskable"])
            .inc();
        return gw.refuse(record, protocol, Refusal::Response(reason));
    }
    strip_hop_by_hop(response.headers_mut(), false);
    gw.masked_response(
        record,
        protocol,
        response,
        Masks {
            profile: evaluation.masking,
            credential,
        },
        evaluation.limits,
        is_watch,
    )
    .await
}

impl Gateway {
    /// The impact preview of a held Kubernetes write: its body is read (so it can be
    /// sent twice: as the API server's dry run now, for real once approved) and the dry
    /// run made. An error is why the request cannot be held.
    async fn preview_write(
        &self,
        runtime: &Runtime,
        connection: &str,
        target: &KubernetesRequest,
        req: Request<Incoming>,
    ) -> Result<(Request<Body>, agentgate_crds::Impact), String> {
        let limit = self.max_buffered_bytes;
        let (parts, body) = req.into_parts();
        let body = match Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX))
            .collect()
            .await
        {
            Ok(collected) => collected.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return Err(format!(
                    "a write held for approval is dry-run first and sent again once approved, so its body must be at most {limit} bytes"
                ));
            }
            Err(e) => return Err(format!("the request body could not be read: {e}")),
        };
        let req = Request::from_parts(
            parts,
            Full::new(body.clone())
                .map_err(|never| match never {})
                .boxed(),
        );
        let impact = match runtime.upstreams.get(connection) {
            Some(Ok(upstream)) => {
                let write = dry_run::Write {
                    target,
                    method: req.method(),
                    path_and_query: req.uri().path_and_query().map_or("/", |p| p.as_str()),
                    headers: req.headers(),
                    body,
                };
                dry_run::preview(upstream, write, &self.audit_masking).await
            }
            Some(Err(e)) => agentgate_crds::Impact {
                estimated_rows: None,
                detail: format!("no preview: {e}"),
            },
            None => agentgate_crds::Impact {
                estimated_rows: None,
                detail: "no preview: this connection has no upstream in this sidecar".into(),
            },
        };
        Ok((req, impact))
    }

    /// Refuses a request: records it, counts it, answers the agent.
    fn refuse(&self, mut record: Record, protocol: Protocol, refusal: Refusal) -> Response<Body> {
        self.note_refusal(&mut record, &refusal);
        refusal_response(protocol, &record.event.connection, &refusal)
    }

    /// Records, counts and logs a refusal, whatever the protocol.
    pub(crate) fn note_refusal(&self, record: &mut Record, refusal: &Refusal) {
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
        record.event.kind = "decision";
        record.event.decision = refusal.decision().into();
        record.event.rule = refusal
            .rule()
            .map(str::to_owned)
            .or(record.event.rule.take());
        record.event.reason = Some(reason.clone());
        record.event.status = Some(refusal.status().as_u16());
        record.event.latency_ms = Some(record.started.elapsed().as_secs_f64() * 1000.0);
        if let Err(e) = self.audit.record(&record.event) {
            self.metrics
                .audit_failures
                .with_label_values(&[self.audit.sink()])
                .inc();
            tracing::error!(error = %e, "a refusal could not be recorded");
        }
        self.count(record, refusal.decision());
        tracing::info!(request_id = %record.event.request_id, connection = %record.event.connection,
            decision = refusal.decision(), rule = refusal.rule(), reason = %reason, "request refused");
    }

    /// The approval step for any protocol: a denial is the refusal returned; a hold
    /// goes to the approval hook and comes back approved or refused.
    pub(crate) async fn approve(
        &self,
        evaluation: &Evaluation,
        attrs: &RequestAttrs,
        summary: impl FnOnce() -> String,
        impact: Option<agentgate_crds::Impact>,
        record: &mut Record,
    ) -> Result<(), Refusal> {
        match &evaluation.decision {
            Decision::Allow { .. } => Ok(()),
            Decision::Deny { rule, reason } => Err(Refusal::Denied {
                rule: rule.clone(),
                policy: evaluation.policy.clone(),
                reason: reason.clone(),
            }),
            Decision::RequireApproval { rule, approval } => {
                // What the preview says is shown like an audit record (an error message
                // can quote a value).
                let impact = impact.map(|mut impact| {
                    impact.detail = self.mask_for_record(&impact.detail);
                    impact
                });
                let estimate = impact.as_ref().and_then(|i| i.estimated_rows);
                if let (Some(max), Some(rows)) = (approval.settings.max_estimated_rows, estimate)
                    && rows > max
                {
                    return Err(Refusal::NotApproved {
                        rule: rule.clone(),
                        reason: format!(
                            "the impact preview estimates this changes {rows} rows or objects, more than approval.maxEstimatedRows ({max}) lets anyone approve; narrow it down"
                        ),
                    });
                }
                // Held: recorded before anyone is asked, so a request that never comes
                // back (a crash, a timeout) still has its trace.
                let mut held_event = record.event.clone();
                held_event.kind = "held";
                held_event.decision = "approve".into();
                held_event.impact = impact.clone();
                if let Err(e) = self.audit.record(&held_event) {
                    self.metrics
                        .audit_failures
                        .with_label_values(&[self.audit.sink()])
                        .inc();
                    tracing::error!(error = %e, "refusing a request because its hold cannot be recorded");
                    return Err(Refusal::AuditUnavailable);
                }
                // Built only here: what the approver sees costs nothing on the requests
                // that need no approval.
                let summary = summary();
                let held = HeldRequest {
                    attrs,
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
                    ApprovalOutcome::Refused { reason } => Err(Refusal::NotApproved {
                        rule: rule.clone(),
                        reason,
                    }),
                }
            }
        }
    }

    /// Records an allowed request's decision before anything is forwarded: a decision
    /// that cannot be recorded is the refusal returned.
    pub(crate) fn record_allowed(&self, record: &mut Record) -> Result<(), Refusal> {
        record.event.decision = "allow".into();
        record.event.kind = "decision";
        if let Err(e) = self.audit.record(&record.event) {
            self.metrics
                .audit_failures
                .with_label_values(&[self.audit.sink()])
                .inc();
            tracing::error!(error = %e, "refusing a request because its decision cannot be recorded");
            return Err(Refusal::AuditUnavailable);
        }
        Ok(())
    }

    pub(crate) fn count(&self, record: &Record, decision: &str) {
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

    /// Records a completed request (`status` for HTTP), its masking and any cut-off.
    /// `text` as every record (audit event, Approval, log) may show it: masked with the
    /// audit profile, whatever the policy's own masking is.
    pub(crate) fn mask_for_record(&self, text: &str) -> String {
        let mut report = MaskReport::default();
        String::from_utf8_lossy(&self.audit_masking.mask_bytes(text.as_bytes(), &mut report))
            .into_owned()
    }

    pub(crate) fn complete(
        &self,
        mut record: Record,
        status: Option<StatusCode>,
        mut done: Completion,
    ) {
        // An error text can quote a value (a database's "invalid input syntax for type
        // integer: …"): it reaches the audit trail and the Approval masked.
        done.error = done.error.map(|e| self.mask_for_record(&e));
        record.event.kind = "completed";
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
        if let Err(e) = self.audit.record(&record.event) {
            self.metrics
                .audit_failures
                .with_label_values(&[self.audit.sink()])
                .inc();
            tracing::error!(error = %e, "a completed request could not be recorded");
        }
        self.count(&record, "allow");
    }

    /// Chooses how to mask the response, and wraps or buffers its body accordingly.
    async fn masked_response(
        self: &Arc<Self>,
        record: Record,
        protocol: Protocol,
        response: Response<Incoming>,
        masks: Masks,
        limits: EffectiveLimits,
        is_watch: bool,
    ) -> Response<Body> {
        let Masks {
            profile: masking,
            credential,
        } = masks;
        let (mut parts, body) = response.into_parts();
        // Counted with the body's masking, in the completion record and the metrics.
        let header_report = mask_headers(&mut parts.headers, &masking, &credential, &record);
        let mode = match body_mode(&masking, &parts.headers, is_watch, protocol) {
            Ok(mode) => mode,
            Err(reason) => {
                self.metrics
                    .responses_refused
                    .with_label_values(&["unmaskable"])
                    .inc();
                return self.refuse(record, protocol, Refusal::Response(reason));
            }
        };
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if let (Some(limit), Some(length)) = (limits.max_response_bytes, declared)
            && length > limit
        {
            self.metrics
                .responses_refused
                .with_label_values(&["too_large"])
                .inc();
            let reason = format!(
                "the response ({length} bytes) exceeds limits.maxResponseBytes ({limit} bytes)"
            );
            return self.refuse(record, protocol, Refusal::Response(reason));
        }
        let status = parts.status;
        let Some(mode) = mode else {
            // A whole JSON document, masked with its structure.
            let cap = limits.max_response_bytes.unwrap_or(self.max_buffered_bytes);
            let bytes = match Limited::new(body, usize::try_from(cap).unwrap_or(usize::MAX))
                .collect()
                .await
            {
                Ok(collected) => collected.to_bytes(),
                Err(e) => {
                    self.metrics
                        .responses_refused
                        .with_label_values(&["too_large"])
                        .inc();
                    let reason = format!(
                        "the response could not be read whole for masking (limit {cap} bytes): {e}"
                    );
                    return self.refuse(record, protocol, Refusal::Response(reason));
                }
            };
            let mut report = header_report;
            let masked = match serde_json::from_slice::<serde_json::Value>(&bytes) {
                Ok(mut doc) => {
                    masking.mask_json(&mut doc, &mut report);
                    doc.to_string().into_bytes()
                }
                // No body (a HEAD, a 204) has nothing to mask.
                Err(_) if bytes.trim_ascii().is_empty() => bytes.to_vec(),
                // Labelled JSON but not JSON: the structure rules cannot apply, and the
                // text detectors alone are not what the policy asked for.
                Err(e) => {
                    self.metrics
                        .responses_refused
                        .with_label_values(&["unmaskable"])
                        .inc();
                    let reason = format!(
                        "the response is labelled JSON but does not parse as JSON ({e}), so it cannot be masked"
                    );
                    return self.refuse(record, protocol, Refusal::Response(reason));
                }
            };
            let masked = Bytes::from(credential.mask(&masked, &mut report).into_owned());
            parts
                .headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(masked.len()));
            self.complete(
                record,
                Some(status),
                Completion {
                    bytes: masked.len() as u64,
                    report,
                    error: None,
                },
            );
            return Response::from_parts(
                parts,
                Full::new(masked).map_err(|never| match never {}).boxed(),
            );
        };
        // Masking changes lengths (of the credential too, in any mode).
        if !matches!(mode, Mode::Pass) || !credential.is_empty() {
            parts.headers.remove(header::CONTENT_LENGTH);
        }
        let gw = self.clone();
        let max_line =
            usize::try_from(limits.max_response_bytes.unwrap_or(self.max_buffered_bytes))
                .unwrap_or(usize::MAX);
        let body = MaskedBody::new(
            body,
            mode,
            BodyMasks {
                profile: masking,
                credential,
                headers: header_report,
            },
            limits.max_response_bytes,
            max_line,
            move |done| gw.complete(record, Some(status), done),
        );
        Response::from_parts(parts, body.boxed())
    }

    /// An upgraded stream (`kubectl exec`, `port-forward`, websockets): decided on the
    /// upgrade request, then relayed byte for byte. Only the byte counts are recorded.
    fn relay(
        self: &Arc<Self>,
        record: Record,
        agent: hyper::upgrade::OnUpgrade,
        mut response: Response<Incoming>,
    ) -> Response<Body> {
        let upstream = hyper::upgrade::on(&mut response);
        let gw = self.clone();
        tokio::spawn(async move {
            let mut record = record;
            let (to_upstream, to_agent, error) = match tokio::try_join!(agent, upstream) {
                Ok((agent, upstream)) => {
                    let (agent_read, agent_write) = tokio::io::split(TokioIo::new(agent));
                    let (upstream_read, upstream_write) = tokio::io::split(TokioIo::new(upstream));
                    let ((up, e1), (down, e2)) = tokio::join!(
                        pump(agent_read, upstream_write),
                        pump(upstream_read, agent_write)
                    );
                    (up, down, e1.or(e2).map(|e| e.to_string()))
                }
                Err(e) => (0, 0, Some(e.to_string())),
            };
            record.event.relayed = Some(json!({ "toUpstream": to_upstream, "toAgent": to_agent }));
            gw.complete(
                record,
                Some(StatusCode::SWITCHING_PROTOCOLS),
                Completion {
                    bytes: to_agent,
                    report: MaskReport::default(),
                    error,
                },
            );
        });
        let (parts, _) = response.into_parts();
        Response::from_parts(
            parts,
            Full::new(Bytes::new())
                .map_err(|never| match never {})
                .boxed(),
        )
    }
}

/// Copies one direction of a relayed stream, counting bytes even when it ends in an
/// error; closes the writing side when the reading side ends.
async fn pump(
    mut from: impl tokio::io::AsyncRead + Unpin,
    mut to: impl tokio::io::AsyncWrite + Unpin,
) -> (u64, Option<std::io::Error>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    let mut total = 0u64;
    loop {
        match from.read(&mut buf).await {
            Ok(0) => {
                let _ = to.shutdown().await;
                return (total, None);
            }
            Ok(n) => {
                if let Err(e) = to.write_all(&buf[..n]).await {
                    return (total, Some(e));
                }
                total += n as u64;
            }
            Err(e) => return (total, Some(e)),
        }
    }
}

/// The launching user's token: `Proxy-Authorization: Bearer`, or — on a kubernetes
/// Connection, where kubectl can only send its kubeconfig token — `Authorization: Bearer`.
fn bearer_token(headers: &HeaderMap, protocol: Protocol) -> Option<String> {
    let from = |name| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, token) = v.trim().split_once(' ')?;
                scheme
                    .eq_ignore_ascii_case("bearer")
                    .then(|| token.trim().to_owned())
            })
    };
    from(header::PROXY_AUTHORIZATION).or_else(|| {
        if protocol == Protocol::Kubernetes {
            from(header::AUTHORIZATION)
        } else {
            None
        }
    })
}

fn classify(
    protocol: Protocol,
    req: &Request<Incoming>,
) -> Result<Target, agentgate_policy::classify::ClassifyError> {
    let path = req.uri().path();
    let query = req.uri().query().unwrap_or_default();
    match protocol {
        Protocol::Kubernetes => {
            classify_kubernetes(req.method().as_str(), path, query).map(Target::Kubernetes)
        }
        _ => {
            let host = req.uri().host().map(str::to_owned).or_else(|| {
                req.headers()
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned)
            });
            classify_http(
                req.method().as_str(),
                &host.unwrap_or_default(),
                path,
                query,
            )
            .map(Target::Http)
        }
    }
}

/// The classified request for the audit trail, masked with the audit profile (a query
/// string can carry a SAS signature, whatever the policy masks).
fn request_summary(target: &Target, masking: &MaskingProfile) -> serde_json::Value {
    let mut summary = match target {
        Target::Http(h) => {
            json!({ "method": h.method, "host": h.host, "path": h.path, "query": h.query })
        }
        Target::Kubernetes(k) => {
            json!({ "verb": k.verb, "apiGroup": k.api_group, "resource": k.resource,
            "subresource": k.subresource, "namespace": k.namespace, "name": k.name, "path": k.path })
        }
        Target::Postgres(s) => json!({ "fingerprint": s.fingerprint }),
    };
    masking.mask_json(&mut summary, &mut MaskReport::default());
    summary
}

/// Masks response header values (a `Location` can carry a SAS token, a `Set-Cookie` a
/// session), dropping any value the masking turns into something not sendable.
///
/// Headers that carry credentials (`Set-Cookie`, `X-Api-Key`, the Connection's own
/// credential header, …) are masked whatever the policy masks, and so is any copy of the
/// injected credential: the agent is never to hold a credential.
fn mask_headers(
    headers: &mut HeaderMap,
    masking: &MaskingProfile,
    credential: &CredentialMask,
    record: &Record,
) -> MaskReport {
    let mut report = MaskReport::default();
    for (name, value) in headers.iter_mut() {
        if headers::is_credential_response_header(name, &credential.header) {
            *value = HeaderValue::from_static("[masked:credential-header]");
            report.add("credential-header");
            continue;
        }
        let mut masked = credential.mask(value.as_bytes(), &mut report).into_owned();
        if !masking.is_empty()
            && let std::borrow::Cow::Owned(m) = masking.mask_bytes(&masked, &mut report)
        {
            masked = m;
        }
        if masked != value.as_bytes() {
            *value = HeaderValue::from_bytes(&masked)
                .unwrap_or_else(|_| HeaderValue::from_static("[masked]"));
        }
    }
    if report.total() > 0 {
        tracing::debug!(request_id = %record.event.request_id, masked = report.total(), "response headers masked");
    }
    report
}

fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers.get_all(header::CONNECTION).iter().any(|v| {
            v.to_str().is_ok_and(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
        })
}

/// Removes hop-by-hop headers (and those the `Connection` header names); keeps
/// `Connection: Upgrade` and `Upgrade` when `keep_upgrade`.
fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|t| t.trim().to_ascii_lowercase()))
        .filter(|t| !(keep_upgrade && t == "upgrade"))
        .collect();
    for name in named {
        headers.remove(name.as_str());
    }
    for name in [
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
    ] {
        headers.remove(name);
    }
    if !keep_upgrade {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
}

/// The request the upstream gets: the agent's, with its credentials and identity removed
/// and the Connection's credential injected.
pub(crate) fn upstream_request(
    req: Request<Body>,
    upstream: &Upstream,
) -> Result<Request<Body>, Refusal> {
    let (mut parts, body) = req.into_parts();
    let upgrade = is_upgrade(&parts.headers);
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    parts.uri = upstream
        .uri(&path_and_query)
        .map_err(|e| Refusal::Upstream(format!("cannot build the upstream URL: {e}")))?;
    parts.version = http::Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers, upgrade);
    if upgrade {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    }
    let (name, value) = upstream
        .credential_header()
        .map_err(|e| Refusal::Upstream(e.to_string()))?;
    // Only what the Connection needs goes on: never the agent's credentials or identity
    // (`Authorization`, `Cookie`, `Impersonate-*`, its own copy of `name`), nor
    // `Accept-Encoding` (bodies must arrive uncompressed to be masked).
    headers::retain_forwarded(&mut parts.headers, upstream.protocol, upgrade, &name);
    if upstream.protocol == Protocol::Kubernetes {
        let accept = headers::kubernetes_accept(&parts.headers);
        parts.headers.insert(header::ACCEPT, accept);
    }
    let host = HeaderValue::from_str(upstream.authority().as_str())
        .map_err(|e| Refusal::Upstream(e.to_string()))?;
    parts.headers.insert(header::HOST, host);
    parts.headers.insert(name, value);
    Ok(Request::from_parts(parts, body))
}

/// How a response body is masked: `Ok(None)` means "buffer the whole JSON document";
/// an error means it cannot be masked and must not be passed on.
///
/// A body is masked as what it is or not passed on: JSON with the policy's structure
/// rules (as a document, or line by line for watch streams however the request spelled
/// watch), text through the detectors. A structured format the structure rules cannot
/// read (YAML, CBOR, protobuf, …) is refused rather than masked as text, and on a
/// kubernetes Connection, which always asks for JSON, so is anything else that is not
/// text.
fn body_mode(
    masking: &MaskingProfile,
    headers: &HeaderMap,
    is_watch: bool,
    protocol: Protocol,
) -> Result<Option<Mode>, String> {
    if masking.is_empty() {
        return Ok(Some(Mode::Pass));
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let media = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned();
    let json = media.contains("json");
    let watch = is_watch || content_type.contains("stream=watch");
    let streaming = watch || media == "text/event-stream";
    let unmaskable = || {
        Err(format!(
            "the response's content type {content_type:?} cannot be masked (ask for JSON)"
        ))
    };
    let structured = ["yaml", "cbor", "protobuf", "msgpack", "bson", "avro"]
        .iter()
        .any(|f| media.contains(f));
    if !json && structured && (masking.needs_json_structure() || protocol == Protocol::Kubernetes) {
        return unmaskable();
    }
    if watch && !json && protocol == Protocol::Kubernetes {
        // A watch is only ever asked for as JSON.
        return unmaskable();
    }
    Ok(match () {
        _ if streaming && json && masking.needs_json_structure() => {
            Some(Mode::JsonLines(Vec::new()))
        }
        _ if streaming => Some(Mode::Text(MaskStream::new())),
        _ if json && masking.needs_json_structure() => None,
        _ if media.is_empty()
            || json
            || media.starts_with("text/")
            || media.contains("xml")
            // Text, so the detectors read it; reached only when no structure rule applies.
            || media.contains("yaml")
            || media.contains("x-www-form-urlencoded") =>
        {
            Some(Mode::Text(MaskStream::new()))
        }
        _ => return unmaskable(),
    })
}

/// What a response is masked with: the policy's profile, and the injected credential.
struct Masks {
    profile: Arc<MaskingProfile>,
    credential: Arc<CredentialMask>,
}

/// The injected credential, as the response must not show it.
#[derive(Debug)]
pub struct CredentialMask {
    /// The header it travels in upstream (masked in responses whatever it holds).
    pub(crate) header: http::HeaderName,
    values: LiteralMask,
}

impl CredentialMask {
    /// Whether there is no value to mask.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Masks every copy of the credential in `input`.
    pub fn mask<'a>(&self, input: &'a [u8], report: &mut MaskReport) -> std::borrow::Cow<'a, [u8]> {
        self.values.mask(input, report)
    }

    /// The values, for a streamed body.
    pub fn literals(&self) -> &LiteralMask {
        &self.values
    }
}

/// The mask of the credential a request to `upstream` carries (read as
/// `upstream_request` read it: files are re-read per request, and a rotation between the
/// two reads is masked as the new value, which is the one a response could echo next).
fn upstream_request_credential(upstream: &Upstream) -> Result<Arc<CredentialMask>, Refusal> {
    let (header, value) = upstream
        .credential_header()
        .map_err(|e| Refusal::Upstream(e.to_string()))?;
    let values = LiteralMask::new(&headers::credential_values(&value)).map_err(|e| {
        Refusal::Upstream(format!(
            "the credential cannot be searched for in responses ({e}), so none is passed on"
        ))
    })?;
    Ok(Arc::new(CredentialMask { header, values }))
}

/// The same request as a `create`, when it is a server-side apply: the API server
/// creates the object when it does not exist, and authorizes that as `create` (its patch
/// handler checks both), so the policy must allow both.
fn apply_as_create(attrs: &RequestAttrs, headers: &HeaderMap) -> Option<RequestAttrs> {
    let Target::Kubernetes(k) = &attrs.target else {
        return None;
    };
    let apply = headers
        .get_all(header::CONTENT_TYPE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase()
                .starts_with("application/apply-patch")
        });
    (k.verb == "patch" && apply).then(|| {
        let mut create = attrs.clone();
        if let Target::Kubernetes(k) = &mut create.target {
            k.verb = "create".to_owned();
        }
        create
    })
}

/// The stricter of two evaluations of one request: a denial over a hold over an allow
/// (the first on a tie). A denial of the create half says why create was asked about.
fn stricter(patch: Evaluation, create: Evaluation) -> Evaluation {
    let rank = |d: &Decision| match d {
        Decision::Allow { .. } => 0,
        Decision::RequireApproval { .. } => 1,
        Decision::Deny { .. } => 2,
    };
    if rank(&create.decision) <= rank(&patch.decision) {
        return patch;
    }
    let mut create = create;
    if let Decision::Deny { reason, .. } = &mut create.decision {
        *reason = format!(
            "a server-side apply creates the object when it does not exist, so it needs create as well as patch, and create is not allowed: {reason}"
        );
    }
    create
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_come_from_proxy_authorization_or_on_kubernetes_authorization() {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer agent-token"),
        );
        assert_eq!(
            bearer_token(&h, Protocol::Http),
            None,
            "Authorization is the agent's business on http"
        );
        assert_eq!(
            bearer_token(&h, Protocol::Kubernetes).as_deref(),
            Some("agent-token")
        );
        h.insert(
            header::PROXY_AUTHORIZATION,
            HeaderValue::from_static("bearer user-jwt"),
        );
        assert_eq!(
            bearer_token(&h, Protocol::Http).as_deref(),
            Some("user-jwt")
        );
        assert_eq!(
            bearer_token(&h, Protocol::Kubernetes).as_deref(),
            Some("user-jwt")
        );
    }

    #[test]
    fn bodies_are_masked_as_what_they_are_or_refused() {
        use agentgate_crds::{DetectorSet, Masking};
        let profile = |sets: Vec<DetectorSet>| {
            MaskingProfile::compile(
                &Masking {
                    detectors: sets,
                    ..Default::default()
                },
                b"k",
            )
            .unwrap()
        };
        let structured = profile(vec![DetectorSet::Secrets]);
        let text_only = profile(vec![DetectorSet::Pii]);
        let ct = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_str(v).unwrap());
            h
        };
        let mode = |p: &MaskingProfile, v: &str, watch: bool, proto: Protocol| {
            body_mode(p, &ct(v), watch, proto).map(|m| match m {
                None => "document",
                Some(Mode::Pass) => "pass",
                Some(Mode::Text(_)) => "text",
                Some(Mode::JsonLines(_)) => "json-lines",
            })
        };
        use Protocol::{Http, Kubernetes};
        assert_eq!(
            mode(&structured, "application/json", false, Kubernetes),
            Ok("document")
        );
        assert_eq!(
            mode(&structured, "application/json", true, Kubernetes),
            Ok("json-lines")
        );
        assert_eq!(
            mode(
                &structured,
                "application/json;stream=watch",
                false,
                Kubernetes
            ),
            Ok("json-lines"),
            "a stream the classifier did not see is still masked event by event"
        );
        for refused in [
            "application/yaml",
            "application/vnd.kubernetes.protobuf",
            "application/cbor",
            "application/vnd.kubernetes.protobuf;stream=watch",
        ] {
            assert!(
                mode(&structured, refused, false, Kubernetes).is_err(),
                "{refused}"
            );
            assert!(
                mode(&structured, refused, false, Http).is_err(),
                "{refused}"
            );
            assert!(
                mode(&text_only, refused, false, Kubernetes).is_err(),
                "{refused}"
            );
        }
        assert!(
            mode(&structured, "text/plain", true, Kubernetes).is_err(),
            "a watch is JSON"
        );
        assert_eq!(
            mode(&text_only, "application/yaml", false, Http),
            Ok("text")
        );
        assert_eq!(
            mode(&structured, "text/plain", false, Kubernetes),
            Ok("text")
        );
        assert_eq!(
            mode(&structured, "text/event-stream", false, Kubernetes),
            Ok("text")
        );
        assert_eq!(
            mode(&structured, "application/xml", false, Http),
            Ok("text")
        );
        assert!(mode(&structured, "application/octet-stream", false, Http).is_err());
        assert_eq!(
            mode(
                &MaskingProfile::none(),
                "application/octet-stream",
                false,
                Http
            ),
            Ok("pass")
        );
    }

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key(header::ACCEPT));
    }
}
