//! Whether the operator's validating webhook guards Approvals in this namespace.
//!
//! A decision is only as trustworthy as the admission that stamped it: where the
//! webhook does not run, anyone with RBAC to patch an Approval can write
//! `decidedBy: alice` themselves. So before the sidecar holds a request, and again
//! before it acts on an approval, it checks two things against the API server:
//!
//! 1. **The configuration** ([`config_guards`]): the ValidatingWebhookConfiguration
//!    exists, and its `approvals.agentgate.dev` webhook has `failurePolicy: Fail`, rules
//!    covering `CREATE` and `UPDATE` of Approvals, no `objectSelector` and no
//!    `matchConditions` that could skip an object.
//! 2. **What the API server does here** ([`probe`]): a dry-run create of an already
//!    decided Approval in this namespace — which the webhook always denies. Denied by
//!    the webhook means it covers this namespace (its `namespaceSelector` included,
//!    which the sidecar cannot read); admitted means it does not. Nothing is stored.
//!
//! Any other answer (unreadable, unreachable, timed out) counts as not guarded.

use std::time::Duration;

use agentgate_crds::{
    AgentRef, Approval, ApprovalSpec, Approvers, Decision, GrantScope, HeldRequest, Protocol,
    RequesterIdentity,
};
use k8s_openapi::api::admissionregistration::v1::{
    ValidatingWebhook, ValidatingWebhookConfiguration,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::{Api, Client};
use prometheus::IntGauge;

/// The webhook (in the operator's ValidatingWebhookConfiguration) that checks decisions.
pub const APPROVALS_WEBHOOK: &str = "approvals.agentgate.dev";

/// How long one check may take, both requests together.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// Checks that the approvals webhook guards one namespace.
#[derive(Debug, Clone)]
pub struct Coverage {
    configs: Api<ValidatingWebhookConfiguration>,
    approvals: Api<Approval>,
    namespace: String,
    /// The ValidatingWebhookConfiguration's name.
    configuration: String,
    /// 1 after a check that passed, 0 after one that did not.
    guarded: IntGauge,
}

impl Coverage {
    /// Checks `namespace` against the ValidatingWebhookConfiguration `configuration`.
    pub fn new(client: Client, namespace: &str, configuration: &str, guarded: IntGauge) -> Self {
        Self {
            configs: Api::all(client.clone()),
            approvals: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
            configuration: configuration.to_owned(),
            guarded,
        }
    }

    /// `Ok` when the webhook guards this namespace now; otherwise why not, in a sentence
    /// that ends "…, so approvals here cannot be trusted".
    pub async fn check(&self) -> Result<(), String> {
        let outcome = match tokio::time::timeout(CHECK_TIMEOUT, self.check_now()).await {
            Ok(outcome) => outcome,
            Err(_) => Err(format!(
                "checking agentgate's approval webhook took longer than {}s",
                CHECK_TIMEOUT.as_secs()
            )),
        };
        self.guarded.set(i64::from(outcome.is_ok()));
        outcome.map_err(|why| format!("{why}, so approvals here cannot be trusted"))
    }

    async fn check_now(&self) -> Result<(), String> {
        let config = self.configs.get(&self.configuration).await.map_err(|e| {
            format!(
                "the ValidatingWebhookConfiguration {} cannot be read ({e})",
                self.configuration
            )
        })?;
        config_guards(&config).map_err(|why| {
            format!(
                "ValidatingWebhookConfiguration {}: {why}",
                config_name(&config)
            )
        })?;
        probe(&self.approvals, &self.namespace).await
    }
}

fn config_name(config: &ValidatingWebhookConfiguration) -> &str {
    config.metadata.name.as_deref().unwrap_or("?")
}

/// Whether the configuration's approvals webhook runs on every create and update of an
/// Approval, and refuses when it cannot be reached. The namespace selector is left to
/// [`probe`].
pub fn config_guards(config: &ValidatingWebhookConfiguration) -> Result<(), String> {
    let webhook = config
        .webhooks
        .iter()
        .flatten()
        .find(|w| w.name == APPROVALS_WEBHOOK)
        .ok_or_else(|| format!("it has no webhook {APPROVALS_WEBHOOK}"))?;
    webhook_guards(webhook).map_err(|why| format!("webhook {APPROVALS_WEBHOOK} {why}"))
}

fn webhook_guards(webhook: &ValidatingWebhook) -> Result<(), String> {
    // Unset means Fail (admissionregistration.k8s.io/v1's default).
    if let Some(policy) = webhook.failure_policy.as_deref()
        && policy != "Fail"
    {
        return Err(format!(
            "has failurePolicy {policy}: an unreachable webhook would admit any decision"
        ));
    }
    if let Some(selector) = &webhook.object_selector
        && (selector
            .match_labels
            .as_ref()
            .is_some_and(|m| !m.is_empty())
            || selector
                .match_expressions
                .as_ref()
                .is_some_and(|m| !m.is_empty()))
    {
        return Err("has an objectSelector: Approvals it does not select are not checked".into());
    }
    if webhook
        .match_conditions
        .as_ref()
        .is_some_and(|m| !m.is_empty())
    {
        return Err("has matchConditions: Approvals they exclude are not checked".into());
    }
    let any = |values: &Option<Vec<String>>, wanted: &str| {
        values
            .iter()
            .flatten()
            .any(|v| v == "*" || v == wanted || (wanted == "approvals" && v == "*/*"))
    };
    let covered = |operation: &str| {
        webhook.rules.iter().flatten().any(|rule| {
            any(&rule.api_groups, "agentgate.dev")
                && any(&rule.api_versions, "v1alpha1")
                && any(&rule.resources, "approvals")
                && any(&rule.operations, operation)
                && rule
                    .scope
                    .as_deref()
                    .is_none_or(|s| s == "*" || s == "Namespaced")
        })
    };
    for operation in ["CREATE", "UPDATE"] {
        if !covered(operation) {
            return Err(format!(
                "does not run on {operation} of agentgate.dev/v1alpha1 approvals"
            ));
        }
    }
    Ok(())
}

/// A dry-run create of a decided Approval in `namespace`: the webhook denies it wherever
/// it runs.
async fn probe(api: &Api<Approval>, namespace: &str) -> Result<(), String> {
    let spec = ApprovalSpec {
        connection: "coverage-check".into(),
        policy: "coverage-check".into(),
        rule: "coverage-check".into(),
        agent: AgentRef {
            pod: "coverage-check".into(),
            service_account: None,
            namespace: namespace.to_owned(),
        },
        requester: RequesterIdentity {
            subject: "agentgate-coverage-check".into(),
            issuer: None,
            email: None,
            groups: Vec::new(),
        },
        request: HeldRequest {
            protocol: Protocol::Http,
            summary: "a dry-run check that agentgate's approval webhook runs here".into(),
            fingerprint: "coverage-check".into(),
            classification: Default::default(),
            impact: None,
        },
        approvers: Approvers {
            groups: vec!["agentgate-coverage-check".into()],
        },
        grant: GrantScope::Once,
        expires_at: Time(Timestamp::now()),
        decision: Some(Decision::Approved),
        reason: None,
        decided_by: None,
        decided_by_groups: Vec::new(),
    };
    let object = Approval::new("agentgate-coverage-check", spec);
    let params = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let denied_by_webhook = format!("admission webhook \"{APPROVALS_WEBHOOK}\" denied the request");
    match api.create(&params, &object).await {
        Ok(_) => Err(format!(
            "the API server admitted an already decided Approval in namespace {namespace} (a dry run): agentgate's approval webhook does not run here"
        )),
        Err(kube::Error::Api(status)) if status.message.contains(&denied_by_webhook) => Ok(()),
        Err(e) => Err(format!(
            "checking that agentgate's approval webhook runs in namespace {namespace} failed ({e})"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config(webhook: serde_json::Value) -> ValidatingWebhookConfiguration {
        let mut hook = json!({
            "name": APPROVALS_WEBHOOK,
            "clientConfig": { "url": "https://127.0.0.1:9443/validate/approvals" },
            "rules": [{ "apiGroups": ["agentgate.dev"], "apiVersions": ["v1alpha1"],
                        "operations": ["CREATE", "UPDATE"], "resources": ["approvals"] }],
            "failurePolicy": "Fail", "sideEffects": "None", "admissionReviewVersions": ["v1"]
        });
        for (k, v) in webhook.as_object().unwrap() {
            hook[k] = v.clone();
        }
        serde_json::from_value(json!({
            "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
            "metadata": { "name": "agentgate" }, "webhooks": [hook]
        }))
        .unwrap()
    }

    #[test]
    fn the_charts_webhook_guards_and_each_gap_is_named() {
        assert_eq!(config_guards(&config(json!({}))), Ok(()));
        // Defaults and wildcards still cover.
        let wide = json!({ "failurePolicy": null, "rules": [
            { "apiGroups": ["*"], "apiVersions": ["*"], "operations": ["*"], "resources": ["*/*"], "scope": "*" }] });
        assert_eq!(config_guards(&config(wide)), Ok(()));
        let split = json!({ "rules": [
            { "apiGroups": ["agentgate.dev"], "apiVersions": ["v1alpha1"], "operations": ["CREATE"], "resources": ["approvals"] },
            { "apiGroups": ["agentgate.dev"], "apiVersions": ["v1alpha1"], "operations": ["UPDATE"], "resources": ["approvals"] }] });
        assert_eq!(config_guards(&config(split)), Ok(()));
        // An empty objectSelector selects everything.
        assert_eq!(
            config_guards(&config(json!({ "objectSelector": {} }))),
            Ok(())
        );

        for (change, says) in [
            (json!({ "failurePolicy": "Ignore" }), "failurePolicy Ignore"),
            (
                json!({ "objectSelector": { "matchLabels": { "checked": "yes" } } }),
                "objectSelector",
            ),
            (
                json!({ "matchConditions": [{ "name": "x", "expression": "true" }] }),
                "matchConditions",
            ),
            (
                json!({ "rules": [{ "apiGroups": ["agentgate.dev"], "apiVersions": ["v1alpha1"], "operations": ["CREATE"], "resources": ["approvals"] }] }),
                "UPDATE",
            ),
            (
                json!({ "rules": [{ "apiGroups": ["agentgate.dev"], "apiVersions": ["v1alpha1"], "operations": ["CREATE", "UPDATE"], "resources": ["approvals/status"] }] }),
                "CREATE",
            ),
            (
                json!({ "rules": [{ "apiGroups": ["agentgate.dev"], "apiVersions": ["v1alpha1"], "operations": ["*"], "resources": ["approvals"], "scope": "Cluster" }] }),
                "CREATE",
            ),
            (json!({ "name": "other.agentgate.dev" }), "no webhook"),
        ] {
            let err = config_guards(&config(change.clone())).unwrap_err();
            assert!(err.contains(says), "{change}: {err}");
        }
    }
}
