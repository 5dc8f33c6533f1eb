//! Approval decisions through the real API server, the real webhooks (served by the
//! operator binary) and real users from the control plane's token file: who may decide,
//! and that what they decide is stamped with who they are.

#![allow(clippy::unwrap_used)]

mod support;

use agentgate_crds::AgentSession;
use agentgate_e2e::{ControlPlane, users};
use kube::Api;
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
    let (_operator, _, _) = start_operator(cp, &client, &system, &ns).await;

    let create = |name: &str, expires: &str| kubectl_apply(cp, &approval(&ns, name, expires));
    let decide = |context: &[&str], name: &str, patch: serde_json::Value| {
        let mut args = context.to_vec();
        let patch = patch.to_string();
        args.extend([
            "patch", "approval", name, "-n", &ns, "--type", "merge", "-p", &patch,
        ]);
        cp.kubectl_output(&args)
    };
    apply_approver_role(cp, &ns);
    let sidecar = format!("system:serviceaccount:{ns}:agentgate-sidecar");
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
    // Nor under the name an OIDC-configured API server gives her (`oidc:` + e-mail).
    let err = decide(
        &["--context", users::CAROL_OIDC],
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
    let groups = cp
        .kubectl_output(&[
            "get",
            "approval",
            "apr-delete-1",
            "-n",
            &ns,
            "-o",
            "jsonpath={.spec.decidedByGroups}",
        ])
        .unwrap();
    assert!(groups.contains("dba-oncall"), "{groups}");

    // The operator publishes one Event for the decision.
    wait_for("the decision's Event", String::new, async || {
        let events = cp
            .kubectl_output(&[
                "get",
                "events",
                "-n",
                &ns,
                "--field-selector",
                "involvedObject.name=apr-delete-1",
                "-o",
                "json",
            ])
            .ok()?;
        let events: serde_json::Value = serde_json::from_str(&events).ok()?;
        events["items"]
            .as_array()?
            .iter()
            .find(|e| {
                e["reason"] == "Approved"
                    && e["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("by alice (ticket 4711)"))
            })
            .map(|_| ())
    })
    .await;

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

    // Creation: only the agent's sidecar (its service account in the Approval's own
    // namespace) holds requests, for an agent of that namespace, and never decided.
    let sa = format!("system:serviceaccount:{ns}:claude");
    let creator = json!({ "apiVersion": "v1", "kind": "List", "items": [
        { "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
          "metadata": { "name": "holder", "namespace": ns },
          "rules": [{ "apiGroups": ["agentgate.dev"], "resources": ["approvals"], "verbs": ["create"] }] },
        { "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
          "metadata": { "name": "holder", "namespace": ns },
          "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "holder" },
          "subjects": [
            { "apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": sa },
            { "apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "developers" } ] }
    ]});
    kubectl_apply(cp, &creator.to_string());
    let create_as = |who: &[&str], object: serde_json::Value| {
        let mut args = who.to_vec();
        args.extend(["create", "-f", "-"]);
        let mut child = cp
            .kubectl()
            .args(&args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(
            &mut child.stdin.take().unwrap(),
            object.to_string().as_bytes(),
        )
        .unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let object = |name: &str, agent_ns: &str, decided: bool| {
        let mut a: serde_json::Value =
            serde_json::from_str(&approval(&ns, name, "2099-01-01T00:00:00Z")).unwrap();
        a["spec"]["agent"]["namespace"] = json!(agent_ns);
        if decided {
            a["spec"]["decision"] = json!("Approved");
            a["spec"]["decidedBy"] = json!("alice");
        }
        a
    };
    // Control: the agent's service account may hold a request of its own namespace.
    let (ok, err) = create_as(&["--as", &sa], object("apr-held", &ns, false));
    assert!(ok, "{err}");
    // It may not create one already approved, naming another namespace or not.
    let (ok, err) = create_as(&["--as", &sa], object("apr-forged", "elsewhere", true));
    assert!(!ok && err.contains("created undecided"), "{err}");
    let (ok, err) = create_as(&["--as", &sa], object("apr-forged", "elsewhere", false));
    assert!(
        !ok && err.contains("not this Approval's namespace"),
        "{err}"
    );
    // A person (with RBAC to create) is not the agent's sidecar.
    let (ok, err) = create_as(&["--context", users::BOB], object("apr-by-bob", &ns, false));
    assert!(!ok && err.contains("only the agent's sidecar"), "{err}");
}

/// The sidecar binary in front of a real PostgreSQL, holding its approvals on the real
/// API server, with the operator's webhooks deciding who may decide.
#[tokio::test]
async fn a_held_delete_runs_after_approval_and_grants_cover_what_they_say() {
    let cp = ControlPlane::shared();
    let client = cp.client().await;
    let system = cp.namespace(&client, "agentgate-system").await;
    let ns = cp.namespace(&client, "held").await;
    let (operator, webhook, _) = start_operator(cp, &client, &system, &ns).await;
    let db = tokio::task::spawn_blocking(|| {
        agentgate_e2e::postgres::Postgres::start(
            "CREATE ROLE app LOGIN PASSWORD 'app-pw-3b9e';
             CREATE TABLE orders (id int PRIMARY KEY, note text);
             INSERT INTO orders SELECT g, 'order ' || g FROM generate_series(1, 10) g;
             CREATE TABLE audit_log (id int, line text);
             INSERT INTO audit_log SELECT g, 'line ' || g FROM generate_series(1, 10) g;
             CREATE TABLE slow (id int);
             CREATE TABLE staging (id int);
             INSERT INTO staging VALUES (1), (2);
             CREATE TABLE api_keys (key text);
             INSERT INTO api_keys VALUES ('ghp_abcdefghijklmnopqrstuvwxyz0123456789');
             GRANT ALL ON orders, audit_log, slow, staging, api_keys TO app;",
        )
        .unwrap()
    })
    .await
    .unwrap();

    // The sidecar, configured as the operator would, its Approvals in `ns`.
    let dir = tempfile::tempdir().unwrap();
    let listen = free_port();
    let rule = |name: &str, table: &str, extra: serde_json::Value| {
        let mut approval = json!({ "approvers": { "groups": ["dba-oncall"] }, "timeout": "10m" });
        for (k, v) in extra.as_object().unwrap() {
            approval[k] = v.clone();
        }
        json!({ "name": name, "match": { "sql": { "statements": ["delete"], "tables": [table] } },
                "action": "approve", "approval": approval })
    };
    write_postgres_sidecar(
        dir.path(),
        &ns,
        (db.port, ("app", "app-pw-3b9e")),
        listen,
        json!([
            { "name": "reads", "match": { "sql": { "statements": ["select"] } }, "action": "allow" },
            rule("order-deletes", "public.orders", json!({ "grant": "once", "maxEstimatedRows": 5 })),
            rule("log-deletes", "public.audit_log", json!({ "grant": "fingerprint", "grantTTL": "10m" })),
            rule("slow-deletes", "public.slow", json!({ "timeout": "2s" })),
            rule("staging-deletes", "public.staging", json!({ "mode": "retry" })),
            rule("key-deletes", "public.api_keys", json!({})),
        ]),
    );
    let admin_port = free_port();
    let log_path = dir.path().join("sidecar.log");
    let start_sidecar = || spawn_sidecar(cp, dir.path(), &ns, &webhook, admin_port);
    let ready = async |log: &dyn Fn() -> String| {
        wait_for("the sidecar", log, async || {
            (http_get(admin_port, "/readyz").await?.0 == 200).then_some(())
        })
        .await;
    };
    let mut sidecar = start_sidecar();
    let log = || {
        format!(
            "sidecar:\n{}\noperator:\n{}",
            std::fs::read_to_string(&log_path).unwrap_or_default(),
            operator.log()
        )
    };
    ready(&log).await;

    // psql as the agent, in the background: it blocks while its statement is held.
    let run = |sql: &str| psql_agent(listen, sql);
    let pending = async |known: &[String]| pending_approval(cp, &ns, known, log).await;
    let get = |name: &str, path: &str| approval_field(cp, &ns, name, path);
    let decide = |name: &str, decision: &str| decide_as_alice(cp, &ns, name, decision);
    apply_approver_role(cp, &ns);

    // Nothing is held yet (this also builds the plugin before anything waits on it).
    let (ok, listed) = kubectl_agentgate(cp, &ns, &["approvals"]);
    assert!(ok && listed.lines().count() == 1, "{listed}");

    // 1. A DELETE is held; the approver sees it; approved, it runs and is recorded.
    let delete = run("DELETE FROM orders WHERE id = 1");
    let first = pending(&[]).await;
    assert_eq!(
        get(&first, "{.spec.request.summary}"),
        "DELETE FROM orders WHERE id = 1"
    );
    assert_eq!(get(&first, "{.spec.agent.pod}"), "claude-7f9c");
    // The impact preview: the planner's estimate, from EXPLAIN (never ANALYZE).
    assert_eq!(get(&first, "{.spec.request.impact.estimatedRows}"), "1");
    assert!(
        !delete.is_finished(),
        "the agent's statement waits for the decision"
    );
    // The approver's view and decision, through `kubectl agentgate` (a kubectl plugin).
    let plugin = |args: &[&str]| kubectl_agentgate(cp, &ns, args);
    let (ok, listed) = plugin(&["approvals"]);
    assert!(ok, "{listed}");
    let line = listed
        .lines()
        .find(|l| l.starts_with(first.as_str()))
        .unwrap_or_else(|| panic!("{listed}"));
    assert!(
        listed.contains("\n    impact: the planner's estimate (EXPLAIN, not run)"),
        "{listed}"
    );
    assert!(
        line.contains("Pending")
            // the rule, then the planner's estimate
            && line.contains(&format!("{:<20} {:<9} ", "order-deletes", "1"))
            && line.contains("DELETE FROM orders WHERE id = 1"),
        "{line}"
    );
    // bob may run the plugin, but the webhook refuses him; alice decides.
    let (ok, refused) = plugin(&[
        "approve",
        &first,
        "--reason",
        "looks fine",
        "--context",
        users::BOB,
    ]);
    assert!(
        !ok && refused.contains("not in the approver groups"),
        "{refused}"
    );
    let decided = std::time::Instant::now();
    let (ok, out) = plugin(&[
        "approve",
        &first,
        "--reason",
        "ticket 4711",
        "--context",
        users::ALICE,
    ]);
    assert!(ok, "{out}");
    assert!(out.contains("approved by alice"), "{out}");
    let (ok, out) = delete.join().unwrap();
    let latency = decided.elapsed();
    assert!(ok, "{out}\n{}", log());
    assert!(out.contains("DELETE 1"), "{out}");
    // `make bench` measures this latency (p50 75 ms, plugin start-up excluded); the bound
    // here catches a lost watch or polling, with room for a loaded CI machine.
    assert!(
        latency < std::time::Duration::from_secs(5),
        "proceeded {latency:?} after the patch\n{}",
        log()
    );
    assert_eq!(get(&first, "{.spec.decidedBy}"), "alice");
    wait_for("Executed", log, async || {
        (get(&first, "{.status.phase}") == "Executed"
            && get(&first, "{.status.result.rowsAffected}") == "1")
            .then_some(())
    })
    .await;

    // Above approval.maxEstimatedRows a statement is refused at once, with no Approval.
    let (ok, out) = run("DELETE FROM orders WHERE id > 0").join().unwrap();
    assert!(!ok && out.contains("maxEstimatedRows (5)"), "{out}");

    // 2. `grant: once`: the next DELETE is held again; denied, the agent is told why.
    let again = run("DELETE FROM orders WHERE id = 2");
    let second = pending(std::slice::from_ref(&first)).await;
    decide(&second, "Denied");
    let (ok, out) = again.join().unwrap();
    assert!(!ok);
    assert!(
        out.contains(&format!(
            "Approval {second} was denied by alice: ticket 4711"
        )),
        "{out}"
    );
    assert_eq!(get(&second, "{.status.phase}"), "Denied");

    // 3. `grant: fingerprint`: approved once, the same statement shape passes within the TTL.
    let log_delete = run("DELETE FROM audit_log WHERE id = 1");
    let third = pending(&[first.clone(), second.clone()]).await;
    decide(&third, "Approved");
    assert!(log_delete.join().unwrap().0);
    let (ok, out) = run("DELETE FROM audit_log WHERE id = 2").join().unwrap();
    assert!(ok && out.contains("DELETE 1"), "{out}");
    let count = cp
        .kubectl_output(&["get", "approvals", "-n", &ns, "-o", "name"])
        .unwrap();
    assert_eq!(
        count.lines().count(),
        3,
        "the grant needed no new Approval: {count}"
    );
    assert_eq!(
        db.psql_as(
            ("app", "app-pw-3b9e"),
            &["-c", "SELECT count(*) FROM orders"]
        )
        .unwrap()
        .trim(),
        "9"
    );

    // 4. Nobody decides within the timeout: refused, and the Approval says Expired.
    let (ok, out) = run("DELETE FROM slow").join().unwrap();
    assert!(!ok);
    assert!(out.contains("was not decided within 2s"), "{out}");
    let phases = cp
        .kubectl_output(&[
            "get",
            "approvals",
            "-n",
            &ns,
            "-o",
            "jsonpath={.items[*].status.phase}",
        ])
        .unwrap();
    assert!(phases.contains("Expired"), "{phases}");

    // 5. `mode: retry`: refused at once naming the Approval; once approved, the same
    // request passes when it comes back — once.
    let (ok, out) = run("DELETE FROM staging WHERE id = 1").join().unwrap();
    assert!(
        !ok && out.contains("retry this request after it is approved"),
        "{out}"
    );
    let name = out
        .split_whitespace()
        .find(|w| w.starts_with("apr-"))
        .unwrap()
        .trim_end_matches(|c: char| !c.is_alphanumeric())
        .to_owned();
    let (ok, out) = run("DELETE FROM staging WHERE id = 1").join().unwrap();
    assert!(
        !ok && out.contains(&format!("still waiting for Approval {name}")),
        "{out}"
    );
    decide(&name, "Approved");
    wait_for("the retry approval to be seen", log, async || {
        (get(&name, "{.status.phase}") == "Approved").then_some(())
    })
    .await;
    let (ok, out) = run("DELETE FROM staging WHERE id = 1").join().unwrap();
    assert!(ok && out.contains("DELETE 1"), "{out}");
    let (ok, out) = run("DELETE FROM staging WHERE id = 1").join().unwrap();
    assert!(
        !ok && out.contains("held for approval in Approval"),
        "the approval was spent: {out}"
    );

    // 5b. The held request's Approval is deleted and re-created under its name (and the
    // copy approved): the agent is told at once that it was deleted, nothing runs, and
    // the sidecar writes nothing onto the object it did not create.
    let known_now = |cp: &ControlPlane| -> Vec<String> {
        cp.kubectl_output(&[
            "get",
            "approvals",
            "-n",
            &ns,
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ])
        .unwrap()
        .split_whitespace()
        .map(str::to_owned)
        .collect()
    };
    let before = known_now(cp);
    let replaced = run("DELETE FROM orders WHERE id = 4");
    let victim = pending(&before).await;
    let copy = cp
        .kubectl_output(&["get", "approval", &victim, "-n", &ns, "-o", "json"])
        .unwrap();
    let mut copy: serde_json::Value = serde_json::from_str(&copy).unwrap();
    for field in [
        "uid",
        "resourceVersion",
        "creationTimestamp",
        "managedFields",
    ] {
        copy["metadata"].as_object_mut().unwrap().remove(field);
    }
    copy.as_object_mut().unwrap().remove("status");
    let asked = std::time::Instant::now();
    cp.kubectl_output(&["delete", "approval", &victim, "-n", &ns])
        .unwrap();
    kubectl_apply(cp, &copy.to_string());
    let (ok, out) = replaced.join().unwrap();
    assert!(!ok && out.contains("was deleted"), "{out}");
    assert!(
        asked.elapsed() < std::time::Duration::from_secs(30),
        "told at once"
    );
    decide(&victim, "Approved");
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    assert_eq!(
        get(&victim, "{.status.phase}"),
        "",
        "the sidecar wrote onto the copy"
    );
    assert_eq!(
        db.psql_as(
            ("app", "app-pw-3b9e"),
            &["-c", "SELECT count(*) FROM orders WHERE id = 4"]
        )
        .unwrap()
        .trim(),
        "1"
    );

    // 5c. An approved statement fails with an error that quotes a secret (a bad cast
    // of a stored key): the agent gets the server's error, but no record — audit trail,
    // logs, the Approval, Events — holds the secret.
    const SECRET: &str = "ghp_abcdefghijklmnopqrstuvwxyz0123456789";
    let known = known_now(cp);
    let failing = run("DELETE FROM api_keys WHERE key::int = 1");
    let name = pending(&known).await;
    decide(&name, "Approved");
    let (ok, out) = failing.join().unwrap();
    assert!(
        !ok && out.contains(SECRET),
        "control: the server's error quotes it: {out}"
    );
    wait_for("the failure to be recorded", log, async || {
        (get(&name, "{.status.phase}") == "Failed").then_some(())
    })
    .await;
    assert!(
        get(&name, "{.status.result.message}").contains("invalid input syntax"),
        "{}",
        get(&name, "{.status.result.message}")
    );
    for (what, record) in [
        ("audit trail", sidecar_audit(dir.path())),
        ("sidecar log", std::fs::read_to_string(&log_path).unwrap()),
        ("operator log", operator.log()),
        (
            "Approvals",
            cp.kubectl_output(&["get", "approvals", "-n", &ns, "-o", "json"])
                .unwrap(),
        ),
        (
            "Events",
            cp.kubectl_output(&["get", "events", "-n", &ns, "-o", "json"])
                .unwrap(),
        ),
    ] {
        assert!(
            !record.contains(SECRET),
            "the secret reached the {what}:\n{record}"
        );
    }

    // 6. The sidecar dies while a request is held: the agent's connection ends (nothing
    // hangs), and the restarted sidecar marks the orphaned Approval Expired.
    let known = known_now(cp);
    let orphaned = run("DELETE FROM orders WHERE id = 3");
    let held = pending(&known).await;
    drop(sidecar);
    let (ok, _) = orphaned.join().unwrap();
    assert!(!ok, "the agent sees its connection end");
    sidecar = start_sidecar();
    ready(&log).await;
    wait_for("the orphaned Approval to expire", log, async || {
        (get(&held, "{.status.phase}") == "Expired").then_some(())
    })
    .await;
    let patch = json!({ "spec": { "decision": "Approved" } }).to_string();
    let late = cp.kubectl_output(&[
        "--context",
        users::ALICE,
        "patch",
        "approval",
        &held,
        "-n",
        &ns,
        "--type",
        "merge",
        "-p",
        &patch,
    ]);
    assert!(
        late.unwrap_err().contains("expired"),
        "an orphaned Approval cannot be approved"
    );
    assert_eq!(
        db.psql_as(
            ("app", "app-pw-3b9e"),
            &["-c", "SELECT count(*) FROM orders WHERE id = 3"]
        )
        .unwrap()
        .trim(),
        "1"
    );
    // The session as etcd holds it: its pod, what was decided, and the head of the audit
    // chain — which the trail must hold.
    let sessions: Api<AgentSession> = Api::namespaced(client.clone(), &ns);
    let session = wait_for("the AgentSession", log, async || {
        let list = sessions.list(&Default::default()).await.ok()?;
        list.items
            .into_iter()
            .filter(|s| {
                s.status.as_ref().is_some_and(|st| {
                    st.counters.approvals_granted >= 1 && st.counters.rows_modified >= 1
                })
            })
            .max_by_key(|s| {
                s.status
                    .as_ref()
                    .and_then(|st| st.audit.as_ref())
                    .map(|a| a.last_seq)
            })
    })
    .await;
    let status = session.status.clone().unwrap();
    assert_eq!(session.spec.agent.pod, "claude-7f9c");
    assert_eq!(session.spec.agent.namespace, ns);
    assert!(
        status.counters.requests >= 3 && status.counters.denied >= 1,
        "{status:?}"
    );
    let anchored = status.audit.unwrap();
    let head = agentgate_crds::audit::Head {
        seq: u64::try_from(anchored.last_seq).unwrap(),
        hash: anchored.chain_head,
    };
    let trail = sidecar_audit(dir.path());
    agentgate_crds::audit::verify(&trail, Some(&head)).unwrap_or_else(|e| panic!("{e}"));
    // A trail cut short before that head no longer matches what etcd holds.
    let cut: String = trail
        .lines()
        .take_while(|l| !l.contains(&format!("\"seq\":{},", head.seq)))
        .map(|l| format!("{l}\n"))
        .collect();
    let e = agentgate_crds::audit::verify(&cut, Some(&head)).unwrap_err();
    assert!(e.what.contains("removed from its end"), "{e}");
    drop(sidecar);

    // The audit trail has the hold, the decision and the execution of the first DELETE.
    let audit = sidecar_audit(dir.path());
    let events: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let of_first = |kind: &str| {
        events.iter().any(|e| {
            e["kind"] == kind
                && (kind == "held" && e["request"]["sql"] == "DELETE FROM orders WHERE id = $1"
                    || e["approval"] == first.as_str())
        })
    };
    assert!(
        of_first("held") && of_first("decision") && of_first("completed"),
        "{audit}"
    );
    assert!(
        events
            .iter()
            .any(|e| e["approval"] == first.as_str() && e["rowsAffected"] == 1),
        "{audit}"
    );
    // The DELETE the fingerprint grant let through says so.
    let granted = format!("covered by the grant of {third}");
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "decision" && e["reason"] == granted.as_str()),
        "{audit}"
    );
}

/// Where the webhook does not guard Approvals, a stamp proves nothing: anyone who may
/// patch an Approval can write `decidedBy: alice` themselves. The sidecar checks the
/// webhook's configuration and asks the API server (a dry run) before it holds a request
/// and again before it acts on an approval.
#[tokio::test]
async fn approvals_the_webhook_does_not_guard_are_never_trusted() {
    let cp = ControlPlane::shared();
    let client = cp.client().await;
    let system = cp.namespace(&client, "agentgate-system").await;
    let covered = cp.namespace(&client, "guarded").await;
    let uncovered = cp.namespace(&client, "unguarded").await;
    let (operator, webhook, _) = start_operator(cp, &client, &system, &covered).await;
    let db = tokio::task::spawn_blocking(|| {
        agentgate_e2e::postgres::Postgres::start(
            "CREATE ROLE app LOGIN PASSWORD 'app-pw-5d2a';
             CREATE TABLE orders (id int PRIMARY KEY);
             INSERT INTO orders SELECT generate_series(1, 10);
             GRANT ALL ON orders TO app;",
        )
        .unwrap()
    })
    .await
    .unwrap();
    let remaining = |id: u32| {
        db.psql_as(
            ("app", "app-pw-5d2a"),
            &[
                "-c",
                &format!("SELECT count(*) FROM orders WHERE id = {id}"),
            ],
        )
        .unwrap()
        .trim()
        .to_owned()
    };
    // bob (developers, not an approver) may patch Approvals in both namespaces: RBAC
    // lets him write; only the webhook stops him deciding.
    apply_approver_role(cp, &covered);
    apply_approver_role(cp, &uncovered);
    let forge = |ns: &str, name: &str| {
        let patch = json!({ "spec": { "decision": "Approved", "reason": "looks fine",
                                      "decidedBy": "alice", "decidedByGroups": ["dba-oncall"] } });
        patch_approval_as(cp, users::BOB, ns, name, &patch)
    };

    // Control: in the unguarded namespace, bob's forged stamp is stored as he wrote it.
    kubectl_apply(
        cp,
        &approval(&uncovered, "apr-control", "2099-01-01T00:00:00Z"),
    );
    forge(&uncovered, "apr-control").unwrap();
    assert_eq!(
        approval_field(cp, &uncovered, "apr-control", "{.spec.decidedBy}"),
        "alice"
    );
    // ... and in the guarded one the webhook refuses it.
    kubectl_apply(
        cp,
        &approval(&covered, "apr-control", "2099-01-01T00:00:00Z"),
    );
    let err = forge(&covered, "apr-control").unwrap_err();
    assert!(err.contains("not in the approver groups"), "{err}");

    let rules = json!([{ "name": "deletes", "match": { "sql": { "statements": ["delete"] } },
                         "action": "approve", "approval": { "approvers": { "groups": ["dba-oncall"] }, "timeout": "10m" } }]);
    let start = |ns: &str| {
        let dir = tempfile::tempdir().unwrap();
        let (listen, admin_port) = (free_port(), free_port());
        write_postgres_sidecar(
            dir.path(),
            ns,
            (db.port, ("app", "app-pw-5d2a")),
            listen,
            rules.clone(),
        );
        let sidecar = spawn_sidecar(cp, dir.path(), ns, &webhook, admin_port);
        (dir, sidecar, listen, admin_port)
    };
    let ready = async |sidecar: &Process, admin_port: u16| {
        let log = || format!("sidecar:\n{}\noperator:\n{}", sidecar.log(), operator.log());
        wait_for("the sidecar", log, async || {
            (http_get(admin_port, "/readyz").await?.0 == 200).then_some(())
        })
        .await;
    };
    let pods_approvals = |ns: &str| {
        cp.kubectl_output(&[
            "get",
            "approvals",
            "-n",
            ns,
            "-l",
            "agentgate.dev/pod=claude-7f9c",
            "-o",
            "name",
        ])
        .unwrap()
    };

    // 1. In the unguarded namespace the sidecar holds nothing: refused at once, and no
    // Approval is created for anyone to forge.
    let (_dir, unguarded, listen, admin_port) = start(&uncovered);
    ready(&unguarded, admin_port).await;
    let (ok, out) = psql_agent(listen, "DELETE FROM orders WHERE id = 1")
        .join()
        .unwrap();
    assert!(
        !ok && out.contains("approval webhook does not run here"),
        "{out}"
    );
    assert_eq!(pods_approvals(&uncovered).trim(), "");
    assert_eq!(remaining(1), "1");
    let (_, metrics) = http_get(admin_port, "/metrics").await.unwrap();
    assert!(
        metrics.contains("agentgate_sidecar_approval_webhook_guards 0"),
        "{metrics}"
    );
    drop(unguarded);

    // 2. In the guarded namespace a request is held; then the webhook stops guarding it
    // (an administrator narrows its namespaceSelector) and bob forges the decision. The
    // API server stores the forgery; the sidecar checks again before acting and refuses.
    let (_dir, guarded, listen, admin_port) = start(&covered);
    ready(&guarded, admin_port).await;
    let held = psql_agent(listen, "DELETE FROM orders WHERE id = 2");
    let log = || guarded.log();
    let name = pending_approval(cp, &covered, &[], log).await;
    // (The approvals webhook is the mutating configuration's second, the validating one's
    // only.)
    for (kind, index) in [
        ("mutatingwebhookconfiguration", 1),
        ("validatingwebhookconfiguration", 0),
    ] {
        let narrow = json!([{ "op": "replace", "path": format!("/webhooks/{index}/namespaceSelector"),
                              "value": { "matchLabels": { "kubernetes.io/metadata.name": "somewhere-else" } } }]);
        cp.kubectl_output(&[
            "patch",
            kind,
            &webhook,
            "--type",
            "json",
            "-p",
            &narrow.to_string(),
        ])
        .unwrap();
    }
    // (The API server applies webhook configuration changes within a second or so.)
    wait_for("the webhook to stop guarding", log, async || {
        forge(&covered, &name).ok()
    })
    .await;
    let (ok, out) = held.join().unwrap();
    assert!(
        !ok && out.contains("cannot verify") && out.contains("does not run here"),
        "{out}"
    );
    assert_eq!(remaining(2), "1");
    assert_eq!(
        approval_field(cp, &covered, &name, "{.status.phase}"),
        "Failed"
    );

    // 3. A configuration that would let a decision through when the webhook is down
    // (failurePolicy Ignore) is refused before anything is held, and says why.
    let ignore =
        json!([{ "op": "replace", "path": "/webhooks/0/failurePolicy", "value": "Ignore" },
                        { "op": "remove", "path": "/webhooks/0/namespaceSelector" }])
        .to_string();
    cp.kubectl_output(&[
        "patch",
        "validatingwebhookconfiguration",
        &webhook,
        "--type",
        "json",
        "-p",
        &ignore,
    ])
    .unwrap();
    let (ok, out) = psql_agent(listen, "DELETE FROM orders WHERE id = 3")
        .join()
        .unwrap();
    assert!(!ok && out.contains("failurePolicy Ignore"), "{out}");
    assert_eq!(remaining(3), "1");
}

/// The sidecar binary in front of the real API server: a held Kubernetes write is first
/// run as the API server's own dry run, and the Approval shows what it would do.
#[tokio::test]
async fn a_held_kubernetes_write_shows_the_api_servers_dry_run() {
    let cp = ControlPlane::shared();
    let client = cp.client().await;
    let system = cp.namespace(&client, "agentgate-system").await;
    let ns = cp.namespace(&client, "dry-run").await;
    let (operator, webhook, _) = start_operator(cp, &client, &system, &ns).await;
    apply_approver_role(cp, &ns);
    let admin = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["-n", &ns]);
        cp.kubectl_output(&all)
            .unwrap_or_else(|e| panic!("kubectl {args:?}: {e}"))
    };
    // The Connection's credential: a service account that may write ConfigMaps.
    admin(&["create", "serviceaccount", "agent-writer"]);
    admin(&[
        "create",
        "role",
        "configmaps",
        "--verb=get,list,watch,create,update,patch,delete,deletecollection",
        "--resource=configmaps",
    ]);
    admin(&[
        "create",
        "rolebinding",
        "agent-writer",
        "--role=configmaps",
        &format!("--serviceaccount={ns}:agent-writer"),
    ]);
    let token = admin(&["create", "token", "agent-writer", "--duration=1h"]);
    admin(&[
        "create",
        "configmap",
        "settings",
        "--from-literal=mode=slow",
    ]);
    for i in 1..=3 {
        admin(&["create", "configmap", &format!("batch-{i}")]);
        admin(&["label", "configmap", &format!("batch-{i}"), "batch=yes"]);
    }

    let dir = tempfile::tempdir().unwrap();
    let listen = free_port();
    let approval = json!({ "approvers": { "groups": ["dba-oncall"] }, "timeout": "10m" });
    let mut bulk = approval.clone();
    bulk["maxEstimatedRows"] = json!(2);
    let bundle = json!({
        "namespace": ns,
        "connections": [{ "name": "prod-cluster", "generation": 1, "spec": {
            "protocol": "kubernetes",
            "upstream": { "address": cp.server(), "tls": { "caSecretRef": { "name": "cluster-ca", "key": "ca.crt" } } },
            "credentials": { "serviceAccount": { "name": "agent-writer" } },
            "listen": { "port": listen } } }],
        "policies": [{ "name": "prod-agents", "generation": 1, "spec": {
            "agentSelector": {}, "connections": ["prod-cluster"],
            "rules": [
                { "name": "reads", "match": { "kubernetes": { "verbs": ["get", "list", "watch"] } }, "action": "allow" },
                { "name": "configmap-writes", "match": { "kubernetes": {
                    "verbs": ["create", "update", "patch", "delete"], "resources": ["configmaps"] } },
                  "action": "approve", "approval": approval },
                { "name": "bulk-deletes", "match": { "kubernetes": {
                    "verbs": ["deletecollection"], "resources": ["configmaps"] } },
                  "action": "approve", "approval": bulk },
            ] } }]
    });
    std::fs::write(dir.path().join("bundle.json"), bundle.to_string()).unwrap();
    std::fs::write(dir.path().join("labels"), "app=\"agent\"\n").unwrap();
    let credentials = dir.path().join("credentials");
    std::fs::create_dir_all(credentials.join("cluster-ca")).unwrap();
    std::fs::copy(cp.ca_file(), credentials.join("cluster-ca/ca.crt")).unwrap();
    std::fs::create_dir_all(credentials.join("serviceaccount-agent-writer")).unwrap();
    std::fs::write(
        credentials.join("serviceaccount-agent-writer/token"),
        token.trim(),
    )
    .unwrap();
    let admin_port = free_port();
    let log_path = dir.path().join("sidecar.log");
    let _sidecar = spawn_sidecar(cp, dir.path(), &ns, &webhook, admin_port);
    let log = || {
        format!(
            "sidecar:\n{}\noperator:\n{}",
            std::fs::read_to_string(&log_path).unwrap_or_default(),
            operator.log()
        )
    };
    wait_for("the sidecar", log, async || {
        (http_get(admin_port, "/readyz").await?.0 == 200).then_some(())
    })
    .await;

    // kubectl as the agent, through the sidecar, with no credential of its own; in the
    // background, as it blocks while its request is held.
    let kubeconfig = dir.path().join("agent.kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: prod\n  cluster: {{ server: \"http://127.0.0.1:{listen}\" }}\n\
             users:\n- name: agent\n  user: {{}}\ncontexts:\n- name: prod\n  context: {{ cluster: prod, user: agent, namespace: {ns} }}\n\
             current-context: prod\n"
        ),
    )
    .unwrap();
    let kubectl = cp.kubectl().get_program().to_owned();
    let agent = |args: &[&str]| {
        let mut command = std::process::Command::new(&kubectl);
        command.arg("--kubeconfig").arg(&kubeconfig).args(args);
        std::thread::spawn(move || {
            let out = command.output().unwrap();
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).into_owned()
                    + &String::from_utf8_lossy(&out.stderr),
            )
        })
    };
    let get = |name: &str, path: &str| approval_field(cp, &ns, name, path);
    let mode = || {
        admin(&[
            "get",
            "configmap",
            "settings",
            "-o",
            "jsonpath={.data.mode}",
        ])
    };

    let (ok, listed) = kubectl_agentgate(cp, &ns, &["approvals"]);
    assert!(
        ok && listed.lines().count() == 1,
        "nothing is held yet: {listed}"
    );

    // 1. A patch: the approver sees the fields it changes, a secret in them masked; the
    // dry run stored nothing; approved, the patch runs once.
    let token_value = "ghp_abcdefghijklmnopqrstuvwxyz0123456789";
    let patch = json!({ "data": { "mode": "fast", "token": token_value } }).to_string();
    let patching = agent(&[
        "patch",
        "configmap",
        "settings",
        "--type",
        "merge",
        "-p",
        &patch,
    ]);
    let first = pending_approval(cp, &ns, &[], log).await;
    let detail = get(&first, "{.spec.request.impact.detail}");
    assert!(
        detail.starts_with(&format!("dry run: changes configmaps settings in {ns}: "))
            && detail.contains(r#"data.mode: "slow" → "fast""#)
            && detail.contains("data.token: (none) → ")
            && !detail.contains("ghp_abc"),
        "{detail}"
    );
    assert_eq!(mode(), "slow", "the dry run changed nothing");
    let (ok, listed) = kubectl_agentgate(cp, &ns, &["approvals"]);
    assert!(
        ok && listed.contains(&format!("\n    impact: {detail}")),
        "{listed}"
    );
    decide_as_alice(cp, &ns, &first, "Approved");
    let (ok, out) = patching.join().unwrap();
    assert!(ok, "{out}\n{}", log());
    assert_eq!(mode(), "fast");
    wait_for(
        "Executed",
        || format!("{}\n{}", admin(&["get", "approvals", "-o", "yaml"]), log()),
        async || {
            (get(&first, "{.status.phase}") == "Executed"
                && get(&first, "{.status.result.httpStatus}") == "200")
                .then_some(())
        },
    )
    .await;

    // 2. A create the API server would refuse: the approver sees why before deciding.
    let creating = agent(&["create", "configmap", "Bad_Name", "--from-literal=a=b"]);
    let second = pending_approval(cp, &ns, std::slice::from_ref(&first), log).await;
    let detail = get(&second, "{.spec.request.impact.detail}");
    assert!(
        detail.starts_with("the API server's dry run refuses it (422 Invalid)")
            && detail.contains("metadata.name"),
        "{detail}"
    );
    decide_as_alice(cp, &ns, &second, "Denied");
    let (ok, out) = creating.join().unwrap();
    assert!(
        !ok && out.contains(&format!("Approval {second} was denied by alice")),
        "{out}"
    );

    // 3. A deletecollection: the dry run counts what it would delete; above
    // maxEstimatedRows it is refused at once, nobody is asked, and nothing is deleted.
    let (ok, out) = agent(&[
        "delete",
        "--raw",
        &format!("/api/v1/namespaces/{ns}/configmaps?labelSelector=batch%3Dyes"),
    ])
    .join()
    .unwrap();
    assert!(
        !ok && out.contains("estimates this changes 3 rows or objects")
            && out.contains("maxEstimatedRows (2)"),
        "{out}"
    );
    let left = admin(&["get", "configmaps", "-l", "batch=yes", "-o", "name"]);
    assert_eq!(left.lines().count(), 3, "{left}");
    let approvals = admin(&["get", "approvals", "-o", "name"]);
    assert_eq!(approvals.lines().count(), 2, "{approvals}");

    // The audit trail keeps what the approver was shown.
    let audit = sidecar_audit(dir.path());
    assert!(
        audit.lines().any(|l| {
            let e: serde_json::Value = serde_json::from_str(l).unwrap();
            e["kind"] == "held"
                && e["impact"]["detail"]
                    .as_str()
                    .is_some_and(|d| d.contains(r#"data.mode: "slow" → "fast""#))
        }),
        "{audit}"
    );
    assert!(!audit.contains("ghp_abc"), "{audit}");
}
