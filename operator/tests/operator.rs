//! The operator against the real API server of the local control plane: reconciling
//! policies and connections into Ready conditions and the bundle, following Secrets and
//! fixes, the real API server calling the real webhook to inject the sidecar, and the
//! admitted Pod's sidecar container run as a local process from what the API server holds.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};

use agentgate_crds::{AgentAccessPolicy, Bundle, Connection};
use agentgate_e2e::ControlPlane;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};
use support::*;

fn ready_condition(status: Option<&Value>) -> Option<(String, String, String)> {
    let c = status?["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Ready")?
        .clone();
    Some((
        c["status"].as_str()?.to_owned(),
        c["reason"].as_str()?.to_owned(),
        c["message"].as_str()?.to_owned(),
    ))
}

async fn readiness<K>(api: &Api<K>, name: &str) -> Option<(String, String, String)>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let object = serde_json::to_value(api.get(name).await.ok()?).ok()?;
    ready_condition(object.get("status"))
}

async fn bundle(client: &Client, ns: &str) -> Option<Bundle> {
    let cm = Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get_opt("agentgate-bundle")
        .await
        .ok()??;
    serde_json::from_str(cm.data?.get("bundle.json")?).ok()
}

fn names<T>(entries: &[agentgate_crds::BundleEntry<T>]) -> Vec<String> {
    entries.iter().map(|e| e.name.clone()).collect()
}

