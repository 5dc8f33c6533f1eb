//! TLS and the HTTP client toward identity providers and upstreams.

use std::path::Path;
use std::sync::Arc;

use agentgate_crds::TlsMode;
use hyper_rustls::{FixedServerNameResolver, HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

/// The body of every HTTP message the sidecar sends: its clients' requests and the
/// responses its HTTP front end proxies.
pub type Body = http_body_util::combinators::BoxBody<bytes::Bytes, BodyError>;
/// The error of such a body.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// An HTTP/1.1 client over TLS (or plain HTTP where the Connection says `disable`).
pub type HttpClient = Client<HttpsConnector<HttpConnector>, Body>;

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A CA file could not be read or holds no certificate.
    #[error("CA file {path}: {why}")]
    CaFile {
        /// The file.
        path: String,
        /// What went wrong.
        why: String,
    },
    /// A server name is not valid.
    #[error("invalid TLS server name {0:?}")]
    ServerName(String),
}

/// A Connection's `upstream.tls` (`verify-full` with the system roots when unset) and
/// the roots to verify with: the system's, the sidecar's extra CA, and the Connection's
/// `caSecretRef` as mounted under `credentials_dir`.
pub fn upstream_tls(
    spec: &agentgate_crds::ConnectionSpec,
    credentials_dir: &Path,
    extra_ca: Option<&Path>,
) -> Result<(agentgate_crds::UpstreamTls, RootCertStore), TlsError> {
    let settings = spec
        .upstream
        .tls
        .clone()
        .unwrap_or(agentgate_crds::UpstreamTls {
            mode: TlsMode::VerifyFull,
            ca_secret_ref: None,
            server_name: None,
        });
    let mut cas: Vec<std::path::PathBuf> = extra_ca.map(Path::to_owned).into_iter().collect();
    if let Some(ca) = &settings.ca_secret_ref {
        cas.push(credentials_dir.join(&ca.name).join(&ca.key));
    }
    let roots = root_store(
        &cas.iter()
            .map(std::path::PathBuf::as_path)
            .collect::<Vec<_>>(),
    )?;
    Ok((settings, roots))
}

/// The system roots plus the PEM certificates in `extra` (each file may hold several).
pub fn root_store(extra: &[&Path]) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    // Missing or unreadable system roots leave only the extra CAs: fail closed, never open.
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    for path in extra {
        let bad = |why: String| TlsError::CaFile {
            path: path.display().to_string(),
            why,
        };
        let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
            .collect::<Result<_, _>>()
            .map_err(|e| bad(e.to_string()))?;
        if certs.is_empty() {
            return Err(bad("no PEM certificate in it".into()));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| bad(e.to_string()))?;
        }
    }
    Ok(roots)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client that verifies certificates against `roots` (mode `verify-full`), only checks
/// that the peer holds its certificate's key (mode `require`), or speaks plain HTTP
/// (mode `disable`). `server_name` overrides the name verified and sent as SNI. A TCP
/// connect that takes longer than `connect_timeout` fails.
pub fn http_client(
    roots: RootCertStore,
    mode: TlsMode,
    server_name: Option<&str>,
    connect_timeout: std::time::Duration,
) -> Result<HttpClient, TlsError> {
    let config = client_config(roots, mode);
    let mut tcp = HttpConnector::new();
    tcp.enforce_http(false);
    tcp.set_connect_timeout(Some(connect_timeout));
    tcp.set_nodelay(true);
    let connector = HttpsConnectorBuilder::new().with_tls_config(config);
    let connector = if mode == TlsMode::Disable {
        connector.https_or_http()
    } else {
        connector.https_only()
    };
    let connector = match server_name {
        Some(name) => {
            let name = ServerName::try_from(name.to_owned())
                .map_err(|_| TlsError::ServerName(name.to_owned()))?;
            connector.with_server_name_resolver(FixedServerNameResolver::new(name))
        }
        None => connector,
    };
    Ok(Client::builder(TokioExecutor::new()).build(connector.enable_http1().wrap_connector(tcp)))
}

/// The TLS client settings for `mode`: certificates verified against `roots`
/// (`verify-full`), or only the key proven (`require`).
pub fn client_config(roots: RootCertStore, mode: TlsMode) -> ClientConfig {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap_or_else(|e| unreachable!("ring supports the default protocol versions: {e}"));
    match mode {
        TlsMode::Require => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(EncryptionOnly(provider())))
            .with_no_client_auth(),
        TlsMode::VerifyFull | TlsMode::Disable => {
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    }
}

/// `tls.mode: require`: encrypted, and the server proves it holds the certificate's key,
/// but the certificate itself is not verified (as libpq's `sslmode=require`).
#[derive(Debug)]
struct EncryptionOnly(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for EncryptionOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
