use super::*;

/// (method, path, query) → (verb, group, resource, subresource, namespace, name)
fn row(method: &str, path: &str, query: &str) -> (String, String, String, String, String, String) {
    let r =
        classify_kubernetes(method, path, query).unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    (
        r.verb,
        r.api_group,
        r.resource,
        r.subresource,
        r.namespace,
        r.name,
    )
}

fn t(
    v: &str,
    g: &str,
    r: &str,
    s: &str,
    ns: &str,
    n: &str,
) -> (String, String, String, String, String, String) {
    (v.into(), g.into(), r.into(), s.into(), ns.into(), n.into())
}

#[test]
fn kubectl_request_paths() {
    let cases = [
        // kubectl get pods -n prod
        (
            ("GET", "/api/v1/namespaces/prod/pods", "limit=500"),
            t("list", "", "pods", "", "prod", ""),
        ),
        // kubectl get pod web-0 -n prod
        (
            ("GET", "/api/v1/namespaces/prod/pods/web-0", ""),
            t("get", "", "pods", "", "prod", "web-0"),
        ),
        // kubectl get pods -w
        (
            (
                "GET",
                "/api/v1/namespaces/prod/pods",
                "watch=true&resourceVersion=10",
            ),
            t("watch", "", "pods", "", "prod", ""),
        ),
        (
            ("GET", "/api/v1/namespaces/prod/pods", "watch=1"),
            t("watch", "", "pods", "", "prod", ""),
        ),
        (
            ("GET", "/api/v1/namespaces/prod/pods", "watch=false"),
            t("list", "", "pods", "", "prod", ""),
        ),
        // kubectl get pod web-0 -w (field selector on the name)
        (
            (
                "GET",
                "/api/v1/namespaces/prod/pods",
                "fieldSelector=metadata.name%3Dweb-0&watch=true",
            ),
            t("watch", "", "pods", "", "prod", "web-0"),
        ),
        // a field selector that is not exactly one name names nothing
        (
            (
                "GET",
                "/api/v1/namespaces/prod/pods",
                "fieldSelector=metadata.name%3Dweb-0%2Cstatus.phase%3DRunning",
            ),
            t("list", "", "pods", "", "prod", ""),
        ),
        // kubectl get pods -A
        (
            ("GET", "/api/v1/pods", ""),
            t("list", "", "pods", "", "", ""),
        ),
        // kubectl get nodes (cluster-scoped)
        (
            ("GET", "/api/v1/nodes/node-1", ""),
            t("get", "", "nodes", "", "", "node-1"),
        ),
        // kubectl get namespace prod; its status; finalize
        (
            ("GET", "/api/v1/namespaces/prod", ""),
            t("get", "", "namespaces", "", "prod", "prod"),
        ),
        (
            ("PUT", "/api/v1/namespaces/prod/status", ""),
            t("update", "", "namespaces", "status", "prod", "prod"),
        ),
        (
            ("PUT", "/api/v1/namespaces/prod/finalize", ""),
            t("update", "", "namespaces", "finalize", "prod", "prod"),
        ),
        (
            ("GET", "/api/v1/namespaces", ""),
            t("list", "", "namespaces", "", "", ""),
        ),
        // kubectl delete pod web-0 / kubectl delete pods --all
        (
            ("DELETE", "/api/v1/namespaces/prod/pods/web-0", ""),
            t("delete", "", "pods", "", "prod", "web-0"),
        ),
        (
            ("DELETE", "/api/v1/namespaces/prod/pods", ""),
            t("deletecollection", "", "pods", "", "prod", ""),
        ),
        // kubectl apply / create / patch / replace
        (
            ("POST", "/apis/apps/v1/namespaces/prod/deployments", ""),
            t("create", "apps", "deployments", "", "prod", ""),
        ),
        (
            ("PATCH", "/apis/apps/v1/namespaces/prod/deployments/web", ""),
            t("patch", "apps", "deployments", "", "prod", "web"),
        ),
        (
            ("PUT", "/apis/apps/v1/namespaces/prod/deployments/web", ""),
            t("update", "apps", "deployments", "", "prod", "web"),
        ),
        // kubectl scale
        (
            (
                "PATCH",
                "/apis/apps/v1/namespaces/prod/deployments/web/scale",
                "",
            ),
            t("patch", "apps", "deployments", "scale", "prod", "web"),
        ),
        // kubectl logs
        (
            (
                "GET",
                "/api/v1/namespaces/prod/pods/web-0/log",
                "container=app&follow=true",
            ),
            t("get", "", "pods", "log", "prod", "web-0"),
        ),
        // kubectl exec (SPDY POST, WebSocket GET) and attach, port-forward: always create
        (
            (
                "POST",
                "/api/v1/namespaces/prod/pods/web-0/exec",
                "command=sh&stdin=true",
            ),
            t("create", "", "pods", "exec", "prod", "web-0"),
        ),
        (
            (
                "GET",
                "/api/v1/namespaces/prod/pods/web-0/exec",
                "command=sh",
            ),
            t("create", "", "pods", "exec", "prod", "web-0"),
        ),
        (
            ("GET", "/api/v1/namespaces/prod/pods/web-0/attach", ""),
            t("create", "", "pods", "attach", "prod", "web-0"),
        ),
        (
            ("POST", "/api/v1/namespaces/prod/pods/web-0/portforward", ""),
            t("create", "", "pods", "portforward", "prod", "web-0"),
        ),
        // the pod proxy subresource, and the deprecated proxy verb
        (
            (
                "GET",
                "/api/v1/namespaces/prod/pods/web-0/proxy/metrics",
                "",
            ),
            t("get", "", "pods", "proxy", "prod", "web-0"),
        ),
        (
            (
                "GET",
                "/api/v1/proxy/namespaces/prod/pods/web-0/metrics",
                "",
            ),
            t("proxy", "", "pods", "", "prod", "web-0"),
        ),
        // the deprecated watch verb
        (
            ("GET", "/api/v1/watch/namespaces/prod/pods", ""),
            t("watch", "", "pods", "", "prod", ""),
        ),
        // custom resources and their status
        (
            (
                "PATCH",
                "/apis/agentgate.dev/v1alpha1/namespaces/agents/approvals/apr-1/status",
                "",
            ),
            t(
                "patch",
                "agentgate.dev",
                "approvals",
                "status",
                "agents",
                "apr-1",
            ),
        ),
        // cluster-scoped CRD objects
        (
            (
                "GET",
                "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
                "",
            ),
            t(
                "list",
                "apiextensions.k8s.io",
                "customresourcedefinitions",
                "",
                "",
                "",
            ),
        ),
        // kubectl auth can-i (a create of a review)
        (
            (
                "POST",
                "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
                "",
            ),
            t(
                "create",
                "authorization.k8s.io",
                "selfsubjectaccessreviews",
                "",
                "",
                "",
            ),
        ),
    ];
    for ((method, path, query), expected) in cases {
        assert_eq!(
            row(method, path, query),
            expected,
            "{method} {path}?{query}"
        );
    }
}

