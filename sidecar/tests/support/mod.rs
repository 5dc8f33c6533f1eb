//! Real peers for the sidecar's integration tests, all on loopback: a test PKI, HTTPS
//! servers (an upstream API and an OIDC issuer) written with hyper + rustls, and the
//! sidecar binary itself as a child process.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod azurite;

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use agentgate_e2e::free_port;
use base64::Engine as _;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
use serde_json::{Value, json};

pub type TestBody = BoxBody<Bytes, Infallible>;

pub fn full(body: impl Into<Bytes>) -> TestBody {
    Full::new(body.into()).boxed()
}

/// A CA and a serving certificate for 127.0.0.1 and localhost.
pub struct Pki {
    pub ca_pem: String,
    pub cert_der: Vec<u8>,
    pub key_der: Vec<u8>,
    pub cert_pem: String,
    pub key_pem: String,
}

impl Pki {
    pub fn new() -> Self {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(vec![]).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params
            .subject_alt_names
            .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        let cert = params.signed_by(&key, &issuer).unwrap();
        Self {
            ca_pem: ca_cert.pem(),
            cert_der: cert.der().to_vec(),
            key_der: key.serialize_der(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    pub fn write_ca(&self, path: &Path) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, &self.ca_pem).unwrap();
    }
}

/// Writes a mounted Secret as the sidecar reads it: `dir/credentials/<name>/<key>`.
pub fn write_secret(dir: &Path, name: &str, files: &[(&str, &str)]) {
    let secret = dir.join("credentials").join(name);
    std::fs::create_dir_all(&secret).unwrap();
    for (key, value) in files {
        std::fs::write(secret.join(key), value).unwrap();
    }
}

/// Serves `handler` over HTTPS on a free loopback port; returns the port.
pub async fn https_server<F, Fut>(pki: &Pki, handler: F) -> u16
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<TestBody>> + Send + 'static,
{
    https_server_on(pki, 0, handler).await
}

/// An OIDC issuer: discovery and an ES256 JWKS over HTTPS, and a signer of tokens.
pub struct OidcIssuer {
    pub url: String,
    key_pem: String,
    pub public_jwk: Value,
}

pub const AUDIENCE: &str = "api://agentgate";

impl OidcIssuer {
    pub async fn start(pki: &Pki) -> Self {
        let key = KeyPair::generate().unwrap();
        let raw = key.public_key_raw();
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let public_jwk = json!({ "kty": "EC", "crv": "P-256", "x": b64(&raw[1..33]), "y": b64(&raw[33..65]),
            "kid": "k1", "alg": "ES256", "use": "sig" });
        let port = free_port();
        let url = format!("https://127.0.0.1:{port}");
        let (jwk, issuer) = (public_jwk.clone(), url.clone());
        let handler = move |req: Request<Incoming>| {
            let (jwk, issuer) = (jwk.clone(), issuer.clone());
            async move {
                let body = match req.uri().path() {
                    "/.well-known/openid-configuration" => {
                        json!({ "issuer": issuer, "jwks_uri": format!("{issuer}/jwks") })
                    }
                    "/jwks" => json!({ "keys": [jwk] }),
                    _ => return Response::builder().status(404).body(full("")).unwrap(),
                };
                Response::new(full(body.to_string()))
            }
        };
        // Bind the chosen port (the URL must be known before the handler exists).
        let bound = https_server_on(pki, port, handler).await;
        assert_eq!(bound, port);
        Self {
            url,
            key_pem: key.serialize_pem(),
            public_jwk,
        }
    }

    /// A token for `sub` in `groups`, valid for an hour, with `claims` merged over it.
    pub fn token(&self, groups: &[&str], claims: Value) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let mut body = json!({ "iss": self.url, "sub": "user-123", "aud": AUDIENCE, "email": "dev@example.com",
            "groups": groups, "iat": now, "nbf": now, "exp": now + 3600 });
        for (k, v) in claims.as_object().unwrap() {
            body[k] = v.clone();
        }
        self.sign(&body, "k1")
    }

    pub fn sign(&self, claims: &Value, kid: &str) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(kid.to_owned());
        jsonwebtoken::encode(
            &header,
            claims,
            &EncodingKey::from_ec_pem(self.key_pem.as_bytes()).unwrap(),
        )
        .unwrap()
    }
}

