use agentgate_crds::{AgentAccessPolicySpec, BundleEntry, ConnectionSpec, SqlStatementKind};
use proptest::prelude::*;
use serde_json::json;

use super::*;
use crate::attrs::{HttpRequest, Identity, SqlRequest};
use crate::classify::{classify_http, classify_kubernetes};
use crate::compile::compile;

const ISSUER: &str = "https://login.example/tenant/v2.0";

fn connections() -> Vec<BundleEntry<ConnectionSpec>> {
    let conn = |name: &str, spec: serde_json::Value| BundleEntry {
        name: name.into(),
        generation: 1,
        spec: serde_json::from_value(spec).expect("valid connection"),
    };
    vec![
        conn(
            "orders-db",
            json!({ "protocol": "postgres", "upstream": { "address": "db:5432", "database": "orders" },
            "credentials": { "secretRef": { "name": "db" } }, "listen": { "port": 15432 } }),
        ),
        conn(
            "prod-cluster",
            json!({ "protocol": "kubernetes", "upstream": { "address": "https://k8s" },
            "credentials": { "serviceAccount": { "name": "reader" } }, "listen": { "port": 16443 } }),
        ),
        conn(
            "arm",
            json!({ "protocol": "http", "upstream": { "address": "https://management.azure.com" },
            "credentials": { "secretRef": { "name": "arm" } }, "listen": { "port": 18080 } }),
        ),
    ]
}

fn policy(name: &str, spec: serde_json::Value) -> BundleEntry<AgentAccessPolicySpec> {
    BundleEntry {
        name: name.into(),
        generation: 1,
        spec: serde_json::from_value(spec).expect("valid policy"),
    }
}

fn example_policy() -> BundleEntry<AgentAccessPolicySpec> {
    policy(
        "prod-agents",
        json!({
            "agentSelector": {},
            "identity": { "issuer": ISSUER, "audiences": ["api://agentgate"] },
            "connections": ["orders-db", "prod-cluster", "arm"],
            "rules": [
                { "name": "read-orders", "match": { "connections": ["orders-db"], "sql": { "statements": ["select"], "tables": ["public.*"] } }, "action": "allow" },
                { "name": "writes-need-a-dba", "match": { "sql": { "statements": ["insert", "update", "delete"] } }, "action": "approve",
                  "approval": { "approvers": { "groups": ["dba-oncall"] } } },
                { "name": "never-ddl", "match": { "sql": { "statements": ["ddl"] } }, "action": "deny" },
                { "name": "no-secrets", "match": { "kubernetes": { "resources": ["secrets"] } }, "action": "deny" },
                { "name": "k8s-read", "match": { "kubernetes": { "verbs": ["get", "list", "watch"], "namespaces": ["prod"] } }, "action": "allow" },
                { "name": "arm-writes", "match": { "http": { "methods": ["PUT", "PATCH", "DELETE"], "paths": ["/subscriptions/*/**"] } },
                  "when": "request.identity.groups.exists(g, g == 'sre')", "action": "approve",
                  "approval": { "approvers": { "groups": ["sre-leads"] }, "timeout": "90s" } },
                { "name": "arm-reads", "match": { "http": { "methods": ["GET"] } }, "action": "allow" }
            ]
        }),
    )
}

fn compiled(policies: &[BundleEntry<AgentAccessPolicySpec>]) -> CompiledPolicy {
    compile(policies, &connections(), b"key").unwrap_or_else(|e| panic!("compiles: {e:?}"))
}

fn user(groups: &[&str]) -> Option<Identity> {
    Some(Identity {
        issuer: ISSUER.into(),
        subject: "u-1".into(),
        email: Some("dev@example.com".into()),
        groups: groups.iter().map(|g| (*g).to_owned()).collect(),
    })
}

fn sql(statements: &[(SqlStatementKind, &[&str])]) -> Target {
    Target::Postgres(SqlRequest {
        statements: statements
            .iter()
            .map(|(kind, tables)| SqlStatement {
                kind: *kind,
                tables: tables.iter().map(|t| (*t).to_owned()).collect(),
                has_where: true,
                ..SqlStatement::default()
            })
            .collect(),
        fingerprint: "f".into(),
        normalized: None,
    })
}

