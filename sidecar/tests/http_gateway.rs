//! The HTTP gateway with real processes on loopback: an HTTPS upstream and an OIDC issuer
//! written here (hyper + rustls, with their own CA), the sidecar binary in front of the
//! upstream, and a client playing the agent.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use agentgate_crds::audit::{EventKind, verify};
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::{Value, json};
use support::*;

const UPSTREAM_TOKEN: &str = "upstream-secret-token-4711";
const SAS_SIG: &str = "Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5MA%3D%3D";
const JWT_IN_STREAM: &str =
    "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzZXJ2aWNlLWFjY291bnQifQ.c2lnbmF0dXJlLXBhcnQ";

async fn upstream(req: Request<Incoming>) -> Response<TestBody> {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let json_response = |v: Value| {
        Response::builder()
            .header("content-type", "application/json")
            .body(full(v.to_string()))
            .unwrap()
    };
    match (req.method().as_str(), req.uri().path()) {
        ("GET", "/echo") => json_response(json!({
            "authorization": header("authorization"), "proxyAuthorization": header("proxy-authorization"),
            "cookie": header("cookie"), "host": header("host"), "path": req.uri().path(), "query": req.uri().query(),
        })),
        ("GET", "/secrets") => json_response(json!({
            "user": "jane.doe@example.com",
            "config": { "password": "hunter2-secret", "region": "westeurope" },
            "note": "use Bearer abcdefghijklmnopqrstuvwxyz0123 for the API",
        })),
        ("GET", "/stream") => {
            let (mut tx, body) =
                http_body_util::channel::Channel::<Bytes, std::convert::Infallible>::new(4);
            tokio::spawn(async move {
                let (a, b) = JWT_IN_STREAM.split_at(30);
                let _ = tx.send_data(Bytes::from("event one\n")).await;
                let _ = tx.send_data(Bytes::from(format!("token: {a}"))).await;
                tokio::time::sleep(Duration::from_millis(1500)).await;
                let _ = tx
                    .send_data(Bytes::from(format!("{b}\nevent three\n")))
                    .await;
            });
            Response::builder()
                .header("content-type", "text/plain")
                .body(body.boxed())
                .unwrap()
        }
        ("GET", "/download") => Response::builder()
            .header("content-type", "text/plain")
            .header(
                "x-download",
                format!("https://acct.blob.core.windows.net/c/b?sv=2022-11-02&sig={SAS_SIG}"),
            )
            .body(full("ok"))
            .unwrap(),
        ("GET", "/upgrade") => {
            // An echo protocol over an upgraded connection, as exec and port-forward are.
            let mut req = req;
            let upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let Ok(io) = upgrade.await else { return };
                let mut io = hyper_util::rt::TokioIo::new(io);
                let mut buf = [0u8; 64];
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
            Response::builder()
                .status(101)
                .header("connection", "upgrade")
                .header("upgrade", "echo")
                .body(full(""))
                .unwrap()
        }
        ("GET", "/big") => Response::builder()
            .header("content-type", "text/plain")
            .body(full("x".repeat(200 * 1024)))
            .unwrap(),
        ("GET", "/big-chunked") => {
            let (mut tx, body) =
                http_body_util::channel::Channel::<Bytes, std::convert::Infallible>::new(4);
            tokio::spawn(async move {
                for _ in 0..20 {
                    if tx
                        .send_data(Bytes::from(format!("{}\n", "y".repeat(10 * 1024 - 1))))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            });
            Response::builder()
                .header("content-type", "text/plain")
                .body(body.boxed())
                .unwrap()
        }
        ("GET", "/binary") => Response::builder()
            .header("content-type", "application/octet-stream")
            .body(full(vec![0u8; 16]))
            .unwrap(),
        (_, path) if path.starts_with("/subscriptions/") => json_response(json!({ "ok": true })),
        _ => Response::builder().status(404).body(full("")).unwrap(),
    }
}

struct Setup {
    issuer: OidcIssuer,
    sidecar: Sidecar,
    port: u16,
    bundle: Value,
}

fn bundle(upstream_port: u16, listen_port: u16, issuer: &str) -> Value {
    json!({
        "namespace": "agents",
        "connections": [{ "name": "api", "generation": 1, "spec": {
            "protocol": "http",
            "upstream": { "address": format!("https://127.0.0.1:{upstream_port}"),
                          "tls": { "mode": "verify-full", "caSecretRef": { "name": "upstream-ca", "key": "ca.crt" } } },
            "credentials": { "secretRef": { "name": "api-token" } },
            "listen": { "port": listen_port } } }],
        "policies": [
            { "name": "agents", "generation": 1, "spec": {
                "agentSelector": { "matchLabels": { "agentgate.dev/agent": "claude" } },
                "identity": { "issuer": issuer, "audiences": [AUDIENCE] },
                "connections": ["api"],
                "rules": [
                    { "name": "reads", "match": { "http": { "methods": ["GET"] } }, "action": "allow" },
                    { "name": "no-deletes", "match": { "http": { "methods": ["DELETE"], "paths": ["/subscriptions/**"] } }, "action": "deny" },
                    { "name": "writes-need-sre", "match": { "http": { "methods": ["PUT"], "paths": ["/subscriptions/*/**"] } },
                      "action": "approve", "approval": { "approvers": { "groups": ["sre-leads"] } } }
                ],
                "masking": { "detectors": ["secrets", "credentials", "pii"] },
                "limits": { "maxResponseBytes": "64Ki" } } },
            { "name": "other-agents", "generation": 1, "spec": {
                "agentSelector": { "matchLabels": { "agentgate.dev/agent": "someone-else" } },
                "connections": ["api"], "defaultAction": "allow" } }
        ]
    })
}

async fn setup() -> Setup {
    setup_with(&[], |_| {}).await
}

/// [`setup`] with extra sidecar flags and files.
async fn setup_with(flags: &[&str], files: impl FnOnce(&std::path::Path)) -> Setup {
    let pki = Pki::new();
    let upstream_port = https_server(&pki, upstream).await;
    let issuer = OidcIssuer::start(&pki).await;
    let port = free_port();
    let bundle = bundle(upstream_port, port, &issuer.url);
    let sidecar = Sidecar::start_with(
        &bundle,
        "agentgate.dev/agent=\"claude\"\napp=\"agent\"\n",
        flags,
        |dir| {
            pki.write_ca(&dir.join("credentials/upstream-ca/ca.crt"));
            pki.write_ca(&dir.join("extra-ca.pem"));
            std::fs::create_dir_all(dir.join("credentials/api-token")).unwrap();
            std::fs::write(dir.join("credentials/api-token/token"), UPSTREAM_TOKEN).unwrap();
            files(dir);
        },
    )
    .await;
    Setup {
        issuer,
        sidecar,
        port,
        bundle,
    }
}

impl Setup {
    async fn send(&self, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(t) = token {
            req = req.header("proxy-authorization", format!("Bearer {t}"));
        }
        let req = req
            .header("authorization", "Bearer agent-made-this-up")
            .header("cookie", "session=agent")
            .body(full(""))
            .unwrap();
        let (status, _, body) = plain_request(self.port, req).await.unwrap();
        (status, body)
    }

    fn token(&self) -> String {
        self.issuer.token(&["developers"], json!({}))
    }

    /// A GET as the agent: its status, body and the request id the sidecar gave it.
    async fn get(&self, path: &str, token: &str) -> Result<(u16, String, String), String> {
        let req = Request::get(path)
            .header("proxy-authorization", format!("Bearer {token}"))
            .body(full(""))
            .unwrap();
        let (status, headers, body) = plain_request(self.port, req).await?;
        let id = headers
            .get("x-agentgate-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        Ok((status, body, id))
    }
}

#[tokio::test]
async fn allowed_requests_carry_the_connections_credential_never_the_agents() {
    let s = setup().await;
    let (status, body) = s.send("GET", "/echo?x=1", Some(&s.token())).await;
    assert_eq!(status, 200, "{body}\n{}", s.sidecar.log());
    let seen: Value = serde_json::from_str(&body).unwrap();
    // The upstream saw the Connection's credential (masked on the way back, as a bearer
    // token), and none of what the agent sent.
    assert_eq!(seen["authorization"], "Bearer [masked:bearer-token]");
    assert_eq!(seen["proxyAuthorization"], Value::Null);
    assert_eq!(seen["cookie"], Value::Null);
    assert_eq!(seen["query"], "x=1");
    assert!(!body.contains(UPSTREAM_TOKEN));
    assert!(!s.sidecar.audit().contains(UPSTREAM_TOKEN));
    assert!(!s.sidecar.log().contains(UPSTREAM_TOKEN));
}

#[tokio::test]
async fn denials_are_403s_a_model_can_act_on() {
    let s = setup().await;
    let token = s.token();
    let (status, body) = s
        .send(
            "DELETE",
            "/subscriptions/s-1/resourceGroups/rg",
            Some(&token),
        )
        .await;
    assert_eq!(status, 403);
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"], "denied_by_agentgate");
    assert_eq!(body["rule"], "no-deletes");
    assert_eq!(body["policy"], "agents");
    assert!(
        body["next"].as_str().unwrap().contains("Do not retry"),
        "{body}"
    );

    let (status, body) = s
        .send("PUT", "/subscriptions/s-1/resourceGroups/rg", Some(&token))
        .await;
    assert_eq!(status, 403);
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["rule"], "writes-need-sre");
    assert!(
        body["reason"]
            .as_str()
            .unwrap()
            .contains("approvals are not configured"),
        "{body}"
    );

    let (status, body) = s.send("POST", "/anything", Some(&token)).await;
    assert_eq!(status, 403, "no rule matches: the default action denies");
    assert!(body.contains("default action is deny"), "{body}");

    let (status, body) = s.send("GET", "/a/../echo", Some(&token)).await;
    assert_eq!(status, 400, "{body}");

    let audit = s.sidecar.audit();
    assert_eq!(
        verify(&audit, None).map(|v| v.events.len()),
        Ok(audit.lines().count())
    );
    let decisions: Vec<Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        decisions.iter().filter(|e| e["decision"] == "deny").count(),
        4,
        "every refusal is recorded: {audit}"
    );
    assert!(
        decisions
            .iter()
            .all(|e| e["identity"]["subject"] == "user-123" || e["decision"] == "deny")
    );
}

