//! Helpers shared by the operator's integration test and its admission benchmark.

#![allow(dead_code, clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agentgate_e2e::ControlPlane;
pub use agentgate_e2e::free_port;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use kube::api::PostParams;
use kube::{Api, Client};
use serde_json::json;

/// A child process killed when the test ends, however it ends.
pub struct Process(pub Child, pub PathBuf);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Process {
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.1).unwrap_or_default()
    }
}

pub async fn wait_for<T>(
    what: &str,
    log: impl Fn() -> String,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; log:\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    let status = out.split_whitespace().nth(1)?.parse().ok()?;
    Some((
        status,
        out.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned(),
    ))
}

/// Registers a MutatingWebhookConfiguration for the pods of `namespace` (as the chart
/// does, but with a loopback URL), starts the operator binary against the control plane,
/// and waits until it serves and has published its caBundle. Returns the process, the
/// configuration's name and the admin port.
pub async fn start_operator(
    cp: &ControlPlane,
    client: &Client,
    system: &str,
    namespace: &str,
) -> (Process, String, u16) {
    let webhook_port = free_port();
    let webhook_name = format!("agentgate-{}-{namespace}", std::process::id());
    let webhook = json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": { "name": webhook_name },
        "webhooks": [{
            "name": "pods.agentgate.dev",
            "clientConfig": { "url": format!("https://127.0.0.1:{webhook_port}/mutate/pods") },
            "rules": [{ "apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"] }],
            "namespaceSelector": { "matchLabels": { "agentgate.dev/injection": "enabled", "kubernetes.io/metadata.name": namespace } },
            "failurePolicy": "Fail", "sideEffects": "None", "admissionReviewVersions": ["v1"], "timeoutSeconds": 5
        }, {
            "name": "approvals.agentgate.dev",
            "clientConfig": { "url": format!("https://127.0.0.1:{webhook_port}/mutate/approvals") },
            "rules": [{ "apiGroups": ["agentgate.dev"], "apiVersions": ["v1alpha1"], "operations": ["CREATE", "UPDATE"], "resources": ["approvals"] }],
            "namespaceSelector": { "matchLabels": { "kubernetes.io/metadata.name": namespace } },
            "failurePolicy": "Fail", "sideEffects": "None", "admissionReviewVersions": ["v1"], "timeoutSeconds": 5
        }]
    });
    let validating = json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
        "metadata": { "name": webhook_name },
        "webhooks": [{
            "name": "approvals.agentgate.dev",
            "clientConfig": { "url": format!("https://127.0.0.1:{webhook_port}/validate/approvals") },
            "rules": [{ "apiGroups": ["agentgate.dev"], "apiVersions": ["v1alpha1"], "operations": ["CREATE", "UPDATE"], "resources": ["approvals"] }],
            "namespaceSelector": { "matchLabels": { "kubernetes.io/metadata.name": namespace } },
            "failurePolicy": "Fail", "sideEffects": "None", "admissionReviewVersions": ["v1"], "timeoutSeconds": 5
        }]
    });
    let vwc: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    vwc.create(
        &PostParams::default(),
        &serde_json::from_value(validating).unwrap(),
    )
    .await
    .unwrap();
    let mwc: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    mwc.create(
        &PostParams::default(),
        &serde_json::from_value(webhook).unwrap(),
    )
    .await
    .unwrap();
    let admin_port = free_port();
    let log_path = std::env::temp_dir().join(format!(
        "agentgate-operator-{}-{namespace}.log",
        std::process::id()
    ));
    let operator = Process(
        Command::new(env!("CARGO_BIN_EXE_agentgate-operator"))
            .env("KUBECONFIG", cp.kubeconfig())
            .args([
                "--namespace",
                system,
                "--pod-name",
                "operator-0",
                "--webhook-hosts",
                "127.0.0.1",
            ])
            .args([
                "--webhook-addr",
                &format!("127.0.0.1:{webhook_port}"),
                "--admin-addr",
                &format!("127.0.0.1:{admin_port}"),
            ])
            .args([
                "--mutating-webhook",
                &webhook_name,
                "--validating-webhook",
                &webhook_name,
                "--lease-duration",
                "6s",
                "--sidecar-image",
                "agentgate-sidecar:test",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&log_path).unwrap()))
            .spawn()
            .unwrap(),
        log_path,
    );
    let log = || operator.log();
    wait_for("the operator to be ready", log, async || {
        (http_get(admin_port, "/readyz").await?.0 == 200).then_some(())
    })
    .await;
    wait_for("the caBundle", log, async || {
        mwc.get(&webhook_name)
            .await
            .ok()?
            .webhooks?
            .first()?
            .client_config
            .ca_bundle
            .clone()
    })
    .await;
    wait_for("the validating caBundle", log, async || {
        vwc.get(&webhook_name)
            .await
            .ok()?
            .webhooks?
            .first()?
            .client_config
            .ca_bundle
            .clone()
    })
    .await;
    (operator, webhook_name, admin_port)
}

