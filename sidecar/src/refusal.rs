//! Every way the sidecar refuses a request, one variant per condition, with what each
//! protocol needs to say it: the HTTP status, the SQLSTATE, the decision recorded, the
//! next step for the agent. Each front end renders a refusal in exactly one function
//! (`http::refusal_response`, `postgres::refusal_frame`), always from
//! [`Refusal::message`], so every refusal reads `agentgate: …` and names its rule.

use agentgate_crds::Protocol;
use agentgate_policy::classify::ClassifyError;
use http::StatusCode;

use crate::identity::IdentityError;

/// Why a request was not served.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Refusal {
    /// A policy denied it.
    #[error("{reason}")]
    Denied {
        /// The rule.
        rule: Option<String>,
        /// The policy.
        policy: Option<String>,
        /// Why.
        reason: String,
    },
    /// It needed approval and did not get it.
    #[error("{reason}")]
    NotApproved {
        /// The rule.
        rule: Option<String>,
        /// Why.
        reason: String,
    },
    /// The Connection it came in on is not in this pod's configuration.
    #[error("Connection {0} is not configured for this pod; no request on it is allowed")]
    NotConfigured(String),
    /// The presented token was refused.
    #[error("{0}")]
    Identity(IdentityError),
    /// The request could not be classified with certainty.
    #[error("{0}")]
    Unclassifiable(ClassifyError),
    /// The request's head (its headers) is larger than the sidecar handles.
    #[error("{0}")]
    HeadTooLarge(String),
    /// The request uses a part of the protocol the gate cannot judge (fast-path
    /// function calls, a prepared FETCH, a client encoding SQL cannot be read in).
    #[error("{0}")]
    Unsupported(String),
    /// A limit of the session (rows it may change, cursors or statements it may hold).
    #[error("{reason}")]
    Limit {
        /// The rule that matched the request, when one did.
        rule: Option<String>,
        /// The policy whose limit it is, when a policy set it.
        policy: Option<String>,
        /// Which limit, and what to do.
        reason: String,
    },
    /// The audit trail cannot take the request's decision, so nothing may happen.
    #[error("the audit trail cannot record this request ({0}), so it is not allowed")]
    AuditUnavailable(String),
    /// The upstream cannot be used as configured (credential missing, TLS, no address).
    #[error("{0}")]
    UpstreamUnavailable(String),
    /// The upstream could not be reached, or did not answer in time.
    #[error("{0}")]
    UpstreamFailed(String),
    /// The response cannot be masked, so it is not passed on.
    #[error("{0}")]
    Unmaskable(String),
    /// The response is over a limit.
    #[error("{0}")]
    TooLarge(String),
}

