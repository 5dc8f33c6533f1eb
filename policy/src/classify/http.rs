//! HTTP request classification and path normalization.

use percent_encoding::percent_decode_str;

use super::ClassifyError;
use crate::attrs::HttpRequest;

/// Classifies an HTTP request: upper-case method, host without port, normalized path.
pub fn classify_http(
    method: &str,
    host: &str,
    raw_path: &str,
    query: &str,
) -> Result<HttpRequest, ClassifyError> {
    Ok(HttpRequest {
        method: method.to_ascii_uppercase(),
        host: normalize_host(host),
        path: normalize_path(raw_path)?,
        query: query.to_owned(),
    })
}

/// Lower-cases a host and strips its port (`API.Example:443` → `api.example`).
pub fn normalize_host(host: &str) -> String {
    let host = host.trim();
    let without_port = if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        rest.split(']').next().unwrap_or(rest)
    } else {
        host.rsplit_once(':').map_or(host, |(h, p)| {
            if p.chars().all(|c| c.is_ascii_digit()) {
                h
            } else {
                host
            }
        })
    };
    without_port.to_ascii_lowercase()
}

/// Percent-decodes a request path exactly once and checks it is canonical.
///
/// Policies match on the decoded path while the upstream receives the raw one, so any
/// path whose meaning could differ between the two is refused: dot segments, empty
/// segments, encoded `/` or `\`, NUL and control characters, and double encoding.
pub fn normalize_path(raw: &str) -> Result<String, ClassifyError> {
    let bad = |why| ClassifyError::NonCanonicalPath {
        path: raw.to_owned(),
        why,
    };
    if !raw.starts_with('/') {
        return Err(bad("it does not start with /"));
    }
    let lower = raw.to_ascii_lowercase();
    if ["%2f", "%5c", "%00"].iter().any(|enc| lower.contains(enc)) {
        return Err(bad("it encodes '/', '\\' or NUL"));
    }
    let decoded = percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| bad("it does not decode to UTF-8"))?;
    if decoded.chars().any(|c| c.is_control() || c == '\\') {
        return Err(bad("it holds control characters or '\\'"));
    }
    if has_percent_escape(&decoded) {
        return Err(bad("it is percent-encoded twice"));
    }
    if decoded.len() > 1 {
        for segment in decoded[1..].split('/') {
            match segment {
                "." | ".." => return Err(bad("it has '.' or '..' segments")),
                "" => {}
                _ => continue,
            }
        }
        if decoded[1..].split('/').rev().skip(1).any(str::is_empty) {
            return Err(bad("it has empty segments ('//')"));
        }
    }
    Ok(decoded.into_owned())
}

fn has_percent_escape(s: &str) -> bool {
    let b = s.as_bytes();
    b.windows(3)
        .any(|w| w[0] == b'%' && w[1].is_ascii_hexdigit() && w[2].is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_decoded_once_and_must_be_canonical() {
        assert_eq!(
            normalize_path("/subscriptions/a%20b/x").as_deref(),
            Ok("/subscriptions/a b/x")
        );
        assert_eq!(normalize_path("/").as_deref(), Ok("/"));
        assert_eq!(normalize_path("/a/b/").as_deref(), Ok("/a/b/"));
        for bad in [
            "/a/../b",
            "/a/./b",
            "/a/%2e%2e/b",
            "/a/%2E%2E/b",
            "/a//b",
            "/a%2fb",
            "/a%5Cb",
            "/a\\b",
            "/a%00",
            "/a%252e%252e/b",
            "relative",
            "/%ff%fe",
            "/a/..",
        ] {
            assert!(normalize_path(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn hosts_lose_their_port_and_case() {
        assert_eq!(
            normalize_host("Management.Azure.com:443"),
            "management.azure.com"
        );
        assert_eq!(normalize_host("127.0.0.1"), "127.0.0.1");
        assert_eq!(normalize_host("[::1]:8080"), "::1");
    }
}
