//! `make bench`: what the audit trail costs a request. The peer is the old way — one
//! JSON line written and flushed to a file under a lock on the request path — and the
//! trail is measured as a request meets it: its decision event handed to the writer and
//! acknowledged once in the spool, with `--audit-fsync 1s` (the default) and `always`,
//! by 1 and by 8 requests at once. Reported: the time from handing the event over to the
//! acknowledgement (p50, p99) and events per second, and each beside the peer.

#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentgate_crds::audit::{AuditEvent, EventKind};
use agentgate_sidecar::audit::{Audit, AuditSettings, Fsync, Sink};
use agentgate_sidecar::metrics::Metrics;

const EVENTS: usize = 4000;

fn event(i: usize) -> AuditEvent {
    AuditEvent {
        kind: EventKind::Decision,
        request_id: format!("01JBENCH{i:018}"),
        pod: "claude-7f9c".into(),
        namespace: "agents".into(),
        connection: "orders-db".into(),
        identity: Some(
            serde_json::json!({ "issuer": "https://idp", "subject": "carol", "email": "carol@example.com" }),
        ),
        request: serde_json::json!({ "sql": "SELECT id, note FROM orders WHERE id = $1", "fingerprint": "1f2e3d4c5b6a7988" }),
        decision: "allow".into(),
        rule: Some("reads".into()),
        policy: Some("prod-agents".into()),
        ..Default::default()
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Runs `EVENTS` events through `record` from `writers` tasks at once; per-event latency
/// (sorted) and events per second.
async fn measure<F, Fut>(writers: usize, record: F) -> (Vec<Duration>, f64)
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let record = Arc::new(record);
    let started = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let record = record.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                for i in (w..EVENTS).step_by(writers) {
                    let t = Instant::now();
                    record(i).await;
                    latencies.push(t.elapsed());
                }
                latencies
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let rate = EVENTS as f64 / started.elapsed().as_secs_f64();
    all.sort();
    (all, rate)
}

fn trail(dir: &std::path::Path, fsync: Fsync) -> Arc<Audit> {
    Arc::new(
        Audit::open(
            &AuditSettings {
                sinks: vec![Sink::File(dir.join("audit.jsonl"))],
                spool: dir.join("spool"),
                max_spool_bytes: 1 << 30,
                segment_bytes: 64 << 20,
                fsync,
                remote: Default::default(),
            },
            None,
            &Metrics::new(),
            AuditEvent::default(),
            None,
        )
        .unwrap(),
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    println!("audit: {EVENTS} decision events, time from hand-over to acknowledgement");
    println!(
        "{:<44} {:>10} {:>10} {:>12} {:>12}",
        "", "p50", "p99", "events/s", "p50 ÷ peer"
    );
    for writers in [1, 8] {
        // The peer: the first cut's synchronous write + flush under one lock.
        let dir = tempfile::tempdir().unwrap();
        let file = Arc::new(Mutex::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.path().join("peer.jsonl"))
                .unwrap(),
        ));
        let (peer, peer_rate) = measure(writers, move |i| {
            let file = file.clone();
            async move {
                let line = serde_json::to_string(&event(i)).unwrap() + "\n";
                let mut f = file.lock().unwrap();
                f.write_all(line.as_bytes()).unwrap();
                f.flush().unwrap();
            }
        })
        .await;
        let peer_p50 = percentile(&peer, 0.5);
        let row = |name: String, lat: &[Duration], rate: f64| {
            println!(
                "{name:<44} {:>10.1?} {:>10.1?} {rate:>12.0} {:>12.2}",
                percentile(lat, 0.5),
                percentile(lat, 0.99),
                percentile(lat, 0.5).as_secs_f64() / peer_p50.as_secs_f64()
            );
        };
        row(
            format!("peer: write+flush under a lock, {writers} at once"),
            &peer,
            peer_rate,
        );
        for (name, fsync) in [
            ("1s", Fsync::Every(Duration::from_secs(1))),
            ("always", Fsync::Always),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let audit = trail(dir.path(), fsync);
            let (lat, rate) = measure(writers, {
                let audit = audit.clone();
                move |i| {
                    let audit = audit.clone();
                    async move { audit.durable(&event(i)).await.unwrap() }
                }
            })
            .await;
            row(
                format!("spool, --audit-fsync {name}, {writers} at once"),
                &lat,
                rate,
            );
        }
    }
}
