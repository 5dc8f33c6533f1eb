//! `make bench`: webhook admission latency. Creates pods in two namespaces of one local
//! API server — one where the agentgate webhook injects the sidecar, one where no webhook
//! runs (the peer) — interleaved, so both see the same machine, and reports p50/p99 of
//! each and their ratio. Absolute times on a shared machine are noise; the ratio is the
//! number to watch.

#![allow(clippy::unwrap_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use agentgate_e2e::ControlPlane;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::PostParams;
use serde_json::json;

const PODS: usize = 1000;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

#[tokio::main]
async fn main() {
    let pods: usize = std::env::var("AGENTGATE_BENCH_PODS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(PODS);
    let cp = ControlPlane::start().unwrap();
    let client = cp.client().await;
    let system = cp.namespace(&client, "agentgate-system").await;
    let injected_ns = cp.namespace(&client, "injected").await;
    let plain_ns = cp.namespace(&client, "plain").await;
    cp.kubectl_output(&[
        "label",
        "namespace",
        &injected_ns,
        "agentgate.dev/injection=enabled",
    ])
    .unwrap();
    let (operator, _, admin_port) =
        support::start_operator(&cp, &client, &system, &injected_ns).await;

    let pod = |i: usize, inject: bool| -> Pod {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": format!("agent-{i}"), "annotations": { "agentgate.dev/inject": if inject { "enabled" } else { "disabled" } } },
            "spec": { "serviceAccountName": "default", "containers": [{ "name": "agent", "image": "agent:1" }] }
        }))
        .unwrap()
    };
    let injected: Api<Pod> = Api::namespaced(client.clone(), &injected_ns);
    let plain: Api<Pod> = Api::namespaced(client.clone(), &plain_ns);
    // Warm both paths (connections, caches) before measuring.
    for i in 0..20 {
        injected
            .create(&PostParams::default(), &pod(100_000 + i, true))
            .await
            .unwrap();
        plain
            .create(&PostParams::default(), &pod(100_000 + i, false))
            .await
            .unwrap();
    }
    let (mut with_webhook, mut without) = (Vec::with_capacity(pods), Vec::with_capacity(pods));
    for i in 0..pods {
        let started = Instant::now();
        let created = injected
            .create(&PostParams::default(), &pod(i, true))
            .await
            .unwrap();
        with_webhook.push(started.elapsed());
        assert!(
            created.spec.unwrap().init_containers.is_some(),
            "pod {i} was not injected:\n{}",
            operator.log()
        );
        let started = Instant::now();
        plain
            .create(&PostParams::default(), &pod(i, false))
            .await
            .unwrap();
        without.push(started.elapsed());
    }
    with_webhook.sort();
    without.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!("pod creation through the local API server, {pods} pods each (interleaved):");
    println!("{:<34} {:>9} {:>9}", "", "p50 ms", "p99 ms");
    for (name, v) in [
        ("with agentgate injection", &with_webhook),
        ("peer: no webhook", &without),
    ] {
        println!(
            "{name:<34} {:>9.2} {:>9.2}",
            ms(percentile(v, 0.5)),
            ms(percentile(v, 0.99))
        );
    }
    println!(
        "{:<34} {:>9.2} {:>9.2}",
        "ratio (agentgate / peer)",
        ms(percentile(&with_webhook, 0.5)) / ms(percentile(&without, 0.5)),
        ms(percentile(&with_webhook, 0.99)) / ms(percentile(&without, 0.99))
    );
    let (_, metrics) = support::http_get(admin_port, "/metrics").await.unwrap();
    for line in metrics.lines().filter(|l| {
        l.starts_with("agentgate_operator_admission_duration_seconds_") && !l.contains("bucket")
    }) {
        println!("operator-side: {line}");
    }
}
