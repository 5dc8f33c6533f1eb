//! `make bench`: the sidecar's cost per request. The same HTTPS upstream is called
//! directly (the peer: what an agent with a static credential does today) and through
//! the sidecar (identity, policy, credential injection, masking, audit), interleaved,
//! over keep-alive connections; p50/p99 of each and their ratio are reported.

#![allow(clippy::unwrap_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::json;
use support::*;

const REQUESTS: usize = 2000;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn upstream(_req: Request<Incoming>) -> Response<TestBody> {
    // A 4 KiB JSON list, as an API returns it; nothing in it needs masking.
    let items: Vec<_> = (0..40)
        .map(|i| json!({ "id": i, "name": format!("resource-{i:04}"), "region": "westeurope" }))
        .collect();
    Response::builder()
        .header("content-type", "application/json")
        .body(full(json!({ "value": items }).to_string()))
        .unwrap()
}

#[tokio::main]
async fn main() {
    let requests: usize = std::env::var("AGENTGATE_BENCH_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(REQUESTS);
    let pki = Pki::new();
    let upstream_port = https_server(&pki, upstream).await;
    let issuer = OidcIssuer::start(&pki).await;
    let listen = free_port();
    let bundle = json!({
        "namespace": "bench",
        "connections": [{ "name": "api", "spec": {
            "protocol": "http",
            "upstream": { "address": format!("https://127.0.0.1:{upstream_port}"),
                          "tls": { "caSecretRef": { "name": "ca", "key": "ca.crt" } } },
            "credentials": { "secretRef": { "name": "token" } },
            "listen": { "port": listen } } }],
        "policies": [{ "name": "bench", "spec": {
            "agentSelector": {}, "identity": { "issuer": issuer.url, "audiences": [AUDIENCE] }, "connections": ["api"],
            "rules": [{ "name": "reads", "match": { "http": { "methods": ["GET"], "paths": ["/subscriptions/**"] } }, "action": "allow" }],
            "masking": { "detectors": ["secrets", "credentials", "pii"] } } }]
    });
    let sidecar = Sidecar::start(&bundle, "", |dir| {
        pki.write_ca(&dir.join("credentials/ca/ca.crt"));
        pki.write_ca(&dir.join("extra-ca.pem"));
        std::fs::create_dir_all(dir.join("credentials/token")).unwrap();
        std::fs::write(dir.join("credentials/token/token"), "upstream-token").unwrap();
    })
    .await;
    let token = issuer.token(&[], json!({}));

    // The peer: HTTPS straight to the upstream, keep-alive.
    let roots = {
        let mut r = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut pki.ca_pem.as_bytes()) {
            r.add(cert.unwrap()).unwrap();
        }
        r
    };
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", upstream_port))
        .await
        .unwrap();
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let (mut direct, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    // Through the sidecar: plain HTTP on loopback, keep-alive.
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", listen))
        .await
        .unwrap();
    let (mut proxied, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);

    let get = |auth: bool| {
        let mut r = Request::get("/subscriptions/s-1/resources").header("host", "localhost");
        if auth {
            r = r.header("proxy-authorization", format!("Bearer {token}"));
        }
        r.body(Empty::<Bytes>::new()).unwrap()
    };
    let (mut peer, mut gated) = (Vec::with_capacity(requests), Vec::with_capacity(requests));
    for i in 0..requests + 100 {
        let started = Instant::now();
        let r = direct.send_request(get(false)).await.unwrap();
        let peer_body = r.into_body().collect().await.unwrap().to_bytes();
        let peer_time = started.elapsed();
        let started = Instant::now();
        let r = proxied.send_request(get(true)).await.unwrap();
        assert_eq!(r.status(), 200, "{}", sidecar.log());
        let gated_body = r.into_body().collect().await.unwrap().to_bytes();
        let gated_time = started.elapsed();
        assert_eq!(peer_body.len(), gated_body.len());
        // The first 100 warm both paths up.
        if i >= 100 {
            peer.push(peer_time);
            gated.push(gated_time);
        }
    }
    peer.sort();
    gated.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!("GET of a 4 KiB JSON list, {requests} requests each (interleaved, keep-alive):");
    println!("{:<44} {:>9} {:>9}", "", "p50 µs", "p99 µs");
    println!(
        "{:<44} {:>9.0} {:>9.0}",
        "through the sidecar (JWT, policy, mask, audit)",
        us(percentile(&gated, 0.5)),
        us(percentile(&gated, 0.99))
    );
    println!(
        "{:<44} {:>9.0} {:>9.0}",
        "peer: direct HTTPS to the upstream",
        us(percentile(&peer, 0.5)),
        us(percentile(&peer, 0.99))
    );
    println!(
        "{:<44} {:>9.2} {:>9.2}",
        "ratio (sidecar / direct)",
        us(percentile(&gated, 0.5)) / us(percentile(&peer, 0.5)),
        us(percentile(&gated, 0.99)) / us(percentile(&peer, 0.99))
    );
}
