use std::path::PathBuf;

use agentgate_crds::{Bundle, BundleEntry};
use serde_json::{Value, json};

use super::*;

fn bundle() -> Bundle {
    let conn = |name: &str, spec: Value| BundleEntry {
        name: name.into(),
        generation: 1,
        spec: serde_json::from_value(spec).expect("valid connection"),
    };
    Bundle {
        namespace: "agents".into(),
        hash: "h".into(),
        connections: vec![
            conn(
                "orders-db",
                json!({ "protocol": "postgres", "upstream": { "address": "db:5432", "database": "orders",
                "tls": { "caSecretRef": { "name": "orders-ca", "key": "ca.crt" } } },
                "credentials": { "secretRef": { "name": "orders-db-creds" } }, "listen": { "port": 15432 } }),
            ),
            conn(
                "prod-cluster",
                json!({ "protocol": "kubernetes", "upstream": { "address": "https://k8s" },
                "credentials": { "serviceAccount": { "name": "reader" } }, "listen": { "port": 16443 } }),
            ),
            conn(
                "arm",
                json!({ "protocol": "http", "upstream": { "address": "https://management.azure.com" },
                "credentials": { "secretRef": { "name": "arm-token" } }, "listen": { "port": 18080 } }),
            ),
            conn(
                "unused",
                json!({ "protocol": "http", "upstream": { "address": "https://other" },
                "credentials": { "secretRef": { "name": "other-token" } }, "listen": { "port": 18081 } }),
            ),
        ],
        policies: vec![BundleEntry {
            name: "prod-agents".into(),
            generation: 1,
            spec: serde_json::from_value(json!({
                "agentSelector": { "matchLabels": { "agentgate.dev/agent": "claude" } },
                "connections": ["orders-db", "prod-cluster", "arm"]
            }))
            .expect("valid policy"),
        }],
    }
}

fn pod(labels: Value, annotations: Value, env: Value) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": "claude-7f9c", "namespace": "agents", "labels": labels, "annotations": annotations },
        "spec": { "serviceAccountName": "claude", "containers": [{ "name": "agent", "image": "agent:1", "env": env }] }
    }))
    .expect("valid pod")
}

fn config() -> InjectConfig {
    InjectConfig::new("ghcr.io/agentgate-dev/sidecar:0.1.0", "agentgate")
}

/// Compares with `testdata/<name>.json`; `UPDATE_GOLDEN=1` rewrites it.
fn golden(name: &str, actual: &Value) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("src/inject/testdata")
        .join(format!("{name}.json"));
    let text = serde_json::to_string_pretty(actual).expect("serializes") + "\n";
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &text).expect("writable testdata");
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        expected == text,
        "{} differs (UPDATE_GOLDEN=1 to accept):\n{text}",
        path.display()
    );
}

fn patch_of(injection: &Injection) -> (&json_patch::Patch, &[String], &[String]) {
    match injection {
        Injection::Patch {
            patch,
            warnings,
            connections,
        } => (patch, warnings, connections),
        Injection::Skip { reason } => panic!("skipped: {reason}"),
    }
}

fn apply(pod: &Pod, patch: &json_patch::Patch) -> Pod {
    let mut doc = serde_json::to_value(pod).expect("serializes");
    json_patch::patch(&mut doc, patch).expect("patch applies");
    serde_json::from_value(doc).expect("still a pod")
}