/// A binary of this workspace, brought up to date (a no-op when `cargo test --workspace`
/// has just built it).
pub fn workspace_binary(package: &str, bin: &str) -> PathBuf {
    let dir = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let mut cargo = Command::new(env!("CARGO"));
    cargo.args(["build", "-p", package, "--bin", bin]);
    if dir.ends_with("release") {
        // A benchmark: the binary it runs is the optimized one.
        cargo.arg("--release");
    }
    let status = cargo.status().unwrap();
    assert!(status.success());
    dir.join(bin)
}

/// The audit trail of the sidecar [`spawn_sidecar`] started in `dir`, once its file sink
/// holds everything the spool does.
pub fn sidecar_audit(dir: &std::path::Path) -> String {
    agentgate_e2e::audit::settled(&dir.join("audit.jsonl"), &dir.join("spool"))
}

/// The sidecar binary.
pub fn sidecar_binary() -> PathBuf {
    workspace_binary("agentgate-sidecar", "agentgate-sidecar")
}

/// The sidecar binary with its files in `dir` (`bundle.json`, `labels`, `credentials/`),
/// as pod claude-7f9c of `namespace`, holding Approvals on the control plane and trusting
/// them while the approvals webhook of the ValidatingWebhookConfiguration `webhook`
/// guards them; its log is `dir/sidecar.log`, its audit trail `dir/audit.jsonl`.
pub fn spawn_sidecar(
    cp: &ControlPlane,
    dir: &std::path::Path,
    namespace: &str,
    webhook: &str,
    admin_port: u16,
) -> Process {
    let log_path = dir.join("sidecar.log");
    Process(
        Command::new(sidecar_binary())
            .env("KUBECONFIG", cp.kubeconfig())
            .arg("--bundle")
            .arg(dir.join("bundle.json"))
            .arg("--pod-labels")
            .arg(dir.join("labels"))
            .arg("--credentials-dir")
            .arg(dir.join("credentials"))
            .args(["--admin-addr", &format!("127.0.0.1:{admin_port}")])
            .args(["--pod-name", "claude-7f9c", "--pod-namespace", namespace])
            .args(["--service-account", "claude", "--approval-webhook", webhook])
            .arg("--audit")
            .arg(format!("file:{}", dir.join("audit.jsonl").display()))
            .arg("--audit-spool")
            .arg(dir.join("spool"))
            .args(["--session-update-interval", "500ms"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path).unwrap())
            .spawn()
            .unwrap(),
        log_path,
    )
}

/// Writes the files of a sidecar (see [`spawn_sidecar`]) with one Postgres Connection,
/// `orders-db`, listening on `listen` and logging in to the server on `db_port` as
/// `login`, and one policy, `prod-agents`, with `rules`.
pub fn write_postgres_sidecar(
    dir: &std::path::Path,
    namespace: &str,
    (db_port, login): (u16, (&str, &str)),
    listen: u16,
    rules: serde_json::Value,
) {
    let bundle = json!({
        "namespace": namespace,
        "connections": [{ "name": "orders-db", "generation": 1, "spec": {
            "protocol": "postgres",
            "upstream": { "address": format!("127.0.0.1:{db_port}"), "database": "postgres", "tls": { "mode": "disable" } },
            "credentials": { "secretRef": { "name": "db" } }, "listen": { "port": listen } } }],
        "policies": [{ "name": "prod-agents", "generation": 1, "spec": {
            "agentSelector": {}, "connections": ["orders-db"], "rules": rules } }]
    });
    std::fs::write(dir.join("bundle.json"), bundle.to_string()).unwrap();
    std::fs::write(dir.join("labels"), "app=\"agent\"\n").unwrap();
    let credentials = dir.join("credentials/db");
    std::fs::create_dir_all(&credentials).unwrap();
    std::fs::write(credentials.join("username"), login.0).unwrap();
    std::fs::write(credentials.join("password"), login.1).unwrap();
}

