//! The CRDs against a real kube-apiserver: valid objects of every kind are stored and read
//! back, invalid ones are refused by the API server with the message of the CEL rule (or
//! schema constraint) that guards them, the status subresource works, and kubectl shows
//! the printer columns and descriptions.

use agentgate_crds::*;
use agentgate_e2e::ControlPlane;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, Time};
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams};
use kube::{Api, Client, Resource};
use serde_json::{Value, json};

fn dynamic_api(client: &Client, ns: &str, kind: &str) -> Api<DynamicObject> {
    let plural = match kind {
        "Connection" => "connections",
        "AgentAccessPolicy" => "agentaccesspolicies",
        "Approval" => "approvals",
        "AgentSession" => "agentsessions",
        other => panic!("not an agentgate kind: {other}"),
    };
    let ar =
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(GROUP, VERSION, kind), plural);
    Api::namespaced_with(client.clone(), ns, &ar)
}

fn object(kind: &str, name: &str, spec: Value) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": format!("{GROUP}/{VERSION}"),
        "kind": kind,
        "metadata": { "name": name },
        "spec": spec,
    }))
    .expect("a well-formed object")
}

/// The API server's refusal message, or a panic saying the object was accepted.
fn refusal<T: std::fmt::Debug>(result: Result<T, kube::Error>) -> String {
    match result {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 422, "expected 422 Invalid, got {status:?}");
            status.message
        }
        other => panic!("expected the API server to refuse the object, got {other:?}"),
    }
}

fn postgres_spec() -> Value {
    json!({
        "protocol": "postgres",
        "upstream": { "address": "orders.example:5432", "database": "orders" },
        "credentials": { "secretRef": { "name": "orders-db-creds" } },
        "listen": { "port": 15432 }
    })
}

fn policy_spec() -> Value {
    json!({
        "agentSelector": { "matchLabels": { "agentgate.dev/agent": "claude" } },
        "connections": ["orders-db"],
        "rules": [
            { "name": "read", "match": { "sql": { "statements": ["select"] } }, "action": "allow" },
            { "name": "write", "match": { "sql": { "statements": ["delete"] } }, "action": "approve",
              "approval": { "approvers": { "groups": ["dba-oncall"] } } }
        ]
    })
}

fn approval_spec() -> Value {
    json!({
        "connection": "orders-db",
        "policy": "prod-agents",
        "rule": "writes-need-a-dba",
        "agent": { "pod": "claude-7f9c", "serviceAccount": "claude", "namespace": "agents" },
        "requester": { "subject": "u-123", "email": "dev@example.com", "groups": ["developers"] },
        "request": {
            "protocol": "postgres",
            "summary": "DELETE FROM orders WHERE id = 42",
            "fingerprint": "4f1c0a",
            "classification": { "statements": ["delete"], "tables": ["public.orders"] }
        },
        "approvers": { "groups": ["dba-oncall"] },
        "expiresAt": "2030-01-01T00:00:00Z"
    })
}

fn session_spec() -> Value {
    json!({
        "agent": { "pod": "claude-7f9c", "namespace": "agents" },
        "identity": { "subject": "u-123", "groups": ["developers"] }
    })
}

/// `base` with the JSON merge patch `change` applied (null removes a field).
fn with(mut base: Value, change: Value) -> Value {
    fn merge(target: &mut Value, patch: Value) {
        match (target, patch) {
            (Value::Object(t), Value::Object(p)) => {
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(&k);
                    } else {
                        merge(t.entry(k).or_insert(Value::Null), v);
                    }
                }
            }
            (t, p) => *t = p,
        }
    }
    merge(&mut base, change);
    base
}

