//! Every way the sidecar refuses a request, and the one function that turns a refusal
//! into what the agent receives: a JSON body a model can act on, or — on a kubernetes
//! Connection — a Kubernetes `Status`, so `kubectl` prints it as it prints the API
//! server's own errors.

use agentgate_crds::Protocol;
use agentgate_policy::classify::ClassifyError;
use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use serde_json::json;

use crate::body::Body;
use crate::identity::IdentityError;

/// Why a request was not served.
#[derive(Debug, Clone)]
pub enum Refusal {
    /// A policy denied it.
    Denied {
        /// The rule.
        rule: Option<String>,
        /// The policy.
        policy: Option<String>,
        /// Why.
        reason: String,
    },
    /// It needed approval and did not get it.
    NotApproved {
        /// The rule.
        rule: Option<String>,
        /// Why.
        reason: String,
    },
    /// The presented token was refused.
    Identity(IdentityError),
    /// The request could not be classified with certainty.
    Unclassifiable(ClassifyError),
    /// The request's head (its headers) is larger than the sidecar handles.
    HeadTooLarge(String),
    /// The audit sink failed, so nothing may happen.
    AuditUnavailable,
    /// The upstream cannot be used (credential missing, TLS, unreachable).
    Upstream(String),
    /// The response could not be passed on safely (cannot be masked, over the limit).
    Response(String),
}

impl Refusal {
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::Denied { .. } | Refusal::NotApproved { .. } => StatusCode::FORBIDDEN,
            Refusal::Identity(_) => StatusCode::UNAUTHORIZED,
            Refusal::Unclassifiable(_) => StatusCode::BAD_REQUEST,
            Refusal::HeadTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Refusal::AuditUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::Upstream(_) | Refusal::Response(_) => StatusCode::BAD_GATEWAY,
        }
    }

    /// The decision label for metrics and audit.
    pub fn decision(&self) -> &'static str {
        match self {
            Refusal::Denied { .. }
            | Refusal::NotApproved { .. }
            | Refusal::Identity(_)
            | Refusal::Unclassifiable(_)
            | Refusal::HeadTooLarge(_) => "deny",
            Refusal::AuditUnavailable | Refusal::Upstream(_) | Refusal::Response(_) => "error",
        }
    }

    /// The deciding rule, if any.
    pub fn rule(&self) -> Option<&str> {
        match self {
            Refusal::Denied { rule, .. } | Refusal::NotApproved { rule, .. } => rule.as_deref(),
            _ => None,
        }
    }

    /// What happened, in words.
    pub fn reason(&self) -> String {
        match self {
            Refusal::Denied { reason, .. } | Refusal::NotApproved { reason, .. } => reason.clone(),
            Refusal::Identity(e) => e.to_string(),
            Refusal::Unclassifiable(e) => e.to_string(),
            Refusal::AuditUnavailable => {
                "the audit trail cannot be written, so no request is allowed".into()
            }
            Refusal::Upstream(e) | Refusal::Response(e) | Refusal::HeadTooLarge(e) => e.clone(),
        }
    }

    /// What the agent can do next.
    pub(crate) fn next_step(&self) -> &'static str {
        match self {
            Refusal::Denied { .. } => {
                "Do not retry this request. If it is needed, ask a human to run it or to change the AgentAccessPolicy."
            }
            Refusal::NotApproved { .. } => "Do not retry until a human has approved the request.",
            Refusal::Identity(_) => {
                "Send the launching user's token as `Proxy-Authorization: Bearer <token>` (or `Authorization` on a kubernetes connection); get a fresh token if it expired."
            }
            Refusal::Unclassifiable(_) => {
                "Send the request with a canonical path (no `..`, `//` or encoded slashes) and each query parameter once, plainly encoded."
            }
            Refusal::HeadTooLarge(_) => "Send fewer or smaller headers.",
            Refusal::AuditUnavailable => {
                "Retry later; tell a human that agentgate's audit sink is failing."
            }
            Refusal::Upstream(_) => "Retry later; tell a human if it persists.",
            Refusal::Response(_) => {
                "Narrow the request (fewer items, a smaller range) or ask a human."
            }
        }
    }
}

/// The response the agent gets for a refusal.
pub fn refusal_response(protocol: Protocol, connection: &str, refusal: &Refusal) -> Response<Body> {
    let status = refusal.status();
    let reason = refusal.reason();
    let body = match protocol {
        Protocol::Kubernetes => json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": format!("agentgate: {reason}. {}", refusal.next_step()),
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
                "reason": reason,
                "next": refusal.next_step(),
            });
            if let Refusal::Denied { rule, policy, .. } = refusal {
                body["rule"] = json!(rule);
                body["policy"] = json!(policy);
            }
            if let Refusal::NotApproved { rule, .. } = refusal {
                body["rule"] = json!(rule);
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