fn k8s(method: &str, path: &str, query: &str) -> Target {
    Target::Kubernetes(classify_kubernetes(method, path, query).expect("classifies"))
}

fn http(method: &str, path: &str) -> Target {
    Target::Http(classify_http(method, "management.azure.com", path, "").expect("classifies"))
}

fn decide(
    p: &CompiledPolicy,
    connection: &str,
    identity: Option<Identity>,
    target: Target,
) -> Decision {
    evaluate(
        p,
        &RequestAttrs {
            connection: connection.into(),
            identity,
            target,
        },
    )
    .decision
}

fn label_and_rule(d: &Decision) -> (&'static str, Option<String>) {
    (d.label(), d.rule().map(str::to_owned))
}

#[test]
fn first_matching_rule_wins_and_the_default_denies() {
    use SqlStatementKind::*;
    let p = compiled(&[example_policy()]);
    let db = |target| label_and_rule(&decide(&p, "orders-db", user(&[]), target));
    assert_eq!(
        db(sql(&[(Select, &["public.orders"])])),
        ("allow", Some("read-orders".to_owned()))
    );
    assert_eq!(
        db(sql(&[(Select, &["billing.invoices"])])),
        ("deny", None),
        "table outside public.*"
    );
    assert_eq!(
        db(sql(&[(Delete, &["public.orders"])])),
        ("approve", Some("writes-need-a-dba".to_owned()))
    );
    assert_eq!(
        db(sql(&[(Ddl, &["public.orders"])])),
        ("deny", Some("never-ddl".to_owned()))
    );
    assert_eq!(db(sql(&[(Copy, &["public.orders"])])), ("deny", None));
}

#[test]
fn each_statement_is_decided_and_the_riskiest_wins() {
    use SqlStatementKind::*;
    let p = compiled(&[example_policy()]);
    let db = |target| label_and_rule(&decide(&p, "orders-db", user(&[]), target));
    assert_eq!(
        db(sql(&[
            (Select, &["public.orders"]),
            (Delete, &["public.orders"])
        ])),
        ("approve", Some("writes-need-a-dba".to_owned()))
    );
    assert_eq!(
        db(sql(&[
            (Select, &["public.orders"]),
            (Ddl, &[]),
            (Delete, &["public.orders"])
        ])),
        ("deny", Some("never-ddl".to_owned()))
    );
    assert_eq!(
        db(sql(&[])),
        ("deny", None),
        "an empty statement list is decided as `other`"
    );
}

#[test]
fn real_sql_through_the_classifier() {
    let p = compiled(&[example_policy()]);
    let db = |text: &str| {
        let target = Target::Postgres(crate::classify::classify_sql(text));
        label_and_rule(&decide(&p, "orders-db", user(&[]), target))
    };
    assert_eq!(
        db("SELECT * FROM orders"),
        ("allow", Some("read-orders".to_owned()))
    );
    assert_eq!(db("SELECT * FROM secret.keys"), ("deny", None));
    assert_eq!(
        db("DROP TABLE orders"),
        ("deny", Some("never-ddl".to_owned()))
    );
    // A select-only rule never allows what the parser cannot read, nor a call that
    // reaches outside the tables.
    assert_eq!(db("SELEKT * FROM orders"), ("deny", None));
    let d = decide(
        &p,
        "orders-db",
        user(&[]),
        Target::Postgres(crate::classify::classify_sql(
            "SELECT pg_read_file('/etc/passwd') FROM orders",
        )),
    );
    match d {
        Decision::Deny { rule, reason } => {
            assert_eq!(rule.as_deref(), Some("read-orders"));
            assert!(reason.contains("pg_read_file"), "{reason}");
        }
        other => panic!("expected a denial, got {other:?}"),
    }
}

