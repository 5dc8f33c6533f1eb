//! Which headers cross the sidecar, in each direction.
//!
//! Requests reach an upstream with an allow-list of headers: what a Connection's client
//! needs to be understood (content negotiation, conditional requests, tracing, the
//! streaming upgrades), never what carries an identity or a credential — the agent's
//! `Authorization`, `Cookie`, `Impersonate-*`, or its own copy of the Connection's
//! credential header. Anything not listed is dropped, so a header nobody thought of is
//! not forwarded with the sidecar's credential.
//!
//! Responses keep their headers (status semantics live there: `Location`, `ETag`,
//! `Retry-After`, …) but those that carry credentials are masked, and so is any copy of
//! the injected credential.

use agentgate_crds::Protocol;
use base64::Engine as _;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Request headers every Connection forwards.
const FORWARDED: [&str; 24] = [
    "accept",
    "accept-language",
    "cache-control",
    "content-disposition",
    "content-encoding",
    "content-language",
    "content-length",
    "content-md5",
    "content-type",
    "date",
    "idempotency-key",
    "if-match",
    "if-modified-since",
    "if-none-match",
    "if-range",
    "if-unmodified-since",
    "pragma",
    "prefer",
    "range",
    "traceparent",
    "tracestate",
    "user-agent",
    "x-correlation-id",
    "x-request-id",
];

/// Headers the streaming upgrades need (`kubectl exec`/`attach`/`port-forward` over
/// SPDY or WebSockets), forwarded on upgrade requests only.
const UPGRADE: [&str; 7] = [
    "connection",
    "upgrade",
    "sec-websocket-extensions",
    "sec-websocket-key",
    "sec-websocket-protocol",
    "sec-websocket-version",
    "x-stream-protocol-version",
];

/// Kubernetes clients' own headers, which carry no identity (kubectl's command name and
/// session id, the audit id the API server logs).
const KUBERNETES: [&str; 3] = ["kubectl-command", "kubectl-session", "audit-id"];

/// `x-ms-*` headers (Azure APIs need them: `x-ms-version`, `x-ms-blob-type`, …) are
/// forwarded on http Connections, except these, which carry tokens or keys.
const AZURE_CREDENTIAL_HEADERS: [&str; 3] = [
    "x-ms-authorization-auxiliary",
    "x-ms-copy-source-authorization",
    "x-ms-encryption-key",
];

/// Whether a request header may reach the upstream of a `protocol` Connection whose
/// credential travels in `credential` (upgrade headers only when `upgrade`).
fn forwarded(
    name: &HeaderName,
    protocol: Protocol,
    upgrade: bool,
    credential: &HeaderName,
) -> bool {
    let name_str = name.as_str();
    if name == credential {
        return false;
    }
    FORWARDED.contains(&name_str)
        || (upgrade && UPGRADE.contains(&name_str))
        || (protocol == Protocol::Kubernetes && KUBERNETES.contains(&name_str))
        || (protocol == Protocol::Http
            && name_str.starts_with("x-ms-")
            && !AZURE_CREDENTIAL_HEADERS.contains(&name_str))
}

/// Keeps only the request headers a Connection forwards (see the module comment).
pub(crate) fn retain_forwarded(
    headers: &mut HeaderMap,
    protocol: Protocol,
    upgrade: bool,
    credential: &HeaderName,
) {
    let dropped: Vec<HeaderName> = headers
        .keys()
        .filter(|name| !forwarded(name, protocol, upgrade, credential))
        .cloned()
        .collect();
    for name in dropped {
        headers.remove(&name);
    }
}

/// The `Accept` a Kubernetes request goes upstream with: only JSON can be masked as a
/// document, and the API server serves every resource as JSON, so media ranges other
/// than `application/json` (with its parameters, e.g. `as=Table`) are removed, and
/// JSON is asked for when none is left. YAML, CBOR and protobuf never come back unless
/// the API server ignores this, and then the response is refused.
pub(crate) fn kubernetes_accept(headers: &HeaderMap) -> HeaderValue {
    let json: Vec<&str> = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|range| {
            let media = range.split(';').next().unwrap_or_default().trim();
            // With its parameters: `as=Table`, `stream=watch` are still JSON.
            media.eq_ignore_ascii_case("application/json")
        })
        .collect();
    if json.is_empty() {
        return HeaderValue::from_static("application/json");
    }
    HeaderValue::from_str(&json.join(","))
        .unwrap_or_else(|_| HeaderValue::from_static("application/json"))
}