/// `psql -c SQL` as the agent through the sidecar listening on `listen`, in the
/// background (it blocks while its statement is held): whether it succeeded, and its
/// output and errors.
pub fn psql_agent(listen: u16, sql: &str) -> std::thread::JoinHandle<(bool, String)> {
    let sql = sql.to_owned();
    std::thread::spawn(move || {
        let out = Command::new("psql")
            .args(["-h", "127.0.0.1", "-p", &listen.to_string()])
            .args(["-U", "agent", "-d", "orders", "-X", "-A", "-t", "-c", &sql])
            .env("PGCONNECT_TIMEOUT", "10")
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    })
}

/// Lets the control plane's users patch Approvals in `ns` (the chart's
/// agentgate-approver role): the webhooks, not RBAC, decide who may decide.
pub fn apply_approver_role(cp: &ControlPlane, ns: &str) {
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
            { "apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": format!("system:serviceaccount:{ns}:agentgate-sidecar") } ] }
    ]});
    kubectl_apply(cp, &rbac.to_string());
}

pub fn kubectl_apply(cp: &ControlPlane, yaml: &str) {
    let mut child = cp
        .kubectl()
        .args(["apply", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), yaml.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The first Approval in `ns` that is `Pending` and not in `known`.
pub async fn pending_approval(
    cp: &ControlPlane,
    ns: &str,
    known: &[String],
    log: impl Fn() -> String,
) -> String {
    wait_for("a pending Approval", log, async || {
        let list = cp
            .kubectl_output(&["get", "approvals", "-n", ns, "-o", "json"])
            .ok()?;
        let list: serde_json::Value = serde_json::from_str(&list).ok()?;
        list["items"].as_array()?.iter().find_map(|a| {
            let name = a["metadata"]["name"].as_str()?.to_owned();
            (a["status"]["phase"] == "Pending" && !known.contains(&name)).then_some(name)
        })
    })
    .await
}

/// One field of an Approval, as a kubectl JSONPath prints it.
pub fn approval_field(cp: &ControlPlane, ns: &str, name: &str, path: &str) -> String {
    cp.kubectl_output(&[
        "get",
        "approval",
        name,
        "-n",
        ns,
        "-o",
        &format!("jsonpath={path}"),
    ])
    .unwrap()
}

/// `kubectl patch approval NAME -n NS --type merge -p PATCH` as `user`.
pub fn patch_approval_as(
    cp: &ControlPlane,
    user: &str,
    ns: &str,
    name: &str,
    patch: &serde_json::Value,
) -> Result<String, String> {
    let patch = patch.to_string();
    cp.kubectl_output(&[
        "--context",
        user,
        "patch",
        "approval",
        name,
        "-n",
        ns,
        "--type",
        "merge",
        "-p",
        &patch,
    ])
}

/// alice, an approver, decides an Approval (`Approved` or `Denied`) for "ticket 4711".
pub fn decide_as_alice(cp: &ControlPlane, ns: &str, name: &str, decision: &str) {
    let patch = json!({ "spec": { "decision": decision, "reason": "ticket 4711" } });
    patch_approval_as(cp, agentgate_e2e::users::ALICE, ns, name, &patch).unwrap();
}

/// `kubectl agentgate ARGS -n NS` (the plugin found on `PATH`, as kubectl finds plugins),
/// as the control plane's admin unless `args` name a `--context`.
pub fn kubectl_agentgate(cp: &ControlPlane, ns: &str, args: &[&str]) -> (bool, String) {
    static PLUGIN_DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let plugin_dir = PLUGIN_DIR.get_or_init(|| {
        workspace_binary("kubectl-agentgate", "kubectl-agentgate")
            .parent()
            .unwrap()
            .to_owned()
    });
    let path = format!(
        "{}:{}",
        plugin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    // `kubectl <plugin>` takes no kubectl flags before the plugin's name.
    let out = Command::new(cp.kubectl().get_program())
        .env("PATH", &path)
        .arg("agentgate")
        .args(args)
        .args([
            "-n",
            ns,
            "--kubeconfig",
            &cp.kubeconfig().display().to_string(),
        ])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}