#[test]
fn kubernetes_rules_read_requests_like_rbac() {
    let p = compiled(&[example_policy()]);
    let kube = |target| label_and_rule(&decide(&p, "prod-cluster", user(&[]), target));
    assert_eq!(
        kube(k8s("GET", "/api/v1/namespaces/prod/pods", "")),
        ("allow", Some("k8s-read".to_owned()))
    );
    assert_eq!(
        kube(k8s("GET", "/api/v1/namespaces/prod/pods", "watch=true")),
        ("allow", Some("k8s-read".to_owned()))
    );
    assert_eq!(
        kube(k8s("GET", "/api/v1/namespaces/prod/pods/web-0/log", "")),
        ("allow", Some("k8s-read".to_owned()))
    );
    assert_eq!(
        kube(k8s("DELETE", "/api/v1/namespaces/prod/pods/web-0", "")),
        ("deny", None)
    );
    assert_eq!(
        kube(k8s("GET", "/api/v1/namespaces/staging/pods", "")),
        ("deny", None),
        "other namespace"
    );
    assert_eq!(
        kube(k8s("GET", "/api/v1/nodes", "")),
        ("deny", None),
        "cluster-scoped, rule names namespaces"
    );
    assert_eq!(
        kube(k8s("GET", "/api/v1/namespaces/prod/secrets/db", "")),
        ("deny", Some("no-secrets".to_owned()))
    );
    assert_eq!(
        kube(k8s(
            "GET",
            "/api/v1/namespaces/prod/pods/web-0/exec",
            "command=sh"
        )),
        ("deny", None),
        "exec is create"
    );
    assert_eq!(
        kube(k8s("GET", "/apis/apps/v1", "")),
        ("allow", Some(DISCOVERY_RULE.to_owned()))
    );
    assert_eq!(
        kube(k8s("GET", "/openapi/v3", "")),
        ("allow", Some(DISCOVERY_RULE.to_owned()))
    );
    assert_eq!(
        kube(k8s("POST", "/apis", "")),
        ("deny", None),
        "discovery is read-only"
    );
}

#[test]
fn resource_patterns_follow_rbac() {
    let p = compiled(&[policy(
        "p",
        json!({
            "agentSelector": {}, "connections": ["prod-cluster"],
            "rules": [
                { "name": "exec", "match": { "kubernetes": { "resources": ["pods/exec"] } }, "action": "approve",
                  "approval": { "approvers": { "groups": ["sre"] } } },
                { "name": "scale", "match": { "kubernetes": { "resources": ["*/scale"], "apiGroups": ["apps"] } }, "action": "allow" },
                { "name": "pods", "match": { "kubernetes": { "resources": ["pods"], "names": ["web-*"] } }, "action": "allow" }
            ]
        }),
    )]);
    let kube = |target| label_and_rule(&decide(&p, "prod-cluster", None, target));
    assert_eq!(
        kube(k8s("POST", "/api/v1/namespaces/a/pods/web-0/exec", "")),
        ("approve", Some("exec".to_owned()))
    );
    assert_eq!(
        kube(k8s(
            "PATCH",
            "/apis/apps/v1/namespaces/a/deployments/web/scale",
            ""
        )),
        ("allow", Some("scale".to_owned()))
    );
    assert_eq!(
        kube(k8s(
            "PATCH",
            "/apis/apps/v1/namespaces/a/deployments/web",
            ""
        )),
        ("deny", None)
    );
    assert_eq!(
        kube(k8s("DELETE", "/api/v1/namespaces/a/pods/web-1", "")),
        ("allow", Some("pods".to_owned()))
    );
    assert_eq!(
        kube(k8s("DELETE", "/api/v1/namespaces/a/pods/db-1", "")),
        ("deny", None)
    );
    assert_eq!(
        kube(k8s("GET", "/api/v1/namespaces/a/pods/web-1/log", "")),
        ("deny", None),
        "pods is not pods/log"
    );
    assert_eq!(
        kube(k8s("DELETE", "/api/v1/namespaces/a/pods", "")),
        ("deny", None),
        "names never match a collection"
    );
}

#[test]
fn cel_conditions_decide_with_the_identity() {
    let p = compiled(&[example_policy()]);
    let arm = |groups: &[&str], target| label_and_rule(&decide(&p, "arm", user(groups), target));
    let put = || {
        http(
            "PUT",
            "/subscriptions/s-1/resourceGroups/rg/providers/Microsoft.Web/sites/app",
        )
    };
    assert_eq!(
        arm(&["sre"], put()),
        ("approve", Some("arm-writes".to_owned()))
    );
    assert_eq!(
        arm(&["developers"], put()),
        ("deny", None),
        "condition false: falls through to the default"
    );
    assert_eq!(
        arm(&[], http("GET", "/subscriptions/s-1")),
        ("allow", Some("arm-reads".to_owned()))
    );
    match decide(&p, "arm", user(&["sre"]), put()) {
        Decision::RequireApproval { approval, .. } => {
            assert_eq!(approval.timeout, std::time::Duration::from_secs(90))
        }
        other => panic!("expected approval, got {other:?}"),
    }
}

