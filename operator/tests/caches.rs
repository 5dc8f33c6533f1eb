//! The reconciler reads caches, not lists: against the real API server, 200 pods' status
//! churning causes no LIST by the operator and no reconcile, while a label change — what
//! policies select on — is reconciled, from the cache, still without a LIST. Counted by
//! the API server itself (`apiserver_request_total`) and by the operator's metrics.
//!
//! Its own test binary, so its own control plane: the API server's counters count no
//! other test's requests.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use agentgate_crds::{AgentAccessPolicy, Connection};
use agentgate_e2e::ControlPlane;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use support::*;

const PODS: usize = 200;
const STATUS_ROUNDS: usize = 3;
/// The resources the reconciler used to LIST on every reconcile, and the other kinds the
/// operator watches.
const LISTED: [&str; 7] = [
    "pods",
    "serviceaccounts",
    "connections",
    "agentaccesspolicies",
    "secrets",
    "configmaps",
    "namespaces",
];

/// The sum of the samples of `name` whose labels include every one of `labels`.
fn sample_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> u64 {
    text.lines()
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let rest = series.strip_prefix(name)?;
            if !(rest.is_empty() || rest.starts_with('{')) {
                return None;
            }
            labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
                .then(|| value.parse::<f64>().ok())?
        })
        .sum::<f64>() as u64
}

/// LIST requests the API server has served, per resource of [`LISTED`].
async fn lists(client: &Client) -> BTreeMap<&'static str, u64> {
    let text = client
        .request_text(http::Request::get("/metrics").body(Vec::new()).unwrap())
        .await
        .unwrap();
    LISTED
        .iter()
        .map(|r| {
            let n = sample_sum(
                &text,
                "apiserver_request_total",
                &[("verb", "LIST"), ("resource", r)],
            );
            (*r, n)
        })
        .collect()
}

/// What the operator's metrics say: reconciles (every one, from the duration histogram),
/// reconciles that got through to planning (`reconciles_total{result="ok"}`), reconcile
/// errors, and pod watch events that triggered a reconcile and that were ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Operator {
    reconciles: u64,
    planned: u64,
    errors: u64,
    pod_triggers: u64,
    pod_ignored: u64,
}

async fn operator_metrics(admin: u16) -> Operator {
    let (status, text) = http_get(admin, "/metrics").await.unwrap();
    assert_eq!(status, 200, "{text}");
    Operator {
        reconciles: sample_sum(
            &text,
            "agentgate_operator_reconcile_duration_seconds_count",
            &[],
        ),
        planned: sample_sum(
            &text,
            "agentgate_operator_reconciles_total",
            &[("result", "ok")],
        ),
        errors: sample_sum(&text, "agentgate_operator_reconcile_errors_total", &[]),
        pod_triggers: sample_sum(
            &text,
            "agentgate_operator_watch_events_total",
            &[("kind", "Pod"), ("outcome", "reconcile")],
        ),
        pod_ignored: sample_sum(
            &text,
            "agentgate_operator_watch_events_total",
            &[("kind", "Pod"), ("outcome", "ignored")],
        ),
    }
}

/// The operator's counters once they have not moved for 1.5 s.
async fn quiet(admin: u16, log: impl Fn() -> String) -> Operator {
    let mut last = operator_metrics(admin).await;
    let mut still = 0;
    wait_for("the operator to go quiet", log, async || {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = operator_metrics(admin).await;
        still = if now == last { still + 1 } else { 0 };
        last = now;
        (still >= 3).then_some(now)
    })
    .await
}

async fn agents_matched(policies: &Api<AgentAccessPolicy>) -> Option<i32> {
    policies
        .get_status("reads")
        .await
        .ok()?
        .status?
        .agents_matched
}

