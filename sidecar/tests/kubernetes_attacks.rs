//! Attacks on the Kubernetes gateway against the real API server of the local control
//! plane, each with its control (the same request sent straight to the API server with
//! the sidecar's service-account token does hand out the secret or perform the action),
//! and the differential test of request classification: many generated request lines go
//! both through the classifier and to the API server, and what the server did must be
//! what the classifier said.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use agentgate_e2e::ControlPlane;
use agentgate_policy::classify::classify_kubernetes;
use futures::StreamExt as _;
use http::{HeaderMap, Request};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use support::*;

const SA: &str = "agent-sa";
const PASSWORD: &str = "hunter2-prod";
/// base64 of [`PASSWORD`], as the API server stores and returns it.
const PASSWORD_B64: &str = "aHVudGVyMi1wcm9k";
const PRIVATE: &str = "private-value-6d1c";
const VAULT_PASSWORD: &str = "vault-pass-991";
/// base64 of `[masked:kubernetes-secret]`.
const MASKED_B64: &str = "W21hc2tlZDprdWJlcm5ldGVzLXNlY3JldF0=";

struct Cluster {
    cp: &'static ControlPlane,
    ns: String,
    /// A namespace only carol may read.
    vault: String,
    sidecar: Sidecar,
    /// The sidecar's service-account token: what a direct request uses as its control.
    token: String,
    api_port: u16,
    ca_pem: String,
    /// get, list, watch on secrets and configmaps; apply (patch + create) of configmaps.
    reader: u16,
    /// get and list only (no watch); list of secrets in any namespace.
    lister: u16,
    /// configmaps named `public` only.
    named: u16,
    /// patch of configmaps only.
    patcher: u16,
}