#[test]
fn a_condition_that_fails_to_evaluate_denies() {
    let p = compiled(&[policy(
        "p",
        json!({
            "agentSelector": {}, "connections": ["arm"],
            "rules": [{ "name": "odd", "when": "request.identity.groups[5] == 'x'", "action": "allow" }]
        }),
    )]);
    let d = decide(&p, "arm", None, http("GET", "/"));
    assert_eq!(label_and_rule(&d), ("deny", Some("odd".to_owned())));
}

#[test]
fn missing_identity_policy_or_connection_denies() {
    let p = compiled(&[example_policy()]);
    let d = decide(&p, "arm", None, http("GET", "/subscriptions"));
    assert!(
        matches!(&d, Decision::Deny { reason, .. } if reason.contains("requires the launching user's token")),
        "{d:?}"
    );
    let wrong_issuer = Some(Identity {
        issuer: "https://evil.example".into(),
        ..user(&[]).expect("identity")
    });
    assert_eq!(
        decide(&p, "arm", wrong_issuer, http("GET", "/")).label(),
        "deny"
    );
    let d = decide(&p, "payments-db", user(&[]), sql(&[]));
    assert!(
        matches!(&d, Decision::Deny { reason, .. } if reason.contains("not configured")),
        "{d:?}"
    );
    let d = decide(&p, "orders-db", user(&[]), http("GET", "/"));
    assert_eq!(d.label(), "deny", "protocol mismatch");

    let no_policies = compiled(&[]);
    let d = decide(&no_policies, "arm", user(&[]), http("GET", "/"));
    assert!(
        matches!(&d, Decision::Deny { reason, .. } if reason.contains("no AgentAccessPolicy")),
        "{d:?}"
    );
    assert_eq!(
        decide(&CompiledPolicy::deny_all(), "arm", None, http("GET", "/")).label(),
        "deny"
    );
}

#[test]
fn the_strictest_of_several_policies_wins() {
    let allow_all = policy(
        "allow-all",
        json!({ "agentSelector": {}, "connections": ["arm"], "defaultAction": "allow",
        "limits": { "maxResponseBytes": "1Mi" }, "masking": { "detectors": ["pii"], "replacement": "partial" } }),
    );
    let deny_deletes = policy(
        "deny-deletes",
        json!({ "agentSelector": {}, "connections": ["arm"], "defaultAction": "allow",
        "rules": [{ "name": "no-delete", "match": { "http": { "methods": ["DELETE"] } }, "action": "deny" }],
        "limits": { "maxResponseBytes": "64Ki" }, "masking": { "detectors": ["secrets"] } }),
    );
    let p = compiled(&[allow_all, deny_deletes]);
    let e = evaluate(
        &p,
        &RequestAttrs {
            connection: "arm".into(),
            identity: None,
            target: http("DELETE", "/x"),
        },
    );
    assert_eq!(
        (e.decision.label(), e.policy.as_deref()),
        ("deny", Some("deny-deletes"))
    );
    assert_eq!(e.limits.max_response_bytes, Some(64 * 1024));
    let mut report = crate::masking::MaskReport::default();
    let masked = e.masking.mask_bytes(
        b"jane@example.com Bearer abcdefghijklmnopqrstuv",
        &mut report,
    );
    assert_eq!(
        String::from_utf8_lossy(&masked),
        "[masked:email] Bearer [masked:bearer-token]",
        "union, strongest replacement"
    );
}

