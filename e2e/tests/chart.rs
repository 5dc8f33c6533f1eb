//! The Helm chart against a fresh API server: it lints, `helm install` creates the CRDs,
//! the operator's Deployment, RBAC and webhook configuration, and the examples apply
//! cleanly on top of them — what the README tells a user to do.

use std::process::Command;

use agentgate_e2e::{ControlPlane, repo_root};

fn succeed(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

#[test]
fn helm_installs_the_crds_and_the_examples_apply() {
    // Its own control plane: the shared one already has the CRDs applied.
    let cp =
        ControlPlane::start().unwrap_or_else(|e| panic!("cannot start the control plane: {e}"));
    let chart = repo_root().join("charts/agentgate");

    let lint = succeed(
        cp.helm()
            .expect("helm builds")
            .args(["lint", "--strict"])
            .arg(&chart),
    );
    assert!(
        lint.contains("1 chart(s) linted, 0 chart(s) failed"),
        "{lint}"
    );

    succeed(
        cp.helm()
            .expect("helm builds")
            .args(["install", "agentgate"])
            .arg(&chart)
            .args(["--namespace", "agentgate-system", "--create-namespace"]),
    );
    cp.wait_for_crds().expect("helm installed the CRDs");
    let installed = cp
        .kubectl_output(&[
            "get",
            "deployment,service,serviceaccount",
            "-n",
            "agentgate-system",
            "-o",
            "name",
        ])
        .expect("kubectl get");
    for name in [
        "deployment.apps/agentgate-operator",
        "service/agentgate-webhook",
        "serviceaccount/agentgate-operator",
    ] {
        assert!(
            installed.lines().any(|l| l == name),
            "{name} missing from:\n{installed}"
        );
    }
    let policy = cp
        .kubectl_output(&[
            "get",
            "mutatingwebhookconfiguration",
            "agentgate",
            "-o",
            "jsonpath={.webhooks[0].failurePolicy}",
        ])
        .expect("the webhook configuration");
    assert_eq!(
        policy, "Fail",
        "opted-in pods must not start without their gate"
    );

    succeed(
        cp.kubectl()
            .arg("apply")
            .arg("-f")
            .arg(repo_root().join("examples")),
    );
    let names = cp
        .kubectl_output(&["get", "agentgate", "-n", "agents", "-o", "name"])
        .expect("kubectl get");
    for name in [
        "connection.agentgate.dev/orders-db",
        "connection.agentgate.dev/prod-cluster",
        "connection.agentgate.dev/arm",
        "agentaccesspolicy.agentgate.dev/prod-agents",
    ] {
        assert!(
            names.lines().any(|l| l == name),
            "{name} missing from:\n{names}"
        );
    }
}
