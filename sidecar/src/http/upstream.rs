//! The upstream side of a Connection: where requests go, over which TLS, with which
//! credential. The credential is read from the files the operator mounts into the
//! sidecar only — once, and again when they change, never per request — and it is never
//! logged, recorded or shown to the agent.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use agentgate_crds::{ConnectionSpec, Protocol, TlsMode};
use agentgate_policy::masking::{LiteralMask, MaskReport};
use arc_swap::ArcSwap;
use http::header::{AUTHORIZATION, HeaderName, HeaderValue};
use http::uri::{Authority, Scheme};

use super::headers;
use crate::config::Timeouts;
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
    /// How long the upstream may take to begin its answer.
    pub response_timeout: std::time::Duration,
    source: CredentialSource,
    loaded: ArcSwap<Result<Arc<Credential>, String>>,
}

#[derive(Debug)]
enum CredentialSource {
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
        timeouts: &Timeouts,
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
        let client = http_client(
            roots,
            tls.mode,
            tls.server_name.as_deref(),
            timeouts.connect,
        )
        .map_err(tls_err)?;
        let c = &spec.credentials;
        let source = if let Some(secret) = &c.secret_ref {
            CredentialSource::Secret(credentials_dir.join(&secret.name))
        } else if let Some(sa) = &c.service_account {
            CredentialSource::ServiceAccountToken(
                credentials_dir
                    .join(format!("serviceaccount-{}", sa.name))
                    .join("token"),
            )
        } else {
            CredentialSource::Unsupported(
                "azureWorkloadIdentity token exchange is not implemented in this sidecar yet",
            )
        };
        let upstream = Self {
            protocol: spec.protocol,
            scheme,
            authority,
            base_path: uri.path().trim_end_matches('/').to_owned(),
            client,
            response_timeout: timeouts.response,
            source,
            loaded: ArcSwap::from_pointee(Err("not loaded yet".to_owned())),
        };
        upstream.refresh();
        Ok(upstream)
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

    /// The credential as last loaded. One that could not be loaded is tried again
    /// here (every request on such a Connection is refused until it loads); one that
    /// loaded is refreshed off the request path by [`Self::refresh`].
    pub fn credential(&self) -> Result<Arc<Credential>, UpstreamError> {
        if let Ok(c) = &**self.loaded.load() {
            return Ok(c.clone());
        }
        self.refresh();
        match &**self.loaded.load() {
            Ok(c) => Ok(c.clone()),
            Err(e) => Err(UpstreamError::Credential(e.clone())),
        }
    }

    /// Reads the credential's files again (blocking I/O: call it off the async
    /// workers) and keeps what they hold now, so rotated Secrets and projected tokens
    /// (the kubelet swaps a symlink) take effect without a restart. An unchanged value
    /// keeps the credential as it is.
    pub fn refresh(&self) {
        let fresh = self.source.read();
        let current = self.loaded.load();
        let unchanged = match (&fresh, &**current) {
            (Ok((name, value)), Ok(c)) => *name == c.mask.header && *value == c.value,
            (Err(a), Err(b)) => a == b,
            _ => false,
        };
        if unchanged {
            return;
        }
        let loaded = fresh.and_then(|(header, value)| {
            let values = LiteralMask::new(&headers::credential_values(&value)).map_err(|e| {
                format!(
                    "the credential cannot be searched for in responses ({e}), so none is passed on"
                )
            })?;
            Ok(Arc::new(Credential {
                value,
                mask: Arc::new(CredentialMask { header, values }),
            }))
        });
        self.loaded.store(Arc::new(loaded));
    }
}

impl CredentialSource {
    /// The header that carries the credential, read from its files.
    fn read(&self) -> Result<(HeaderName, HeaderValue), String> {
        let read = |path: &Path| {
            std::fs::read_to_string(path)
                .map(|s| s.trim().to_owned())
                .map_err(|e| format!("{}: {e}", path.display()))
        };
        let bearer = |token: String| {
            HeaderValue::try_from(format!("Bearer {token}"))
                .map(|mut v| {
                    v.set_sensitive(true);
                    (AUTHORIZATION, v)
                })
                .map_err(|_| "the token is not a valid header value".to_owned())
        };
        match self {
            CredentialSource::ServiceAccountToken(path) => bearer(read(path)?),
            CredentialSource::Secret(dir) if dir.join("token").exists() => {
                bearer(read(&dir.join("token"))?)
            }
            CredentialSource::Secret(dir) => {
                let name = read(&dir.join("header"))?;
                let name = HeaderName::try_from(name)
                    .map_err(|_| "the Secret's `header` is not a header name".to_owned())?;
                let mut value = HeaderValue::try_from(read(&dir.join("value"))?)
                    .map_err(|_| "the Secret's `value` is not a header value".to_owned())?;
                value.set_sensitive(true);
                Ok((name, value))
            }
            CredentialSource::Unsupported(why) => Err((*why).to_owned()),
        }
    }
}

/// A Connection's credential, loaded: the header value injected upstream, and what a
/// response must not show of it.
#[derive(Debug)]
pub struct Credential {
    /// The header's value.
    pub value: HeaderValue,
    /// The header's name and every form of the value a response could echo.
    pub mask: Arc<CredentialMask>,
}

/// The injected credential, as the response must not show it.
#[derive(Debug)]
pub struct CredentialMask {
    /// The header it travels in upstream (masked in responses whatever it holds).
    pub header: HeaderName,
    values: LiteralMask,
}

impl CredentialMask {
    /// Whether there is no value to mask.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Masks every copy of the credential in `input`.
    pub fn mask<'a>(&self, input: &'a [u8], report: &mut MaskReport) -> std::borrow::Cow<'a, [u8]> {
        self.values.mask(input, report)
    }

    /// The values, for a streamed body.
    pub fn literals(&self) -> &LiteralMask {
        &self.values
    }
}
