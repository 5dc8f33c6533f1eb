//! Attacks on the HTTP gateway, each with its control: the HTTPS upstream written here
//! is first asked directly and shown to hand out the secret (or to act on the header),
//! then the same request through the sidecar is shown not to.

#![allow(clippy::unwrap_used)]

mod support;

use base64::Engine as _;
use http::{HeaderMap, Request, Response};
use hyper::body::Incoming;
use serde_json::{Value, json};
use support::*;

/// The bearer token of the `api` Connection.
const TOKEN: &str = "upstream-bearer-token-8c1f2e";
/// The `x-api-key` value of the `keyed` Connection.
const API_KEY: &str = "keyed-api-key-77d0aa41";
const SESSION: &str = "s3ss10n-cookie-value-5521";
const GZ_SECRET: &str = "s3cr3t-in-a-gzip-body";
const YAML_SECRET: &str = "s3cr3t-in-yaml-value";
const BROKEN_JSON_SECRET: &str = "s3cr3t-after-the-document";

fn b64_variants(value: &str) -> Vec<String> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE_NO_PAD};
    vec![
        STANDARD.encode(value),
        STANDARD_NO_PAD.encode(value),
        URL_SAFE_NO_PAD.encode(value),
    ]
}

/// CRC-32 (IEEE), for a well-formed gzip member.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for b in data {
        crc ^= u32::from(*b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A valid gzip member holding `data` in one stored (uncompressed) deflate block.
fn gzip_stored(data: &[u8]) -> Vec<u8> {
    let len = u16::try_from(data.len()).unwrap();
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff, 0x01];
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&(!len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&crc32(data).to_le_bytes());
    out.extend_from_slice(&u32::try_from(data.len()).unwrap().to_le_bytes());
    out
}

async fn upstream(req: Request<Incoming>) -> Response<TestBody> {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let json_body = json!({ "clientSecret": GZ_SECRET }).to_string();
    match req.uri().path() {
        // Echoes what it was sent — the credential too, plain and base64, in the body and
        // in headers — and sets a session cookie.
        "/echo" => {
            let authorization = header("authorization");
            let api_key = header("x-api-key");
            let token = authorization
                .strip_prefix("Bearer ")
                .unwrap_or_default()
                .to_owned();
            let received: serde_json::Map<String, Value> = req
                .headers()
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), json!(v.to_str().unwrap_or_default())))
                .collect();
            let b64 = base64::engine::general_purpose::STANDARD;
            let body = json!({
                "received": received,
                "debug": format!("token={token} key={api_key}"),
                "encoded": [b64.encode(&token), b64.encode(&api_key)],
            });
            Response::builder()
                .header("content-type", "application/json")
                .header("set-cookie", format!("session={SESSION}; HttpOnly"))
                .header("x-echo-authorization", authorization)
                .header("x-api-key", api_key.clone())
                .header("x-debug", format!("key={api_key}"))
                .body(full(body.to_string()))
                .unwrap()
        }
        "/gzip-identity" => Response::builder()
            .header("content-type", "application/json")
            .header("content-encoding", "identity, gzip")
            .body(full(gzip_stored(json_body.as_bytes())))
            .unwrap(),
        "/gzip-two-headers" => Response::builder()
            .header("content-type", "application/json")
            .header("content-encoding", "identity")
            .header("content-encoding", "gzip")
            .body(full(gzip_stored(json_body.as_bytes())))
            .unwrap(),
        "/gzip-uppercase" => Response::builder()
            .header("content-type", "text/plain")
            .header("content-encoding", "GZIP")
            .body(full(gzip_stored(json_body.as_bytes())))
            .unwrap(),
        // hyper sends this as `gzip, chunked`: the body is gzip inside the chunking.
        "/te-gzip" => Response::builder()
            .header("content-type", "application/json")
            .header("transfer-encoding", "gzip")
            .body(full(gzip_stored(json_body.as_bytes())))
            .unwrap(),
        "/yaml" => Response::builder()
            .header("content-type", "application/yaml")
            .body(full(format!("kind: Config\nclientSecret: {YAML_SECRET}\n")))
            .unwrap(),
        "/not-json" => Response::builder()
            .header("content-type", "application/json")
            .body(full(format!(
                "{{\"ok\":true}}\n{{\"clientSecret\":\"{BROKEN_JSON_SECRET}\"}}"
            )))
            .unwrap(),
        _ => Response::builder().status(404).body(full("")).unwrap(),
    }
}

struct Setup {
    pki: Pki,
    upstream_port: u16,
    sidecar: Sidecar,
    /// The `api` Connection (bearer token, JSON-structure masking).
    api: u16,
    /// The `keyed` Connection (an `x-api-key` header, no masking in its policy).
    keyed: u16,
}