#[test]
fn an_opted_in_pod_gets_the_sidecar_its_secrets_and_env() {
    let pod = pod(
        json!({ "agentgate.dev/agent": "claude", INJECT_KEY: "enabled" }),
        json!({}),
        json!([]),
    );
    let injection = inject(&pod, Some(&bundle()), &config()).expect("injects");
    let (patch, warnings, connections) = patch_of(&injection);
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(connections, ["orders-db", "prod-cluster", "arm"]);
    golden("full", &serde_json::to_value(patch).expect("serializes"));

    let injected = apply(&pod, patch);
    let spec = injected.spec.as_ref().expect("spec");
    assert_eq!(spec.automount_service_account_token, Some(false));
    let sidecar = &spec.init_containers.as_ref().expect("init containers")[0];
    assert_eq!(sidecar.name, SIDECAR_NAME);
    assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"));
    let sc = sidecar.security_context.as_ref().expect("security context");
    assert_eq!(
        (
            sc.run_as_non_root,
            sc.read_only_root_filesystem,
            sc.allow_privilege_escalation
        ),
        (Some(true), Some(true), Some(false))
    );
    // Secrets are mounted into the sidecar only, and only those of the pod's connections.
    let secret_names: Vec<String> = spec
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| v.secret.as_ref()?.secret_name.clone())
        .collect();
    assert_eq!(
        secret_names,
        [
            "agentgate-sa-reader",
            "arm-token",
            "orders-ca",
            "orders-db-creds"
        ]
    );
    let agent = &spec.containers[0];
    let agent_mounts: Vec<&str> = agent
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| m.name.as_str())
        .collect();
    assert_eq!(
        agent_mounts,
        ["agentgate-kubeconfig"],
        "the agent gets its kubeconfig and no secret"
    );
    let env: Vec<(String, String)> = agent
        .env
        .iter()
        .flatten()
        .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
        .collect();
    for (name, value) in [
        ("PGHOST", "127.0.0.1"),
        ("PGPORT", "15432"),
        ("PGDATABASE", "orders"),
        ("PGSSLMODE", "disable"),
        ("KUBECONFIG", "/etc/agentgate/kubeconfig/kubeconfig"),
        ("AGENTGATE_ARM_URL", "http://127.0.0.1:18080"),
        ("AGENTGATE_PROD_CLUSTER_URL", "http://127.0.0.1:16443"),
    ] {
        assert!(
            env.contains(&(name.to_owned(), value.to_owned())),
            "{name}={value} missing: {env:?}"
        );
    }

    // Injecting again changes nothing.
    assert_eq!(
        inject(&injected, Some(&bundle()), &config()).expect("decides"),
        Injection::Skip {
            reason: "already injected".into()
        }
    );
}

#[test]
fn a_pod_no_policy_selects_gets_a_deny_all_sidecar() {
    let pod = pod(
        json!({ "app": "other" }),
        json!({ INJECT_KEY: "enabled" }),
        json!([]),
    );
    for bundle in [Some(bundle()), None] {
        let injection = inject(&pod, bundle.as_ref(), &config()).expect("injects");
        let (patch, warnings, connections) = patch_of(&injection);
        assert!(connections.is_empty());
        assert!(warnings[0].contains("denies every request"), "{warnings:?}");
        golden(
            "deny-all",
            &serde_json::to_value(patch).expect("serializes"),
        );
    }
}

#[test]
fn user_env_is_not_clobbered() {
    let pod = pod(
        json!({ "agentgate.dev/agent": "claude", INJECT_KEY: "enabled" }),
        json!({}),
        json!([{ "name": "PGHOST", "value": "db.local" }]),
    );
    let injection = inject(&pod, Some(&bundle()), &config()).expect("injects");
    let (patch, warnings, _) = patch_of(&injection);
    assert_eq!(
        warnings,
        ["container agent: PGHOST is set by the pod and was not overridden"]
    );
    let injected = apply(&pod, patch);
    let env = injected.spec.expect("spec").containers[0]
        .env
        .clone()
        .expect("env");
    assert_eq!(env.iter().filter(|e| e.name == "PGHOST").count(), 1);
    assert_eq!(env[0].value.as_deref(), Some("db.local"));
}

#[test]
fn pods_that_did_not_opt_in_are_left_alone() {
    for (labels, annotations) in [
        (json!({}), json!({})),
        (json!({ INJECT_KEY: "disabled" }), json!({})),
        (
            json!({ "agentgate.dev/agent": "claude" }),
            json!({ "other": "enabled" }),
        ),
    ] {
        let pod = pod(labels, annotations, json!([]));
        assert!(matches!(
            inject(&pod, Some(&bundle()), &config()),
            Ok(Injection::Skip { .. })
        ));
    }
}