async fn setup() -> Cluster {
    let cp = ControlPlane::shared();
    let client = cp.client().await;
    let ns = cp.namespace(&client, "attacks").await;
    let vault = cp.namespace(&client, "vault").await;
    let kubectl = |args: &[&str]| {
        cp.kubectl_output(args)
            .unwrap_or_else(|e| panic!("kubectl {args:?}: {e}"))
    };
    let apply = |manifest: String| {
        let path = std::env::temp_dir().join(format!(
            // Per namespace: tests run in parallel in this process.
            "agentgate-attacks-{ns}-{}.yaml",
            manifest.len()
        ));
        std::fs::write(&path, manifest).unwrap();
        kubectl(&["apply", "-f", path.to_str().unwrap()]);
    };
    kubectl(&["create", "serviceaccount", SA, "-n", &ns]);
    kubectl(&[
        "create",
        "role",
        "agent",
        "--verb=get,list,watch,create,patch,update,delete",
        "--resource=pods,secrets,configmaps",
        "-n",
        &ns,
    ]);
    kubectl(&[
        "create",
        "rolebinding",
        "agent",
        "--role=agent",
        &format!("--serviceaccount={ns}:{SA}"),
        "-n",
        &ns,
    ]);
    // The service account may impersonate carol, who may read the vault namespace's
    // Secrets; the service account itself may not.
    let impersonate = format!("impersonate-carol-{ns}");
    kubectl(&[
        "create",
        "clusterrole",
        &impersonate,
        "--verb=impersonate",
        "--resource=users",
        "--resource-name=carol",
    ]);
    kubectl(&[
        "create",
        "clusterrolebinding",
        &impersonate,
        &format!("--clusterrole={impersonate}"),
        &format!("--serviceaccount={ns}:{SA}"),
    ]);
    kubectl(&[
        "create",
        "role",
        "vault-reader",
        "--verb=get,list",
        "--resource=secrets",
        "-n",
        &vault,
    ]);
    kubectl(&[
        "create",
        "rolebinding",
        "carol",
        "--role=vault-reader",
        "--user=carol",
        "-n",
        &vault,
    ]);
    kubectl(&[
        "create",
        "secret",
        "generic",
        "vault",
        &format!("--from-literal=password={VAULT_PASSWORD}"),
        "-n",
        &vault,
    ]);
    // Applied (client-side), so the last-applied annotation holds a copy of the data.
    apply(format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: db\n  namespace: {ns}\n\
         data:\n  password: {PASSWORD_B64}\nstringData:\n  token: {PASSWORD}-token\n"
    ));
    apply(format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: private\n  namespace: {ns}\ndata:\n  value: {PRIVATE}\n\
         ---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: public\n  namespace: {ns}\ndata:\n  value: hello\n"
    ));
    let token = kubectl(&["create", "token", SA, "-n", &ns, "--duration=1h"])
        .trim()
        .to_owned();

    let ports = [free_port(), free_port(), free_port(), free_port()];
    let connection = |name: &str, port: u16| {
        json!({ "name": name, "spec": {
            "protocol": "kubernetes",
            "upstream": { "address": cp.server(), "tls": { "caSecretRef": { "name": "cluster-ca", "key": "ca.crt" } } },
            "credentials": { "serviceAccount": { "name": SA } },
            "listen": { "port": port } } })
    };
    let policy = |name: &str, rules: Value| {
        json!({ "name": name, "spec": { "agentSelector": {}, "connections": [name],
            "rules": rules, "masking": { "detectors": ["secrets"] } } })
    };
    let kube = |verbs: &[&str], resources: &[&str], extra: Value| {
        let mut m = json!({ "verbs": verbs, "resources": resources, "namespaces": [ns] });
        for (k, v) in extra.as_object().unwrap() {
            m[k] = v.clone();
        }
        m
    };
    let bundle = json!({
        "namespace": "agents",
        "connections": [connection("reader", ports[0]), connection("lister", ports[1]),
                        connection("named", ports[2]), connection("patcher", ports[3])],
        "policies": [
            policy("reader", json!([
                { "name": "read", "match": { "kubernetes": kube(&["get", "list", "watch"], &["secrets", "configmaps"], json!({})) }, "action": "allow" },
                { "name": "apply", "match": { "kubernetes": kube(&["patch", "create"], &["configmaps"], json!({})) }, "action": "allow" }])),
            policy("lister", json!([
                { "name": "list", "match": { "kubernetes": kube(&["get", "list"], &["secrets", "configmaps"], json!({})) }, "action": "allow" },
                { "name": "list-any-secrets", "match": { "kubernetes": { "verbs": ["list"], "resources": ["secrets"] } }, "action": "allow" }])),
            policy("named", json!([
                { "name": "public-only", "match": { "kubernetes": kube(&["get", "list", "watch"], &["configmaps"], json!({ "names": ["public"] })) }, "action": "allow" }])),
            policy("patcher", json!([
                { "name": "patch-only", "match": { "kubernetes": kube(&["patch"], &["configmaps"], json!({})) }, "action": "allow" }])),
        ]
    });
    let ca = std::fs::read(cp.ca_file()).unwrap();
    let sidecar = Sidecar::start(&bundle, "app=\"agent\"\n", |dir| {
        std::fs::create_dir_all(dir.join("credentials/cluster-ca")).unwrap();
        std::fs::write(dir.join("credentials/cluster-ca/ca.crt"), &ca).unwrap();
        std::fs::create_dir_all(dir.join(format!("credentials/serviceaccount-{SA}"))).unwrap();
        std::fs::write(
            dir.join(format!("credentials/serviceaccount-{SA}/token")),
            &token,
        )
        .unwrap();
    })
    .await;
    let api_port = cp.server().rsplit(':').next().unwrap().parse().unwrap();
    Cluster {
        cp,
        ns,
        vault,
        sidecar,
        token,
        api_port,
        ca_pem: String::from_utf8(ca).unwrap(),
        reader: ports[0],
        lister: ports[1],
        named: ports[2],
        patcher: ports[3],
    }
}

