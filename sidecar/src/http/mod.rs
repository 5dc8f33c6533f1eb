//! The HTTP / Kubernetes front end: one listener per http or kubernetes Connection. It
//! decodes and classifies each request, runs the shared pipeline (`crate::pipeline`),
//! forwards what is allowed with the Connection's credential (`forward`), masks the
//! response (`response`), and renders every refusal in one function
//! ([`refusal_response`]).

pub mod body;
mod dry_run;
mod forward;
mod headers;
mod response;
pub mod upstream;

use std::convert::Infallible;
use std::sync::Arc;

use agentgate_crds::{Impact, Protocol};
use agentgate_policy::classify::{classify_http, classify_kubernetes};
use agentgate_policy::masking::{MaskReport, MaskingProfile};
use agentgate_policy::{
    CompiledPolicy, Decision, Evaluation, KubernetesRequest, RequestAttrs, Target, evaluate,
};
use bytes::Bytes;
use http::header::{self, HeaderMap};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::json;
use tokio::net::TcpListener;
use tracing::Instrument as _;

use crate::pipeline::{FrontEnd, Gateway, Record};
use crate::refusal::Refusal;
use crate::runtime::Runtime;
use body::{Body, BodyError};

/// The HTTP front end's state: the shared pipeline and its own settings.
#[derive(Debug)]
pub struct Front {
    /// The shared pipeline.
    pub gateway: Arc<Gateway>,
    /// The largest body buffered for JSON-structure masking (or a dry run) without a
    /// policy limit.
    pub max_buffered_bytes: u64,
}

/// hyper's limits on a request head: above [`headers::MAX_HEAD_BYTES`] and
/// [`headers::MAX_HEADERS`], so the gateway sees (and refuses readably) heads up to
/// these; only a head larger still gets hyper's bare 431.
const HYPER_MAX_HEAD_BYTES: usize = 4 * 1024 * 1024;
const HYPER_MAX_HEADERS: usize = 1000;