#[tokio::test]
async fn valid_objects_of_every_kind_are_stored_and_read_back() {
    let cp = ControlPlane::shared();
    let client = cp.client().await;
    let ns = cp.namespace(&client, "valid").await;

    let conn_spec = ConnectionSpec {
        protocol: Protocol::Postgres,
        upstream: Upstream {
            address: "orders.example:5432".into(),
            database: Some("orders".into()),
            tls: Some(UpstreamTls {
                mode: TlsMode::VerifyFull,
                ca_secret_ref: Some(SecretKeyRef {
                    name: "orders-ca".into(),
                    key: "ca.crt".into(),
                }),
                server_name: Some("orders.example".into()),
            }),
            search_path: vec!["sales".into(), "public".into()],
        },
        credentials: Credentials {
            secret_ref: Some(SecretRef {
                name: "orders-db-creds".into(),
            }),
            azure_workload_identity: None,
            service_account: None,
        },
        listen: Listen { port: 15432 },
    };
    let conns: Api<Connection> = Api::namespaced(client.clone(), &ns);
    conns
        .create(
            &PostParams::default(),
            &Connection::new("orders-db", conn_spec.clone()),
        )
        .await
        .expect("valid Connection");
    assert_eq!(
        conns.get("orders-db").await.expect("read back").spec,
        conn_spec
    );

    let example: AgentAccessPolicy = serde_norway::from_str(
        &std::fs::read_to_string(
            agentgate_e2e::repo_root().join("examples/prod-agents-policy.yaml"),
        )
        .expect("example"),
    )
    .expect("the example policy parses");
    let policies: Api<AgentAccessPolicy> = Api::namespaced(client.clone(), &ns);
    policies
        .create(
            &PostParams::default(),
            &AgentAccessPolicy::new("prod-agents", example.spec.clone()),
        )
        .await
        .expect("the example policy is valid");
    let stored = policies.get("prod-agents").await.expect("read back");
    assert_eq!(stored.spec, example.spec);
    assert_eq!(stored.spec.rules.len(), 5);

    let approval: ApprovalSpec = serde_json::from_value(approval_spec()).expect("typed approval");
    let approvals: Api<Approval> = Api::namespaced(client.clone(), &ns);
    approvals
        .create(
            &PostParams::default(),
            &Approval::new("apr-x7k2", approval.clone()),
        )
        .await
        .expect("valid Approval");
    assert_eq!(
        approvals.get("apr-x7k2").await.expect("read back").spec,
        approval
    );

    let session = AgentSessionSpec {
        agent: AgentRef {
            pod: "claude-7f9c".into(),
            service_account: Some("claude".into()),
            namespace: ns.clone(),
        },
        identity: Some(RequesterIdentity {
            subject: "u-123".into(),
            issuer: Some("https://issuer.example".into()),
            email: None,
            groups: vec!["developers".into()],
        }),
    };
    let sessions: Api<AgentSession> = Api::namespaced(client.clone(), &ns);
    sessions
        .create(
            &PostParams::default(),
            &AgentSession::new("claude-7f9c-u-123", session.clone()),
        )
        .await
        .expect("valid AgentSession");
    assert_eq!(
        sessions
            .get("claude-7f9c-u-123")
            .await
            .expect("read back")
            .spec,
        session
    );
}

#[tokio::test]
async fn the_api_server_fills_in_fail_closed_defaults() {
    let cp = ControlPlane::shared();
    let client = cp.client().await;
    let ns = cp.namespace(&client, "defaults").await;
    let spec = json!({
        "agentSelector": {},
        "connections": ["orders-db"],
        "identity": { "issuer": "https://issuer.example", "audiences": ["agentgate"] },
        "rules": [{ "name": "w", "action": "approve", "approval": { "approvers": { "groups": ["dba"] } } }]
    });
    let api = dynamic_api(&client, &ns, "AgentAccessPolicy");
    api.create(
        &PostParams::default(),
        &object("AgentAccessPolicy", "minimal", spec),
    )
    .await
    .expect("minimal policy");
    let stored = api.get("minimal").await.expect("read back");
    let spec = &stored.data["spec"];
    assert_eq!(spec["defaultAction"], "deny");
    assert_eq!(spec["identity"]["required"], true);
    assert_eq!(spec["identity"]["groupsClaim"], "groups");
    assert_eq!(
        spec["rules"][0]["approval"],
        json!({
            "approvers": { "groups": ["dba"] }, "timeout": "10m", "mode": "hold", "grant": "once"
        })
    );
}

