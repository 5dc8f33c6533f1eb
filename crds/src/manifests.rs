//! Rendering of the CRD manifests. `crdgen` writes them; the drift test compares the
//! committed files with what the types generate, so the two can never disagree.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use serde_json::Value;

use crate::{AgentAccessPolicy, AgentSession, Approval, Connection};

/// One generated CRD manifest: the file it lives in and its YAML text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrdManifest {
    /// File name, `<plural>.<group>.yaml`.
    pub file_name: String,
    /// The YAML document, with a header saying it is generated.
    pub yaml: String,
}

/// The error of rendering a CRD.
pub type RenderError = serde_json::Error;

/// Every agentgate CRD, in a stable order, with descriptions reflowed for
/// `kubectl explain`.
pub fn all_crds() -> Result<Vec<CustomResourceDefinition>, RenderError> {
    [
        Connection::crd(),
        AgentAccessPolicy::crd(),
        Approval::crd(),
        AgentSession::crd(),
    ]
    .into_iter()
    .map(|crd| {
        let mut value = serde_json::to_value(crd)?;
        reflow_descriptions(&mut value);
        serde_json::from_value(value)
    })
    .collect()
}

/// Renders one CRD as the YAML file `make crds` writes.
pub fn render_manifest(crd: &CustomResourceDefinition) -> Result<CrdManifest, RenderError> {
    let body = serde_norway::to_string(crd).map_err(serde::ser::Error::custom)?;
    let name = crd
        .metadata
        .name
        .as_deref()
        .unwrap_or(&crd.spec.names.plural);
    Ok(CrdManifest {
        file_name: format!("{name}.yaml"),
        yaml: format!(
            "# Generated from crds/src by `make crds`; do not edit by hand.\n---\n{body}"
        ),
    })
}

/// Doc comments are hard-wrapped at 90 columns; `kubectl explain` wraps text itself, so
/// single line breaks become spaces and only paragraph breaks stay.
fn reflow_descriptions(value: &mut Value) {
    match value {
        Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                match v {
                    Value::String(text) if key == "description" => {
                        *text = text
                            .split("\n\n")
                            .map(|paragraph| paragraph.replace('\n', " "))
                            .collect::<Vec<_>>()
                            .join("\n\n");
                    }
                    _ => reflow_descriptions(v),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(reflow_descriptions),
        _ => {}
    }
}