#[test]
fn discovery_and_other_urls_are_non_resource_requests() {
    for (method, path) in [
        ("GET", "/api"),
        ("GET", "/api/v1"),
        ("GET", "/apis"),
        ("GET", "/apis/apps/v1"),
        ("GET", "/version"),
        ("GET", "/openapi/v3/apis/apps/v1"),
        ("GET", "/healthz"),
    ] {
        let r = classify_kubernetes(method, path, "").expect("classifies");
        assert!(!r.is_resource_request, "{path}");
        assert_eq!(r.verb, "get");
        assert_eq!(r.resource, "");
    }
}

#[test]
fn malformed_paths_are_errors() {
    assert!(classify_kubernetes("GET", "/api/v1/proxy", "").is_err());
    assert!(classify_kubernetes("GET", "/api/v1/namespaces/prod/pods/../secrets", "").is_err());
    assert!(classify_kubernetes("GET", "/api/v1/namespaces/prod/secrets%2Fx", "").is_err());
}

/// The verb and name the API server's request-info would give a list request.
fn list(query: &str) -> Result<(String, String), ClassifyError> {
    classify_kubernetes("GET", "/api/v1/namespaces/prod/configmaps", query)
        .map(|r| (r.verb, r.name))
}

#[test]
fn watch_is_any_value_but_0_or_false_as_the_api_server_reads_it() {
    for query in [
        "watch",
        "watch=",
        "watch=true",
        "watch=1",
        "watch=yes",
        "watch=no",
        "watch=f",
        "watch=+",
        "watch=%66alse%21",
        "%77atch=true",
        "w%61tch=0x",
        "watch=true&watchx=false",
        "limit=1&watch",
    ] {
        assert_eq!(list(query).unwrap().0, "watch", "{query}");
    }
    for query in [
        "",
        "watch=0",
        "watch=false",
        "watch=FALSE",
        "watch=fAlSe",
        "%77atch=%30",
        "watch=fa%6Cse",
        "Watch=true",
        "watchx=true",
        "x=watch",
    ] {
        assert_eq!(list(query).unwrap().0, "list", "{query}");
    }
}

