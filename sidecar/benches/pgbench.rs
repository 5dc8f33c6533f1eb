//! `make bench`: the Postgres gateway's cost. `pgbench`'s select-only script against the
//! same real PostgreSQL server three ways — directly (the peer: an agent with the
//! database password), through pgbouncer (the usual proxy in this seat, session
//! pooling) and through the sidecar (token login, a decision on every statement, row
//! masking, audit) — in interleaved rounds, simple and prepared protocol; average
//! latency and throughput of each and the sidecar's ratios are reported.

#![allow(clippy::unwrap_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agentgate_e2e::postgres::Postgres;
use serde_json::json;
use support::*;

const PASSWORD: &str = "bench-password-3e7a";
const TRANSACTIONS: usize = 2000;
const ROUNDS: usize = 3;

/// pgbouncer in session mode in front of `db_port`, run as `nobody` when root (it
/// refuses to run as root).
fn pgbouncer(dir: &Path, db_port: u16) -> (Child, u16) {
    let port = free_port();
    std::fs::write(dir.join("users.txt"), format!("\"app\" \"{PASSWORD}\"\n")).unwrap();
    std::fs::write(
        dir.join("pgbouncer.ini"),
        format!(
            "[databases]\norders = host=127.0.0.1 port={db_port} dbname=postgres\n\
             [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
             auth_type = scram-sha-256\nauth_file = {}\npool_mode = session\n\
             max_client_conn = 100\ndefault_pool_size = 20\nlogfile = {}\n",
            dir.join("users.txt").display(),
            dir.join("pgbouncer.log").display()
        ),
    )
    .unwrap();
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0");
    let mut cmd = if root {
        Command::new("chown")
            .args(["-R", "nobody:nogroup"])
            .arg(dir)
            .status()
            .unwrap();
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "--",
            "pgbouncer",
        ]);
        c
    } else {
        Command::new("pgbouncer")
    };
    let child = cmd
        .arg(dir.join("pgbouncer.ini"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("pgbouncer is installed (e2e/deps.sh)");
    (child, port)
}

struct Run {
    latency_ms: f64,
    tps: f64,
}

fn pgbench(bin: &Path, port: u16, user: &str, db: &str, password: &str, mode: &str) -> Run {
    let out = Command::new(bin.join("pgbench"))
        .args(["-n", "-S", "-c", "4", "-j", "2", "-M", mode])
        .args(["-t", &(TRANSACTIONS / 4).to_string()])
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", user, db])
        .env("PGPASSWORD", password)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "pgbench on port {port}: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let number = |prefix: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {prefix:?} in pgbench output:\n{text}"))
    };
    Run {
        latency_ms: number("latency average = "),
        tps: number("tps = "),
    }
}

#[tokio::main]
async fn main() {
    let setup = format!(
        "CREATE ROLE app LOGIN PASSWORD '{PASSWORD}'; GRANT CREATE ON SCHEMA public TO app;"
    );
    let db = tokio::task::spawn_blocking(move || Postgres::start(&setup).unwrap())
        .await
        .unwrap();
    let bin = db.bin().to_owned();
    let init = Command::new(bin.join("pgbench"))
        .args([
            "-i",
            "-q",
            "-s",
            "1",
            "-h",
            "127.0.0.1",
            "-p",
            &db.port.to_string(),
            "-U",
            "app",
            "postgres",
        ])
        .env("PGPASSWORD", PASSWORD)
        .output()
        .unwrap();
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );

    let pki = Pki::new();
    let issuer = OidcIssuer::start(&pki).await;
    let listen = free_port();
    let bundle = json!({
        "namespace": "bench",
        "connections": [{ "name": "orders-db", "spec": {
            "protocol": "postgres",
            "upstream": { "address": format!("127.0.0.1:{}", db.port), "database": "postgres", "tls": { "mode": "disable" } },
            "credentials": { "secretRef": { "name": "creds" } },
            "listen": { "port": listen } } }],
        "policies": [{ "name": "bench", "spec": {
            "agentSelector": {}, "identity": { "issuer": issuer.url, "audiences": [AUDIENCE] }, "connections": ["orders-db"],
            "rules": [{ "name": "reads", "match": { "sql": { "statements": ["select"], "tables": ["public.*"] } }, "action": "allow" }],
            "masking": { "detectors": ["secrets", "pii"] } } }]
    });
    let sidecar = Sidecar::start(&bundle, "app=\"bench\"\n", |dir| {
        pki.write_ca(&dir.join("extra-ca.pem"));
        std::fs::create_dir_all(dir.join("credentials/creds")).unwrap();
        std::fs::write(dir.join("credentials/creds/username"), "app").unwrap();
        std::fs::write(dir.join("credentials/creds/password"), PASSWORD).unwrap();
    })
    .await;
    let token = issuer.token(&[], json!({}));
    let bouncer_dir = tempfile::tempdir().unwrap();
    let (mut bouncer, bouncer_port) = pgbouncer(bouncer_dir.path(), db.port);
    // pgbouncer is up once it answers.
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", bouncer_port)).is_err() {
        assert!(Instant::now() < deadline, "pgbouncer did not start");
        std::thread::sleep(Duration::from_millis(50));
    }

    println!(
        "pgbench -S (select-only), 4 clients, {TRANSACTIONS} transactions per run, {ROUNDS} interleaved rounds"
    );
    for mode in ["simple", "prepared"] {
        let (mut direct, mut pooled, mut gated) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            direct.push(pgbench(&bin, db.port, "app", "postgres", PASSWORD, mode));
            pooled.push(pgbench(&bin, bouncer_port, "app", "orders", PASSWORD, mode));
            gated.push(pgbench(&bin, listen, "agent", "orders", &token, mode));
        }
        let mean =
            |runs: &[Run], f: fn(&Run) -> f64| runs.iter().map(f).sum::<f64>() / runs.len() as f64;
        let (d, p, g) = (
            mean(&direct, |r| r.latency_ms),
            mean(&pooled, |r| r.latency_ms),
            mean(&gated, |r| r.latency_ms),
        );
        let (dt, pt, gt) = (
            mean(&direct, |r| r.tps),
            mean(&pooled, |r| r.tps),
            mean(&gated, |r| r.tps),
        );
        println!("-M {mode}:");
        println!("  direct     latency {d:.3} ms  tps {dt:.0}");
        println!("  pgbouncer  latency {p:.3} ms  tps {pt:.0}");
        println!("  sidecar    latency {g:.3} ms  tps {gt:.0}");
        println!(
            "  ratio sidecar/direct latency {:.2}, sidecar/pgbouncer latency {:.2}, sidecar tps / pgbouncer tps {:.2}",
            g / d,
            g / p,
            gt / pt
        );
    }
    let _ = bouncer.kill();
    let _ = bouncer.wait();
    drop(sidecar);
    drop(db);
}
