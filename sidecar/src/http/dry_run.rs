//! The impact preview of a held Kubernetes write: the API server's own server-side dry
//! run (`?dryRun=All` — authorization, admission, validation and defaulting run, nothing
//! is stored), and for an update or patch the fields it would change, read against the
//! current object. The approver sees what the write does before deciding; a
//! `deletecollection` reports how many objects it would delete, so
//! `approval.maxEstimatedRows` applies to it as to SQL.

use agentgate_crds::Impact;
use agentgate_policy::KubernetesRequest;
use agentgate_policy::masking::{MaskReport, MaskingProfile};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request};
use http_body_util::{BodyExt, Full, Limited};
use serde_json::Value;

use super::forward;
use super::upstream::Upstream;

/// The longest `Impact.detail` the Approval's schema accepts.
const MAX_DETAIL: usize = 1024;
/// The longest value shown in a change.
const MAX_VALUE: usize = 60;
/// The largest dry-run answer read (a deletecollection answers with every object).
const MAX_ANSWER: usize = 32 << 20;

/// Whether a request is a write the API server can dry-run. Streams (`exec`, `attach`,
/// `portforward`) and `proxy` cannot be.
pub(crate) fn previews(k: &KubernetesRequest) -> bool {
    k.is_resource_request
        && matches!(
            k.verb.as_str(),
            "create" | "update" | "patch" | "delete" | "deletecollection"
        )
        && !matches!(
            k.subresource.as_str(),
            "exec" | "attach" | "portforward" | "proxy"
        )
}

/// The agent's request, as the dry run replays it.
pub(crate) struct Write<'a> {
    pub(crate) target: &'a KubernetesRequest,
    pub(crate) method: &'a Method,
    /// Path and query, as the agent sent them.
    pub(crate) path_and_query: &'a str,
    pub(crate) headers: &'a HeaderMap,
    pub(crate) body: Bytes,
}

/// Runs the dry run (and, for an update or patch, reads the current object) with the
/// Connection's credential. Never fails: a preview that cannot be made says why.
pub(crate) async fn preview(
    upstream: &Upstream,
    write: Write<'_>,
    masking: &MaskingProfile,
) -> Impact {
    let k = write.target;
    let current = if matches!(k.verb.as_str(), "update" | "patch") {
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        match send(upstream, &Method::GET, &k.path, &headers, Bytes::new()).await {
            Ok((200, object)) => Some(object),
            _ => None,
        }
    } else {
        None
    };
    let separator = if write.path_and_query.contains('?') {
        '&'
    } else {
        '?'
    };
    let dry_run = format!("{}{separator}dryRun=All", write.path_and_query);
    match send(upstream, write.method, &dry_run, write.headers, write.body).await {
        Ok((status, answer)) => describe(k, status, current.as_ref(), &answer, masking),
        Err(e) => Impact {
            estimated_rows: None,
            detail: truncate(format!("no preview: the dry run could not be made: {e}")),
        },
    }
}

/// One request to the API server as the Connection's credential: its status and JSON
/// answer.
async fn send(
    upstream: &Upstream,
    method: &Method,
    path_and_query: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<(u16, Value), String> {
    let mut request = Request::builder()
        .method(method.clone())
        .uri(path_and_query)
        .body(Full::new(body).map_err(|never| match never {}).boxed())
        .map_err(|e| e.to_string())?;
    *request.headers_mut() = headers.clone();
    request.headers_mut().remove(header::CONTENT_LENGTH);
    let (response, _, _) = forward::send(request, upstream)
        .await
        .map_err(|r| r.reason())?;
    let status = response.status().as_u16();
    let body = Limited::new(response.into_body(), MAX_ANSWER)
        .collect()
        .await
        .map_err(|e| format!("the API server's answer could not be read: {e}"))?
        .to_bytes();
    let answer = serde_json::from_slice(&body)
        .map_err(|_| format!("the API server answered {status} with something other than JSON"))?;
    Ok((status, answer))
}

/// What the dry run says the write would do, in words the approver reads. Values are
/// masked with `masking`; a Secret's values are never shown.
pub(crate) fn describe(
    k: &KubernetesRequest,
    status: u16,
    current: Option<&Value>,
    answer: &Value,
    masking: &MaskingProfile,
) -> Impact {
    let scope = if k.namespace.is_empty() {
        String::new()
    } else {
        format!(" in {}", k.namespace)
    };
    let name = answer["metadata"]["name"].as_str().unwrap_or(&k.name);
    let resource = if k.subresource.is_empty() {
        k.resource.clone()
    } else {
        format!("{}/{}", k.resource, k.subresource)
    };
    let object = format!("{resource} {name}{scope}");
    let mut estimated_rows = None;
    let detail = if status >= 300 {
        let reason = answer["reason"].as_str().unwrap_or("");
        let message = answer["message"].as_str().unwrap_or("no message");
        format!("the API server's dry run refuses it ({status} {reason}): {message}")
    } else {
        match k.verb.as_str() {
            "create" => format!("dry run: creates {object}"),
            "delete" => format!("dry run: deletes {object}"),
            "deletecollection" => {
                let items = answer["items"].as_array().map_or(&[][..], Vec::as_slice);
                estimated_rows = i64::try_from(items.len()).ok();
                let names: Vec<&str> = items
                    .iter()
                    .filter_map(|i| i["metadata"]["name"].as_str())
                    .collect();
                format!(
                    "dry run: deletes {} {resource}{scope}: {}",
                    items.len(),
                    names.join(", ")
                )
            }
            _ => match current {
                None => format!(
                    "dry run: succeeds on {object} (the current object could not be read to compare)"
                ),
                Some(current) => {
                    let secret = k.api_group.is_empty() && k.resource == "secrets";
                    let mut found = Vec::new();
                    changes(current, answer, String::new(), &mut found);
                    found.retain(|c| !is_bookkeeping(&c.path));
                    if found.is_empty() {
                        format!("dry run: changes nothing in {object}")
                    } else {
                        let shown: Vec<String> =
                            found.iter().map(|c| c.render(secret, masking)).collect();
                        format!("dry run: changes {object}: {}", shown.join("; "))
                    }
                }
            },
        }
    };
    Impact {
        estimated_rows,
        detail: truncate(detail),
    }
}

/// One field the write changes.
#[derive(Debug, PartialEq)]
struct Change<'a> {
    path: String,
    before: Option<&'a Value>,
    after: Option<&'a Value>,
}

