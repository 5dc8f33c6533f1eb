use std::collections::{BTreeMap, BTreeSet};

use agentgate_crds::{AgentAccessPolicy, Connection};
use serde_json::{Value, json};

use super::*;

fn connection(name: &str, spec: Value) -> Connection {
    let mut c = Connection::new(name, serde_json::from_value(spec).expect("valid spec"));
    c.metadata.generation = Some(2);
    c
}

fn policy(name: &str, spec: Value) -> AgentAccessPolicy {
    let mut p = AgentAccessPolicy::new(name, serde_json::from_value(spec).expect("valid spec"));
    p.metadata.generation = Some(3);
    p
}

fn objects() -> NamespaceObjects {
    NamespaceObjects {
        namespace: "agents".into(),
        connections: vec![
            connection(
                "orders-db",
                json!({ "protocol": "postgres", "upstream": { "address": "db:5432", "database": "orders" },
                "credentials": { "secretRef": { "name": "db-creds" } }, "listen": { "port": 15432 } }),
            ),
            connection(
                "prod-cluster",
                json!({ "protocol": "kubernetes", "upstream": { "address": "https://k8s" },
                "credentials": { "serviceAccount": { "name": "reader" } }, "listen": { "port": 16443 } }),
            ),
        ],
        policies: vec![
            policy(
                "reads",
                json!({ "agentSelector": { "matchLabels": { "agent": "claude" } }, "connections": ["orders-db"],
                "rules": [{ "name": "r", "match": { "sql": { "statements": ["select"] } }, "action": "allow" }] }),
            ),
            policy(
                "cluster",
                json!({ "agentSelector": {}, "connections": ["prod-cluster"] }),
            ),
        ],
        secrets: BTreeMap::from([(
            "db-creds".into(),
            BTreeSet::from(["username".into(), "password".into()]),
        )]),
        service_accounts: BTreeSet::from(["reader".into()]),
        pods: vec![
            BTreeMap::from([("agent".into(), "claude".into())]),
            BTreeMap::new(),
        ],
    }
}

fn reason(r: &Readiness) -> Option<&str> {
    r.ready.as_ref().err().map(|(reason, _)| reason.as_str())
}

#[test]
fn everything_resolved_is_ready_and_bundled() {
    let planned = plan(&objects());
    let plan = planned;
    assert!(
        plan.connections.iter().all(|c| c.ready.is_ok()),
        "{:?}",
        plan.connections
    );
    assert!(
        plan.policies.iter().all(|p| p.readiness.ready.is_ok()),
        "{:?}",
        plan.policies
    );
    let reads = plan
        .policies
        .iter()
        .find(|p| p.readiness.name == "reads")
        .expect("reads");
    assert_eq!((reads.connections_resolved, reads.agents_matched), (1, 1));
    let cluster = plan
        .policies
        .iter()
        .find(|p| p.readiness.name == "cluster")
        .expect("cluster");
    assert_eq!(
        cluster.agents_matched, 2,
        "an empty selector selects every pod"
    );
    assert_eq!(plan.bundle.connections.len(), 2);
    assert_eq!(plan.bundle.policies.len(), 2);
    assert_eq!(plan.bundle.hash, bundle_hash(&plan.bundle));
    let kubeconfig = plan.kubeconfig.expect("a kubernetes connection");
    assert!(
        kubeconfig.contains("server: http://127.0.0.1:16443"),
        "{kubeconfig}"
    );
}

#[test]
fn a_missing_secret_key_makes_the_connection_and_its_policy_not_ready() {
    let mut objects = objects();
    objects
        .secrets
        .insert("db-creds".into(), BTreeSet::from(["username".into()]));
    let first = plan(&objects);
    let db = first
        .connections
        .iter()
        .find(|c| c.name == "orders-db")
        .expect("orders-db");
    assert_eq!(
        db.ready,
        Err((
            "SecretKeyMissing".into(),
            "Secret db-creds has no key password".into()
        ))
    );
    let reads = first
        .policies
        .iter()
        .find(|p| p.readiness.name == "reads")
        .expect("reads");
    assert_eq!(reason(&reads.readiness), Some("ConnectionNotReady"));
    assert!(
        reads
            .readiness
            .ready
            .as_ref()
            .unwrap_err()
            .1
            .contains("Secret db-creds has no key password")
    );
    // The other policy and connection stay in the bundle.
    assert_eq!(
        first
            .bundle
            .policies
            .iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>(),
        ["cluster"]
    );
    assert_eq!(
        first
            .bundle
            .connections
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>(),
        ["prod-cluster"]
    );

    objects.secrets.clear();
    objects.service_accounts.clear();
    let second = plan(&objects);
    assert_eq!(reason(&second.connections[0]), Some("SecretMissing"));
    assert_eq!(
        reason(&second.connections[1]),
        Some("ServiceAccountMissing")
    );
    assert!(second.bundle.policies.is_empty());
}

#[test]
fn a_broken_rule_is_named_and_a_port_clash_is_caught() {
    let mut objects = objects();
    objects.policies.push(policy("broken", json!({ "agentSelector": {}, "connections": ["orders-db"],
        "rules": [{ "name": "bad-cel", "when": "request.identity.groups.exists(g,", "action": "allow" }] })));
    objects.policies.push(policy(
        "ghost",
        json!({ "agentSelector": {}, "connections": ["payments-db"] }),
    ));
    objects.connections.push(connection(
        "zz-clash",
        json!({ "protocol": "http", "upstream": { "address": "https://x" },
        "credentials": { "serviceAccount": { "name": "reader" } }, "listen": { "port": 15432 } }),
    ));
    let planned = plan(&objects);
    let broken = planned
        .policies
        .iter()
        .find(|p| p.readiness.name == "broken")
        .expect("broken");
    let (why, message) = broken.readiness.ready.clone().unwrap_err();
    assert_eq!(why, "Invalid");
    assert!(
        message.contains("AgentAccessPolicy/broken, rule bad-cel: when is not valid CEL"),
        "{message}"
    );
    let ghost = planned
        .policies
        .iter()
        .find(|p| p.readiness.name == "ghost")
        .expect("ghost");
    assert_eq!(
        ghost.readiness.ready,
        Err((
            "ConnectionMissing".into(),
            "Connection payments-db does not exist".into()
        ))
    );
    let clash = planned
        .connections
        .iter()
        .find(|c| c.name == "zz-clash")
        .expect("clash");
    assert_eq!(
        clash.ready,
        Err((
            "PortConflict".into(),
            "listen.port 15432 is already used by Connection orders-db".into()
        ))
    );
    assert_eq!(planned.bundle.policies.len(), 2, "the good policies stay");
}