fn request(method: &str, target: &str, headers: &[(&str, &str)], body: &str) -> Request<TestBody> {
    let mut req = Request::builder().method(method).uri(target);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.body(full(body.to_owned())).unwrap()
}

impl Cluster {
    /// Straight to the API server as the sidecar's service account: the control.
    async fn direct(
        &self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (u16, HeaderMap, Vec<u8>) {
        let bearer = format!("Bearer {}", self.token);
        let mut all = vec![("authorization", bearer.as_str())];
        all.extend_from_slice(headers);
        https_request(
            self.api_port,
            &self.ca_pem,
            request(method, target, &all, body),
        )
        .await
        .unwrap()
    }

    /// Through the sidecar's listener `port`, as the agent.
    async fn agent(
        &self,
        port: u16,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (u16, HeaderMap, String) {
        // Bounded: a watch let through as something else would never end, and the test
        // must then fail, not hang.
        tokio::time::timeout(
            Duration::from_secs(30),
            plain_request(port, request(method, target, headers, body)),
        )
        .await
        .unwrap_or_else(|_| panic!("{method} {target}: no complete response in 30 s"))
        .unwrap()
    }

    /// Whether the API server, asked `target` directly as the service account (with
    /// `timeoutSeconds=1` added, so that a watch ends), streamed watch events.
    async fn direct_watches(&self, target: &str) -> bool {
        let (status, _, body) = self
            .direct("GET", &format!("{target}&timeoutSeconds=1"), &[], "")
            .await;
        assert_eq!(status, 200, "{target}: {}", String::from_utf8_lossy(&body));
        let first: Value = serde_json::from_slice(body.split(|b| *b == b'\n').next().unwrap())
            .unwrap_or_else(|e| panic!("{target}: {e}"));
        first["type"].is_string() && first["object"].is_object()
    }

    fn path(&self, rest: &str) -> String {
        format!("/api/v1/namespaces/{}/{rest}", self.ns)
    }
}

fn status_of(body: &str) -> Value {
    let status: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(status["kind"], "Status", "{body}");
    status
}

#[tokio::test]
async fn secret_data_in_any_encoding_comes_back_as_masked_json() {
    let c = setup().await;
    let secret = c.path("secrets/db");
    for accept in [
        "application/yaml",
        "application/vnd.kubernetes.protobuf",
        "application/json;as=Table;v=v1;g=meta.k8s.io",
        "application/cbor",
        "application/yaml, application/json;q=0.1",
    ] {
        // Control: the API server hands the Secret's data out in what was asked for.
        let (status, _, body) = c.direct("GET", &secret, &[("accept", accept)], "").await;
        let direct = String::from_utf8_lossy(&body);
        if accept != "application/cbor" {
            assert_eq!(status, 200, "{accept}: {direct}");
            assert!(
                direct.contains(PASSWORD_B64) || direct.contains(PASSWORD),
                "{accept}: the control should show the secret: {direct}"
            );
        }

        let (status, headers, body) = c
            .agent(c.reader, "GET", &secret, &[("accept", accept)], "")
            .await;
        assert_eq!(status, 200, "{accept}: {body}\n{}", c.sidecar.log());
        assert!(
            headers["content-type"]
                .to_str()
                .unwrap()
                .starts_with("application/json"),
            "{accept}: {headers:?}"
        );
        assert!(!body.contains(PASSWORD_B64), "{accept}: {body}");
        assert!(!body.contains(PASSWORD), "{accept}: {body}");
        let doc: Value = serde_json::from_str(&body).unwrap();
        if doc["kind"] == "Secret" {
            assert_eq!(doc["data"]["password"], MASKED_B64, "{body}");
        }
    }

    // kubectl can still decode what it is given: describe works and shows the keys.
    let kubeconfig = c.sidecar.path("agent.kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {{ server: \"http://127.0.0.1:{}\" }}\n\
             users:\n- name: a\n  user: {{}}\ncontexts:\n- name: c\n  context: {{ cluster: c, user: a, namespace: {} }}\n\
             current-context: c\n",
            c.reader, c.ns
        ),
    )
    .unwrap();
    for args in [
        &["describe", "secret", "db"][..],
        &["get", "secret", "db", "-o", "yaml"][..],
        &["get", "secret", "db"][..],
    ] {
        let out = std::process::Command::new(c.cp.kubectl().get_program())
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(args)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains("db") || stdout.contains("password"),
            "{stdout}"
        );
        assert!(
            !stdout.contains(PASSWORD) && !stdout.contains(PASSWORD_B64),
            "{stdout}"
        );
    }
}