#[test]
fn queries_the_api_server_could_read_differently_are_refused() {
    for query in [
        "watch=true&watch=false",
        "watch=false&watch=true",
        "watch=false&%77atch=true",
        "fieldSelector=metadata.name%3Da&fieldSelector=metadata.name%3Db",
        "labelSelector=a&labelSelector=b",
        "watch=false;watch=true",
        "a=b;c",
        "watch=tr%ue",
        "watch=%",
        "watch=%+1",
        "fieldSelector=%ff",
        "dryRun=All&dryRun=None",
        "fieldManager=a&fieldManager=b",
    ] {
        assert!(
            matches!(list(query), Err(ClassifyError::AmbiguousQuery { .. })),
            "{query} should be refused, got {:?}",
            list(query)
        );
    }
    // Repetition that means nothing different (exec's command arguments) is fine.
    let exec = classify_kubernetes(
        "POST",
        "/api/v1/namespaces/prod/pods/web-0/exec",
        "command=sh&command=-c&command=id&stdin=true",
    )
    .unwrap();
    assert_eq!(exec.verb, "create");
    // A proxied request's query belongs to the pod.
    let proxied = classify_kubernetes(
        "GET",
        "/api/v1/namespaces/prod/pods/web-0/proxy/metrics",
        "limit=1&limit=2;x=%zz",
    )
    .unwrap();
    assert_eq!(proxied.subresource, "proxy");
    // A repeated write parameter on a write is refused as on a list.
    assert!(
        classify_kubernetes(
            "POST",
            "/api/v1/namespaces/prod/configmaps",
            "dryRun=All&dryRun=All"
        )
        .is_err()
    );
}

#[test]
fn only_a_single_plain_name_selector_names_the_object() {
    let named = |q: &str| list(q).unwrap().1;
    assert_eq!(named("fieldSelector=metadata.name%3Dweb-0"), "web-0");
    assert_eq!(named("fieldSelector=metadata.name%3D%3Dweb-0"), "web-0");
    assert_eq!(named("%66ieldSelector=metadata.name%3Dweb-0"), "web-0");
    assert_eq!(named("fieldSelector=metadata.name=web-0"), "web-0");
    for selector in [
        "metadata.name%3Dweb-0%2Cstatus.phase%3DRunning",
        "metadata.name%3Dweb-0%2C",
        "metadata.name%21%3Dweb-0",
        "metadata.name+%3D+web-0",
        "metadata.name%3D+web-0",
        "metadata.name%3Dweb%5C-0",
        "metadata.name%3Da%3Db",
        "metadata.name%3D",
        "metadata.name%3D..",
        "metadata.namespace%3Dprod",
        "spec.metadata.name%3Dweb-0",
    ] {
        assert_eq!(
            named(&format!("fieldSelector={selector}")),
            "",
            "{selector}"
        );
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 512, ..Default::default() })]

    /// Any query over the characters that matter: no panic, and whenever it classifies,
    /// the verb is the one Go's decoding and metav1's conversion give.
    #[test]
    fn any_query_classifies_as_the_api_server_reads_it_or_is_refused(
        query in "[a-z%0-9&=;+.,\\\\!FALSEW]{0,40}"
    ) {
        if let Ok((verb, _)) = list(&query) {
            let pairs: Vec<(String, String)> = query
                .split('&')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once('=').unwrap_or((p, ""));
                    let dec = |s: &str| String::from_utf8(query_unescape(s).unwrap()).unwrap();
                    (dec(k), dec(v))
                })
                .collect();
            let watch = pairs
                .iter()
                .find(|(k, _)| k == "watch")
                .is_some_and(|(_, v)| v != "0" && v.to_lowercase() != "false");
            proptest::prop_assert_eq!(verb, if watch { "watch" } else { "list" });
        }
    }
}
