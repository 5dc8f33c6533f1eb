//! Forwarding an allowed request: the agent's request rewritten for the upstream (its
//! credentials and identity removed, the Connection's credential injected, headers by
//! allow-list), sent within the Connection's timeouts; upgraded streams relayed.

use std::sync::Arc;

use agentgate_crds::Protocol;
use agentgate_policy::masking::MaskReport;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::json;

use super::body::Body;
use super::headers;
use super::upstream::{Credential, CredentialMask, Upstream};
use crate::pipeline::{Completion, Gateway, Record};
use crate::refusal::Refusal;

/// What sending a request upstream gives: the response, the mask of the credential it
/// carried (a response must not echo it), and the agent's side of an upgrade it asked
/// for.
type Sent = (
    Response<Incoming>,
    Arc<CredentialMask>,
    Option<hyper::upgrade::OnUpgrade>,
);

/// Sends an allowed request to `upstream` with the Connection's credential. The upstream
/// has `upstream.response_timeout` to begin its answer (connect and TLS included).
pub(super) async fn send(mut req: Request<Body>, upstream: &Upstream) -> Result<Sent, Refusal> {
    let credential = upstream
        .credential()
        .map_err(|e| Refusal::UpstreamUnavailable(e.to_string()))?;
    let agent_upgrade = is_upgrade(req.headers()).then(|| hyper::upgrade::on(&mut req));
    let upstream_request = upstream_request(req, upstream, &credential)?;
    let timeout = upstream.response_timeout;
    let response =
        match tokio::time::timeout(timeout, upstream.client.request(upstream_request)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                return Err(Refusal::UpstreamFailed(format!(
                    "the upstream request failed: {e}"
                )));
            }
            Err(_) => {
                return Err(Refusal::UpstreamFailed(format!(
                    "the upstream did not begin its answer within {}s",
                    timeout.as_secs()
                )));
            }
        };
    Ok((response, credential.mask.clone(), agent_upgrade))
}

fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers.get_all(header::CONNECTION).iter().any(|v| {
            v.to_str().is_ok_and(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
        })
}

/// Removes hop-by-hop headers (and those the `Connection` header names); keeps
/// `Connection: Upgrade` and `Upgrade` when `keep_upgrade`.
pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|t| t.trim().to_ascii_lowercase()))
        .filter(|t| !(keep_upgrade && t == "upgrade"))
        .collect();
    for name in named {
        headers.remove(name.as_str());
    }
    for name in [
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
    ] {
        headers.remove(name);
    }
    if !keep_upgrade {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
}

/// The request the upstream gets: the agent's, with its credentials and identity removed
/// and the Connection's credential injected.
fn upstream_request(
    req: Request<Body>,
    upstream: &Upstream,
    credential: &Credential,
) -> Result<Request<Body>, Refusal> {
    let (mut parts, body) = req.into_parts();
    let upgrade = is_upgrade(&parts.headers);
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    parts.uri = upstream
        .uri(&path_and_query)
        .map_err(|e| Refusal::UpstreamUnavailable(format!("cannot build the upstream URL: {e}")))?;
    parts.version = http::Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers, upgrade);
    if upgrade {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    }
    let name = &credential.mask.header;
    // Only what the Connection needs goes on: never the agent's credentials or identity
    // (`Authorization`, `Cookie`, `Impersonate-*`, its own copy of `name`), nor
    // `Accept-Encoding` (bodies must arrive uncompressed to be masked).
    headers::retain_forwarded(&mut parts.headers, upstream.protocol, upgrade, name);
    if upstream.protocol == Protocol::Kubernetes {
        let accept = headers::kubernetes_accept(&parts.headers);
        parts.headers.insert(header::ACCEPT, accept);
    }
    let host = HeaderValue::from_str(upstream.authority().as_str())
        .map_err(|e| Refusal::UpstreamUnavailable(e.to_string()))?;
    parts.headers.insert(header::HOST, host);
    parts.headers.insert(name.clone(), credential.value.clone());
    Ok(Request::from_parts(parts, body))
}

/// An upgraded stream (`kubectl exec`, `port-forward`, websockets): decided on the
/// upgrade request, then relayed byte for byte. Only the byte counts are recorded.
pub(super) fn relay(
    gw: Arc<Gateway>,
    record: Record,
    agent: hyper::upgrade::OnUpgrade,
    mut response: Response<Incoming>,
) -> Response<Body> {
    let upstream = hyper::upgrade::on(&mut response);
    tokio::spawn(async move {
        let mut record = record;
        let (to_upstream, to_agent, error) = match tokio::try_join!(agent, upstream) {
            Ok((agent, upstream)) => {
                let (agent_read, agent_write) = tokio::io::split(TokioIo::new(agent));
                let (upstream_read, upstream_write) = tokio::io::split(TokioIo::new(upstream));
                let ((up, e1), (down, e2)) = tokio::join!(
                    pump(agent_read, upstream_write),
                    pump(upstream_read, agent_write)
                );
                (up, down, e1.or(e2).map(|e| e.to_string()))
            }
            Err(e) => (0, 0, Some(e.to_string())),
        };
        record.event.relayed = Some(json!({ "toUpstream": to_upstream, "toAgent": to_agent }));
        gw.complete(
            record,
            Some(StatusCode::SWITCHING_PROTOCOLS),
            Completion {
                bytes: to_agent,
                report: MaskReport::default(),
                error,
            },
        );
    });
    let (parts, _) = response.into_parts();
    Response::from_parts(
        parts,
        Full::new(Bytes::new())
            .map_err(|never| match never {})
            .boxed(),
    )
}

/// Copies one direction of a relayed stream, counting bytes even when it ends in an
/// error; closes the writing side when the reading side ends.
async fn pump(
    mut from: impl tokio::io::AsyncRead + Unpin,
    mut to: impl tokio::io::AsyncWrite + Unpin,
) -> (u64, Option<std::io::Error>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    let mut total = 0u64;
    loop {
        match from.read(&mut buf).await {
            Ok(0) => {
                let _ = to.shutdown().await;
                return (total, None);
            }
            Ok(n) => {
                if let Err(e) = to.write_all(&buf[..n]).await {
                    return (total, Some(e));
                }
                total += n as u64;
            }
            Err(e) => return (total, Some(e)),
        }
    }
}

/// The launching user's token: `Proxy-Authorization: Bearer`, or — on a kubernetes
/// Connection, where kubectl can only send its kubeconfig token — `Authorization: Bearer`.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key(header::ACCEPT));
    }
}
