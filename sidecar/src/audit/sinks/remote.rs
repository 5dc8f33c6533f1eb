//! What the HTTP collector and the Azure Blob sink share: an HTTP/1.1 client (the
//! system roots plus `--extra-ca-file`) driven from the sink's own thread by a small
//! current-thread runtime, where every exchange — connect, send, the whole answer — has
//! `--audit-sink-timeout` and no more.

use std::path::Path;
use std::time::Duration;

use agentgate_crds::TlsMode;
use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};

use crate::tls::{Body, HttpClient};

/// An HTTP client for one sink thread.
pub(super) struct Remote {
    client: HttpClient,
    timeout: Duration,
    /// Made on first use, in the sink's thread (never on the sidecar's async workers,
    /// where a runtime may not be dropped).
    runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// An answer: status, headers and (up to a limit) body.
#[derive(Debug)]
pub(super) struct Answer {
    pub(super) status: StatusCode,
    pub(super) headers: HeaderMap,
    pub(super) body: Bytes,
}

impl Answer {
    /// A header's value as text.
    pub(super) fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// `e` and its sources, on one line.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

impl Remote {
    /// A client for `https` (verified against the system roots and `extra_ca`) or plain
    /// `http` URLs.
    pub(super) fn new(
        https: bool,
        extra_ca: Option<&Path>,
        timeout: Duration,
    ) -> Result<Self, String> {
        let roots = crate::tls::root_store(&extra_ca.into_iter().collect::<Vec<_>>())
            .map_err(|e| e.to_string())?;
        let mode = if https {
            TlsMode::VerifyFull
        } else {
            TlsMode::Disable
        };
        let client =
            crate::tls::http_client(roots, mode, None, timeout).map_err(|e| e.to_string())?;
        Ok(Self {
            client,
            timeout,
            runtime: None,
        })
    }

    /// A request body.
    pub(super) fn body(bytes: impl Into<Bytes>) -> Body {
        Full::new(bytes.into())
            .map_err(|never| match never {})
            .boxed()
    }

    /// Sends `req` and reads its answer, at most `limit` bytes of body. `what` names the
    /// exchange in errors (never a credential: requests carry theirs in headers, and
    /// errors never show headers).
    pub(super) fn send(
        &mut self,
        what: &str,
        req: Request<Body>,
        limit: usize,
    ) -> std::io::Result<Answer> {
        let runtime = match &mut self.runtime {
            Some(r) => r,
            None => self.runtime.insert(
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?,
            ),
        };
        let client = &self.client;
        let exchange = async {
            let response = client
                .request(req)
                .await
                .map_err(|e| format!("{what}: {}", chain(&e)))?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, limit)
                .collect()
                .await
                .map_err(|e| format!("{what}: reading the answer: {}", chain(&*e)))?
                .to_bytes();
            Ok::<_, String>(Answer {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        let timeout = self.timeout;
        runtime
            .block_on(async { tokio::time::timeout(timeout, exchange).await })
            .map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("{what}: no answer within {timeout:?} (--audit-sink-timeout)"),
                )
            })?
            .map_err(std::io::Error::other)
    }
}