impl Refusal {
    /// A short, bounded label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Refusal::Denied { .. } => "denied",
            Refusal::NotApproved { .. } => "not_approved",
            Refusal::NotConfigured(_) => "not_configured",
            Refusal::Identity(_) => "identity",
            Refusal::Unclassifiable(_) => "unclassifiable",
            Refusal::HeadTooLarge(_) => "head_too_large",
            Refusal::Unsupported(_) => "unsupported",
            Refusal::Limit { .. } => "limit",
            Refusal::AuditUnavailable(_) => "audit_unavailable",
            Refusal::UpstreamUnavailable(_) => "upstream_unavailable",
            Refusal::UpstreamFailed(_) => "upstream_failed",
            Refusal::Unmaskable(_) => "unmaskable",
            Refusal::TooLarge(_) => "too_large",
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::Denied { .. }
            | Refusal::NotApproved { .. }
            | Refusal::NotConfigured(_)
            | Refusal::Limit { .. } => StatusCode::FORBIDDEN,
            Refusal::Identity(_) => StatusCode::UNAUTHORIZED,
            Refusal::Unclassifiable(_) | Refusal::Unsupported(_) => StatusCode::BAD_REQUEST,
            Refusal::HeadTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Refusal::AuditUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::UpstreamUnavailable(_)
            | Refusal::UpstreamFailed(_)
            | Refusal::Unmaskable(_)
            | Refusal::TooLarge(_) => StatusCode::BAD_GATEWAY,
        }
    }

    /// The SQLSTATE a PostgreSQL client gets.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            // insufficient_privilege
            Refusal::Denied { .. } | Refusal::NotApproved { .. } => "42501",
            // invalid_authorization_specification
            Refusal::NotConfigured(_) => "28000",
            // invalid_password
            Refusal::Identity(_) => "28P01",
            // syntax_error
            Refusal::Unclassifiable(_) => "42601",
            // feature_not_supported
            Refusal::Unsupported(_) | Refusal::Unmaskable(_) => "0A000",
            // program_limit_exceeded
            Refusal::HeadTooLarge(_) | Refusal::Limit { .. } | Refusal::TooLarge(_) => "54000",
            // io_error
            Refusal::AuditUnavailable(_) => "58030",
            // connection_failure
            Refusal::UpstreamUnavailable(_) | Refusal::UpstreamFailed(_) => "08006",
        }
    }

    /// The decision recorded: `deny` for what the gate refused to do, `error` for what
    /// it could not do safely.
    pub fn decision(&self) -> &'static str {
        match self {
            Refusal::Denied { .. }
            | Refusal::NotApproved { .. }
            | Refusal::NotConfigured(_)
            | Refusal::Identity(_)
            | Refusal::Unclassifiable(_)
            | Refusal::HeadTooLarge(_)
            | Refusal::Unsupported(_)
            | Refusal::Limit { .. } => "deny",
            Refusal::AuditUnavailable(_)
            | Refusal::UpstreamUnavailable(_)
            | Refusal::UpstreamFailed(_)
            | Refusal::Unmaskable(_)
            | Refusal::TooLarge(_) => "error",
        }
    }

    /// The deciding rule, if any.
    pub fn rule(&self) -> Option<&str> {
        match self {
            Refusal::Denied { rule, .. }
            | Refusal::NotApproved { rule, .. }
            | Refusal::Limit { rule, .. } => rule.as_deref(),
            _ => None,
        }
    }

    /// The deciding policy, if any.
    pub fn policy(&self) -> Option<&str> {
        match self {
            Refusal::Denied { policy, .. } | Refusal::Limit { policy, .. } => policy.as_deref(),
            _ => None,
        }
    }

    /// What happened, in words (without the `agentgate:` prefix).
    pub fn reason(&self) -> String {
        self.to_string()
    }

    /// What every protocol shows the agent: `agentgate: rule R: reason`.
    pub fn message(&self) -> String {
        match self.rule() {
            Some(rule) => format!("agentgate: rule {rule}: {self}"),
            None => format!("agentgate: {self}"),
        }
    }

    /// What the agent can do next.
    pub fn next_step(&self, protocol: Protocol) -> &'static str {
        match self {
            Refusal::Denied { .. } | Refusal::NotConfigured(_) => {
                "Do not retry this request. If it is needed, ask a human to run it or to change the AgentAccessPolicy."
            }
            Refusal::NotApproved { .. } => "Do not retry until a human has approved the request.",
            Refusal::Identity(_) if protocol == Protocol::Postgres => {
                "Connect with the launching user's token as the password; get a fresh token if it expired."
            }
            Refusal::Identity(_) => {
                "Send the launching user's token as `Proxy-Authorization: Bearer <token>` (or `Authorization` on a kubernetes connection); get a fresh token if it expired."
            }
            Refusal::Unclassifiable(_) => {
                "Send the request with a canonical path (no `..`, `//` or encoded slashes) and each query parameter once, plainly encoded."
            }
            Refusal::HeadTooLarge(_) => "Send fewer or smaller headers.",
            Refusal::Unsupported(_) => "Send the request in the plainer form the message names.",
            Refusal::Limit { .. } => {
                "Stay within the limit: close what you no longer need, or ask a human to run the rest."
            }
            Refusal::AuditUnavailable(_) => {
                "Retry later; tell a human that agentgate's audit sink is failing."
            }
            Refusal::UpstreamUnavailable(_) | Refusal::UpstreamFailed(_) => {
                "Retry later; tell a human if it persists."
            }
            Refusal::Unmaskable(_) | Refusal::TooLarge(_) => {
                "Narrow the request (fewer items, a smaller range) or ask a human."
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_prefixed_and_name_the_rule() {
        let denied = Refusal::Denied {
            rule: Some("no-ddl".into()),
            policy: Some("p".into()),
            reason: "DROP is not allowed".into(),
        };
        assert_eq!(
            denied.message(),
            "agentgate: rule no-ddl: DROP is not allowed"
        );
        assert_eq!(denied.sqlstate(), "42501");
        assert_eq!(denied.status(), StatusCode::FORBIDDEN);
        let limit = Refusal::Limit {
            rule: None,
            policy: None,
            reason: "too many".into(),
        };
        assert_eq!(limit.message(), "agentgate: too many");
        assert_eq!(limit.decision(), "deny");
        assert_eq!(
            Refusal::AuditUnavailable("the spool is full".into()).decision(),
            "error"
        );
        assert!(
            Refusal::NotConfigured("db".into())
                .message()
                .starts_with("agentgate: Connection db is not configured")
        );
    }
}
