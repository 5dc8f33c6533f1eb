use std::path::Path;

use kube::CustomResourceExt;
use serde_json::Value;

use super::*;

fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("crds/ is below the root")
}

#[test]
fn committed_manifests_match_the_types() {
    for crd in all_crds().expect("CRDs render") {
        let manifest = render_manifest(&crd).expect("CRD renders as YAML");
        for dir in ["crds/manifests", "charts/agentgate/crds"] {
            let path = repo_root().join(dir).join(&manifest.file_name);
            let committed = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                committed == manifest.yaml,
                "{} is out of date with crds/src: run `make crds` and commit the result",
                path.display()
            );
        }
    }
}

/// Walks a schema and returns the paths of properties without a description, which
/// `kubectl explain` would show blank.
fn undescribed(schema: &Value, path: &str, out: &mut Vec<String>) {
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        for (name, prop) in props {
            let here = format!("{path}.{name}");
            let described = prop
                .get("description")
                .and_then(Value::as_str)
                .is_some_and(|d| !d.trim().is_empty());
            // apiVersion, kind and metadata are described by Kubernetes itself.
            let builtin =
                path.is_empty() && ["apiVersion", "kind", "metadata"].contains(&name.as_str());
            if !described && !builtin {
                out.push(here.clone());
            }
            undescribed(prop, &here, out);
        }
    }
    if let Some(items) = schema.get("items") {
        undescribed(items, &format!("{path}[]"), out);
    }
}

#[test]
fn every_field_has_a_description() {
    for crd in all_crds().expect("CRDs render") {
        let version = &crd.spec.versions[0];
        let schema = serde_json::to_value(
            version
                .schema
                .as_ref()
                .and_then(|s| s.open_api_v3_schema.as_ref())
                .expect("a schema"),
        )
        .expect("schema serializes");
        assert!(
            schema.get("description").is_some(),
            "{}: the kind has no description",
            crd.spec.names.kind
        );
        let mut missing = Vec::new();
        undescribed(&schema, "", &mut missing);
        assert!(
            missing.is_empty(),
            "{} fields without a description: {missing:?}",
            crd.spec.names.kind
        );
    }
}

#[test]
fn every_kind_has_a_short_name_the_category_and_a_status_subresource() {
    let expected = [
        ("Connection", "conn"),
        ("AgentAccessPolicy", "aap"),
        ("Approval", "apr"),
        ("AgentSession", "as"),
    ];
    let crds = all_crds().expect("CRDs render");
    assert_eq!(crds.len(), expected.len());
    for (crd, (kind, short)) in crds.iter().zip(expected) {
        assert_eq!(crd.spec.names.kind, kind);
        assert_eq!(crd.spec.group, GROUP);
        assert_eq!(
            crd.spec.names.short_names.as_deref(),
            Some(&[short.to_owned()][..])
        );
        assert_eq!(
            crd.spec.names.categories.as_deref(),
            Some(&[CATEGORY.to_owned()][..])
        );
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, VERSION);
        assert!(
            version
                .subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some(),
            "{kind} has no status subresource"
        );
        assert!(
            version
                .additional_printer_columns
                .as_ref()
                .is_some_and(|c| c.len() >= 3),
            "{kind} has too few printer columns"
        );
    }
}

#[test]
fn reserved_port_rule_names_the_admin_port() {
    let crd = serde_json::to_string(&Connection::crd()).expect("serializes");
    assert!(crd.contains(&format!("self != {SIDECAR_ADMIN_PORT}")));
}

#[test]
fn examples_parse_as_the_types() {
    let dir = repo_root().join("examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("examples/ exists") {
        let path = entry.expect("readable dir entry").path();
        let text = std::fs::read_to_string(&path).expect("readable example");
        for doc in serde_norway::Deserializer::from_str(&text) {
            let value: Value = serde::Deserialize::deserialize(doc).expect("valid YAML");
            let kind = value["kind"].as_str().unwrap_or_default();
            let parsed = match kind {
                "Connection" => serde_json::from_value::<Connection>(value.clone()).map(|_| ()),
                "AgentAccessPolicy" => {
                    serde_json::from_value::<AgentAccessPolicy>(value.clone()).map(|_| ())
                }
                "Approval" => serde_json::from_value::<Approval>(value.clone()).map(|_| ()),
                "AgentSession" => serde_json::from_value::<AgentSession>(value.clone()).map(|_| ()),
                _ => continue,
            };
            parsed.unwrap_or_else(|e| panic!("{}: {kind} does not parse: {e}", path.display()));
            seen += 1;
        }
    }
    assert!(
        seen >= 4,
        "expected the examples to hold Connections and a policy, saw {seen}"
    );
}

#[test]
fn policy_defaults_fail_closed() {
    let spec: AgentAccessPolicySpec = serde_json::from_value(serde_json::json!({
        "agentSelector": {},
        "connections": ["db"],
        "identity": { "issuer": "https://issuer.example", "audiences": ["agentgate"] },
        "rules": [{ "name": "w", "action": "approve", "approval": { "approvers": { "groups": ["dba"] } } }]
    }))
    .expect("minimal policy parses");
    assert_eq!(spec.default_action, Action::Deny);
    let identity = spec.identity.expect("identity set");
    assert!(
        identity.required,
        "identity is required unless said otherwise"
    );
    assert_eq!(identity.groups_claim, "groups");
    let approval = spec.rules[0].approval.as_ref().expect("approval set");
    assert_eq!(
        (approval.mode, approval.grant, approval.timeout.as_str()),
        (ApprovalMode::Hold, GrantScope::Once, "10m")
    );
}
