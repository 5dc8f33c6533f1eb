//! Kubernetes API request classification, following the API server's own request-info
//! logic (k8s.io/apiserver `RequestInfoFactory`), so that a policy reads a request the
//! way RBAC does.

use super::{ClassifyError, normalize_path};
use crate::attrs::KubernetesRequest;

/// Subresources that open an interactive stream into a pod. RBAC authorizes them as
/// `create` whichever HTTP method carries them (WebSocket clients use GET), and so do we.
const STREAMING_SUBRESOURCES: [&str; 3] = ["exec", "attach", "portforward"];

/// Classifies a Kubernetes API request from its method, path and raw query string.
pub fn classify_kubernetes(
    method: &str,
    raw_path: &str,
    query: &str,
) -> Result<KubernetesRequest, ClassifyError> {
    let path = normalize_path(raw_path)?;
    let mut info = KubernetesRequest {
        verb: method.to_ascii_lowercase(),
        path: path.clone(),
        ..Default::default()
    };
    let mut parts: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|p| !p.is_empty())
        .collect();
    let is_api = parts.first().is_some_and(|p| *p == "api");
    let is_apis = parts.first().is_some_and(|p| *p == "apis");
    // /api/v1/<x> at least; /apis/<group>/<version>/<x> at least.
    if !(is_api && parts.len() >= 3 || is_apis && parts.len() >= 4) {
        return Ok(info);
    }
    parts.remove(0);
    if is_apis {
        info.api_group = parts.remove(0).to_owned();
    }
    info.is_resource_request = true;
    info.api_version = parts.remove(0).to_owned();

    if matches!(parts[0], "proxy" | "watch") {
        if parts.len() < 2 {
            return Err(ClassifyError::IncompleteKubernetesPath(path));
        }
        info.verb = parts.remove(0).to_owned();
    } else {
        info.verb = match method.to_ascii_uppercase().as_str() {
            "POST" => "create",
            "GET" | "HEAD" => "get",
            "PUT" => "update",
            "PATCH" => "patch",
            "DELETE" => "delete",
            _ => "",
        }
        .to_owned();
    }

    if parts[0] == "namespaces" && parts.len() > 1 {
        info.namespace = parts[1].to_owned();
        // namespaces/<ns>/status and namespaces/<ns>/finalize are the namespace's own
        // subresources; anything else after the name is a namespaced resource.
        if parts.len() > 2 && !matches!(parts[2], "status" | "finalize") {
            parts.drain(..2);
        }
    }

    if parts.len() >= 3 && info.verb != "proxy" {
        info.subresource = parts[2].to_owned();
    }
    if parts.len() >= 2 {
        info.name = parts[1].to_owned();
    }
    info.resource = parts[0].to_owned();

    // A proxied request's query is the pod's or service's business, not the API
    // server's: it is not read (nor refused) here.
    let proxied = info.verb == "proxy" || info.subresource == "proxy";
    let params = if proxied {
        Vec::new()
    } else {
        parse_query(query)?
    };
    if info.name.is_empty() && info.verb == "get" {
        let (watch, name) = list_options(&params);
        info.verb = if watch { "watch" } else { "list" }.to_owned();
        if let Some(name) = name {
            info.name = name;
        }
    }
    if info.name.is_empty() && info.verb == "delete" {
        info.verb = "deletecollection".to_owned();
    }
    if STREAMING_SUBRESOURCES.contains(&info.subresource.as_str()) && info.resource == "pods" {
        info.verb = "create".to_owned();
    }
    Ok(info)
}

/// Query parameters that change what a resource request does or which objects it
/// touches. The API server reads only the first value of a repeated key (Go's
/// `url.Values` and `metav1` parameter conversion take `values[0]`), so a repeated one
/// could be read one way here and another way there: it is refused instead.
const MEANINGFUL_PARAMS: [&str; 18] = [
    "watch",
    "fieldSelector",
    "labelSelector",
    "resourceVersion",
    "resourceVersionMatch",
    "allowWatchBookmarks",
    "sendInitialEvents",
    "timeoutSeconds",
    "limit",
    "continue",
    "dryRun",
    "fieldManager",
    "fieldValidation",
    "force",
    "propagationPolicy",
    "gracePeriodSeconds",
    "orphanDependents",
    "container",
];

/// A query string decoded as the API server's Go `net/url` decodes it (`ParseQuery`):
/// pairs split on `&`, keys and values percent-decoded with `+` as space. Where Go would
/// silently drop a pair (a `;` in it, a bad escape), the request is refused, because the
/// policy would then have read a parameter the API server never sees, or the reverse.
fn parse_query(query: &str) -> Result<Vec<(String, String)>, ClassifyError> {
    let bad = |why: &'static str| ClassifyError::AmbiguousQuery {
        query: query.to_owned(),
        why,
    };
    let mut pairs = Vec::new();
    for pair in query.split('&') {
        if pair.contains(';') {
            return Err(bad(
                "it holds a ';', which the API server drops with its pair",
            ));
        }
        if pair.is_empty() {
            continue;
        }
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = query_unescape(key).ok_or_else(|| bad("it has an invalid percent escape"))?;
        let value = query_unescape(value).ok_or_else(|| bad("it has an invalid percent escape"))?;
        let key = String::from_utf8(key).map_err(|_| bad("a key is not UTF-8"))?;
        let value = String::from_utf8(value).map_err(|_| bad("a value is not UTF-8"))?;
        pairs.push((key, value));
    }
    for (i, (key, _)) in pairs.iter().enumerate() {
        if MEANINGFUL_PARAMS.contains(&key.as_str()) && pairs[..i].iter().any(|(k, _)| k == key) {
            return Err(bad(
                "a parameter that changes what the request does is repeated, and the API server reads only its first value",
            ));
        }
    }
    Ok(pairs)
}

/// Go's `url.QueryUnescape`: `+` is a space, `%XY` a byte; any other `%` is an error.
fn query_unescape(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = b.get(i + 1..i + 3)?;
                if !hex.iter().all(u8::is_ascii_hexdigit) {
                    return None;
                }
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    Some(out)
}

/// `watch` and an exact `metadata.name` field selector from a list request's query, as
/// the API server's request-info reads them.
fn list_options(pairs: &[(String, String)]) -> (bool, Option<String>) {
    let first = |key: &str| {
        pairs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    };
    // metav1's Convert_Slice_string_To_bool: any value but `0` or `false` (any case) is
    // true, including the empty value of a bare `watch`.
    let watch = first("watch").is_some_and(|v| v != "0" && !v.eq_ignore_ascii_case("false"));
    let name = first("fieldSelector").and_then(exact_name);
    (watch, name)
}

/// The object name a field selector pins, when it is exactly one `metadata.name=<name>`
/// (or `==`) term with nothing the API server would unescape or split differently. Any
/// other selector names nothing here, so a rule restricted to names does not match it.
fn exact_name(selector: &str) -> Option<String> {
    if selector.contains([',', '\\']) {
        return None;
    }
    let rest = selector.strip_prefix("metadata.name")?;
    let name = rest.strip_prefix("==").or_else(|| rest.strip_prefix('='))?;
    // `metadata.name=a=b` and `metadata.name=!x` are what they look like to the API
    // server only with care; they are no object name kubectl sends.
    (is_path_segment_name(name) && !name.contains(['=', '!', ' '])).then(|| name.to_owned())
}

fn is_path_segment_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '%'])
}

#[cfg(test)]
mod tests;