#[tokio::test]
async fn pod_status_churn_causes_no_list_and_no_reconcile_but_a_label_change_reconciles() {
    let started = Instant::now();
    let cp = ControlPlane::shared();
    let client = cp.client().await;
    let system = cp.namespace(&client, "agentgate-system").await;
    // Not labeled for injection: the webhook is never asked about these pods.
    let ns = cp.namespace(&client, "churn").await;
    let up = started.elapsed();
    let (operator, webhook_name, admin) = start_operator(cp, &client, &system, &ns).await;
    let log = || operator.log();
    let operator_up = started.elapsed();

    let create = PostParams::default();
    Api::<Secret>::namespaced(client.clone(), &ns)
        .create(
            &create,
            &serde_json::from_value(json!({ "metadata": { "name": "api-token" },
                "stringData": { "token": "t0ken-value" } }))
            .unwrap(),
        )
        .await
        .unwrap();
    Api::<Connection>::namespaced(client.clone(), &ns)
        .create(&create, &serde_json::from_value(json!({
            "apiVersion": "agentgate.dev/v1alpha1", "kind": "Connection", "metadata": { "name": "api" },
            "spec": { "protocol": "http", "upstream": { "address": "https://api.example" },
                      "credentials": { "secretRef": { "name": "api-token" } }, "listen": { "port": 18080 } } }))
        .unwrap())
        .await
        .unwrap();
    let policies: Api<AgentAccessPolicy> = Api::namespaced(client.clone(), &ns);
    policies
        .create(&create, &serde_json::from_value(json!({
            "apiVersion": "agentgate.dev/v1alpha1", "kind": "AgentAccessPolicy", "metadata": { "name": "reads" },
            "spec": { "agentSelector": { "matchLabels": { "agentgate.dev/agent": "claude" } }, "connections": ["api"],
                      "rules": [{ "name": "get", "match": { "http": { "methods": ["GET"] } }, "action": "allow" }] } }))
        .unwrap())
        .await
        .unwrap();

    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let names: Vec<String> = (0..PODS).map(|i| format!("agent-{i:03}")).collect();
    futures::stream::iter(names.iter())
        .map(|name| {
            let pods = pods.clone();
            let pod: Pod = serde_json::from_value(json!({
                "metadata": { "name": name, "labels": { "agentgate.dev/agent": "claude" } },
                "spec": { "containers": [{ "name": "agent", "image": "agent:1" }] }
            }))
            .unwrap();
            async move { pods.create(&PostParams::default(), &pod).await }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<_>>()
        .await
        .unwrap();
    let created = started.elapsed();
    wait_for("the policy to match every pod", log, async || {
        (agents_matched(&policies).await? == i32::try_from(PODS).unwrap()).then_some(())
    })
    .await;
    let matched = started.elapsed();
    let before = quiet(admin, log).await;
    eprintln!(
        "control plane up at {up:?}, operator serving at {operator_up:?}, \
         pods created at {created:?}, all matched at {matched:?}, quiet at {:?}",
        started.elapsed()
    );
    assert!(
        before.pod_triggers >= PODS as u64,
        "every created pod triggered: {before:?}"
    );
    let lists_before = lists(&client).await;

    // --- status churn: nothing but the status subresource changes --------------------------
    let churn_started = Instant::now();
    for round in 0..STATUS_ROUNDS {
        futures::stream::iter(names.iter())
            .map(|name| {
                let pods = pods.clone();
                let status = json!({ "status": { "conditions": [{
                    "type": "agentgate.dev/Churn", "status": "True",
                    "reason": format!("Round{round}"), "message": format!("round {round} of {name}"),
                    "lastTransitionTime": k8s_openapi::jiff::Timestamp::now().to_string() }] } });
                async move {
                    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
                        .await
                }
            })
            .buffer_unordered(16)
            .try_collect::<Vec<_>>()
            .await
            .unwrap();
    }
    let churned = churn_started.elapsed();
    // Every status write reached the operator's pod watch (one event each)...
    let writes = (PODS * STATUS_ROUNDS) as u64;
    let seen = wait_for("the operator to see every status write", log, async || {
        let now = operator_metrics(admin).await;
        (now.pod_ignored >= before.pod_ignored + writes).then_some(now)
    })
    .await;
    // ...and a reconcile it had started would have finished by now.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after_churn = operator_metrics(admin).await;
    let lists_after_churn = lists(&client).await;
    eprintln!(
        "{writes} status writes to {PODS} pods in {churned:?}\n\
         operator before churn: {before:?}\n\
         operator after churn:  {after_churn:?} (when every write was seen: {seen:?})\n\
         LISTs before churn: {lists_before:?}\n\
         LISTs after churn:  {lists_after_churn:?}"
    );
    assert_eq!(
        after_churn.pod_ignored - before.pod_ignored,
        writes,
        "one ignored pod event per status write"
    );
    assert_eq!(
        after_churn.pod_triggers, before.pod_triggers,
        "no status write triggered"
    );
    assert_eq!(
        after_churn.reconciles,
        before.reconciles,
        "status churn reconciled; log:\n{}",
        log()
    );
    assert_eq!(
        lists_after_churn, lists_before,
        "status churn caused a LIST"
    );

    // --- the LIST counter counts: a LIST of pods by the test shows in it ---------------------
    pods.list_metadata(&ListParams::default().limit(1))
        .await
        .unwrap();
    let lists_control = wait_for("the test's own LIST to be counted", log, async || {
        let now = lists(&client).await;
        (now["pods"] > lists_after_churn["pods"]).then_some(now)
    })
    .await;

    // --- a label change is reconciled, from the cache ----------------------------------------
    pods.patch(
        &names[0],
        &PatchParams::default(),
        &Patch::Merge(json!({ "metadata": { "labels": { "agentgate.dev/agent": "other" } } })),
    )
    .await
    .unwrap();
    wait_for("the policy to match one pod fewer", log, async || {
        (agents_matched(&policies).await? == i32::try_from(PODS - 1).unwrap()).then_some(())
    })
    .await;
    let after_label = quiet(admin, log).await;
    let lists_after_label = lists(&client).await;
    eprintln!(
        "operator after the label change: {after_label:?}\n\
         LISTs after the test's LIST:     {lists_control:?}\n\
         LISTs after the label change:    {lists_after_label:?}\n\
         test runtime: {:?}",
        started.elapsed()
    );
    assert_eq!(after_label.pod_triggers, after_churn.pod_triggers + 1);
    assert!(
        after_label.reconciles > after_churn.reconciles
            && after_label.planned > after_churn.planned,
        "the label change reconciled: {after_label:?}"
    );
    assert_eq!(
        lists_after_label, lists_control,
        "the reconcile of the label change LISTed"
    );
    assert_eq!(after_label.errors, 0, "log:\n{}", log());

    Api::<MutatingWebhookConfiguration>::all(client.clone())
        .delete(&webhook_name, &DeleteParams::default())
        .await
        .unwrap();
    Api::<ValidatingWebhookConfiguration>::all(client.clone())
        .delete(&webhook_name, &DeleteParams::default())
        .await
        .unwrap();
    drop(operator);
}
