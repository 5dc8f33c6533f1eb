//! The upstream side of a Connection: where requests go, over which TLS, with which
//! credential. The credential is read from the files the operator mounts into the
//! sidecar only; it is never logged, recorded or shown to the agent.

use std::path::{Path, PathBuf};

use agentgate_crds::{ConnectionSpec, Protocol, TlsMode};
use http::header::{AUTHORIZATION, HeaderName, HeaderValue};
use http::uri::{Authority, Scheme};

use crate::tls::{HttpClient, http_client, upstream_tls};

/// Where the sidecar forwards a Connection's requests.
#[derive(Debug)]
pub struct Upstream {
    /// The Connection's protocol.
    pub protocol: Protocol,
    scheme: Scheme,
    authority: Authority,
    base_path: String,
    /// The HTTP client, with the Connection's TLS settings.
    pub client: HttpClient,
    credential: Credential,
}

#[derive(Debug)]
enum Credential {
    /// A Secret mounted at this directory: `token` (a bearer token) or `header` + `value`.
    Secret(PathBuf),
    /// A service-account token file, sent as a bearer token.
    ServiceAccountToken(PathBuf),
    /// A credential source this sidecar cannot use yet.
    Unsupported(&'static str),
}

/// Why an upstream cannot be set up or used.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The address is not a usable URL.
    #[error("Connection {name}: upstream.address {address:?} is not an http(s) URL")]
    BadAddress {
        /// The Connection.
        name: String,
        /// The address.
        address: String,
    },
    /// TLS could not be set up.
    #[error("Connection {name}: {error}")]
    Tls {
        /// The Connection.
        name: String,
        /// The error.
        error: crate::tls::TlsError,
    },
    /// The credential is missing or cannot be used.
    #[error("the credential for this connection is unavailable: {0}")]
    Credential(String),
}

impl Upstream {
    /// Sets up the upstream of an http or kubernetes Connection.
    pub fn new(
        name: &str,
        spec: &ConnectionSpec,
        credentials_dir: &Path,
        extra_ca: Option<&Path>,
    ) -> Result<Self, UpstreamError> {
        let bad_address = || UpstreamError::BadAddress {
            name: name.to_owned(),
            address: spec.upstream.address.clone(),
        };
        let uri: http::Uri = spec.upstream.address.parse().map_err(|_| bad_address())?;
        let scheme = uri.scheme().cloned().ok_or_else(bad_address)?;
        let authority = uri.authority().cloned().ok_or_else(bad_address)?;
        let tls_err = |error| UpstreamError::Tls {
            name: name.to_owned(),
            error,
        };
        let (tls, roots) = upstream_tls(spec, credentials_dir, extra_ca).map_err(tls_err)?;
        if scheme == Scheme::HTTP && tls.mode != TlsMode::Disable {
            // An http:// address only with an explicit `tls.mode: disable`.
            return Err(bad_address());
        }
        let client = http_client(roots, tls.mode, tls.server_name.as_deref()).map_err(tls_err)?;
        let c = &spec.credentials;
        let credential = if let Some(secret) = &c.secret_ref {
            Credential::Secret(credentials_dir.join(&secret.name))
        } else if let Some(sa) = &c.service_account {
            Credential::ServiceAccountToken(
                credentials_dir
                    .join(format!("serviceaccount-{}", sa.name))
                    .join("token"),
            )
        } else {
            Credential::Unsupported(
                "azureWorkloadIdentity token exchange is not implemented in this sidecar yet",
            )
        };
        Ok(Self {
            protocol: spec.protocol,
            scheme,
            authority,
            base_path: uri.path().trim_end_matches('/').to_owned(),
            client,
            credential,
        })
    }

    /// The upstream URI for an agent's request path and query.
    pub fn uri(&self, path_and_query: &str) -> Result<http::Uri, http::Error> {
        http::Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(format!("{}{}", self.base_path, path_and_query))
            .build()
    }

    /// The upstream's authority, for the `Host` header.
    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    /// The header that carries the credential, read fresh from its file (so rotated
    /// Secrets and tokens take effect without a restart).
    pub fn credential_header(&self) -> Result<(HeaderName, HeaderValue), UpstreamError> {
        let read = |path: &Path| {
            std::fs::read_to_string(path)
                .map(|s| s.trim().to_owned())
                .map_err(|e| UpstreamError::Credential(format!("{}: {e}", path.display())))
        };
        let bearer = |token: String| {
            HeaderValue::try_from(format!("Bearer {token}"))
                .map(|mut v| {
                    v.set_sensitive(true);
                    (AUTHORIZATION, v)
                })
                .map_err(|_| {
                    UpstreamError::Credential("the token is not a valid header value".into())
                })
        };
        match &self.credential {
            Credential::ServiceAccountToken(path) => bearer(read(path)?),
            Credential::Secret(dir) if dir.join("token").exists() => {
                bearer(read(&dir.join("token"))?)
            }
            Credential::Secret(dir) => {
                let name = read(&dir.join("header"))?;
                let name = HeaderName::try_from(name).map_err(|_| {
                    UpstreamError::Credential("the Secret's `header` is not a header name".into())
                })?;
                let mut value = HeaderValue::try_from(read(&dir.join("value"))?).map_err(|_| {
                    UpstreamError::Credential("the Secret's `value` is not a header value".into())
                })?;
                value.set_sensitive(true);
                Ok((name, value))
            }
            Credential::Unsupported(why) => Err(UpstreamError::Credential((*why).to_owned())),
        }
    }
}