#[test]
fn compile_errors_name_the_policy_and_the_rule() {
    let bad = policy(
        "broken",
        json!({
            "agentSelector": {}, "connections": ["arm", "missing-db"],
            "rules": [
                { "name": "cel", "when": "request.identity.groups.exists(g, g ==", "action": "allow" },
                { "name": "unknown-var", "when": "user.admin", "action": "allow" },
                { "name": "sql-on-http", "match": { "sql": { "statements": ["select"] } }, "action": "allow" },
                { "name": "verb", "match": { "kubernetes": { "verbs": ["destroy"] } }, "action": "allow" },
                { "name": "timeout", "action": "approve", "approval": { "approvers": { "groups": ["a"] }, "timeout": "forever" } }
            ],
            "masking": { "patterns": [{ "name": "bad", "regex": "(" }] },
            "limits": { "maxResponseBytes": "10Qi" }
        }),
    );
    let errors = compile(&[bad], &connections(), b"k").expect_err("does not compile");
    let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
    let has = |needle: &str| text.iter().any(|t| t.contains(needle));
    assert!(
        has("AgentAccessPolicy/broken: Connection missing-db does not exist"),
        "{text:#?}"
    );
    assert!(
        has("AgentAccessPolicy/broken, rule cel: when is not valid CEL"),
        "{text:#?}"
    );
    assert!(
        has(
            "AgentAccessPolicy/broken, rule unknown-var: when refers to \"user\", which is not defined"
        ),
        "{text:#?}"
    );
    assert!(
        has(
            "AgentAccessPolicy/broken, rule sql-on-http: it matches Postgres requests, but none of its connections"
        ),
        "{text:#?}"
    );
    assert!(
        has("AgentAccessPolicy/broken, rule verb: unknown Kubernetes verb \"destroy\""),
        "{text:#?}"
    );
    assert!(
        has(
            "AgentAccessPolicy/broken, rule timeout: approval.timeout: \"forever\" is not a duration"
        ),
        "{text:#?}"
    );

    let conns = connections();
    let mut clash = conns[0].clone();
    clash.name = "other-db".into();
    let errors = compile(&[], &[conns[0].clone(), clash], b"k").expect_err("port clash");
    assert_eq!(
        errors[0].to_string(),
        "Connection/other-db: listen.port 15432 is also used by Connection orders-db"
    );

    let masking = policy(
        "m",
        json!({ "agentSelector": {}, "connections": ["arm"], "masking": { "patterns": [{ "name": "bad", "regex": "(" }] } }),
    );
    let errors = compile(&[masking], &connections(), b"k").expect_err("bad masking");
    assert!(
        errors[0]
            .to_string()
            .starts_with("AgentAccessPolicy/m: masking pattern \"bad\""),
        "{errors:?}"
    );
}

#[test]
fn durations_and_quantities() {
    use std::time::Duration;
    assert_eq!(parse_duration_ok("10m"), Duration::from_secs(600));
    assert_eq!(parse_duration_ok("1h30m"), Duration::from_secs(5400));
    assert_eq!(parse_duration_ok("1.5s"), Duration::from_millis(1500));
    assert_eq!(parse_duration_ok("250ms"), Duration::from_millis(250));
    for bad in ["", "10", "m", "10x", "-1s", "1..5s"] {
        assert!(crate::parse_duration(bad).is_err(), "{bad}");
    }
    assert_eq!(crate::parse_quantity("64Ki"), Ok(65536));
    assert_eq!(crate::parse_quantity("10Mi"), Ok(10 << 20));
    assert_eq!(crate::parse_quantity("1G"), Ok(1_000_000_000));
    assert!(crate::parse_quantity("1.5Mi").is_err());
    assert!(crate::parse_quantity("99999999999Ti").is_err());
}

fn parse_duration_ok(s: &str) -> std::time::Duration {
    crate::parse_duration(s).expect("valid duration")
}

proptest! {
    /// Classifying any path and query never panics; when it succeeds, a resource request
    /// has a resource and its verb is one RBAC knows.
    #[test]
    fn kubernetes_classification_is_total(
        method in prop_oneof![Just("GET"), Just("POST"), Just("PUT"), Just("PATCH"), Just("DELETE"), Just("OPTIONS")],
        segments in prop::collection::vec(prop_oneof![
            Just("api".to_owned()), Just("apis".to_owned()), Just("v1".to_owned()), Just("namespaces".to_owned()),
            Just("pods".to_owned()), Just("exec".to_owned()), Just("proxy".to_owned()), Just("watch".to_owned()),
            Just("..".to_owned()), Just("%2F".to_owned()), "[a-z0-9.%-]{0,8}",
        ], 0..9),
        query in "[a-z=&%0-9.]{0,20}",
    ) {
        let path = format!("/{}", segments.join("/"));
        if let Ok(r) = classify_kubernetes(method, &path, &query) {
            if r.is_resource_request {
                prop_assert!(!r.resource.is_empty());
                prop_assert!(["get", "list", "watch", "create", "update", "patch", "delete", "deletecollection", "proxy", ""]
                    .contains(&r.verb.as_str()), "verb {}", r.verb);
            }
            prop_assert!(!r.path.contains("/../"));
        }
    }

    /// A normalized path is a fixed point, and nothing normalizes to a path with dot
    /// segments.
    #[test]
    fn path_normalization_is_stable(raw in "/[a-zA-Z0-9%./~-]{0,30}") {
        if let Ok(p) = crate::classify::normalize_path(&raw) {
            prop_assert!(!p.split('/').any(|s| s == ".." || s == "."));
            if !p.contains('%') {
                prop_assert_eq!(crate::classify::normalize_path(&p), Ok(p.clone()));
            }
        }
    }
}

