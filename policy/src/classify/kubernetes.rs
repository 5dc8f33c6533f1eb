//! Kubernetes API request classification, following the API server's own request-info
//! logic (k8s.io/apiserver `RequestInfoFactory`), so that a policy reads a request the
//! way RBAC does.

use percent_encoding::percent_decode_str;

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

    if info.name.is_empty() && info.verb == "get" {
        let (watch, name) = list_options(query);
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

/// `watch` and an exact `metadata.name` field selector from a list request's query.
fn list_options(query: &str) -> (bool, Option<String>) {
    let mut watch = false;
    let mut name = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_decode_str(&value.replace('+', " "))
            .decode_utf8_lossy()
            .into_owned();
        match key {
            // Go's strconv.ParseBool, as the API server reads it.
            "watch" => watch = matches!(value.as_str(), "1" | "t" | "T" | "true" | "TRUE" | "True"),
            "fieldSelector" => {
                let exact = value.split(',').filter_map(|term| {
                    let (k, v) = term.split_once("==").or_else(|| term.split_once('='))?;
                    (k.trim() == "metadata.name" && !v.starts_with('='))
                        .then(|| v.trim().to_owned())
                });
                // Only a selector that is exactly one name names the object.
                let terms: Vec<String> = exact.collect();
                if value.split(',').count() == 1
                    && terms.len() == 1
                    && is_path_segment_name(&terms[0])
                {
                    name = terms.into_iter().next();
                }
            }
            _ => {}
        }
    }
    (watch, name)
}

fn is_path_segment_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '%'])
}

#[cfg(test)]
mod tests;
