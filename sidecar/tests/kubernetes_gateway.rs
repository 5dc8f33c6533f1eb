//! The Kubernetes gateway against the real API server of the local control plane, with
//! the real kubectl as the agent: reads allowed, a delete refused with a `Status` kubectl
//! prints, Secret data masked (in a get and in a watch stream), and the sidecar's own
//! service-account credential used upstream.

#![allow(clippy::unwrap_used)]

mod support;

use agentgate_e2e::ControlPlane;
use serde_json::{Value, json};
use support::*;

const READER: &str = "agent-k8s-reader";

struct Cluster {
    cp: &'static ControlPlane,
    ns: String,
    sidecar: Sidecar,
    agent_kubeconfig: std::path::PathBuf,
}

async fn setup() -> Cluster {
    let cp = ControlPlane::shared();
    let client = cp.client().await;
    let ns = cp.namespace(&client, "prod").await;
    let kubectl = |args: &[&str]| {
        cp.kubectl_output(args)
            .unwrap_or_else(|e| panic!("kubectl {args:?}: {e}"))
    };
    kubectl(&["create", "serviceaccount", READER, "-n", &ns]);
    kubectl(&[
        "create",
        "role",
        "pods-and-secrets",
        "--verb=get,list,watch,delete",
        "--resource=pods,secrets",
        "-n",
        &ns,
    ]);
    kubectl(&[
        "create",
        "rolebinding",
        "reader",
        "--role=pods-and-secrets",
        &format!("--serviceaccount={ns}:{READER}"),
        "-n",
        &ns,
    ]);
    kubectl(&[
        "run",
        "web-0",
        "--image=nginx",
        "--restart=Never",
        "-n",
        &ns,
    ]);
    kubectl(&[
        "create",
        "secret",
        "generic",
        "db",
        "--from-literal=password=hunter2-prod",
        "-n",
        &ns,
    ]);
    let token = kubectl(&["create", "token", READER, "-n", &ns, "--duration=1h"]);

    let port = free_port();
    let bundle = json!({
        "namespace": "agents",
        "connections": [{ "name": "prod-cluster", "spec": {
            "protocol": "kubernetes",
            "upstream": { "address": cp.server(), "tls": { "caSecretRef": { "name": "cluster-ca", "key": "ca.crt" } } },
            "credentials": { "serviceAccount": { "name": READER } },
            "listen": { "port": port } } }],
        "policies": [{ "name": "k8s-readers", "spec": {
            "agentSelector": {},
            "connections": ["prod-cluster"],
            "rules": [{ "name": "k8s-read", "match": { "kubernetes": { "verbs": ["get", "list", "watch"], "namespaces": [ns] } }, "action": "allow" }],
            "masking": { "detectors": ["secrets"] } } }]
    });
    let ca = std::fs::read(cp.ca_file()).unwrap();
    let sidecar = Sidecar::start(&bundle, "app=\"agent\"\n", |dir| {
        std::fs::create_dir_all(dir.join("credentials/cluster-ca")).unwrap();
        std::fs::write(dir.join("credentials/cluster-ca/ca.crt"), &ca).unwrap();
        std::fs::create_dir_all(dir.join(format!("credentials/serviceaccount-{READER}"))).unwrap();
        std::fs::write(
            dir.join(format!("credentials/serviceaccount-{READER}/token")),
            token.trim(),
        )
        .unwrap();
    })
    .await;
    // The agent's kubeconfig points at the sidecar and holds no credential.
    let agent_kubeconfig = sidecar.path("agent.kubeconfig");
    std::fs::write(
        &agent_kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: prod\n  cluster: {{ server: \"http://127.0.0.1:{port}\" }}\n\
             users:\n- name: agent\n  user: {{}}\ncontexts:\n- name: prod\n  context: {{ cluster: prod, user: agent, namespace: {ns} }}\n\
             current-context: prod\n"
        ),
    )
    .unwrap();
    Cluster {
        cp,
        ns,
        sidecar,
        agent_kubeconfig,
    }
}

impl Cluster {
    /// kubectl as the agent: through the sidecar.
    fn agent(&self, args: &[&str]) -> (bool, String, String) {
        let out = std::process::Command::new(self.cp.kubectl().get_program())
            .arg("--kubeconfig")
            .arg(&self.agent_kubeconfig)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

#[tokio::test]
async fn kubectl_reads_through_the_sidecar_and_a_delete_is_refused_readably() {
    let c = setup().await;
    let (ok, out, err) = c.agent(&["get", "pods"]);
    assert!(ok, "kubectl get pods failed: {err}\n{}", c.sidecar.log());
    assert!(out.lines().any(|l| l.starts_with("web-0")), "{out}");

    let (ok, _, err) = c.agent(&["delete", "pod", "web-0", "--wait=false"]);
    assert!(!ok);
    assert!(
        err.contains("Error from server (Forbidden): agentgate: no rule of policy k8s-readers allows this request"),
        "kubectl should print the Status message: {err}"
    );
    // ...and the pod is still there, as the admin sees it.
    assert!(
        c.cp.kubectl_output(&["get", "pod", "web-0", "-n", &c.ns])
            .is_ok()
    );

    let (ok, _, err) = c.agent(&["get", "pods", "-n", "kube-system"]);
    assert!(
        !ok && err.contains("Forbidden"),
        "other namespaces are denied: {err}"
    );

    let audit = c.sidecar.audit();
    let events: Vec<Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let delete = events
        .iter()
        .find(|e| e["request"]["verb"] == "delete")
        .expect("the delete was recorded");
    assert_eq!(delete["decision"], "deny");
    assert_eq!(delete["request"]["name"], "web-0");
    assert!(
        events
            .iter()
            .any(|e| e["rule"] == agentgate_policy::DISCOVERY_RULE),
        "discovery is allowed and recorded"
    );
}

#[tokio::test]
async fn secret_data_never_reaches_the_agent() {
    let c = setup().await;
    let (ok, out, err) = c.agent(&["get", "secret", "db", "-o", "json"]);
    assert!(ok, "{err}");
    let secret: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        secret["data"]["password"],
        "W21hc2tlZDprdWJlcm5ldGVzLXNlY3JldF0="
    );
    assert!(
        !out.contains("aHVudGVyMi1wcm9k"),
        "base64 of the password leaked: {out}"
    );

    // A watch stream is masked event by event.
    let path = format!(
        "/api/v1/namespaces/{}/secrets?watch=true&timeoutSeconds=2",
        c.ns
    );
    let (ok, out, err) = c.agent(&["get", "--raw", &path]);
    assert!(ok, "{err}");
    let added: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|e: &Value| e["type"] == "ADDED")
        .collect();
    assert!(!added.is_empty(), "{out}");
    assert!(
        added.iter().all(|e| e["object"]["data"]
            .as_object()
            .unwrap()
            .values()
            .all(|v| v == "W21hc2tlZDprdWJlcm5ldGVzLXNlY3JldF0=")),
        "{out}"
    );
    assert!(!out.contains("aHVudGVyMi1wcm9k"));
    assert!(!c.sidecar.audit().contains("aHVudGVyMi1wcm9k"));
}