#[test]
fn http_attrs_are_normalized() {
    assert_eq!(
        classify_http(
            "put",
            "Management.Azure.com:443",
            "/subscriptions/s%201",
            "api-version=2024-01-01"
        ),
        Ok(HttpRequest {
            method: "PUT".into(),
            host: "management.azure.com".into(),
            path: "/subscriptions/s 1".into(),
            query: "api-version=2024-01-01".into()
        })
    );
}

fn select_only(extra_rules: serde_json::Value) -> CompiledPolicy {
    let mut rules = vec![
        json!({ "name": "reads", "match": { "sql": { "statements": ["select", "set", "transaction"], "tables": ["public.*"] } }, "action": "allow" }),
    ];
    rules.extend(extra_rules.as_array().cloned().unwrap_or_default());
    compiled(&[policy(
        "readers",
        json!({
            "agentSelector": {},
            "connections": ["orders-db"],
            "rules": rules,
            "masking": { "columns": ["customers.email", "*.ssn"] }
        }),
    )])
}

fn db_text(p: &CompiledPolicy, text: &str) -> Decision {
    decide(
        p,
        "orders-db",
        None,
        Target::Postgres(crate::classify::classify_sql(text)),
    )
}

fn denial(d: Decision) -> String {
    match d {
        Decision::Deny { reason, .. } => reason,
        other => panic!("expected a denial, got {other:?}"),
    }
}

#[test]
fn allow_rules_allow_only_side_effect_free_functions_or_those_they_name() {
    let p = select_only(json!([
        { "name": "reports", "match": { "sql": { "statements": ["select"], "tables": ["public.*"], "functions": ["reporting.monthly_*"] } }, "action": "allow" }
    ]));
    assert_eq!(
        db_text(&p, "SELECT lower(note), count(*) FROM orders GROUP BY 1").label(),
        "allow"
    );
    assert_eq!(
        db_text(&p, "SELECT pg_catalog.upper(note) FROM orders").label(),
        "allow"
    );
    let d = db_text(&p, "SELECT reporting.monthly_totals(2026) FROM orders");
    assert_eq!(label_and_rule(&d), ("allow", Some("reports".to_owned())));
    // A function that reads a table given as text, or any user function, is not
    // allowed by a select rule.
    for text in [
        "SELECT table_to_xml('secret.keys', true, false, '')",
        "SELECT query_to_xml('select * from secret.keys', true, false, '')",
        "SELECT * FROM ts_stat('select note from secret.keys')",
        "SELECT app.leak() FROM orders",
        "SELECT \"LOWER\"(note) FROM orders",
        "SELECT encode(convert_to(note, 'UTF8'), 'base64') FROM orders",
    ] {
        let reason = denial(db_text(&p, text));
        assert!(reason.contains("side-effect-free"), "{text}: {reason}");
    }
    // Dangerous ones stay refused even when a rule names them.
    let p = select_only(json!([
        { "name": "sleepy", "match": { "sql": { "statements": ["select"], "functions": ["pg_sleep"] } }, "action": "allow" }
    ]));
    assert!(denial(db_text(&p, "SELECT pg_sleep(1)")).contains("pg_sleep"));
    // An approve rule still holds what an allow rule passes over.
    let p = select_only(json!([
        { "name": "ask", "match": { "sql": { "statements": ["select"] } }, "action": "approve",
          "approval": { "approvers": { "groups": ["dba"] } } }
    ]));
    assert_eq!(
        db_text(&p, "SELECT app.report() FROM orders").label(),
        "approve"
    );
}