#[tokio::test]
async fn reconcile_inject_and_run_the_injected_sidecar() {
    let cp = ControlPlane::shared();
    let client = cp.client().await;
    let system = cp.namespace(&client, "agentgate-system").await;
    let ns = cp.namespace(&client, "agents").await;
    cp.kubectl_output(&["label", "namespace", &ns, "agentgate.dev/injection=enabled"])
        .unwrap();

    let (operator, webhook_name, admin_port) = start_operator(cp, &client, &system, &ns).await;
    let log = || operator.log();
    let mwc: Api<k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration> =
        Api::all(client.clone());

    // --- reconcile: everything resolves ---------------------------------------------------
    let listen = free_port();
    let apply = |yaml: Value| {
        let out = cp
            .kubectl()
            .args(["apply", "-n", &ns, "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        out.stdin
            .as_ref()
            .unwrap()
            .write_all(yaml.to_string().as_bytes())
            .unwrap();
        let out = out.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    apply(
        json!({ "apiVersion": "v1", "kind": "Secret", "metadata": { "name": "orders-db-creds" },
        "stringData": { "username": "agent", "password": "s3cret-db-password" } }),
    );
    apply(
        json!({ "apiVersion": "v1", "kind": "Secret", "metadata": { "name": "api-token" }, "stringData": { "token": "t0ken-value" } }),
    );
    apply(
        json!({ "apiVersion": "agentgate.dev/v1alpha1", "kind": "Connection", "metadata": { "name": "orders-db" },
        "spec": { "protocol": "postgres", "upstream": { "address": "db.example:5432", "database": "orders" },
                  "credentials": { "secretRef": { "name": "orders-db-creds" } }, "listen": { "port": 15432 } } }),
    );
    apply(
        json!({ "apiVersion": "agentgate.dev/v1alpha1", "kind": "Connection", "metadata": { "name": "api" },
        "spec": { "protocol": "http", "upstream": { "address": "https://api.example" },
                  "credentials": { "secretRef": { "name": "api-token" } }, "listen": { "port": listen } } }),
    );
    apply(
        json!({ "apiVersion": "v1", "kind": "ServiceAccount", "metadata": { "name": "k8s-reader" } }),
    );
    apply(
        json!({ "apiVersion": "agentgate.dev/v1alpha1", "kind": "Connection", "metadata": { "name": "cluster" },
        "spec": { "protocol": "kubernetes", "upstream": { "address": "https://k8s.example" },
                  "credentials": { "serviceAccount": { "name": "k8s-reader" } }, "listen": { "port": 16443 } } }),
    );
    let reads = json!({ "apiVersion": "agentgate.dev/v1alpha1", "kind": "AgentAccessPolicy", "metadata": { "name": "reads" },
        "spec": { "agentSelector": { "matchLabels": { "agentgate.dev/agent": "claude" } }, "connections": ["api"],
                  "rules": [{ "name": "get", "match": { "http": { "methods": ["GET"] } }, "action": "allow" }] } });
    apply(reads.clone());
    apply(
        json!({ "apiVersion": "agentgate.dev/v1alpha1", "kind": "AgentAccessPolicy", "metadata": { "name": "db" },
        "spec": { "agentSelector": { "matchLabels": { "agentgate.dev/agent": "claude" } }, "connections": ["orders-db"] } }),
    );

    let connections: Api<Connection> = Api::namespaced(client.clone(), &ns);
    let policies: Api<AgentAccessPolicy> = Api::namespaced(client.clone(), &ns);
    for name in ["orders-db", "api", "cluster"] {
        let (status, ..) = wait_for("Connection Ready", log, async || {
            readiness(&connections, name)
                .await
                .filter(|r| r.0 == "True")
        })
        .await;
        assert_eq!(status, "True");
    }
    // A postgres Connection's status shows the search path its sessions are pinned to.
    let pg = connections.get_status("orders-db").await.unwrap();
    assert_eq!(pg.status.unwrap().search_path, ["public"]);
    let http = connections.get_status("api").await.unwrap();
    assert!(http.status.unwrap().search_path.is_empty());
    for name in ["reads", "db"] {
        wait_for("policy Ready", log, async || {
            readiness(&policies, name).await.filter(|r| r.0 == "True")
        })
        .await;
    }
    let b = wait_for("the bundle", log, async || {
        bundle(&client, &ns).await.filter(|b| b.policies.len() == 2)
    })
    .await;
    assert_eq!(names(&b.connections), ["api", "cluster", "orders-db"]);
    let token = Api::<Secret>::namespaced(client.clone(), &ns)
        .get("agentgate-sa-k8s-reader")
        .await
        .unwrap();
    assert_eq!(
        token.type_.as_deref(),
        Some("kubernetes.io/service-account-token")
    );
    assert_eq!(
        token
            .annotations()
            .get("kubernetes.io/service-account.name")
            .map(String::as_str),
        Some("k8s-reader")
    );
    let cm = Api::<ConfigMap>::namespaced(client.clone(), &ns)
        .get("agentgate-bundle")
        .await
        .unwrap();
    let text = serde_json::to_string(&cm).unwrap();
    assert!(
        !text.contains("s3cret-db-password") && !text.contains("t0ken-value"),
        "no secret value in the bundle"
    );
    assert_eq!(
        cm.owner_references().len(),
        5,
        "owned by every object it renders"
    );

    // --- a deleted Secret: not Ready with the reason; the other policy stays ------------------
    Api::<Secret>::namespaced(client.clone(), &ns)
        .delete("orders-db-creds", &DeleteParams::default())
        .await
        .unwrap();
    let (_, reason, message) = wait_for("orders-db not Ready", log, async || {
        readiness(&connections, "orders-db")
            .await
            .filter(|r| r.0 == "False")
    })
    .await;
    assert_eq!(
        (reason.as_str(), message.as_str()),
        (
            "SecretMissing",
            "Secret orders-db-creds (credentials.secretRef) does not exist"
        )
    );
    let (_, reason, message) = wait_for("db not Ready", log, async || {
        readiness(&policies, "db").await.filter(|r| r.0 == "False")
    })
    .await;
    assert_eq!(reason, "ConnectionNotReady");
    assert!(
        message.contains("Connection orders-db is not Ready: Secret orders-db-creds"),
        "{message}"
    );
    let b = wait_for("the bundle without db", log, async || {
        bundle(&client, &ns).await.filter(|b| b.policies.len() == 1)
    })
    .await;
    assert_eq!(names(&b.policies), ["reads"]);
    assert_eq!(names(&b.connections), ["api", "cluster"]);
    let events = cp
        .kubectl_output(&[
            "get",
            "events",
            "-n",
            &ns,
            "--field-selector",
            "involvedObject.name=orders-db",
            "-o",
            "json",
        ])
        .unwrap();
    assert!(
        events.contains("SecretMissing"),
        "an Event says why: {events}"
    );

    // --- a broken rule names the rule -------------------------------------------------------
    let mut broken = reads.clone();
    broken["spec"]["rules"][0]["when"] = json!("request.identity.groups.exists(g,");
    apply(broken);
    let (_, reason, message) = wait_for("reads not Ready", log, async || {
        readiness(&policies, "reads")
            .await
            .filter(|r| r.0 == "False")
    })
    .await;
    assert_eq!(reason, "Invalid");
    assert!(
        message.contains("AgentAccessPolicy/reads, rule get: when is not valid CEL"),
        "{message}"
    );

    // --- fixed: Ready again -----------------------------------------------------------------
    apply(reads);
    apply(
        json!({ "apiVersion": "v1", "kind": "Secret", "metadata": { "name": "orders-db-creds" },
        "stringData": { "username": "agent", "password": "s3cret-db-password" } }),
    );
    wait_for("everything Ready again", log, async || {
        bundle(&client, &ns).await.filter(|b| b.policies.len() == 2)
    })
    .await;
    let p = policies.get("db").await.unwrap();
    assert_eq!(
        p.status.as_ref().and_then(|s| s.observed_generation),
        p.metadata.generation
    );

    // --- the real API server calls the real webhook ------------------------------------------
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pod = |name: &str, annotations: Value| -> Pod {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": name, "labels": { "agentgate.dev/agent": "claude" }, "annotations": annotations },
            "spec": { "containers": [{ "name": "agent", "image": "agent:1" }] }
        }))
        .unwrap()
    };
    let plain = pods
        .create(&PostParams::default(), &pod("plain", json!({})))
        .await
        .unwrap();
    assert!(
        plain.spec.as_ref().unwrap().init_containers.is_none(),
        "a pod that did not opt in is untouched"
    );
    let injected = pods
        .create(
            &PostParams::default(),
            &pod("claude-0", json!({ "agentgate.dev/inject": "enabled" })),
        )
        .await
        .unwrap();
    let spec = injected.spec.clone().unwrap();
    let sidecar = spec
        .init_containers
        .clone()
        .unwrap()
        .into_iter()
        .next()
        .unwrap();
    assert_eq!(sidecar.name, "agentgate-sidecar");
    assert_eq!(sidecar.image.as_deref(), Some("agentgate-sidecar:test"));
    assert_eq!(spec.automount_service_account_token, Some(false));
    let env: BTreeMap<String, String> = spec.containers[0]
        .env
        .iter()
        .flatten()
        .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
        .collect();
    assert_eq!(env.get("PGPORT").map(String::as_str), Some("15432"));
    assert_eq!(
        env.get("AGENTGATE_API_URL"),
        Some(&format!("http://127.0.0.1:{listen}"))
    );

    // --- the admitted pod's sidecar, run as a local process -----------------------------------
    let run = tempfile::tempdir().unwrap();
    let sidecar_process = start_sidecar(&client, &injected, &sidecar, run.path()).await;
    let admin = sidecar_process.1;
    wait_for(
        "the injected sidecar to be ready",
        || sidecar_process.0.log(),
        async || (http_get(admin, "/readyz").await?.0 == 200).then_some(()),
    )
    .await;
    // It serves the api connection on the port the Connection names, deciding by policy.
    let (status, body) = http_get(listen, "/").await.unwrap();
    assert_eq!(
        status, 502,
        "allowed by rule get, but api.example is unreachable here: {body}"
    );
    assert!(body.contains("agentgate_error"), "{body}");

    let (_, metrics) = http_get(admin_port, "/metrics").await.unwrap();
    assert!(
        metrics.contains(
            "agentgate_operator_admissions_total{outcome=\"injected\",webhook=\"pods\"} 1"
        ),
        "{metrics}"
    );
    let lease = cp
        .kubectl_output(&[
            "get",
            "lease",
            "agentgate-operator",
            "-n",
            &system,
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ])
        .unwrap();
    assert_eq!(lease, "operator-0");

    mwc.delete(&webhook_name, &DeleteParams::default())
        .await
        .unwrap();
    drop(operator);
}

