//! The approval step of the pipeline: [`kubernetes::KubeApprovals`] holds a request on
//! an `Approval` object until a human decides; [`NotConfigured`] (no Kubernetes API
//! reachable) refuses every request that needs approval, and says so;
//! [`coverage::Coverage`] checks that the operator's webhook guards the decisions.

pub mod coverage;
pub mod kubernetes;

use std::future::Future;
use std::pin::Pin;

use agentgate_policy::{ApprovalPolicy, RequestAttrs};

/// A request held for a human.
#[derive(Debug)]
pub struct HeldRequest<'a> {
    /// The request.
    pub attrs: &'a RequestAttrs,
    /// The rule that asked for approval.
    pub rule: Option<&'a str>,
    /// The policy the rule is in.
    pub policy: Option<&'a str>,
    /// Who approves, for how long, what the approval grants.
    pub approval: &'a ApprovalPolicy,
    /// What the approver is shown: the request as the agent sent it, masked.
    pub summary: &'a str,
    /// What running it would touch, when the front end could estimate it.
    pub impact: Option<agentgate_crds::Impact>,
}

/// What a held and approved request did, for its Approval's status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Executed {
    /// Rows the statement changed.
    pub rows_affected: Option<i64>,
    /// The upstream's HTTP status.
    pub http_status: Option<i32>,
    /// Why it failed, when it did.
    pub error: Option<String>,
}

/// What became of a held request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApprovalOutcome {
    /// A human approved it (or a grant covers it): forward it.
    Approved {
        /// The Approval object's name.
        approval: String,
        /// An earlier approval's grant covers it: it runs, but its outcome belongs to
        /// this request only, not to that Approval's status.
        by_grant: bool,
    },
    /// Refused: denied by a human, timed out, or approvals are unavailable.
    Refused {
        /// Why, and what the agent can do.
        reason: String,
    },
}

/// The approval hook.
pub trait ApprovalHook: Send + Sync + std::fmt::Debug {
    /// Holds `request` until it is decided.
    fn decide<'a>(
        &'a self,
        request: HeldRequest<'a>,
    ) -> Pin<Box<dyn Future<Output = ApprovalOutcome> + Send + 'a>>;

    /// Records what an approved request did (in the background; never blocks the
    /// request).
    fn executed(&self, _approval: &str, _outcome: Executed) {}
}

/// No approval backend: every request that needs approval is refused.
#[derive(Debug, Default)]
pub struct NotConfigured;

impl ApprovalHook for NotConfigured {
    fn decide<'a>(
        &'a self,
        request: HeldRequest<'a>,
    ) -> Pin<Box<dyn Future<Output = ApprovalOutcome> + Send + 'a>> {
        let rule = request.rule.unwrap_or("the policy's default action");
        Box::pin(std::future::ready(ApprovalOutcome::Refused {
            reason: format!(
                "{rule} requires a human's approval (approvers: {}), but approvals are not configured in this sidecar; \
                 ask a human to run this request or to change the policy",
                request.approval.settings.approvers.groups.join(", ")
            ),
        }))
    }
}