/// Like [`https_server`], on a given port (0: any free one).
pub async fn https_server_on<F, Fut>(pki: &Pki, port: u16, handler: F) -> u16
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<TestBody>> + Send + 'static,
{
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
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
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, handler) = (acceptor.clone(), handler.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |req| {
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(handler(req).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    port
}

/// The sidecar binary, running with its files in a temp dir.
pub struct Sidecar {
    pub dir: tempfile::TempDir,
    pub admin_port: u16,
    child: Child,
    flags: Vec<String>,
}

impl Sidecar {
    /// Writes `bundle` and `labels`, starts the sidecar, waits for `/readyz`.
    pub async fn start(bundle: &Value, labels: &str, setup: impl FnOnce(&Path)) -> Self {
        let sidecar = Self::spawn(&bundle.to_string(), labels, setup);
        sidecar.wait_ready().await;
        sidecar
    }

    /// Starts the sidecar with `bundle` as the bundle file's text, without waiting.
    pub fn spawn(bundle: &str, labels: &str, setup: impl FnOnce(&Path)) -> Self {
        Self::spawn_with(bundle, labels, &[], setup)
    }

    /// [`Self::start`] with extra command-line flags.
    pub async fn start_with(
        bundle: &Value,
        labels: &str,
        flags: &[&str],
        setup: impl FnOnce(&Path),
    ) -> Self {
        let sidecar = Self::spawn_with(&bundle.to_string(), labels, flags, setup);
        sidecar.wait_ready().await;
        sidecar
    }

    /// [`Self::spawn`] with extra command-line flags.
    pub fn spawn_with(
        bundle: &str,
        labels: &str,
        flags: &[&str],
        setup: impl FnOnce(&Path),
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("bundle.json"), bundle).unwrap();
        std::fs::write(dir.path().join("labels"), labels).unwrap();
        std::fs::create_dir_all(dir.path().join("credentials")).unwrap();
        setup(dir.path());
        let admin_port = free_port();
        let flags: Vec<String> = flags.iter().map(|f| (*f).to_owned()).collect();
        let child = Self::spawn_child(dir.path(), admin_port, &flags);
        Self {
            dir,
            admin_port,
            child,
            flags,
        }
    }

    fn spawn_child(dir: &Path, admin_port: u16, flags: &[String]) -> Child {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_agentgate-sidecar"));
        cmd.arg("--bundle")
            .arg(dir.join("bundle.json"))
            .arg("--pod-labels")
            .arg(dir.join("labels"))
            .arg("--credentials-dir")
            .arg(dir.join("credentials"))
            .arg("--admin-addr")
            .arg(format!("127.0.0.1:{admin_port}"))
            .arg("--audit")
            .arg(format!("file:{}", dir.join("audit.jsonl").display()))
            .arg("--audit-spool")
            .arg(dir.join("spool"))
            .arg("--reload-interval")
            .arg("200ms")
            .arg("--pod-name")
            .arg("claude-7f9c")
            .arg("--pod-namespace")
            .arg("agents")
            .args(flags)
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.join("sidecar.log"))
                    .unwrap(),
            ));
        // Approvals need a Kubernetes API: these tests have none (the operator's
        // end-to-end tests run the sidecar against a real one).
        cmd.env("AGENTGATE_APPROVALS", "off");
        cmd.env("AGENTGATE_SESSIONS", "off");
        if dir.join("extra-ca.pem").exists() {
            cmd.arg("--extra-ca-file").arg(dir.join("extra-ca.pem"));
        }
        cmd.spawn().unwrap()
    }

    /// Stops the sidecar with `signal` (`TERM`: a clean shutdown; `KILL`: a crash).
    pub fn stop(&mut self, signal: &str) {
        Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        self.child.wait().unwrap();
    }

    /// Starts the sidecar again on the same files — its spool too — and waits for it.
    pub async fn restart(&mut self) {
        self.child = Self::spawn_child(self.dir.path(), self.admin_port, &self.flags);
        self.wait_ready().await;
    }

    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok((200, _)) = self.admin("/readyz").await {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "sidecar not ready; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn admin(&self, path: &str) -> Result<(u16, String), String> {
        let (status, _, body) =
            plain_request(self.admin_port, Request::get(path).body(full("")).unwrap()).await?;
        Ok((status, body))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sidecar.log")).unwrap_or_default()
    }

    /// The sidecar process's resident memory, in KiB (Linux `/proc`).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    /// The audit trail's file sink, once it holds everything the spool does.
    pub fn audit(&self) -> String {
        agentgate_e2e::audit::settled(&self.path("audit.jsonl"), &self.path("spool"))
    }

    pub fn write_bundle(&self, bundle: &str) {
        let tmp = self.dir.path().join("bundle.json.tmp");
        std::fs::write(&tmp, bundle).unwrap();
        std::fs::rename(tmp, self.dir.path().join("bundle.json")).unwrap();
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends `req` over plain HTTP/1.1 to 127.0.0.1:`port` (as the agent does), returning
/// status, headers and body.
pub async fn plain_request(
    port: u16,
    req: Request<TestBody>,
) -> Result<(u16, http::HeaderMap, String), String> {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut req = req;
    req.headers_mut().insert(
        http::header::HOST,
        http::HeaderValue::from_static("localhost"),
    );
    let response = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, headers, String::from_utf8_lossy(&body).into_owned()))
}

/// Sends `req` over HTTPS/1.1 to 127.0.0.1:`port`, trusting `ca_pem`: the direct path to
/// an upstream, for the controls of the attack tests. The request target is sent as
/// given (no re-encoding), so it reaches the server exactly as the agent would send it.
pub async fn https_request(
    port: u16,
    ca_pem: &str,
    req: Request<TestBody>,
) -> Result<(u16, http::HeaderMap, Vec<u8>), String> {
    let response = https_response(port, ca_pem, req).await?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, headers, body.to_vec()))
}

/// Like [`https_request`], returning the response as soon as its head arrives (a watch
/// never ends by itself).
pub async fn https_response(
    port: u16,
    ca_pem: &str,
    req: Request<TestBody>,
) -> Result<Response<Incoming>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
        roots
            .add(cert.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").map_err(|e| e.to_string())?;
    let tls = connector
        .connect(name.to_owned(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut req = req;
    if !req.headers().contains_key(http::header::HOST) {
        req.headers_mut().insert(
            http::header::HOST,
            http::HeaderValue::from_str(&format!("127.0.0.1:{port}")).unwrap(),
        );
    }
    sender.send_request(req).await.map_err(|e| e.to_string())
}