impl Change<'_> {
    fn render(&self, secret: bool, masking: &MaskingProfile) -> String {
        if secret {
            return format!("{} (value not shown)", self.path);
        }
        let value = |v: Option<&Value>| match v {
            None => "(none)".to_owned(),
            Some(Value::Object(_)) => "{…}".to_owned(),
            Some(Value::Array(_)) => "[…]".to_owned(),
            Some(v) => {
                // Masked whole, then shortened: a cut secret might no longer be found.
                let text = v.to_string();
                let mut report = MaskReport::default();
                let masked = masking.mask_bytes(text.as_bytes(), &mut report);
                let masked = String::from_utf8_lossy(&masked);
                if masked.chars().count() > MAX_VALUE {
                    masked.chars().take(MAX_VALUE).chain(['…']).collect()
                } else {
                    masked.into_owned()
                }
            }
        };
        format!(
            "{}: {} → {}",
            self.path,
            value(self.before),
            value(self.after)
        )
    }
}

/// The leaf differences between `before` and `after`: objects are compared key by key,
/// arrays index by index.
fn changes<'a>(before: &'a Value, after: &'a Value, path: String, out: &mut Vec<Change<'a>>) {
    match (before, after) {
        (Value::Object(b), Value::Object(a)) => {
            let mut keys: Vec<&String> = b
                .keys()
                .chain(a.keys().filter(|k| !b.contains_key(*k)))
                .collect();
            keys.sort();
            for key in keys {
                let child = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                match (b.get(key), a.get(key)) {
                    (Some(b), Some(a)) => changes(b, a, child, out),
                    (before, after) => out.push(Change {
                        path: child,
                        before,
                        after,
                    }),
                }
            }
        }
        (Value::Array(b), Value::Array(a)) => {
            for i in 0..b.len().max(a.len()) {
                let child = format!("{path}[{i}]");
                match (b.get(i), a.get(i)) {
                    (Some(b), Some(a)) => changes(b, a, child, out),
                    (before, after) => out.push(Change {
                        path: child,
                        before,
                        after,
                    }),
                }
            }
        }
        (b, a) if b != a => out.push(Change {
            path,
            before: Some(b),
            after: Some(a),
        }),
        _ => {}
    }
}

/// Fields every write changes, which say nothing about what it does.
fn is_bookkeeping(path: &str) -> bool {
    matches!(path, "metadata.resourceVersion" | "metadata.generation")
        || path.starts_with("metadata.managedFields")
        || path == "metadata.annotations.kubectl.kubernetes.io/last-applied-configuration"
}