/// Runs a Pod's sidecar container locally: each volume materialized from the API
/// server's objects into `root`, mount paths and the admin port rewritten.
async fn start_sidecar(
    client: &Client,
    pod: &Pod,
    container: &k8s_openapi::api::core::v1::Container,
    root: &Path,
) -> (Process, u16) {
    let ns = pod.namespace().unwrap();
    let spec = pod.spec.as_ref().unwrap();
    let mut rewrites = Vec::new();
    for mount in container.volume_mounts.iter().flatten() {
        let local = root.join(mount.mount_path.trim_start_matches('/'));
        std::fs::create_dir_all(&local).unwrap();
        let volume = spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == mount.name)
            .unwrap();
        if let Some(cm) = &volume.config_map
            && let Some(found) = Api::<ConfigMap>::namespaced(client.clone(), &ns)
                .get_opt(&cm.name)
                .await
                .unwrap()
        {
            for item in cm.items.iter().flatten() {
                if let Some(data) = found.data.as_ref().and_then(|d| d.get(&item.key)) {
                    std::fs::write(local.join(&item.path), data).unwrap();
                }
            }
        }
        if let Some(secret) = &volume.secret {
            let found = Api::<Secret>::namespaced(client.clone(), &ns)
                .get(secret.secret_name.as_deref().unwrap())
                .await
                .unwrap();
            for (key, value) in found.data.unwrap_or_default() {
                std::fs::write(local.join(key), value.0).unwrap();
            }
        }
        if let Some(downward) = &volume.downward_api {
            for item in downward.items.iter().flatten() {
                if item.field_ref.as_ref().map(|f| f.field_path.as_str()) == Some("metadata.labels")
                {
                    let labels: String = pod
                        .labels()
                        .iter()
                        .map(|(k, v)| format!("{k}={v:?}\n"))
                        .collect();
                    std::fs::write(local.join(&item.path), labels).unwrap();
                }
            }
        }
        rewrites.push((mount.mount_path.clone(), local.display().to_string()));
    }
    let admin = free_port();
    let args: Vec<String> = container
        .args
        .iter()
        .flatten()
        .map(|a| {
            let a = rewrites
                .iter()
                .fold(a.clone(), |a, (from, to)| a.replace(from.as_str(), to));
            if a.starts_with("--admin-addr=") {
                format!("--admin-addr=127.0.0.1:{admin}")
            } else {
                a
            }
        })
        .collect();
    let mut cmd = Command::new(sidecar_binary());
    cmd.args(&args);
    for var in container.env.iter().flatten() {
        let value = match var
            .value_from
            .as_ref()
            .and_then(|f| f.field_ref.as_ref())
            .map(|f| f.field_path.as_str())
        {
            Some("metadata.name") => pod.name_any(),
            Some("metadata.namespace") => ns.clone(),
            _ => var.value.clone().unwrap_or_default(),
        };
        cmd.env(&var.name, value);
    }
    let log = root.join("sidecar.log");
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
        .spawn()
        .unwrap();
    (Process(child, log), admin)
}