#[tokio::test]
async fn every_spelling_of_watch_is_decided_and_masked_as_a_watch() {
    let c = setup().await;
    let secrets = c.path("secrets");
    for spelling in [
        "watch",
        "watch=yes",
        "%77atch=true",
        "watch=no",
        "watch=+",
        "w%61tch=1",
    ] {
        // Control: the API server streams a watch for each of them.
        assert!(
            c.direct_watches(&format!("{secrets}?{spelling}")).await,
            "{spelling}"
        );

        // A list-only rule does not let it through...
        let (status, _, body) = c
            .agent(c.lister, "GET", &format!("{secrets}?{spelling}"), &[], "")
            .await;
        assert_eq!(status, 403, "{spelling}: {body}");
        assert_eq!(status_of(&body)["reason"], "Forbidden");

        // ...and where watch is allowed, the stream is masked event by event.
        let (status, headers, body) = c
            .agent(
                c.reader,
                "GET",
                &format!("{secrets}?{spelling}&timeoutSeconds=1"),
                &[("accept", "application/yaml")],
                "",
            )
            .await;
        assert_eq!(status, 200, "{spelling}: {body}");
        assert!(headers["content-type"].to_str().unwrap().contains("json"));
        let events: Vec<Value> = body
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let db = events
            .iter()
            .find(|e| e["object"]["metadata"]["name"] == "db")
            .unwrap_or_else(|| panic!("{spelling}: no event for db: {body}"));
        assert_eq!(db["object"]["data"]["password"], MASKED_B64);
        assert!(
            !body.contains(PASSWORD_B64) && !body.contains(PASSWORD),
            "{body}"
        );
    }

    // Repeated: the API server reads the first; the gateway refuses to guess.
    for query in [
        "watch=true&watch=false",
        "watch=1&%77atch=0",
        "watch=true;x",
    ] {
        let (status, _, body) = c
            .agent(c.lister, "GET", &format!("{secrets}?{query}"), &[], "")
            .await;
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(status_of(&body)["reason"], "BadRequest");
    }
    assert!(
        c.direct_watches(&format!("{secrets}?watch=true&watch=false"))
            .await,
        "control: the first value wins"
    );
}

#[tokio::test]
async fn a_repeated_field_selector_cannot_return_another_object() {
    let c = setup().await;
    let configmaps = c.path("configmaps");
    let attack = format!(
        "{configmaps}?fieldSelector=metadata.name%3Dprivate&fieldSelector=metadata.name%3Dpublic"
    );
    // Control: the API server filters by the first selector, returning `private`.
    let (status, _, body) = c.direct("GET", &attack, &[], "").await;
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&body).contains(PRIVATE));

    for target in [
        attack.clone(),
        format!(
            "{configmaps}?%66ieldSelector=metadata.name%3Dprivate&fieldSelector=metadata.name%3Dpublic"
        ),
        format!(
            "{configmaps}?fieldSelector=metadata.name%3Dprivate;fieldSelector=metadata.name%3Dpublic"
        ),
    ] {
        let (status, _, body) = c.agent(c.named, "GET", &target, &[], "").await;
        assert_ne!(status, 200, "{target}: {body}");
        assert!(!body.contains(PRIVATE), "{body}");
        status_of(&body);
    }
    // Selectors that do not name exactly `public` name nothing, so the rule does not match.
    for selector in [
        "metadata.name%3D+public",
        "metadata.name%3Dpublic%2Cmetadata.name%3Dprivate",
    ] {
        let (status, _, body) = c
            .agent(
                c.named,
                "GET",
                &format!("{configmaps}?fieldSelector={selector}"),
                &[],
                "",
            )
            .await;
        assert_eq!(status, 403, "{selector}: {body}");
    }
    // The rule itself works.
    let (status, _, body) = c
        .agent(
            c.named,
            "GET",
            &format!("{configmaps}?fieldSelector=metadata.name%3Dpublic"),
            &[],
            "",
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("hello") && !body.contains(PRIVATE));
}

