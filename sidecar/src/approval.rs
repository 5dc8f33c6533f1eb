//! The approval step of the pipeline. The approval issue implements it with `Approval`
//! objects; until then [`NotConfigured`] refuses every request that needs approval, and
//! says so.

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
}

/// What became of a held request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApprovalOutcome {
    /// A human approved it (or a grant covers it): forward it.
    Approved {
        /// The Approval object's name.
        approval: String,
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