async fn setup() -> Setup {
    let pki = Pki::new();
    let upstream_port = https_server(&pki, upstream).await;
    let (api, keyed) = (free_port(), free_port());
    let tls =
        json!({ "mode": "verify-full", "caSecretRef": { "name": "upstream-ca", "key": "ca.crt" } });
    let address = format!("https://127.0.0.1:{upstream_port}");
    let bundle = json!({
        "namespace": "agents",
        "connections": [
            { "name": "api", "spec": { "protocol": "http",
                "upstream": { "address": address, "tls": tls },
                "credentials": { "secretRef": { "name": "api-token" } }, "listen": { "port": api } } },
            { "name": "keyed", "spec": { "protocol": "http",
                "upstream": { "address": address, "tls": tls },
                "credentials": { "secretRef": { "name": "api-key" } }, "listen": { "port": keyed } } }],
        "policies": [
            { "name": "api-readers", "spec": { "agentSelector": {}, "connections": ["api"],
                "rules": [{ "name": "reads", "match": { "http": { "methods": ["GET"] } }, "action": "allow" }],
                "masking": { "detectors": ["secrets", "credentials"] } } },
            { "name": "keyed-readers", "spec": { "agentSelector": {}, "connections": ["keyed"],
                "rules": [{ "name": "reads", "match": { "http": { "methods": ["GET"] } }, "action": "allow" }] } }]
    });
    let sidecar = Sidecar::start(&bundle, "app=\"agent\"\n", |dir| {
        pki.write_ca(&dir.join("credentials/upstream-ca/ca.crt"));
        write_secret(dir, "api-token", &[("token", TOKEN)]);
        write_secret(
            dir,
            "api-key",
            &[("header", "x-api-key"), ("value", API_KEY)],
        );
    })
    .await;
    Setup {
        pki,
        upstream_port,
        sidecar,
        api,
        keyed,
    }
}

impl Setup {
    /// Straight to the upstream, with `headers`.
    async fn direct(&self, path: &str, headers: &[(&str, &str)]) -> (u16, HeaderMap, Vec<u8>) {
        let mut req = Request::get(path);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        https_request(
            self.upstream_port,
            &self.pki.ca_pem,
            req.body(full("")).unwrap(),
        )
        .await
        .unwrap()
    }