#[tokio::test]
async fn responses_are_masked_and_nothing_unmasked_is_recorded() {
    let s = setup().await;
    let (status, body) = s.send("GET", "/secrets", Some(&s.token())).await;
    assert_eq!(status, 200);
    for secret in [
        "jane.doe@example.com",
        "hunter2-secret",
        "abcdefghijklmnopqrstuvwxyz0123",
    ] {
        assert!(!body.contains(secret), "{secret} reached the agent: {body}");
    }
    let doc: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        doc["config"]["region"], "westeurope",
        "what is not sensitive passes"
    );
    assert_eq!(doc["config"]["password"], "[masked:credential-field]");
    let audit = s.sidecar.audit();
    let completed: Value = audit
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|e| e["kind"] == "completed")
        .unwrap();
    assert_eq!(
        completed["masked"],
        json!({ "bearer-token": 1, "credential-field": 1, "email": 1 })
    );
    assert!(!audit.contains("hunter2"), "{audit}");
    let (_, metrics) = s.sidecar.admin("/metrics").await.unwrap();
    assert!(
        metrics.contains("agentgate_sidecar_masked_values_total{detector=\"email\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn streamed_responses_are_masked_on_the_fly() {
    let s = setup().await;
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", s.port))
        .await
        .unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::get("/stream")
        .header("host", "localhost")
        .header("proxy-authorization", format!("Bearer {}", s.token()))
        .body(full(""))
        .unwrap();
    let started = Instant::now();
    let mut body = sender.send_request(req).await.unwrap().into_body();
    let mut frames: Vec<(Duration, Bytes)> = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            frames.push((started.elapsed(), data));
        }
    }
    let text: String = frames
        .iter()
        .map(|(_, d)| String::from_utf8_lossy(d))
        .collect();
    assert_eq!(text, "event one\ntoken: [masked:jwt]\nevent three\n");
    // The first event arrived before the upstream paused: it was not held for the rest.
    assert!(
        frames[0].0 < Duration::from_millis(1000),
        "first frame after {:?}",
        frames[0].0
    );
    assert_eq!(String::from_utf8_lossy(&frames[0].1), "event one\n");
}