/// Every value of every header `name`, split on commas, trimmed and lower-cased.
fn codings(headers: &HeaderMap, name: &HeaderName) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for value in headers.get_all(name) {
        let value = value
            .to_str()
            .map_err(|_| format!("the upstream sent a {name} header that is not text"))?;
        out.extend(
            value
                .split(',')
                .map(|c| c.trim().to_ascii_lowercase())
                .filter(|c| !c.is_empty()),
        );
    }
    Ok(out)
}

/// The response's codings: the sidecar decodes none but HTTP/1.1 chunking, so a body in
/// any other content or transfer coding could not be masked or searched for the
/// credential, and is refused. Every value of every header counts (`identity, gzip` is
/// gzip).
pub(crate) fn check_codings(headers: &HeaderMap) -> Result<(), String> {
    for coding in codings(headers, &header::CONTENT_ENCODING)? {
        if coding != "identity" {
            return Err(format!(
                "the upstream sent a {coding}-encoded response, which the sidecar cannot decode to mask"
            ));
        }
    }
    for coding in codings(headers, &header::TRANSFER_ENCODING)? {
        if coding != "chunked" && coding != "identity" {
            return Err(format!(
                "the upstream sent a response with transfer coding {coding}, which the sidecar cannot decode to mask"
            ));
        }
    }
    Ok(())
}

/// Response headers that carry a credential or a session whatever the upstream: their
/// values are masked.
const CREDENTIAL_RESPONSE_HEADERS: [&str; 16] = [
    "authorization",
    "proxy-authorization",
    "set-cookie",
    "set-cookie2",
    "cookie",
    "api-key",
    "x-api-key",
    "x-auth-token",
    "x-access-token",
    "x-amz-security-token",
    "x-goog-api-key",
    "x-functions-key",
    "x-ms-authorization-auxiliary",
    "x-vault-token",
    "ocp-apim-subscription-key",
    "private-token",
];

/// Whether a response header's value is a credential (`credential` is the header the
/// Connection's own credential travels in).
pub(crate) fn is_credential_response_header(name: &HeaderName, credential: &HeaderName) -> bool {
    let n = name.as_str();
    name == credential
        || CREDENTIAL_RESPONSE_HEADERS.contains(&n)
        || ["secret", "password", "apikey", "api-key", "credential"]
            .iter()
            .any(|word| n.contains(word))
}

/// The byte strings a response must not contain: the injected credential's value, the
/// token inside a `Bearer` value, and their base64 (standard and URL-safe; unpadded, so
/// the padded form is caught too).
pub(crate) fn credential_values(value: &HeaderValue) -> Vec<Vec<u8>> {
    let raw = value.as_bytes().to_vec();
    let mut plain = vec![raw.clone()];
    if let Some(token) = raw
        .get(..7)
        .filter(|p| p.eq_ignore_ascii_case(b"bearer "))
        .map(|_| raw[7..].trim_ascii().to_vec())
    {
        plain.push(token);
    }
    let mut all = plain.clone();
    for p in &plain {
        all.push(
            base64::engine::general_purpose::STANDARD_NO_PAD
                .encode(p)
                .into_bytes(),
        );
        all.push(
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(p)
                .into_bytes(),
        );
    }
    all
}

/// The most header bytes (names and values) a request may carry, and the most headers.
/// Larger heads are refused by the gateway in the protocol's shape; hyper's own limits
/// are set above these so that it does not answer first with a bare 431.
pub(crate) const MAX_HEAD_BYTES: usize = 64 * 1024;
/// See [`MAX_HEAD_BYTES`].
pub(crate) const MAX_HEADERS: usize = 100;