#[tokio::test]
async fn impersonation_headers_never_reach_the_api_server() {
    let c = setup().await;
    let impersonate = [("impersonate-user", "carol")];
    let vault_list = format!("/api/v1/namespaces/{}/secrets", c.vault);
    // Control: the service account alone may not read the vault namespace...
    let (status, _, _) = c.direct("GET", &vault_list, &[], "").await;
    assert_eq!(status, 403);
    // ...but impersonating carol, it reads the Secrets there.
    let (status, _, body) = c.direct("GET", &vault_list, &impersonate, "").await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("\"vault\""));

    // Through the gateway the header is dropped: the API server sees the service
    // account, which may not read the vault namespace.
    for headers in [
        &impersonate[..],
        &[
            ("impersonate-user", "carol"),
            ("impersonate-group", "system:masters"),
        ][..],
        &[
            ("Impersonate-User", "carol"),
            ("impersonate-uid", "uid-carol"),
        ][..],
    ] {
        let (status, _, body) = c.agent(c.lister, "GET", &vault_list, headers, "").await;
        assert_eq!(status, 403, "{body}");
        let status = status_of(&body);
        assert!(
            status["message"]
                .as_str()
                .unwrap()
                .contains(&format!("system:serviceaccount:{}:{SA}", c.ns)),
            "the API server saw the service account, not carol: {status}"
        );
        assert!(!body.contains(VAULT_PASSWORD));
    }
}

#[tokio::test]
async fn a_server_side_apply_that_creates_needs_create_as_well_as_patch() {
    let c = setup().await;
    let manifest = |name: &str| {
        format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\ndata:\n  a: b\n")
    };
    let apply = [("content-type", "application/apply-patch+yaml")];
    let target = |name: &str| c.path(&format!("configmaps/{name}?fieldManager=agent"));

    // Control: as the service account, the apply creates the object.
    let (status, _, body) = c
        .direct(
            "PATCH",
            &target("made-directly"),
            &apply,
            &manifest("made-directly"),
        )
        .await;
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));

    // A patch-only rule does not let an apply create.
    let (status, _, body) = c
        .agent(
            c.patcher,
            "PATCH",
            &target("made-by-agent"),
            &apply,
            &manifest("made-by-agent"),
        )
        .await;
    assert_eq!(status, 403, "{body}");
    assert!(
        status_of(&body)["message"]
            .as_str()
            .unwrap()
            .contains("needs create as well as patch"),
        "{body}"
    );
    assert!(
        c.cp.kubectl_output(&["get", "configmap", "made-by-agent", "-n", &c.ns])
            .is_err(),
        "the object must not exist"
    );
    // A merge patch of an existing object is still a patch.
    let (status, _, body) = c
        .agent(
            c.patcher,
            "PATCH",
            &c.path("configmaps/public"),
            &[("content-type", "application/merge-patch+json")],
            r#"{"data":{"patched":"yes"}}"#,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    // With patch and create allowed, the apply creates.
    let (status, _, body) = c
        .agent(
            c.reader,
            "PATCH",
            &target("made-by-agent"),
            &apply,
            &manifest("made-by-agent"),
        )
        .await;
    assert_eq!(status, 201, "{body}");
}

