//! `make bench`: approval latency — from a human's decision (the PATCH of
//! `spec.decision`, as alice, through the API server and the operator's webhooks) to the
//! held statement finishing in the agent's psql, through the sidecar binary, against a
//! real PostgreSQL. The peer is the same kind of statement run by psql straight against
//! the database, so the ratio is what the hold adds beyond running it at all.

#![allow(clippy::unwrap_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use agentgate_crds::Approval;
use agentgate_e2e::{ControlPlane, users};
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams};
use serde_json::json;

const APPROVALS: usize = 20;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn psql(port: u16, user: &str, password: &str, db: &str, sql: &str) -> (bool, String) {
    let out = Command::new("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            user,
            "-d",
            db,
            "-X",
            "-A",
            "-t",
            "-c",
            sql,
        ])
        .env("PGPASSWORD", password)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("AGENTGATE_BENCH_APPROVALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(APPROVALS);
    let cp = ControlPlane::shared();
    let client = cp.client().await;
    let system = cp.namespace(&client, "agentgate-system").await;
    let ns = cp.namespace(&client, "bench").await;
    let (_operator, webhook, _) = support::start_operator(cp, &client, &system, &ns).await;
    support::apply_approver_role(cp, &ns);
    let rows = 2 * n + 10;
    let db = agentgate_e2e::postgres::Postgres::start(&format!(
        "CREATE ROLE app LOGIN PASSWORD 'bench-pw'; CREATE TABLE orders (id int PRIMARY KEY);
         INSERT INTO orders SELECT generate_series(1, {rows}); GRANT ALL ON orders TO app;"
    ))
    .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let listen = support::free_port();
    support::write_postgres_sidecar(
        dir.path(),
        &ns,
        (db.port, ("app", "bench-pw")),
        listen,
        json!([{ "name": "deletes", "match": { "sql": { "statements": ["delete"] } }, "action": "approve",
                 "approval": { "approvers": { "groups": ["dba-oncall"] }, "timeout": "60s" } }]),
    );
    let admin_port = support::free_port();
    let sidecar = support::spawn_sidecar(cp, dir.path(), &ns, &webhook, admin_port);
    support::wait_for(
        "the sidecar",
        || sidecar.log(),
        async || (support::http_get(admin_port, "/readyz").await?.0 == 200).then_some(()),
    )
    .await;

    let approvals: Api<Approval> = Api::namespaced(client.clone(), &ns);
    let alice: Api<Approval> = Api::namespaced(cp.client_as(users::ALICE).await, &ns);
    let (mut held, mut direct) = (Vec::new(), Vec::new());
    for i in 0..n {
        // The peer: the same statement, straight to the database.
        let started = Instant::now();
        let (ok, err) = psql(
            db.port,
            "app",
            "bench-pw",
            "postgres",
            &format!("DELETE FROM orders WHERE id = {}", n + 1 + i),
        );
        assert!(ok, "{err}");
        direct.push(started.elapsed());

        let agent = std::thread::spawn(move || {
            psql(
                listen,
                "agent",
                "",
                "orders",
                &format!("DELETE FROM orders WHERE id = {}", i + 1),
            )
        });
        let name = loop {
            let list = approvals.list(&ListParams::default()).await.unwrap();
            let pending = list.items.into_iter().find(|a| {
                a.spec.decision.is_none()
                    && a.status.as_ref().and_then(|s| s.phase)
                        == Some(agentgate_crds::ApprovalPhase::Pending)
            });
            if let Some(a) = pending {
                break a.metadata.name.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let patch = json!({ "spec": { "decision": "Approved", "reason": "bench" } });
        let started = Instant::now();
        alice
            .patch(&name, &PatchParams::default(), &Patch::Merge(patch))
            .await
            .unwrap();
        let (ok, err) = tokio::task::spawn_blocking(move || agent.join().unwrap())
            .await
            .unwrap();
        held.push(started.elapsed());
        assert!(ok, "{err}\n{}", sidecar.log());
    }
    held.sort();
    direct.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "approval latency: {n} held DELETEs, decision PATCH -> statement done in the agent's psql"
    );
    println!(
        "  held, after the patch  p50 {:.1} ms  p95 {:.1} ms  max {:.1} ms",
        ms(percentile(&held, 0.5)),
        ms(percentile(&held, 0.95)),
        ms(percentile(&held, 1.0))
    );
    println!(
        "  direct psql (peer)     p50 {:.1} ms  p95 {:.1} ms",
        ms(percentile(&direct, 0.5)),
        ms(percentile(&direct, 0.95))
    );
    println!(
        "  ratio p50 {:.2}",
        ms(percentile(&held, 0.5)) / ms(percentile(&direct, 0.5))
    );
}