/// Each case: a kind, a spec the API server must refuse, and what its message must say.
fn invalid_creations() -> Vec<(&'static str, Value, &'static str)> {
    let pg = postgres_spec;
    let policy = policy_spec;
    vec![
        // Connection
        (
            "Connection",
            with(pg(), json!({ "upstream": { "database": null } })),
            "a postgres Connection needs spec.upstream.database",
        ),
        (
            "Connection",
            with(
                pg(),
                json!({ "upstream": { "address": "postgres://orders:5432" } }),
            ),
            "spec.upstream.address is host:port, not a URL",
        ),
        (
            "Connection",
            with(
                pg(),
                json!({ "protocol": "http", "upstream": { "address": "management.azure.com:443", "database": null } }),
            ),
            "an http or kubernetes Connection's spec.upstream.address is a URL",
        ),
        (
            "Connection",
            with(
                pg(),
                json!({ "protocol": "http", "upstream": { "address": "https://api.example" } }),
            ),
            "spec.upstream.database is only for postgres Connections",
        ),
        (
            "Connection",
            with(
                pg(),
                json!({ "protocol": "http", "upstream": { "address": "https://api.example", "database": null, "searchPath": ["public"] } }),
            ),
            "spec.upstream.searchPath is only for postgres Connections",
        ),
        (
            "Connection",
            with(
                pg(),
                json!({ "upstream": { "searchPath": ["public", "pg_temp"] } }),
            ),
            "spec.upstream.searchPath names plain schemas",
        ),
        (
            "Connection",
            with(
                pg(),
                json!({ "credentials": { "secretRef": null, "serviceAccount": { "name": "reader" } } }),
            ),
            "credentials.serviceAccount is only for kubernetes Connections",
        ),
        (
            "Connection",
            with(
                pg(),
                json!({ "protocol": "kubernetes", "upstream": { "address": "https://k8s.example", "database": null },
            "credentials": { "secretRef": null, "azureWorkloadIdentity": { "clientId": "c", "tenantId": "t", "scope": "s" } } }),
            ),
            "credentials.azureWorkloadIdentity is for postgres and http Connections",
        ),
        (
            "Connection",
            with(
                pg(),
                json!({ "upstream": { "tls": { "mode": "disable", "caSecretRef": { "name": "ca", "key": "ca.crt" } } } }),
            ),
            "tls.caSecretRef and tls.serverName need tls.mode require or verify-full",
        ),
        (
            "Connection",
            with(pg(), json!({ "credentials": { "secretRef": null } })),
            "set exactly one of credentials.secretRef, credentials.azureWorkloadIdentity, credentials.serviceAccount",
        ),
        (
            "Connection",
            with(
                pg(),
                json!({ "credentials": { "serviceAccount": { "name": "reader" } } }),
            ),
            "set exactly one of credentials.secretRef",
        ),
        (
            "Connection",
            with(pg(), json!({ "listen": { "port": 15020 } })),
            "listen.port 15020 is reserved for the sidecar's admin server",
        ),
        (
            "Connection",
            with(pg(), json!({ "listen": { "port": 80 } })),
            "should be greater than or equal to 1024",
        ),
        (
            "Connection",
            with(pg(), json!({ "protocol": "mysql" })),
            "Unsupported value: \"mysql\"",
        ),
        // AgentAccessPolicy
        (
            "AgentAccessPolicy",
            with(
                policy(),
                json!({ "rules": [
            { "name": "same", "action": "allow" }, { "name": "same", "action": "deny" }] }),
            ),
            "rule names must be unique within a policy",
        ),
        (
            "AgentAccessPolicy",
            with(
                policy(),
                json!({ "rules": [
            { "name": "other-db", "match": { "connections": ["payments-db"] }, "action": "allow" }] }),
            ),
            "a rule's match.connections may only name Connections listed in spec.connections",
        ),
        (
            "AgentAccessPolicy",
            with(policy(), json!({ "defaultAction": "approve" })),
            "defaultAction approve needs spec.defaultApproval",
        ),
        (
            "AgentAccessPolicy",
            with(
                policy(),
                json!({ "identity": { "issuer": "http://login.example", "audiences": ["a"] } }),
            ),
            "identity.issuer must be an https:// URL",
        ),
        (
            "AgentAccessPolicy",
            with(
                policy(),
                json!({ "identity": { "issuer": "https://login.example", "audiences": [] } }),
            ),
            "should have at least 1 items",
        ),
        (
            "AgentAccessPolicy",
            with(
                policy(),
                json!({ "rules": [{ "name": "writes", "action": "approve" }] }),
            ),
            "a rule with action approve needs approval settings",
        ),
        (
            "AgentAccessPolicy",
            with(
                policy(),
                json!({ "rules": [
            { "name": "reads", "action": "allow", "approval": { "approvers": { "groups": ["dba"] } } }] }),
            ),
            "approval settings are only allowed on a rule with action approve",
        ),
        (
            "AgentAccessPolicy",
            with(
                policy(),
                json!({ "rules": [
            { "name": "mixed", "match": { "sql": {}, "http": { "methods": ["GET"] } }, "action": "allow" }] }),
            ),
            "a rule's match may hold at most one of sql, kubernetes, http",
        ),
        (
            "AgentAccessPolicy",
            with(
                policy(),
                json!({ "rules": [
            { "name": "slow", "action": "approve", "approval": { "approvers": { "groups": ["dba"] }, "timeout": "48h" } }] }),
            ),
            "approval.timeout must be more than 0s and at most 24h",
        ),
        (
            "AgentAccessPolicy",
            with(
                policy(),
                json!({ "rules": [
            { "name": "never", "action": "approve", "approval": { "approvers": { "groups": ["dba"] }, "timeout": "0s" } }] }),
            ),
            "approval.timeout must be more than 0s and at most 24h",
        ),
        (
            "AgentAccessPolicy",
            with(
                policy(),
                json!({ "rules": [{ "name": "Read Orders", "action": "allow" }] }),
            ),
            "should match '^[a-z0-9]([-a-z0-9]*[a-z0-9])?$'",
        ),
        (
            "AgentAccessPolicy",
            with(
                policy(),
                json!({ "rules": [
            { "name": "arm", "match": { "http": { "paths": ["subscriptions/*"] } }, "action": "allow" }] }),
            ),
            "should match '^/'",
        ),
        (
            "AgentAccessPolicy",
            with(
                policy(),
                json!({ "masking": { "jsonPaths": ["password"] } }),
            ),
            "should match '^\\$'",
        ),
        (
            "AgentAccessPolicy",
            with(policy(), json!({ "connections": [] })),
            "should have at least 1 items",
        ),
        // Approval
        (
            "Approval",
            with(
                approval_spec(),
                json!({ "decidedBy": "mallory@example.com" }),
            ),
            "spec.decidedBy is only set together with spec.decision",
        ),
        (
            "Approval",
            with(approval_spec(), json!({ "decision": "Maybe" })),
            "Unsupported value: \"Maybe\"",
        ),
    ]
}