/// Why a request head is too large, if it is.
pub(crate) fn head_too_large(headers: &HeaderMap) -> Option<String> {
    let bytes: usize = headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum();
    if headers.len() > MAX_HEADERS {
        return Some(format!(
            "the request has {} headers, more than the {MAX_HEADERS} the sidecar accepts",
            headers.len()
        ));
    }
    (bytes > MAX_HEAD_BYTES).then(|| {
        format!("the request's headers are {bytes} bytes, more than the {MAX_HEAD_BYTES} the sidecar accepts")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn only_listed_request_headers_are_forwarded() {
        let mut h = map(&[
            ("accept", "application/json"),
            ("content-type", "application/json"),
            ("user-agent", "kubectl/v1.33"),
            ("authorization", "Bearer agent"),
            ("proxy-authorization", "Bearer user"),
            ("cookie", "a=b"),
            ("impersonate-user", "admin"),
            ("impersonate-group", "system:masters"),
            ("impersonate-extra-scopes", "x"),
            ("x-api-key", "agent-supplied"),
            ("x-forwarded-for", "1.2.3.4"),
            ("kubectl-command", "kubectl get"),
            ("x-ms-version", "2023-11-03"),
            ("x-ms-authorization-auxiliary", "Bearer other-tenant"),
            ("upgrade", "SPDY/3.1"),
        ]);
        let credential = HeaderName::from_static("x-api-key");
        retain_forwarded(&mut h, Protocol::Kubernetes, false, &credential);
        let mut kept: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        kept.sort_unstable();
        assert_eq!(
            kept,
            ["accept", "content-type", "kubectl-command", "user-agent"]
        );

        let mut h = map(&[
            ("x-ms-version", "2023-11-03"),
            ("x-ms-authorization-auxiliary", "Bearer other-tenant"),
            ("kubectl-command", "kubectl get"),
            ("upgrade", "websocket"),
            ("sec-websocket-key", "k"),
        ]);
        retain_forwarded(&mut h, Protocol::Http, true, &header::AUTHORIZATION);
        let mut kept: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        kept.sort_unstable();
        assert_eq!(kept, ["sec-websocket-key", "upgrade", "x-ms-version"]);
    }

    #[test]
    fn kubernetes_accept_keeps_json_only() {
        let accept = |v: &str| kubernetes_accept(&map(&[("accept", v)]));
        assert_eq!(accept("application/yaml"), "application/json");
        assert_eq!(
            accept("application/vnd.kubernetes.protobuf"),
            "application/json"
        );
        assert_eq!(accept("application/cbor, */*"), "application/json");
        assert_eq!(
            accept("application/vnd.kubernetes.protobuf;stream=watch"),
            "application/json"
        );
        assert_eq!(
            accept(
                "application/json;as=Table;v=v1;g=meta.k8s.io,application/yaml,application/json"
            ),
            "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"
        );
        assert_eq!(
            kubernetes_accept(&HeaderMap::new()),
            "application/json",
            "no Accept is JSON too"
        );
    }

    #[test]
    fn every_coding_value_is_checked() {
        assert!(check_codings(&map(&[("content-encoding", "identity")])).is_ok());
        assert!(check_codings(&map(&[("transfer-encoding", "chunked")])).is_ok());
        for bad in [
            [("content-encoding", "identity, gzip"), ("x", "y")],
            [("content-encoding", "identity"), ("content-encoding", "br")],
            [("transfer-encoding", "gzip, chunked"), ("x", "y")],
            [("transfer-encoding", "gzip"), ("x", "y")],
            [("content-encoding", "GZIP"), ("x", "y")],
        ] {
            assert!(check_codings(&map(&bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn credential_values_include_the_bearer_token_and_base64() {
        let values = credential_values(&HeaderValue::from_static("Bearer tok-123456789"));
        for v in [
            "Bearer tok-123456789",
            "tok-123456789",
            "dG9rLTEyMzQ1Njc4OQ",
        ] {
            assert!(values.contains(&v.as_bytes().to_vec()), "{v}");
        }
    }

    #[test]
    fn credential_bearing_response_headers() {
        let credential = HeaderName::from_static("x-custom-key");
        for name in ["set-cookie", "x-api-key", "x-custom-key", "x-client-secret"] {
            assert!(
                is_credential_response_header(&HeaderName::from_static(name), &credential),
                "{name}"
            );
        }
        for name in ["location", "etag", "content-type", "x-ms-continuation"] {
            assert!(!is_credential_response_header(
                &HeaderName::from_static(name),
                &credential
            ));
        }
    }

    #[test]
    fn large_heads_are_found() {
        assert!(head_too_large(&map(&[("a", "b")])).is_none());
        let big = "x".repeat(MAX_HEAD_BYTES);
        assert!(head_too_large(&map(&[("authorization", &big)])).is_some());
    }
}