#[tokio::test]
async fn bad_tokens_are_refused_with_the_reason() {
    let s = setup().await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let b64 = |v: &Value| {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let claims =
        json!({ "iss": s.issuer.url, "sub": "user-123", "aud": AUDIENCE, "exp": now + 3600 });
    let alg_none = format!(
        "{}.{}.",
        b64(&json!({ "alg": "none", "kid": "k1", "typ": "JWT" })),
        b64(&claims)
    );
    // HS256 signed with the issuer's public key as the secret: the classic key confusion.
    let hs_confusion = jsonwebtoken::encode(
        &jsonwebtoken::Header {
            kid: Some("k1".into()),
            ..jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256)
        },
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(s.issuer.public_jwk.to_string().as_bytes()),
    )
    .unwrap();
    let cases = [
        (None, 403, "requires the launching user's token"),
        (Some("not-a-jwt".to_owned()), 401, "not a well-formed JWT"),
        (
            Some(
                s.issuer
                    .token(&[], json!({ "exp": now - 3600, "nbf": now - 7200 })),
            ),
            401,
            "expired",
        ),
        (
            Some(s.issuer.token(&[], json!({ "nbf": now + 3600 }))),
            401,
            "not valid yet",
        ),
        (
            Some(s.issuer.token(&[], json!({ "aud": "api://someone-else" }))),
            401,
            "audience",
        ),
        (
            Some(
                s.issuer
                    .token(&[], json!({ "iss": "https://evil.example" })),
            ),
            401,
            "not trusted",
        ),
        (
            Some(s.issuer.sign(&claims, "k-unknown")),
            401,
            "the issuer has no key",
        ),
        (Some(alg_none), 401, ""),
        (Some(hs_confusion), 401, "algorithm does not match"),
    ];
    for (token, expected, reason) in cases {
        let (status, body) = s.send("GET", "/echo", token.as_deref()).await;
        assert_eq!(status, expected, "{token:?}: {body}");
        assert!(
            body.contains(reason),
            "{token:?}: expected {reason:?} in {body}"
        );
        assert!(!body.contains(UPSTREAM_TOKEN));
    }
    let (_, metrics) = s.sidecar.admin("/metrics").await.unwrap();
    for reason in [
        "expired",
        "not_yet_valid",
        "wrong_audience",
        "untrusted_issuer",
        "unknown_kid",
        "algorithm_mismatch",
    ] {
        assert!(
            metrics.contains(&format!(
                "agentgate_sidecar_jwt_failures_total{{reason=\"{reason}\"}} 1"
            )),
            "{reason}: {metrics}"
        );
    }
    assert!(
        metrics
            .contains("agentgate_sidecar_requests_total{connection=\"api\",decision=\"deny\"} 9"),
        "{metrics}"
    );
}