    /// Through the sidecar's listener `port`, with `headers`.
    async fn agent(
        &self,
        port: u16,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (u16, HeaderMap, String) {
        let mut req = Request::get(path);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        plain_request(port, req.body(full("")).unwrap())
            .await
            .unwrap()
    }
}

/// Every header line and the body as one text, to search for leaks.
fn everything(headers: &HeaderMap, body: &[u8]) -> String {
    let mut all = String::from_utf8_lossy(body).into_owned();
    for (k, v) in headers {
        all.push_str(&format!("\n{k}: {}", String::from_utf8_lossy(v.as_bytes())));
    }
    all
}

#[tokio::test]
async fn an_upstream_echoing_the_credential_never_hands_it_to_the_agent() {
    let s = setup().await;
    for (port, credential, header, value) in [
        (s.api, TOKEN, "authorization", format!("Bearer {TOKEN}")),
        (s.keyed, API_KEY, "x-api-key", API_KEY.to_owned()),
    ] {
        // Control: asked directly with the credential, the upstream hands it back in
        // the body and in headers, plain and base64, and sets a session cookie.
        let (status, headers, body) = s.direct("/echo", &[(header, &value)]).await;
        assert_eq!(status, 200);
        let direct = everything(&headers, &body);
        assert!(direct.contains(credential), "{direct}");
        assert!(direct.contains(&b64_variants(credential)[0]), "{direct}");
        assert!(direct.contains(SESSION), "{direct}");

        // Through the sidecar: the injected credential is used (the upstream answers)
        // but never shown, in no encoding, and the cookie is masked.
        let (status, headers, body) = s.agent(port, "/echo", &[]).await;
        assert_eq!(status, 200, "{body}\n{}", s.sidecar.log());
        let seen = everything(&headers, body.as_bytes());
        assert!(!seen.contains(credential), "the credential leaked: {seen}");
        for encoded in b64_variants(credential) {
            assert!(!seen.contains(&encoded), "its base64 leaked: {seen}");
        }
        assert!(!seen.contains(SESSION), "the session cookie leaked: {seen}");
        assert_eq!(headers["set-cookie"], "[masked:credential-header]");
        assert!(seen.contains("[masked:upstream-credential]"), "{seen}");
        let echoed: Value = serde_json::from_str(&body).unwrap();
        assert!(
            echoed["received"][header]
                .as_str()
                .unwrap()
                .contains("[masked:"),
            "the upstream did get a credential: {echoed}"
        );
    }
    assert!(
        s.sidecar.audit().contains("\"upstream-credential\""),
        "the echo is counted in the audit record"
    );
    assert!(
        s.sidecar.audit().contains("\"credential-header\""),
        "masked response headers are counted too"
    );
    assert!(!s.sidecar.audit().contains(TOKEN));
    assert!(!s.sidecar.audit().contains(API_KEY));
}

#[tokio::test]
async fn identity_and_credential_headers_of_the_agent_are_not_forwarded() {
    let s = setup().await;
    let sent = [
        ("impersonate-user", "admin"),
        ("impersonate-group", "system:masters"),
        ("impersonate-uid", "0"),
        ("authorization", "Bearer agent-made-this-up"),
        ("proxy-authorization", "Bearer agent-jwt"),
        ("cookie", "session=agent"),
        ("x-api-key", "agent-chosen-key"),
        ("x-forwarded-for", "10.0.0.1"),
        ("x-ms-authorization-auxiliary", "Bearer other-tenant"),
        ("accept", "application/json"),
        ("x-request-id", "req-42"),
    ];
    // Control: the upstream sees (and could act on) every header it is sent.
    let (_, _, body) = s.direct("/echo", &sent).await;
    let echoed: Value = serde_json::from_slice(&body).unwrap();
    for (name, value) in &sent {
        assert_eq!(echoed["received"][name], *value, "{echoed}");
    }

    for port in [s.api, s.keyed] {
        let (status, _, body) = s.agent(port, "/echo", &sent).await;
        assert_eq!(status, 200, "{body}");
        let echoed: Value = serde_json::from_str(&body).unwrap();
        let received = echoed["received"].as_object().unwrap();
        for name in [
            "impersonate-user",
            "impersonate-group",
            "impersonate-uid",
            "proxy-authorization",
            "cookie",
            "x-forwarded-for",
            "x-ms-authorization-auxiliary",
        ] {
            assert!(
                !received.contains_key(name),
                "{name} was forwarded: {echoed}"
            );
        }
        for (_, agent_value) in &sent[3..7] {
            assert!(
                !body.contains(agent_value),
                "the agent's {agent_value} reached the upstream: {body}"
            );
        }
        assert_eq!(received["accept"], "application/json");
        assert_eq!(received["x-request-id"], "req-42");
    }
}

#[tokio::test]
async fn compressed_bodies_are_refused_however_they_are_labelled() {
    let s = setup().await;
    for path in [
        "/gzip-identity",
        "/gzip-two-headers",
        "/gzip-uppercase",
        "/te-gzip",
    ] {
        // Control: the upstream sends the secret (in a stored gzip block it is even
        // readable as it is).
        let (status, headers, body) = s.direct(path, &[]).await;
        assert_eq!(status, 200);
        assert!(
            headers.contains_key("content-encoding")
                || headers["transfer-encoding"]
                    .to_str()
                    .unwrap()
                    .contains("gzip"),
            "{path}: {headers:?}"
        );
        assert!(String::from_utf8_lossy(&body).contains(GZ_SECRET));

        for port in [s.api, s.keyed] {
            let (status, headers, body) = s.agent(port, path, &[]).await;
            assert_eq!(status, 502, "{path}: {body}");
            assert_eq!(headers["content-type"], "application/json");
            let refusal: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(refusal["error"], "agentgate_error", "{refusal}");
            assert!(
                refusal["reason"]
                    .as_str()
                    .unwrap()
                    .contains("cannot decode"),
                "{refusal}"
            );
            assert!(!body.contains(GZ_SECRET));
        }
    }
    let (_, metrics) = s.sidecar.admin("/metrics").await.unwrap();
    assert!(
        metrics.contains("agentgate_sidecar_responses_refused_total{reason=\"unmaskable\"} 8"),
        "{metrics}"
    );
}

#[tokio::test]
async fn bodies_the_structure_rules_cannot_read_are_refused_not_text_masked() {
    let s = setup().await;
    for (path, secret) in [("/yaml", YAML_SECRET), ("/not-json", BROKEN_JSON_SECRET)] {
        let (status, _, body) = s.direct(path, &[]).await;
        assert_eq!(status, 200);
        assert!(String::from_utf8_lossy(&body).contains(secret));

        // The api policy masks credential fields, which only a parsed document shows.
        let (status, _, body) = s.agent(s.api, path, &[]).await;
        assert_eq!(status, 502, "{path}: {body}");
        assert!(!body.contains(secret), "{body}");
        assert!(body.contains("cannot be masked"), "{body}");
    }
}

#[tokio::test]
async fn oversized_heads_are_refused_in_json() {
    let s = setup().await;
    // Control: a normal request goes through.
    let (status, _, _) = s.agent(s.keyed, "/echo", &[]).await;
    assert_eq!(status, 200);

    let huge = format!("Bearer {}", "a".repeat(1024 * 1024));
    let (status, headers, body) = s
        .agent(s.keyed, "/echo", &[("proxy-authorization", &huge)])
        .await;
    assert_eq!(status, 431, "{body}");
    assert_eq!(headers["content-type"], "application/json");
    let refusal: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(refusal["error"], "denied_by_agentgate", "{refusal}");
    assert!(refusal["reason"].as_str().unwrap().contains("bytes"));

    let many: Vec<(String, String)> = (0..150)
        .map(|i| (format!("x-filler-{i}"), "1".to_owned()))
        .collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let (status, _, body) = s.agent(s.keyed, "/echo", &many).await;
    assert_eq!(status, 431, "{body}");
    assert!(serde_json::from_str::<Value>(&body).is_ok(), "{body}");
}