/// Serves one Connection's listener until the task is dropped.
pub async fn serve(listener: TcpListener, connection: String, front: Arc<Front>) {
    let connection: Arc<str> = connection.into();
    loop {
        let stream = agentgate_process::accept(&listener, &connection).await;
        let (front, connection) = (front.clone(), connection.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let (front, connection) = (front.clone(), connection.clone());
                async move { Ok::<_, Infallible>(handle(front, connection, req).await) }
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

/// One request through the front end, in a span that carries its request id.
pub async fn handle(
    front: Arc<Front>,
    connection: Arc<str>,
    req: Request<Incoming>,
) -> Response<Body> {
    let record = front
        .gateway
        .record(&connection, json!({ "method": req.method().as_str() }));
    let span = tracing::info_span!("request", request_id = %record.event.request_id, connection = %connection);
    // The agent can name its request to a human (and find it in the trail).
    let id = header::HeaderValue::from_str(&record.event.request_id).ok();
    let mut response = front
        .request(connection, req, record)
        .instrument(span)
        .await;
    if let Some(id) = id {
        response.headers_mut().insert(REQUEST_ID_HEADER, id);
    }
    response
}

/// The response header that carries a request's id.
pub const REQUEST_ID_HEADER: &str = "x-agentgate-request-id";

impl Front {
    /// Decode, classify, decide (the shared pipeline), forward, mask; the completion
    /// is recorded when the response body ends.
    async fn request(
        self: Arc<Self>,
        connection: Arc<str>,
        req: Request<Incoming>,
        mut record: Record,
    ) -> Response<Body> {
        let gw = &self.gateway;
        let runtime = gw.config.load_full();
        let Some(conn) = runtime.policy.connection(&connection) else {
            let refusal = Refusal::NotConfigured(connection.to_string());
            return self.refuse(record, Protocol::Http, refusal);
        };
        let protocol = conn.spec.protocol;
        // Before anything reads a header: a head too large to be handled is refused.
        if let Some(reason) = headers::head_too_large(req.headers()) {
            return self.refuse(record, protocol, Refusal::HeadTooLarge(reason));
        }

        // 1. identity
        let token = bearer_token(req.headers(), protocol);
        let identity = match gw
            .identify(token.as_deref(), &conn.identities, &mut record)
            .await
        {
            Ok(identity) => identity,
            Err(refusal) => return self.refuse(record, protocol, refusal),
        };

        record.event.trace = crate::pipeline::trace::from_pairs(
            req.headers()
                .iter()
                .filter_map(|(name, value)| Some((name.as_str(), value.to_str().ok()?))),
        );

        // 2. classify
        let target = match classify(protocol, &req) {
            Ok(t) => t,
            Err(e) => return self.refuse(record, protocol, Refusal::Unclassifiable(e)),
        };
        record.event.request = request_summary(&target, &gw.audit_masking);
        let is_watch = matches!(&target, Target::Kubernetes(k) if k.verb == "watch");
        let attrs = RequestAttrs {
            connection: connection.to_string(),
            identity,
            target,
        };

        // 3.–4. decide, and approve what the policy holds
        let create = apply_as_create(&attrs, req.headers());
        let mut asked = Asked {
            front: &self,
            runtime: &runtime,
            connection: &connection,
            attrs,
            create,
            req: req.map(|body| body.map_err(BodyError::from).boxed()),
        };
        let evaluation = match gw.decide(&runtime, &mut asked, &mut record).await {
            Ok(evaluation) => evaluation,
            Err(refusal) => return self.refuse(record, protocol, refusal),
        };
        let req = asked.req;

        // 5. forward
        let upstream = match runtime.upstreams.get(&*connection) {
            Some(Ok(u)) => u.clone(),
            Some(Err(e)) => {
                return self.refuse(record, protocol, Refusal::UpstreamUnavailable(e.clone()));
            }
            None => {
                let reason = "this connection has no upstream in this sidecar".to_owned();
                return self.refuse(record, protocol, Refusal::UpstreamUnavailable(reason));
            }
        };
        let (response, credential, agent_upgrade) = match forward::send(req, &upstream).await {
            Ok(sent) => sent,
            Err(refusal) => return self.refuse(record, protocol, refusal),
        };
        if let Some(agent_upgrade) = agent_upgrade
            && response.status() == StatusCode::SWITCHING_PROTOCOLS
        {
            return forward::relay(gw.clone(), record, agent_upgrade, response);
        }

        // 6. mask, 7. record (when the body ends)
        self.masked_response(
            record,
            protocol,
            response,
            response::Masks {
                profile: evaluation.masking,
                credential,
            },
            evaluation.limits,
            is_watch,
        )
        .await
    }

    /// Records a refusal and answers the agent with it.
    fn refuse(&self, mut record: Record, protocol: Protocol, refusal: Refusal) -> Response<Body> {
        self.gateway.refuse(&mut record, &refusal);
        refusal_response(protocol, &record.event.connection, &refusal)
    }
}

/// What the pipeline asks of an HTTP request while deciding it.
struct Asked<'a> {
    front: &'a Front,
    runtime: &'a Runtime,
    connection: &'a str,
    attrs: RequestAttrs,
    /// The same request as a create, when it is a server-side apply.
    create: Option<RequestAttrs>,
    req: Request<Body>,
}

impl FrontEnd for Asked<'_> {
    fn attrs(&self) -> &RequestAttrs {
        &self.attrs
    }

    /// A server-side apply is decided as both the patch it is and the create it can be.
    fn evaluate(&self, policy: &CompiledPolicy) -> Evaluation {
        let patch = evaluate(policy, &self.attrs);
        match &self.create {
            Some(create) => stricter(patch, evaluate(policy, create)),
            None => patch,
        }
    }

    /// A held Kubernetes write is dry-run by the API server itself; other requests
    /// have no preview.
    async fn preview(&mut self, evaluation: &Evaluation) -> Result<Option<Impact>, Refusal> {
        let Target::Kubernetes(k) = &self.attrs.target else {
            return Ok(None);
        };
        if !dry_run::previews(k) {
            return Ok(None);
        }
        let req = std::mem::replace(&mut self.req, Request::new(empty()));
        match self
            .front
            .preview_write(self.runtime, self.connection, k, req)
            .await
        {
            Ok((req, impact)) => {
                self.req = req;
                Ok(Some(impact))
            }
            Err(reason) => Err(Refusal::Denied {
                rule: evaluation.decision.rule().map(str::to_owned),
                policy: evaluation.policy.clone(),
                reason,
            }),
        }
    }

    /// The method and path (the pipeline masks it like an audit record: a path can
    /// carry a key).
    fn summary(&self, _evaluation: &Evaluation) -> String {
        format!("{} {}", self.req.method(), self.req.uri().path())
    }
}

/// An empty body.
fn empty() -> Body {
    Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed()
}

impl Front {
    /// The impact preview of a held Kubernetes write: its body is read (so it can be
    /// sent twice: as the API server's dry run now, for real once approved) and the dry
    /// run made. An error is why the request cannot be held.
    async fn preview_write(
        &self,
        runtime: &Runtime,
        connection: &str,
        target: &KubernetesRequest,
        req: Request<Body>,
    ) -> Result<(Request<Body>, Impact), String> {
        let limit = self.max_buffered_bytes;
        let (parts, mut body) = req.into_parts();
        let mut read = bytes::BytesMut::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| format!("the request body could not be read: {e}"))?;
            if let Ok(data) = frame.into_data() {
                if (read.len() + data.len()) as u64 > limit {
                    return Err(format!(
                        "a write held for approval is dry-run first and sent again once approved, so its body must be at most {limit} bytes"
                    ));
                }
                read.extend_from_slice(&data);
            }
        }
        let body = read.freeze();
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
                dry_run::preview(upstream, write, &self.gateway.audit_masking).await
            }
            Some(Err(e)) => Impact {
                estimated_rows: None,
                detail: format!("no preview: {e}"),
            },
            None => Impact {
                estimated_rows: None,
                detail: "no preview: this connection has no upstream in this sidecar".into(),
            },
        };
        Ok((req, impact))
    }
}