/// Shortens a detail to what the Approval's schema accepts, on a character boundary.
fn truncate(mut detail: String) -> String {
    if detail.len() > MAX_DETAIL {
        let mut end = MAX_DETAIL - '…'.len_utf8();
        while !detail.is_char_boundary(end) {
            end -= 1;
        }
        detail.truncate(end);
        detail.push('…');
    }
    detail
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::json;

    use super::*;
    use crate::pipeline::audit_masking;

    fn target(verb: &str, resource: &str, name: &str) -> KubernetesRequest {
        KubernetesRequest {
            is_resource_request: true,
            verb: verb.into(),
            api_version: "v1".into(),
            resource: resource.into(),
            namespace: "prod".into(),
            name: name.into(),
            path: format!("/api/v1/namespaces/prod/{resource}/{name}"),
            ..Default::default()
        }
    }

    #[test]
    fn a_patch_shows_the_fields_it_changes_and_not_the_bookkeeping() {
        let before = json!({ "metadata": { "name": "web", "resourceVersion": "7", "generation": 3,
            "managedFields": [{ "manager": "kubectl" }] },
            "spec": { "replicas": 3, "template": { "spec": { "containers": [{ "image": "nginx:1.25" }] } } } });
        let after = json!({ "metadata": { "name": "web", "resourceVersion": "8", "generation": 4,
            "managedFields": [{ "manager": "kubectl" }, { "manager": "agent" }] },
            "spec": { "replicas": 30, "paused": true, "template": { "spec": { "containers": [{ "image": "nginx:1.27" }] } } } });
        let impact = describe(
            &target("patch", "deployments", "web"),
            200,
            Some(&before),
            &after,
            &audit_masking(),
        );
        assert_eq!(impact.estimated_rows, None);
        assert_eq!(
            impact.detail,
            "dry run: changes deployments web in prod: spec.paused: (none) → true; spec.replicas: 3 → 30; \
             spec.template.spec.containers[0].image: \"nginx:1.25\" → \"nginx:1.27\""
        );
    }

    #[test]
    fn secrets_never_show_their_values_and_other_values_are_masked() {
        let before = json!({ "data": { "password": "aHVudGVyMg==" } });
        let after = json!({ "data": { "password": "c2VjcmV0" } });
        let impact = describe(
            &target("update", "secrets", "db"),
            200,
            Some(&before),
            &after,
            &audit_masking(),
        );
        assert_eq!(
            impact.detail,
            "dry run: changes secrets db in prod: data.password (value not shown)"
        );

        let token = "ghp_abcdefghijklmnopqrstuvwxyz0123456789";
        let after = json!({ "data": { "token": format!("{token}{}", "x".repeat(80)) } });
        let impact = describe(
            &target("patch", "configmaps", "settings"),
            200,
            Some(&json!({ "data": {} })),
            &after,
            &audit_masking(),
        );
        assert!(
            impact
                .detail
                .starts_with("dry run: changes configmaps settings in prod: data.token: (none) → "),
            "{}",
            impact.detail
        );
        assert!(!impact.detail.contains("ghp_abc"), "{}", impact.detail);
    }

    #[test]
    fn a_refused_dry_run_says_why_and_a_deletecollection_counts_its_objects() {
        let status = json!({ "kind": "Status", "reason": "Invalid",
            "message": "ConfigMap \"Bad_Name\" is invalid: metadata.name: Invalid value" });
        let impact = describe(
            &target("create", "configmaps", ""),
            422,
            None,
            &status,
            &audit_masking(),
        );
        assert_eq!(
            impact.detail,
            "the API server's dry run refuses it (422 Invalid): ConfigMap \"Bad_Name\" is invalid: metadata.name: Invalid value"
        );

        let list = json!({ "kind": "ConfigMapList", "items": [
            { "metadata": { "name": "batch-1" } }, { "metadata": { "name": "batch-2" } }, { "metadata": { "name": "batch-3" } } ] });
        let impact = describe(
            &target("deletecollection", "configmaps", ""),
            200,
            None,
            &list,
            &audit_masking(),
        );
        assert_eq!(impact.estimated_rows, Some(3));
        assert_eq!(
            impact.detail,
            "dry run: deletes 3 configmaps in prod: batch-1, batch-2, batch-3"
        );
    }

    #[test]
    fn details_fit_the_approval_schema() {
        let before = json!({ "data": {} });
        let data: serde_json::Map<String, Value> = (0..200)
            .map(|i| (format!("key-{i:03}-é"), json!("value")))
            .collect();
        let after = json!({ "data": data });
        let impact = describe(
            &target("patch", "configmaps", "big"),
            200,
            Some(&before),
            &after,
            &audit_masking(),
        );
        assert!(impact.detail.len() <= MAX_DETAIL, "{}", impact.detail.len());
        assert!(impact.detail.ends_with('…'));
    }

    /// Any JSON document, a few levels deep.
    fn any_json() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            ".{0,80}".prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
                proptest::collection::btree_map("[a-z]{1,3}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        /// The API server's answer is read as it comes: whatever it is, the preview is
        /// made, fits the schema, and reports a change exactly when there is one.
        #[test]
        fn any_answer_gives_a_preview_that_fits(
            before in any_json(),
            after in any_json(),
            status in proptest::sample::select(vec![200u16, 201, 404, 409, 422, 500]),
            verb in proptest::sample::select(vec!["create", "update", "patch", "delete", "deletecollection"]),
        ) {
            static MASKING: std::sync::LazyLock<MaskingProfile> = std::sync::LazyLock::new(audit_masking);
            let impact = describe(&target(verb, "configmaps", "x"), status, Some(&before), &after, &MASKING);
            proptest::prop_assert!(impact.detail.len() <= MAX_DETAIL);
            let mut found = Vec::new();
            changes(&before, &after, String::new(), &mut found);
            proptest::prop_assert_eq!(found.is_empty(), before == after);
        }
    }

    #[test]
    fn only_writes_the_api_server_can_dry_run_are_previewed() {
        assert!(previews(&target("patch", "deployments", "web")));
        assert!(previews(&target("deletecollection", "pods", "")));
        assert!(!previews(&target("get", "pods", "web")));
        let mut exec = target("create", "pods", "web");
        exec.subresource = "exec".into();
        assert!(!previews(&exec));
    }
}