#[test]
fn sql_functions_is_only_for_allow_rules() {
    let spec = policy(
        "bad",
        json!({ "agentSelector": {}, "connections": ["orders-db"], "rules": [
            { "name": "x", "match": { "sql": { "functions": ["f"] } }, "action": "deny" } ] }),
    );
    let e = compile(&[spec], &connections(), b"k").unwrap_err();
    assert!(format!("{e:?}").contains("sql.functions"), "{e:?}");
}

#[test]
fn pinned_settings_are_refused_whatever_the_rules_say() {
    let p = compiled(&[policy(
        "anything",
        json!({ "agentSelector": {}, "connections": ["orders-db"], "defaultAction": "allow", "rules": [] }),
    )]);
    for text in [
        "SET search_path = secret, public",
        "SET client_encoding = 'GBK'",
        "SET NAMES 'SJIS'",
        "SET standard_conforming_strings = off",
        "SET ROLE postgres",
        "SELECT set_config('search_path', 'secret', false)",
        "SELECT 1; SET LOCAL search_path = secret",
    ] {
        let reason = denial(db_text(&p, text));
        assert!(reason.contains("pins"), "{text}: {reason}");
    }
    // The session may write: turning read-only off is not refused.
    assert_eq!(db_text(&p, "BEGIN READ WRITE").label(), "allow");
    assert!(!session_is_read_only(&p, "orders-db"));
}

#[test]
fn read_only_sessions_cannot_turn_read_only_off() {
    let p = select_only(json!([
        { "name": "no-writes", "match": { "sql": { "statements": ["delete"] } }, "action": "deny" }
    ]));
    assert!(session_is_read_only(&p, "orders-db"));
    for text in [
        "BEGIN READ WRITE",
        "START TRANSACTION READ WRITE",
        "SET TRANSACTION READ WRITE",
        "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
        "SET default_transaction_read_only = off",
        "SET transaction_read_only TO false",
    ] {
        let reason = denial(db_text(&p, text));
        assert!(reason.contains("read-only"), "{text}: {reason}");
    }
    assert_eq!(db_text(&p, "BEGIN READ ONLY").label(), "allow");
    assert_eq!(db_text(&p, "BEGIN").label(), "allow");
    // Any rule that may let a write through makes the session writable.
    for rule in [
        json!({ "name": "w", "match": { "sql": { "statements": ["insert"] } }, "action": "allow" }),
        json!({ "name": "w", "match": { "sql": { "statements": ["delete"] } }, "action": "approve", "approval": { "approvers": { "groups": ["dba"] } } }),
        json!({ "name": "w", "match": { "sql": {} }, "action": "allow" }),
        json!({ "name": "w", "match": {}, "action": "allow" }),
    ] {
        assert!(
            !session_is_read_only(&select_only(json!([rule.clone()])), "orders-db"),
            "{rule}"
        );
    }
}

#[test]
fn masked_columns_only_as_plain_output_columns() {
    let p = select_only(json!([]));
    assert_eq!(
        db_text(&p, "SELECT id, email, ssn FROM customers").label(),
        "allow"
    );
    assert_eq!(
        db_text(&p, "SELECT lower(note) FROM orders").label(),
        "allow"
    );
    for text in [
        "SELECT lower(email) FROM customers",
        "SELECT email::bytea FROM customers",
        "SELECT id FROM customers WHERE ssn LIKE '1%'",
        "SELECT to_jsonb(c) FROM customers c",
        "SELECT ARRAY[ssn] FROM customers",
        "SELECT lower(x) FROM (SELECT email FROM customers) s(x)",
        "SELECT email FROM customers UNION SELECT 'x'",
        "SELECT id FROM orders WHERE note IN (SELECT ssn FROM orders)",
    ] {
        let reason = denial(db_text(&p, text));
        assert!(reason.contains("masked"), "{text}: {reason}");
    }
    // A table without masked columns may use any column anywhere.
    assert_eq!(
        db_text(&p, "SELECT total FROM orders WHERE total > 1 ORDER BY id").label(),
        "allow"
    );
    // `*.ssn` may be a column of any table: a whole row of any table is refused.
    assert!(denial(db_text(&p, "SELECT to_jsonb(o) FROM orders o")).contains("whole row"));
}