#[tokio::test]
async fn invalid_objects_are_refused_with_the_rule_message() {
    let cp = ControlPlane::shared();
    let client = cp.client().await;
    let ns = cp.namespace(&client, "invalid").await;
    let mut failures = Vec::new();
    for (i, (kind, spec, expected)) in invalid_creations().into_iter().enumerate() {
        let api = dynamic_api(&client, &ns, kind);
        let message = refusal(
            api.create(
                &PostParams::default(),
                &object(kind, &format!("case-{i}"), spec.clone()),
            )
            .await,
        );
        if !message.contains(expected) {
            failures.push(format!(
                "case {i} ({kind} {spec}):\n  expected: {expected}\n  got: {message}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

async fn merge_patch(
    api: &Api<DynamicObject>,
    name: &str,
    patch: Value,
) -> Result<DynamicObject, kube::Error> {
    api.patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
}

#[tokio::test]
async fn a_decision_is_final() {
    let cp = ControlPlane::shared();
    let client = cp.client().await;
    let ns = cp.namespace(&client, "decision").await;
    let api = dynamic_api(&client, &ns, "Approval");
    api.create(
        &PostParams::default(),
        &object("Approval", "apr-1", approval_spec()),
    )
    .await
    .expect("valid Approval");

    let msg = refusal(
        merge_patch(
            &api,
            "apr-1",
            json!({ "spec": { "request": { "summary": "DELETE FROM orders" } } }),
        )
        .await,
    );
    assert!(
        msg.contains("only spec.decision and spec.reason of an Approval can change"),
        "{msg}"
    );
    let msg = refusal(
        merge_patch(
            &api,
            "apr-1",
            json!({ "spec": { "approvers": { "groups": ["developers"] } } }),
        )
        .await,
    );
    assert!(
        msg.contains("only spec.decision and spec.reason of an Approval can change"),
        "{msg}"
    );

    let decided = merge_patch(
        &api,
        "apr-1",
        json!({ "spec": { "decision": "Approved", "reason": "ticket 4711" } }),
    )
    .await
    .expect("a first decision is accepted");
    assert_eq!(decided.data["spec"]["decision"], "Approved");

    let msg =
        refusal(merge_patch(&api, "apr-1", json!({ "spec": { "decision": "Denied" } })).await);
    assert!(
        msg.contains("spec.decision can be set once and never changed or cleared"),
        "{msg}"
    );
    let msg = refusal(merge_patch(&api, "apr-1", json!({ "spec": { "decision": null } })).await);
    assert!(
        msg.contains("spec.decision can be set once and never changed or cleared"),
        "{msg}"
    );
    let msg = refusal(
        merge_patch(
            &api,
            "apr-1",
            json!({ "spec": { "reason": "changed my mind" } }),
        )
        .await,
    );
    assert!(
        msg.contains("a decided Approval is final: its spec can no longer change"),
        "{msg}"
    );
    assert_eq!(
        api.get("apr-1").await.expect("read back").data["spec"]["decision"],
        "Approved"
    );
}

#[tokio::test]
async fn an_agent_session_spec_is_immutable() {
    let cp = ControlPlane::shared();
    let client = cp.client().await;
    let ns = cp.namespace(&client, "session").await;
    let api = dynamic_api(&client, &ns, "AgentSession");
    api.create(
        &PostParams::default(),
        &object("AgentSession", "s-1", session_spec()),
    )
    .await
    .expect("valid AgentSession");
    let msg = refusal(
        merge_patch(
            &api,
            "s-1",
            json!({ "spec": { "agent": { "pod": "someone-else" } } }),
        )
        .await,
    );
    assert!(msg.contains("an AgentSession's spec is immutable"), "{msg}");
}

#[tokio::test]
async fn status_is_written_only_through_the_status_subresource() {
    let cp = ControlPlane::shared();
    let client = cp.client().await;
    let ns = cp.namespace(&client, "status").await;
    let approvals: Api<Approval> = Api::namespaced(client.clone(), &ns);
    let spec: ApprovalSpec = serde_json::from_value(approval_spec()).expect("typed approval");
    approvals
        .create(&PostParams::default(), &Approval::new("apr-s", spec))
        .await
        .expect("valid Approval");

    // A status sent with the main resource is dropped by the API server.
    let patched = approvals
        .patch(
            "apr-s",
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": { "phase": "Executed" } })),
        )
        .await
        .expect("patch of the main resource");
    assert_eq!(patched.status, None);

    let status = ApprovalStatus {
        phase: Some(ApprovalPhase::Executed),
        decided_at: Some(Time("2030-01-01T00:00:00Z".parse().expect("a timestamp"))),
        executed_at: None,
        result: Some(ExecutionResult {
            rows_affected: Some(1),
            http_status: None,
            message: None,
        }),
    };
    approvals
        .patch_status(
            "apr-s",
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": status })),
        )
        .await
        .expect("status patch");
    let stored = approvals.get("apr-s").await.expect("read back");
    assert_eq!(stored.status, Some(status));
    // ...and a spec change sent to /status is ignored.
    approvals
        .patch_status(
            "apr-s",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "decision": "Approved" } })),
        )
        .await
        .expect("status patch with a spec");
    assert_eq!(
        approvals
            .get("apr-s")
            .await
            .expect("read back")
            .spec
            .decision,
        None
    );

    let policies: Api<AgentAccessPolicy> = Api::namespaced(client.clone(), &ns);
    let policy = AgentAccessPolicy::new(
        "p",
        AgentAccessPolicySpec {
            agent_selector: LabelSelector::default(),
            identity: None,
            connections: vec!["orders-db".into()],
            default_action: Action::Deny,
            default_approval: None,
            rules: vec![],
            masking: None,
            limits: None,
            recording: None,
        },
    );
    let created = policies
        .create(&PostParams::default(), &policy)
        .await
        .expect("valid policy");
    let generation = created.meta().generation;
    let condition = json!({
        "type": "Ready", "status": "False", "reason": "ConnectionMissing",
        "message": "Connection orders-db does not exist", "lastTransitionTime": "2030-01-01T00:00:00Z",
        "observedGeneration": generation
    });
    let patched = policies
        .patch_status(
            "p",
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": {
            "observedGeneration": generation, "conditions": [condition], "agentsMatched": 2 } })),
        )
        .await
        .expect("status patch");
    let status = patched.status.expect("a status");
    assert_eq!(status.agents_matched, Some(2));
    assert_eq!(status.conditions[0].reason, "ConnectionMissing");
}