/// The response the agent gets for a refusal: a JSON body a model can act on, or — on a
/// kubernetes Connection — a Kubernetes `Status`, so `kubectl` prints it as it prints
/// the API server's own errors.
pub fn refusal_response(protocol: Protocol, connection: &str, refusal: &Refusal) -> Response<Body> {
    let status = refusal.status();
    let reason = refusal.reason();
    let next = refusal.next_step(protocol);
    let body = match protocol {
        Protocol::Kubernetes => json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": format!("{}. {next}", refusal.message()),
            "reason": match status {
                StatusCode::UNAUTHORIZED => "Unauthorized",
                StatusCode::FORBIDDEN => "Forbidden",
                StatusCode::BAD_REQUEST | StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => "BadRequest",
                StatusCode::SERVICE_UNAVAILABLE => "ServiceUnavailable",
                _ => "InternalError",
            },
            "details": { "kind": "agentgate", "causes": [{ "reason": refusal.decision(), "message": reason, "field": refusal.rule().unwrap_or_default() }] },
            "code": status.as_u16(),
        }),
        _ => {
            let mut body = json!({
                "error": if refusal.decision() == "deny" { "denied_by_agentgate" } else { "agentgate_error" },
                "connection": connection,
                "message": refusal.message(),
                "reason": reason,
                "next": next,
            });
            if let Some(rule) = refusal.rule() {
                body["rule"] = json!(rule);
            }
            if let Some(policy) = refusal.policy() {
                body["policy"] = json!(policy);
            }
            body
        }
    };
    let mut response = Response::new(
        Full::new(Bytes::from(body.to_string()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

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
    use http::header::HeaderValue;

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
}
