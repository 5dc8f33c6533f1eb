//! Approval decisions through the real API server, the real webhooks (served by the
//! operator binary) and real users from the control plane's token file: who may decide,
//! and that what they decide is stamped with who they are.

#![allow(clippy::unwrap_used)]

mod support;

use agentgate_e2e::{ControlPlane, users};
use serde_json::json;
use support::*;

/// An Approval as the sidecar creates it: carol launched the agent.
fn approval(ns: &str, name: &str, expires_at: &str) -> String {
    json!({
        "apiVersion": "agentgate.dev/v1alpha1", "kind": "Approval",
        "metadata": { "name": name, "namespace": ns },
        "spec": {
            "connection": "orders-db", "policy": "prod-agents", "rule": "writes-need-a-dba",
            "agent": { "pod": "claude-7f9c", "serviceAccount": "claude", "namespace": ns },
            "requester": { "subject": "carol", "email": "carol@example.com", "groups": ["developers"] },
            "request": { "protocol": "postgres", "summary": "DELETE FROM orders WHERE id = $1",
                         "fingerprint": "4f1c", "classification": { "statements": ["delete"], "tables": ["public.orders"] } },
            "approvers": { "groups": ["dba-oncall"] },
            "grant": "once",
            "expiresAt": expires_at
        }
    })
    .to_string()
}

#[tokio::test]
async fn only_an_approver_who_is_not_the_requester_can_decide_and_decided_by_is_stamped() {
    let cp = ControlPlane::shared();
    let client = cp.client().await;
    let system = cp.namespace(&client, "agentgate-system").await;
    let ns = cp.namespace(&client, "approvals").await;
    let (operator, _, _) = start_operator(cp, &client, &system, &ns).await;

    let apply = |yaml: &str| {
        let mut cmd = cp.kubectl();
        cmd.args(["apply", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), yaml.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            operator.log()
        );
    };
    let create = |name: &str, expires: &str| apply(&approval(&ns, name, expires));
    let decide = |context: &[&str], name: &str, patch: serde_json::Value| {
        let mut args = context.to_vec();
        let patch = patch.to_string();
        args.extend([
            "patch", "approval", name, "-n", &ns, "--type", "merge", "-p", &patch,
        ]);
        cp.kubectl_output(&args)
    };
    // Everyone may patch Approvals here (as the chart's agentgate-approver role allows):
    // what stops them is the webhooks, not RBAC.
    let sidecar = format!("system:serviceaccount:{ns}:agentgate-sidecar");
    let rbac = json!({ "apiVersion": "v1", "kind": "List", "items": [
        { "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
          "metadata": { "name": "approver", "namespace": ns },
          "rules": [{ "apiGroups": ["agentgate.dev"], "resources": ["approvals"], "verbs": ["get", "list", "watch", "patch"] }] },
        { "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
          "metadata": { "name": "approver", "namespace": ns },
          "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "approver" },
          "subjects": [
            { "apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "dba-oncall" },
            { "apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "developers" },
            { "apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": sidecar } ] }
    ]});
    apply(&rbac.to_string());
    let approve = json!({ "spec": { "decision": "Approved", "reason": "ticket 4711", "decidedBy": "mallory" } });
    create("apr-delete-1", "2099-01-01T00:00:00Z");

    // bob is not in dba-oncall.
    let err = decide(&["--context", users::BOB], "apr-delete-1", approve.clone()).unwrap_err();
    assert!(err.contains("not in the approver groups"), "{err}");
    // carol is in dba-oncall, but she launched the agent.
    let err = decide(
        &["--context", users::CAROL],
        "apr-delete-1",
        approve.clone(),
    )
    .unwrap_err();
    assert!(err.contains("requested this and cannot decide it"), "{err}");
    // The agent's side (any service account of its namespace) cannot, even in the group.
    let err = decide(
        &["--as", &sidecar, "--as-group", "dba-oncall"],
        "apr-delete-1",
        approve.clone(),
    )
    .unwrap_err();
    assert!(
        err.contains("service account of the agent's namespace"),
        "{err}"
    );

    // alice can; the forged decidedBy is replaced by who she is.
    decide(
        &["--context", users::ALICE],
        "apr-delete-1",
        approve.clone(),
    )
    .unwrap();
    let decided_by = cp
        .kubectl_output(&[
            "get",
            "approval",
            "apr-delete-1",
            "-n",
            &ns,
            "-o",
            "jsonpath={.spec.decidedBy}",
        ])
        .unwrap();
    assert_eq!(decided_by, "alice");

    // Nobody changes it afterwards, not even alice.
    let err = decide(
        &["--context", users::ALICE],
        "apr-delete-1",
        json!({ "spec": { "decision": "Denied" } }),
    )
    .unwrap_err();
    assert!(
        err.contains("cannot be changed") || err.contains("never changed"),
        "{err}"
    );

    // An expired Approval cannot be approved (denying it is still fine).
    create("apr-expired", "2020-01-01T00:00:00Z");
    let err = decide(&["--context", users::ALICE], "apr-expired", approve.clone()).unwrap_err();
    assert!(err.contains("expired"), "{err}");
    decide(
        &["--context", users::ALICE],
        "apr-expired",
        json!({ "spec": { "decision": "Denied", "reason": "too late" } }),
    )
    .unwrap();
}