#[tokio::test]
async fn kubectl_get_agentgate_prints_the_columns() {
    let cp = ControlPlane::shared();
    let client = cp.client().await;
    let ns = cp.namespace(&client, "columns").await;
    dynamic_api(&client, &ns, "Connection")
        .create(
            &PostParams::default(),
            &object("Connection", "orders-db", postgres_spec()),
        )
        .await
        .expect("valid Connection");
    dynamic_api(&client, &ns, "Approval")
        .create(
            &PostParams::default(),
            &object("Approval", "apr-x7k2", approval_spec()),
        )
        .await
        .expect("valid Approval");
    dynamic_api(&client, &ns, "AgentAccessPolicy")
        .create(
            &PostParams::default(),
            &object("AgentAccessPolicy", "prod-agents", policy_spec()),
        )
        .await
        .expect("valid policy");
    dynamic_api(&client, &ns, "AgentSession")
        .create(
            &PostParams::default(),
            &object("AgentSession", "claude-7f9c", session_spec()),
        )
        .await
        .expect("valid AgentSession");

    // kubectl learns the `agentgate` category from discovery, which it caches: a fresh
    // control plane's new CRDs may take a moment to show there.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let out = loop {
        match cp.kubectl_output(&["get", "agentgate", "-n", &ns]) {
            Ok(out) => break out,
            Err(e) if std::time::Instant::now() < deadline => {
                eprintln!("retrying kubectl get agentgate: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            Err(e) => panic!("kubectl get agentgate: {e}"),
        }
    };
    let lines: Vec<Vec<&str>> = out
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    // A header line, and the row of one object with these values in this order.
    let has_header = |words: &[&str]| lines.iter().any(|l| l.as_slice() == words);
    let has_row = |name: &str, values: &[&str]| {
        lines.iter().filter(|l| l.first() == Some(&name)).any(|l| {
            let mut rest = l.iter();
            values.iter().all(|v| rest.any(|w| w == v))
        })
    };
    assert!(
        has_header(&["NAME", "PROTOCOL", "UPSTREAM", "PORT", "READY", "AGE"]),
        "{out}"
    );
    assert!(
        has_row(
            "connection.agentgate.dev/orders-db",
            &["postgres", "orders.example:5432", "15432"]
        ),
        "{out}"
    );
    assert!(
        has_header(&["NAME", "DEFAULT", "AGENTS", "READY", "AGE"]),
        "{out}"
    );
    assert!(
        has_row("agentaccesspolicy.agentgate.dev/prod-agents", &["deny"]),
        "{out}"
    );
    assert!(
        has_header(&[
            "NAME",
            "PHASE",
            "CONNECTION",
            "RULE",
            "REQUESTER",
            "SUMMARY",
            "EST-ROWS",
            "AGE"
        ]),
        "{out}"
    );
    assert!(
        has_row(
            "approval.agentgate.dev/apr-x7k2",
            &[
                "orders-db",
                "writes-need-a-dba",
                "u-123",
                "DELETE",
                "FROM",
                "orders"
            ]
        ),
        "{out}"
    );
    assert!(
        has_header(&[
            "NAME",
            "PHASE",
            "POD",
            "SUBJECT",
            "REQUESTS",
            "DENIED",
            "LAST-ACTIVITY",
            "AGE"
        ]),
        "{out}"
    );
    assert!(
        has_row(
            "agentsession.agentgate.dev/claude-7f9c",
            &["claude-7f9c", "u-123"]
        ),
        "{out}"
    );

    // Short names work too.
    let out = cp
        .kubectl_output(&["get", "conn,aap,apr,as", "-n", &ns, "-o", "name"])
        .expect("kubectl get by short names");
    for name in [
        "connection.agentgate.dev/orders-db",
        "agentaccesspolicy.agentgate.dev/prod-agents",
        "approval.agentgate.dev/apr-x7k2",
        "agentsession.agentgate.dev/claude-7f9c",
    ] {
        assert!(out.contains(name), "{name} missing from:\n{out}");
    }
}

#[tokio::test]
async fn kubectl_explain_shows_the_descriptions() {
    let cp = ControlPlane::shared();
    // The API server publishes a new CRD's OpenAPI a moment after it is Established.
    let mut last = String::new();
    for _ in 0..60 {
        match cp.kubectl_output(&["explain", "agentaccesspolicy.spec.rules"]) {
            Ok(out) => {
                last = out;
                if last.contains("FIELDS:") {
                    break;
                }
            }
            Err(e) => last = e,
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    // kubectl wraps descriptions at its own width.
    let flat = |text: &str| text.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        flat(&last)
            .contains("Rules, tried in order; the first whose `match` (and `when`) holds decides."),
        "{last}"
    );
    for field in ["action", "approval", "match", "name", "when"] {
        assert!(
            last.lines().any(|l| l.trim_start().starts_with(field)),
            "field {field} missing:\n{last}"
        );
    }
    assert!(
        flat(&last).contains("What to do with a matching request: `allow`, `deny` or `approve`."),
        "{last}"
    );

    let out = cp
        .kubectl_output(&["explain", "approval.spec.decidedBy"])
        .expect("explain decidedBy");
    assert!(
        flat(&out)
            .contains("stamped by agentgate's admission webhook from the authenticated request"),
        "{out}"
    );
}