#[tokio::test]
async fn oversized_and_unmaskable_responses_do_not_reach_the_agent() {
    let s = setup().await;
    let (status, body) = s.send("GET", "/big", Some(&s.token())).await;
    assert_eq!(
        status, 502,
        "content-length over maxResponseBytes is refused up front"
    );
    assert!(body.contains("exceeds limits.maxResponseBytes"), "{body}");
    let (status, body) = s.send("GET", "/binary", Some(&s.token())).await;
    assert_eq!(status, 502);
    assert!(body.contains("cannot be masked"), "{body}");

    // A streamed body with no declared length is cut off at the limit.
    let req = Request::get("/big-chunked")
        .header("proxy-authorization", format!("Bearer {}", s.token()))
        .body(full(""))
        .unwrap();
    let result = plain_request(s.port, req).await;
    assert!(
        result.as_ref().is_err() || result.as_ref().is_ok_and(|(_, _, b)| b.len() <= 64 * 1024),
        "not cut off"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while !s
        .sidecar
        .audit()
        .contains("exceeds limits.maxResponseBytes (65536 bytes) and was cut off")
    {
        assert!(
            Instant::now() < deadline,
            "the cut-off was not recorded: {}",
            s.sidecar.audit()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn h2c_is_served_too() {
    let s = setup().await;
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", s.port))
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = Request::get(format!("http://127.0.0.1:{}/echo", s.port))
        .header("proxy-authorization", format!("Bearer {}", s.token()))
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(req).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), http::Version::HTTP_2);
}

#[tokio::test]
async fn an_invalid_bundle_keeps_the_last_good_one_and_a_valid_one_applies() {
    let s = setup().await;
    let token = s.token();
    s.sidecar.write_bundle("{ not json");
    // Wait until the sidecar has seen (and refused) the invalid bundle.
    let deadline = Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let (_, metrics) = s.sidecar.admin("/metrics").await.unwrap();
        if metrics.contains("agentgate_sidecar_config_reloads_total{result=\"invalid\"}") {
            break metrics;
        }
        assert!(
            Instant::now() < deadline,
            "the invalid bundle was not noticed:\n{}",
            s.sidecar.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        s.send("GET", "/echo", Some(&token)).await.0,
        200,
        "still serving with the last good bundle"
    );
    assert!(
        metrics.contains("agentgate_sidecar_config_reloads_total{result=\"invalid\"} 1"),
        "{metrics}"
    );
    assert!(
        s.sidecar
            .log()
            .contains("new configuration is invalid; keeping the last good one")
    );

    let mut bundle = s.bundle.clone();
    bundle["policies"][0]["spec"]["rules"][1]["action"] = json!("allow");
    s.sidecar.write_bundle(&bundle.to_string());
    let deadline = Instant::now() + Duration::from_secs(5);
    while s
        .send("DELETE", "/subscriptions/s-1/x", Some(&token))
        .await
        .0
        != 200
    {
        assert!(
            Instant::now() < deadline,
            "the new bundle was not applied:\n{}",
            s.sidecar.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_pod_no_policy_selects_is_denied_everything() {
    let pki = Pki::new();
    let upstream_port = https_server(&pki, upstream).await;
    let issuer = OidcIssuer::start(&pki).await;
    let port = free_port();
    let _sidecar = Sidecar::start(
        &bundle(upstream_port, port, &issuer.url),
        "agentgate.dev/agent=\"gpt\"\n",
        |dir| {
            pki.write_ca(&dir.join("credentials/upstream-ca/ca.crt"));
        },
    )
    .await;
    let req = Request::get("/echo")
        .header(
            "proxy-authorization",
            format!("Bearer {}", issuer.token(&[], json!({}))),
        )
        .body(full(""))
        .unwrap();
    let (status, _, body) = plain_request(port, req).await.unwrap();
    assert_eq!(status, 403);
    assert!(
        body.contains("no AgentAccessPolicy that selects this pod"),
        "{body}"
    );
}

#[tokio::test]
async fn upgraded_streams_are_decided_then_relayed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = setup().await;
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", s.port))
        .await
        .unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn.with_upgrades());
    let req = Request::get("/upgrade")
        .header("host", "localhost")
        .header("connection", "upgrade")
        .header("upgrade", "echo")
        .header("proxy-authorization", format!("Bearer {}", s.token()))
        .body(full(""))
        .unwrap();
    let response = sender.send_request(req).await.unwrap();
    assert_eq!(response.status(), 101, "{}", s.sidecar.log());
    let mut io = hyper_util::rt::TokioIo::new(hyper::upgrade::on(response).await.unwrap());
    io.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    io.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    drop(io);
    // The relay is recorded with its byte counts once it ends.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let audit = s.sidecar.audit();
        if let Some(e) = audit
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .find(|e| e["status"] == 101)
        {
            assert_eq!(e["relayed"], json!({ "toUpstream": 4, "toAgent": 4 }));
            break;
        }
        assert!(Instant::now() < deadline, "no relay record: {audit}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // An upgrade the policy denies never reaches the upstream.
    let (status, _) = s
        .send("DELETE", "/subscriptions/s/x", Some(&s.token()))
        .await;
    assert_eq!(status, 403);
}

#[tokio::test]
async fn without_a_valid_bundle_it_is_not_ready_and_denies() {
    let sidecar = Sidecar::spawn("{\"namespace\": 7}", "", |_| {});
    let deadline = Instant::now() + Duration::from_secs(20);
    let body = loop {
        match sidecar.admin("/readyz").await {
            Ok((503, body)) => break body,
            other => assert!(Instant::now() < deadline, "{other:?}\n{}", sidecar.log()),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(body.contains("no valid bundle loaded yet"), "{body}");
    let (_, metrics) = sidecar.admin("/metrics").await.unwrap();
    assert!(
        metrics.contains("agentgate_sidecar_bundle_loaded 0"),
        "{metrics}"
    );
}

#[test]
fn bad_settings_exit_64_with_a_reason() {
    for args in [
        &["--audit", "syslog"][..],
        &["--admin-addr", "not-an-address"],
        &["--log", "[["],
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_agentgate-sidecar"))
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        assert!(stderr.starts_with("agentgate-sidecar: "), "{stderr}");
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_agentgate-sidecar"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("AGENTGATE_BUNDLE"));
}

#[test]
fn remote_sinks_that_cannot_be_set_up_stop_the_sidecar_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let secret = "s3cret-key-material-never-shown";
    std::fs::write(dir.path().join("not-base64"), format!("{secret}!")).unwrap();
    std::fs::write(dir.path().join("token"), format!("{secret}\n")).unwrap();
    let path = |name: &str| dir.path().join(name).display().to_string();
    let blob = "azureblob:https://acct.blob.core.windows.net/audit/agents/pod-1";
    let spool = path("spool");
    for (args, why) in [
        (
            vec!["--audit", blob, "--audit-azure-auth", "workload-identity"],
            "not implemented yet",
        ),
        (vec!["--audit", blob], "needs --audit-azure-key-file"),
        (
            vec![
                "--audit",
                blob,
                "--audit-azure-key-file",
                &path("not-base64"),
            ],
            "does not hold a base64 account key",
        ),
        (
            vec!["--audit", blob, "--audit-azure-key-file", &path("missing")],
            "cannot read the key file",
        ),
        (
            vec![
                "--audit",
                "http://collector.example/ingest",
                "--audit-http-token-file",
                &path("token"),
            ],
            "needs an https:// collector",
        ),
        (
            vec![
                "--audit",
                "https://collector.example/ingest",
                "--audit-http-token-file",
                &path("missing"),
            ],
            "cannot read the token file",
        ),
        (
            vec![
                "--audit",
                &format!("https://collector.example/ingest?key={secret}"),
            ],
            "cannot have a query",
        ),
        (
            vec!["--audit", &format!("{blob}?sv=2021-12-02&sig={secret}")],
            "a SAS is not supported",
        ),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_agentgate-sidecar"))
            .args(&args)
            .args(["--audit-spool", &spool, "--admin-addr", "127.0.0.1:0"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        assert!(stderr.contains(why), "{args:?}: {stderr}");
        assert!(!stderr.contains(secret), "{stderr}");
    }
    assert!(
        !dir.path().join("spool").exists(),
        "a sink that cannot be set up is found before the spool is touched"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_chain_goes_on_across_restarts_and_marks_a_crash() {
    let mut s = setup().await;
    let token = s.token();
    let mut answered = Vec::new();
    // The agent names the prompt and the tool call behind its request.
    let req = Request::get("/echo")
        .header("proxy-authorization", format!("Bearer {token}"))
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .header("x-agentgate-prompt-id", "prompt-42")
        .header("x-agentgate-tool-call-id", "toolu_7")
        .body(full(""))
        .unwrap();
    let (_, headers, _) = plain_request(s.port, req).await.unwrap();
    let traced = headers["x-agentgate-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    for _ in 0..10 {
        let (status, _, id) = s.get("/echo", &token).await.unwrap();
        assert_eq!(status, 200);
        answered.push(id);
    }
    // A clean restart.
    s.sidecar.stop("TERM");
    s.sidecar.restart().await;
    for _ in 0..10 {
        answered.push(s.get("/echo", &token).await.unwrap().2);
    }
    // A crash with requests in flight: each answer the agent got must be in the trail.
    let s = std::sync::Arc::new(tokio::sync::Mutex::new(s));
    let load: Vec<_> = (0..4)
        .map(|_| {
            let (s, token) = (s.clone(), token.clone());
            tokio::spawn(async move {
                let port = s.lock().await.port;
                let mut got = Vec::new();
                loop {
                    let req = Request::get("/echo")
                        .header("proxy-authorization", format!("Bearer {token}"))
                        .body(full(""))
                        .unwrap();
                    match plain_request(port, req).await {
                        Ok((_, headers, _)) => got.push(
                            headers["x-agentgate-request-id"]
                                .to_str()
                                .unwrap()
                                .to_owned(),
                        ),
                        Err(_) => return got,
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    s.lock().await.sidecar.stop("KILL");
    for task in load {
        answered.extend(task.await.unwrap());
    }
    let mut s = std::sync::Arc::into_inner(s).unwrap().into_inner();
    s.sidecar.restart().await;
    answered.push(s.get("/echo", &token).await.unwrap().2);
    assert!(
        answered.len() > 30,
        "the load got {} answers",
        answered.len()
    );

    let audit = s.sidecar.audit();
    let verified = verify(&audit, None).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(verified.first_seq, 1);
    let kinds: Vec<_> = verified
        .events
        .iter()
        .map(|l| &l.envelope.event)
        .filter(|e| matches!(e.kind, EventKind::Restart | EventKind::Shutdown))
        .map(|e| (e.kind, e.resumed.as_ref().map(|r| r.clean)))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (EventKind::Shutdown, None),
            (EventKind::Restart, Some(true)),
            (EventKind::Restart, Some(false)),
        ],
        "a clean stop, its restart, then a crash boundary"
    );
    assert_eq!(verified.crashes, 1);
    let traced = verified
        .events
        .iter()
        .find(|l| l.envelope.event.request_id == traced)
        .unwrap();
    assert_eq!(
        traced.envelope.event.trace.prompt_id.as_deref(),
        Some("prompt-42")
    );
    assert_eq!(
        traced.envelope.event.trace.tool_call_id.as_deref(),
        Some("toolu_7")
    );
    assert!(traced.envelope.event.trace.traceparent.is_some());
    for id in &answered {
        assert!(
            verified
                .events
                .iter()
                .any(|l| l.envelope.event.request_id == *id
                    && l.envelope.event.kind == EventKind::Decision),
            "request {id} was answered but its decision is not in the trail"
        );
    }

    // Each kind of tampering is found, and named.
    let lines: Vec<&str> = audit.lines().collect();
    let join = |lines: &[&str]| lines.iter().map(|l| format!("{l}\n")).collect::<String>();
    let mut flipped = audit.clone().into_bytes();
    let at = audit.find("\"decision\":\"allow\"").unwrap() + 13;
    flipped[at] = b'A';
    let e = verify(&String::from_utf8(flipped).unwrap(), None).unwrap_err();
    assert!(e.what.contains("was changed"), "{e}");
    let mut without = lines.clone();
    without.remove(5);
    let e = verify(&join(&without), None).unwrap_err();
    assert!(e.what.contains("missing") && e.line == 6, "{e}");
    let mut reordered = lines.clone();
    reordered.swap(5, 6);
    assert!(verify(&join(&reordered), None).is_err());
    let e = verify(&join(&lines[..lines.len() - 2]), Some(&verified.head)).unwrap_err();
    assert!(e.what.contains("removed from its end"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_that_is_down_fills_the_spool_and_requests_wait_for_it_not_the_trail() {
    // The file sink cannot be written: its path is a directory.
    let s = setup_with(
        &[
            "--audit-spool-max-bytes",
            "16384",
            "--audit-segment-bytes",
            "2048",
        ],
        |dir| std::fs::create_dir(dir.join("audit.jsonl")).unwrap(),
    )
    .await;
    let token = s.token();
    // Requests go through while the spool has room, then are refused.
    let mut allowed = 0;
    let refusal = loop {
        let (status, body, _) = s.get("/echo", &token).await.unwrap();
        if status != 200 {
            break (status, body);
        }
        allowed += 1;
        assert!(allowed < 500, "the spool never filled");
    };
    assert!(allowed > 3, "{allowed}");
    assert_eq!(refusal.0, 503, "{}", refusal.1);
    assert!(refusal.1.contains("audit spool is full"), "{}", refusal.1);
    let (_, metrics) = s.sidecar.admin("/metrics").await.unwrap();
    assert!(
        metrics.contains("agentgate_sidecar_audit_failures_total{sink=\"spool_full\"}"),
        "{metrics}"
    );

    // The sink comes back: it delivers everything, once and in order, and requests are
    // allowed again.
    std::fs::remove_dir(s.sidecar.path("audit.jsonl")).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        if s.get("/echo", &token).await.unwrap().0 == 200 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{}", s.sidecar.log());
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let audit = s.sidecar.audit();
    let verified = verify(&audit, None).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(verified.first_seq, 1, "every event, from the first");
    assert!(
        verified.events.len() >= 2 * allowed,
        "{}",
        verified.events.len()
    );
    // Delivered segments are gone from the spool.
    let segments = std::fs::read_dir(s.sidecar.path("spool"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "jsonl")
        })
        .count();
    assert!(segments <= 2, "{segments} segments left in the spool");
}

/// Four agents sending GETs through the sidecar, each at most one every 10 ms, until
/// `stop` (or 40 s): each returns how many were answered 200. A sidecar that is down
/// meanwhile is waited for.
fn load(
    port: u16,
    token: &str,
    stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<tokio::task::JoinHandle<usize>> {
    (0..4)
        .map(|_| {
            let (token, stop) = (token.to_owned(), stop.clone());
            tokio::spawn(async move {
                let deadline = Instant::now() + Duration::from_secs(40);
                let mut answered = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline
                {
                    let req = Request::get("/echo")
                        .header("proxy-authorization", format!("Bearer {token}"))
                        .body(full(""))
                        .unwrap();
                    if let Ok((200, _, _)) = plain_request(port, req).await {
                        answered += 1;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                answered
            })
        })
        .collect()
}

/// The segment files in a spool, and their bytes.
fn spool_size(spool: &std::path::Path) -> (usize, u64) {
    std::fs::read_dir(spool)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .fold((0, 0), |(n, bytes), p| {
            (n + 1, bytes + std::fs::metadata(p).map_or(0, |m| m.len()))
        })
}

/// Waits (up to 60 s: a sink that was down for long retries every 30 s at most) until
/// `delivered()` says the sink holds the spool's last event.
async fn until_delivered(s: &Setup, what: &str, mut delivered: impl AsyncFnMut() -> u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let head = agentgate_e2e::audit::spool_seq(&s.sidecar.path("spool"));
        let got = delivered().await;
        if head > 0 && got == head {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what} holds seq {got} of {head}:\n{}",
            s.sidecar.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

const COLLECTOR_TOKEN: &str = "collector-token-8d1e77c04b";

/// What the collector written here received, as it came: nothing is dropped, so a
/// batch sent twice would be there twice.
#[derive(Default)]
struct Received {
    text: String,
    batches: usize,
    problems: Vec<String>,
}

/// An HTTP audit collector over HTTPS, that can be stopped and started again on its
/// port.
struct Collector {
    port: u16,
    tls: std::sync::Arc<rustls::ServerConfig>,
    received: std::sync::Arc<std::sync::Mutex<Received>>,
    running: Option<(
        tokio::task::JoinHandle<()>,
        std::sync::Arc<std::sync::atomic::AtomicBool>,
    )>,
}

async fn collect(
    req: Request<Incoming>,
    received: &std::sync::Mutex<Received>,
    down: &std::sync::atomic::AtomicBool,
) -> Response<TestBody> {
    let status = |code: u16| {
        Response::builder()
            .status(code)
            .header("connection", "close")
            .body(full(""))
            .unwrap()
    };
    if down.load(std::sync::atomic::Ordering::SeqCst) {
        return status(503);
    }
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    if header("authorization") != Some(format!("Bearer {COLLECTOR_TOKEN}")) {
        return status(401);
    }
    let mut problems = Vec::new();
    if req.method() != "POST" || req.uri().path() != "/ingest" {
        problems.push(format!("{} {}", req.method(), req.uri()));
    }
    if header("content-type").as_deref() != Some("application/x-ndjson") {
        problems.push(format!("content-type {:?}", header("content-type")));
    }
    let (first, last) = (
        header("x-agentgate-first-seq"),
        header("x-agentgate-last-seq"),
    );
    let Ok(body) = req.into_body().collect().await else {
        return status(400);
    };
    let text = String::from_utf8(body.to_bytes().to_vec()).unwrap();
    let first_in_body = text
        .lines()
        .next()
        .map(|l| agentgate_e2e::audit::last_seq(&format!("{l}\n")));
    if first.and_then(|f| f.parse().ok()) != first_in_body
        || last.and_then(|l| l.parse().ok()) != Some(agentgate_e2e::audit::last_seq(&text))
    {
        problems.push("the seq headers do not name the batch's ends".into());
    }
    let mut r = received.lock().unwrap();
    r.text.push_str(&text);
    r.batches += 1;
    r.problems.extend(problems);
    status(200)
}

impl Collector {
    async fn start(pki: &Pki) -> Self {
        let tls = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![pki.cert_der.clone().into()],
            rustls::pki_types::PrivateKeyDer::try_from(pki.key_der.clone()).unwrap(),
        )
        .unwrap();
        let mut collector = Self {
            port: free_port(),
            tls: std::sync::Arc::new(tls),
            received: Default::default(),
            running: None,
        };
        collector.start_again().await;
        collector
    }

    async fn start_again(&mut self) {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port))
            .await
            .unwrap();
        let down = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let acceptor = tokio_rustls::TlsAcceptor::from(self.tls.clone());
        let (received, d) = (self.received.clone(), down.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, received, down) = (acceptor.clone(), received.clone(), d.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |req| {
                        let (received, down) = (received.clone(), down.clone());
                        async move {
                            Ok::<_, std::convert::Infallible>(collect(req, &received, &down).await)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        self.running = Some((task, down));
    }

    /// Stops it: its port is closed, and what arrives on a connection still open is
    /// answered 503 (and the connection closed), never stored.
    fn stop(&mut self) {
        let (task, down) = self.running.take().unwrap();
        down.store(true, std::sync::atomic::Ordering::SeqCst);
        task.abort();
    }

    fn text(&self) -> String {
        self.received.lock().unwrap().text.clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_collector_that_was_down_gets_every_event_once_in_order() {
    let started = Instant::now();
    let pki = Pki::new();
    let mut collector = Collector::start(&pki).await;
    let secrets = tempfile::tempdir().unwrap();
    let token_file = secrets.path().join("collector-token");
    std::fs::write(&token_file, format!("{COLLECTOR_TOKEN}\n")).unwrap();
    let url = format!("https://127.0.0.1:{}/ingest", collector.port);
    let mut s = setup_with(
        &[
            "--audit",
            &url,
            "--audit-http-token-file",
            token_file.to_str().unwrap(),
            "--audit-segment-bytes",
            "16384",
            "--audit-spool-max-bytes",
            "67108864",
            "--audit-sink-timeout",
            "5s",
        ],
        // The sidecar trusts the collector's CA through --extra-ca-file.
        |dir| {
            let mut cas = std::fs::read_to_string(dir.join("extra-ca.pem")).unwrap();
            cas.push_str(&pki.ca_pem);
            std::fs::write(dir.join("extra-ca.pem"), cas).unwrap();
        },
    )
    .await;
    let token = s.token();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let agents = load(s.port, &token, &stop);
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The collector goes away under load; the sidecar crashes and starts again while
    // it is away (so where the sink stopped comes from its cursor in the spool).
    collector.stop();
    let outage = Instant::now();
    let before = spool_size(&s.sidecar.path("spool"));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    s.sidecar.stop("KILL");
    s.sidecar.restart().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let during = spool_size(&s.sidecar.path("spool"));
    let (_, metrics) = s.sidecar.admin("/metrics").await.unwrap();
    collector.start_again().await;
    let outage = outage.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut answered = 0;
    for agent in agents {
        answered += agent.await.unwrap();
    }
    assert!(answered > 20, "only {answered} requests were answered");
    assert!(
        during.0 >= before.0 + 3,
        "the spool did not grow while the collector was away: {before:?} → {during:?}"
    );
    assert!(
        metrics.contains(&format!(
            "agentgate_sidecar_audit_failures_total{{sink=\"{url}\"}}"
        )),
        "{metrics}"
    );

    let delivered = async || agentgate_e2e::audit::last_seq(&collector.text());
    until_delivered(&s, "the collector", delivered).await;
    // One more request, so the writer deletes what every sink has delivered.
    assert_eq!(s.get("/echo", &token).await.unwrap().0, 200);
    let delivered = async || agentgate_e2e::audit::last_seq(&collector.text());
    until_delivered(&s, "the collector", delivered).await;

    // Every event once, in order, from seq 1: byte for byte what the file sink holds,
    // and a chain that verifies (an event twice is out of order).
    let received = collector.text();
    let verified = verify(&received, None).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(verified.first_seq, 1);
    assert_eq!(verified.crashes, 1, "the crash is in the trail");
    let file = s.sidecar.audit();
    assert!(
        received == file,
        "the collector's trail is not the file sink's"
    );
    let r = collector.received.lock().unwrap();
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    // Delivered segments are gone from the spool again.
    let after = spool_size(&s.sidecar.path("spool"));
    assert!(after.0 <= 2, "the spool still holds {after:?}");
    let log = s.sidecar.log();
    assert!(log.contains("an audit sink failed"), "{log}");
    for secret in [COLLECTOR_TOKEN, UPSTREAM_TOKEN] {
        assert!(!log.contains(secret), "the log holds a secret");
        assert!(!received.contains(secret), "the trail holds a secret");
    }
    eprintln!(
        "collector: {} events in {} batches, 0 twice; {answered} requests answered; outage {outage:?}; spool {before:?} → {during:?} → {after:?}; {:?} in all",
        verified.events.len(),
        r.batches,
        started.elapsed()
    );
}

/// A TCP pass-through to `backend` that can hold what the connections open at that
/// moment send on, until it is released — as a network that delivers a request late,
/// after its sender gave up on it. Connections opened meanwhile pass at once.
struct LateNetwork {
    port: u16,
    /// Connections numbered below `.0` are held while `.1`.
    state: tokio::sync::watch::Sender<(u64, bool)>,
    next: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl LateNetwork {
    async fn start(backend: u16) -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let (state, _) = tokio::sync::watch::channel((0, false));
        let next = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (states, n) = (state.clone(), next.clone());
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let id = n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let (reading, mut writing) = (states.subscribe(), states.subscribe());
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", backend)).await
                    else {
                        return;
                    };
                    let (mut client_rx, mut client_tx) = client.into_split();
                    let (mut server_rx, mut server_tx) = server.into_split();
                    let answers = tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut server_rx, &mut client_tx).await;
                    });
                    // What the client sends is read at once (a reset loses none of it)
                    // and forwarded unless held. When a held client gives up, its TLS
                    // close_notify (a lone 24-byte TLS 1.3 record) is not passed on:
                    // Azurite (Node) drops a request whose sender closed before its
                    // answer, where Azure carries out a request it received whole.
                    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Vec<u8>, bool)>();
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 64 << 10];
                        // A held lone record that may be the close_notify: passed on only
                        // if more follows.
                        let mut maybe_close: Option<Vec<u8>> = None;
                        while let Ok(n @ 1..) = client_rx.read(&mut buf).await {
                            let (below, holding) = *reading.borrow();
                            let held = holding && id < below;
                            if let Some(bytes) = maybe_close.take()
                                && tx.send((bytes, true)).is_err()
                            {
                                return;
                            }
                            let bytes = buf[..n].to_vec();
                            if held && n == 24 && bytes.starts_with(&[0x17, 0x03, 0x03, 0x00, 19]) {
                                maybe_close = Some(bytes);
                            } else if tx.send((bytes, held)).is_err() {
                                return;
                            }
                        }
                    });
                    while let Some((bytes, held)) = rx.recv().await {
                        if held {
                            let _ = writing.wait_for(|(_, holding)| !holding).await;
                        }
                        if server_tx.write_all(&bytes).await.is_err() {
                            break;
                        }
                    }
                    // The client is gone; what it sent is still answered.
                    let _ = tokio::time::timeout(Duration::from_secs(10), answers).await;
                });
            }
        });
        Self { port, state, next }
    }

    /// Holds what the connections open now send on, until [`Self::release`].
    fn hold(&self) {
        let below = self.next.load(std::sync::atomic::Ordering::SeqCst);
        self.state.send_replace((below, true));
    }

    fn release(&self) {
        self.state.send_modify(|(_, holding)| *holding = false);
    }
}

/// The last event in the blobs under `prefix`: in the newest one that holds one.
async fn last_blob_seq(azurite: &support::azurite::Azurite, prefix: &str) -> u64 {
    for name in azurite.list("audit", prefix).await.iter().rev() {
        let seq = agentgate_e2e::audit::last_seq(&String::from_utf8_lossy(
            &azurite.get("audit", name).await,
        ));
        if seq > 0 {
            return seq;
        }
    }
    0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_append_blobs_get_every_event_once_across_late_appends_an_outage_and_a_crash() {
    let started = Instant::now();
    let pki = Pki::new();
    let mut azurite = tokio::task::block_in_place(|| support::azurite::Azurite::start(&pki));
    azurite.create_container("audit").await;
    let network = LateNetwork::start(azurite.port).await;
    let secrets = tempfile::tempdir().unwrap();
    let key_file = secrets.path().join("azure-key");
    azurite.write_key(&key_file);
    let mut unique = [0u8; 4];
    getrandom::fill(&mut unique).unwrap();
    let prefix = format!("agents/claude-7f9c-{}", hex::encode(unique));
    // The sidecar reaches Azurite through the late network (TLS end to end).
    let url = format!(
        "azureblob:https://127.0.0.1:{}/{}/audit/{prefix}",
        network.port, azurite.account
    );
    let mut s = setup_with(
        &[
            "--audit",
            &url,
            "--audit-azure-key-file",
            key_file.to_str().unwrap(),
            "--audit-azure-max-blob-bytes",
            "1048576",
            "--audit-sink-timeout",
            "3s",
            "--audit-segment-bytes",
            "16384",
            "--audit-spool-max-bytes",
            "67108864",
        ],
        |dir| {
            let mut cas = std::fs::read_to_string(dir.join("extra-ca.pem")).unwrap();
            cas.push_str(&pki.ca_pem);
            std::fs::write(dir.join("extra-ca.pem"), cas).unwrap();
        },
    )
    .await;
    let token = s.token();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let agents = load(s.port, &token, &stop);
    let delivered = async || last_blob_seq(&azurite, &prefix).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while delivered().await == 0 {
        assert!(
            Instant::now() < deadline,
            "nothing delivered:\n{}",
            s.sidecar.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // An append arrives late: the sink's connection is held, so its append times out;
    // the sink reads where the blob ends and goes on on a new connection; only then
    // does the first append reach Azurite, at a position that has passed.
    let timeouts = || s.sidecar.log().matches("no answer within").count();
    let mut tries = 0;
    loop {
        let (before, held_at) = (timeouts(), delivered().await);
        network.hold();
        let deadline = Instant::now() + Duration::from_secs(30);
        while timeouts() == before {
            assert!(
                Instant::now() < deadline,
                "nothing timed out:\n{}",
                s.sidecar.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let log = s.sidecar.log();
        let held = log
            .lines()
            .rfind(|l| l.contains("no answer within"))
            .unwrap()
            .to_owned();
        if held.contains("Append Block") {
            while delivered().await <= held_at {
                assert!(Instant::now() < deadline, "the sink did not go on:\n{log}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            network.release();
            break;
        }
        // What was held was not an append (a List, a HEAD, a new blob): again.
        network.release();
        tries += 1;
        assert!(tries < 5, "no append was ever held:\n{log}");
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Azurite stops under load; the sidecar crashes and starts again while it is away;
    // Azurite starts again on the same port and data (which takes it seconds).
    tokio::task::block_in_place(|| azurite.stop());
    let outage = Instant::now();
    let before = spool_size(&s.sidecar.path("spool"));
    tokio::time::sleep(Duration::from_secs(1)).await;
    s.sidecar.stop("KILL");
    s.sidecar.restart().await;
    tokio::task::block_in_place(|| azurite.start_again());
    let outage = outage.elapsed();
    let during = spool_size(&s.sidecar.path("spool"));
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut answered = 0;
    for agent in agents {
        answered += agent.await.unwrap();
    }
    assert!(answered > 20, "only {answered} requests were answered");
    assert!(
        during.0 >= before.0 + 2,
        "the spool did not grow while Azurite was away: {before:?} → {during:?}"
    );

    let blobs = async || {
        let names = azurite.list("audit", &prefix).await;
        let mut text = String::new();
        for name in &names {
            text.push_str(&String::from_utf8(azurite.get("audit", name).await).unwrap());
        }
        (names, text)
    };
    let delivered = async || last_blob_seq(&azurite, &prefix).await;
    until_delivered(&s, "the blobs", delivered).await;
    assert_eq!(s.get("/echo", &token).await.unwrap().0, 200);
    until_delivered(&s, "the blobs", delivered).await;

    // Every event once, in order, from seq 1, across blobs that each hold whole events.
    let (names, text) = blobs().await;
    let verified = verify(&text, None).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(verified.first_seq, 1);
    assert_eq!(verified.crashes, 1, "the crash is in the trail");
    assert!(
        text == s.sidecar.audit(),
        "the blobs' trail is not the file sink's"
    );
    assert!(names.len() >= 3, "no new blob was started: {names:?}");
    for name in &names {
        let blob = String::from_utf8(azurite.get("audit", name).await).unwrap();
        assert!(blob.len() <= 1 << 20, "{name} is {} bytes", blob.len());
        verify(&blob, None).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    // The late append was refused by its position, not written twice.
    let late = azurite
        .log()
        .lines()
        .filter(|l| l.contains("comp=appendblock") && l.contains("\" 412"))
        .count();
    assert!(
        late >= 1,
        "no append arrived late:\n{}\nthe sink's failures:\n{}",
        azurite.log(),
        s.sidecar
            .log()
            .lines()
            .filter(|l| l.contains("an audit sink failed"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let after = spool_size(&s.sidecar.path("spool"));
    assert!(after.0 <= 2, "the spool still holds {after:?}");
    let log = s.sidecar.log();
    assert!(log.contains("an audit sink failed"), "{log}");
    for secret in [azurite.key.as_str(), UPSTREAM_TOKEN, "SharedKey"] {
        assert!(!log.contains(secret), "the log holds a secret");
        assert!(!text.contains(secret), "the blobs hold a secret");
    }
    eprintln!(
        "azure: {} events in {} blobs, 0 twice; {late} late appends refused (412); {answered} requests answered; outage {outage:?}; spool {before:?} → {during:?} → {after:?}; {:?} in all",
        verified.events.len(),
        names.len(),
        started.elapsed()
    );
}