#[tokio::test]
async fn oversized_heads_are_refused_with_a_status() {
    let c = setup().await;
    let (status, _, _) = c
        .agent(c.reader, "GET", &c.path("configmaps"), &[], "")
        .await;
    assert_eq!(status, 200, "control: a normal request goes through");
    let huge = format!("Bearer {}", "a".repeat(1024 * 1024));
    let (status, _, body) = c
        .agent(
            c.reader,
            "GET",
            &c.path("configmaps"),
            &[("authorization", &huge)],
            "",
        )
        .await;
    assert_eq!(status, 431, "{body}");
    let status = status_of(&body);
    assert_eq!(status["code"], 431);
}

/// What the API server did with one request line.
#[derive(Debug, PartialEq)]
enum Observed {
    Watch { first_name: Option<String> },
    List { names: Vec<String> },
    Get { name: String },
    Error(u16),
}

async fn observe(c: &Cluster, admin_token: &str, target: &str) -> Observed {
    let req = request(
        "GET",
        target,
        &[("authorization", &format!("Bearer {admin_token}"))],
        "",
    );
    let response = tokio::time::timeout(
        Duration::from_secs(10),
        https_response(c.api_port, &c.ca_pem, req),
    )
    .await
    .unwrap_or_else(|_| panic!("{target}: no response head in 10 s"))
    .unwrap();
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    if status != 200 {
        return Observed::Error(status);
    }
    // Every line asks for `timeoutSeconds=1`, so a watch ends too: as newline-separated
    // events (or nothing, when no object matched), where a list or a get is one object.
    // (The legacy `/watch/` paths do not say `stream=watch` in their content type.)
    let bytes = tokio::time::timeout(Duration::from_secs(20), response.into_body().collect())
        .await
        .unwrap_or_else(|_| panic!("{target}: the body did not end in 20 s"))
        .unwrap()
        .to_bytes();
    let events: Option<Vec<Value>> = bytes
        .split(|b| *b == b'\n')
        .filter(|l| !l.trim_ascii().is_empty())
        .map(|l| {
            serde_json::from_slice::<Value>(l)
                .ok()
                .filter(|e| e["type"].is_string())
        })
        .collect();
    if bytes.trim_ascii().is_empty() || content_type.contains("watch") {
        let events = events.unwrap_or_else(|| panic!("{target}: not watch events"));
        let first_name = events
            .first()
            .and_then(|e| e["object"]["metadata"]["name"].as_str().map(str::to_owned));
        return Observed::Watch { first_name };
    }
    if let Some(events) = events.filter(|e| !e.is_empty()) {
        let first_name = events[0]["object"]["metadata"]["name"]
            .as_str()
            .map(str::to_owned);
        return Observed::Watch { first_name };
    }
    let doc: Value = serde_json::from_slice(&bytes).unwrap();
    let kind = doc["kind"].as_str().unwrap_or_default();
    if kind.ends_with("List") {
        let names = doc["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["metadata"]["name"].as_str().unwrap().to_owned())
            .collect();
        Observed::List { names }
    } else {
        Observed::Get {
            name: doc["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        }
    }
}

/// Request lines generated from spellings of `watch`, of field selectors and of paths,
/// sent to the real API server and classified: wherever the classifier gives an answer,
/// it is what the API server did — the verb (a watch streamed, a list listed, a get got
/// one object) and, when it names an object, the only object the server returned.
#[tokio::test]
async fn the_classifier_reads_request_lines_as_the_api_server_does() {
    let c = setup().await;
    let admin_token = std::fs::read_to_string(c.cp.dir().join("tokens.csv"))
        .unwrap()
        .lines()
        .find(|l| l.split(',').nth(1) == Some("admin"))
        .unwrap()
        .split(',')
        .next()
        .unwrap()
        .to_owned();
    let watches = [
        "",
        "watch",
        "watch=",
        "watch=true",
        "watch=1",
        "watch=yes",
        "watch=no",
        "watch=0",
        "watch=false",
        "watch=FALSE",
        "watch=False",
        "watch=f",
        "watch=+",
        "watch=%30",
        "watch=fa%6Cse",
        "%77atch=true",
        "%77atch=0",
        "w%61tch=1",
        "Watch=true",
        "watchx=true",
        "watch=true&watch=false",
        "watch=false&watch=true",
        "watch=false&%77atch=true",
        "watch=tr%ue",
        "watch=true;x=1",
    ];
    let selectors = [
        "",
        "fieldSelector=metadata.name%3Dpublic",
        "fieldSelector=metadata.name%3D%3Dprivate",
        "%66ieldSelector=metadata.name%3Dpublic",
        "fieldSelector=metadata.name%3Dprivate&fieldSelector=metadata.name%3Dpublic",
        "fieldSelector=metadata.name%3Dpublic%2Cmetadata.namespace%3Dx",
        "fieldSelector=metadata.name%21%3Dpublic",
        "labelSelector=a%3Db&labelSelector=c",
    ];
    let collection = c.path("configmaps");
    let legacy = format!("/api/v1/watch/namespaces/{}/configmaps", c.ns);
    let mut lines = Vec::new();
    for w in watches {
        for s in selectors {
            let query = [w, s]
                .iter()
                .filter(|p| !p.is_empty())
                .copied()
                .collect::<Vec<_>>()
                .join("&");
            lines.push(format!("{collection}?{query}"));
        }
        lines.push(format!("{collection}/public?{w}"));
        lines.push(format!("{legacy}?{w}"));
        lines.push(format!("{legacy}/private?{w}"));
    }
    // Each line bounds a watch, so that it ends and is told from a list by its body.
    let lines: Vec<String> = lines
        .into_iter()
        .map(|l| {
            if l.ends_with('?') {
                format!("{l}timeoutSeconds=1")
            } else {
                format!("{l}&timeoutSeconds=1")
            }
        })
        .collect();
    // Sent sixteen at a time: most of them are watches that last a second.
    let observed: Vec<Observed> = futures::stream::iter(&lines)
        .map(|line| observe(&c, &admin_token, line))
        .buffered(16)
        .collect()
        .await;
    let (mut agreed, mut refused) = (0, 0);
    for (line, observed) in lines.iter().zip(observed) {
        let (path, query) = line.split_once('?').unwrap();
        let classified = classify_kubernetes("GET", path, query);
        let Ok(k) = classified else {
            refused += 1;
            continue;
        };
        match (&observed, k.verb.as_str()) {
            (Observed::Error(_), _) => {}
            (Observed::Watch { first_name }, "watch") => {
                if let (false, Some(name)) = (k.name.is_empty(), first_name) {
                    assert_eq!(*name, k.name, "{line}: the server watched another object");
                }
            }
            (Observed::List { names }, "list") => {
                if !k.name.is_empty() {
                    assert!(
                        names.iter().all(|n| *n == k.name),
                        "{line}: classified as naming {}, the server returned {names:?}",
                        k.name
                    );
                }
            }
            (Observed::Get { name }, "get") => assert_eq!(*name, k.name, "{line}"),
            (observed, verb) => panic!("{line}: classified {verb}, the server did {observed:?}"),
        }
        agreed += 1;
    }
    // The test must test something: most lines classify, and every ambiguous one is
    // refused, not guessed.
    assert!(
        agreed * 2 > lines.len(),
        "{agreed} of {} agreed, {refused} refused",
        lines.len()
    );
    assert!(refused > 0);
    for must in [
        format!("{collection}?watch=true"),
        format!("{collection}?fieldSelector=metadata.name%3Dpublic"),
        format!("{collection}?%77atch=true"),
    ] {
        let (path, query) = must.split_once('?').unwrap();
        assert!(classify_kubernetes("GET", path, query).is_ok(), "{must}");
    }
}
