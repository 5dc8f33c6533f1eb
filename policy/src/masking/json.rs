//! Masking of a parsed JSON document.

use serde_json::Value;

use super::{MaskReport, MaskingProfile, is_credential_key};

/// The annotation `kubectl apply` leaves on objects: for a Secret it holds the data.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

impl MaskingProfile {
    /// Masks a JSON document in place: JSON paths first, then credential-named keys,
    /// Kubernetes Secret data, and every string value through the text detectors.
    pub fn mask_json(&self, doc: &mut Value, report: &mut MaskReport) {
        for path in &self.json_paths {
            let pointers: Vec<String> = path
                .query_located(doc)
                .locations()
                .map(|l| l.to_json_pointer())
                .collect();
            for pointer in pointers {
                if let Some(v) = doc.pointer_mut(&pointer) {
                    let original = v.to_string();
                    *v = Value::String(self.replacement_for("json-path", original.as_bytes()));
                    report.add("json-path");
                }
            }
        }
        self.walk(doc, report);
    }

    fn walk(&self, value: &mut Value, report: &mut MaskReport) {
        match value {
            Value::Object(map) => {
                let kind = map
                    .get("kind")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned();
                if self.kubernetes_secrets && kind == "Secret" {
                    self.mask_secret_object(map, report);
                }
                if self.kubernetes_secrets
                    && kind == "SecretList"
                    && let Some(Value::Array(items)) = map.get_mut("items")
                {
                    for item in items.iter_mut().filter_map(Value::as_object_mut) {
                        self.mask_secret_object(item, report);
                    }
                }
                for (key, v) in map.iter_mut() {
                    let scalar = matches!(v, Value::String(_) | Value::Number(_));
                    if self.credential_keys && scalar && is_credential_key(key) {
                        if !matches!(v, Value::String(s) if s.starts_with("[masked:")) {
                            *v = Value::String(
                                self.replacement_for("credential-field", v.to_string().as_bytes()),
                            );
                            report.add("credential-field");
                        }
                    } else {
                        self.walk(v, report);
                    }
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|v| self.walk(v, report)),
            Value::String(s) => {
                if let std::borrow::Cow::Owned(masked) = self.mask_bytes(s.as_bytes(), report) {
                    *s = String::from_utf8_lossy(&masked).into_owned();
                }
            }
            _ => {}
        }
    }

    /// A Secret's `data` and `stringData` values, and the copy of them kubectl keeps in
    /// the last-applied annotation.
    fn mask_secret_object(
        &self,
        secret: &mut serde_json::Map<String, Value>,
        report: &mut MaskReport,
    ) {
        for field in ["data", "stringData"] {
            if let Some(Value::Object(data)) = secret.get_mut(field) {
                for v in data.values_mut() {
                    *v = Value::String(
                        self.replacement_for("kubernetes-secret", v.to_string().as_bytes()),
                    );
                    report.add("kubernetes-secret");
                }
            }
        }
        if let Some(Value::Object(annotations)) = secret
            .get_mut("metadata")
            .and_then(|m| m.get_mut("annotations"))
            && let Some(v) = annotations.get_mut(LAST_APPLIED)
        {
            *v = Value::String(self.replacement_for("kubernetes-secret", v.to_string().as_bytes()));
            report.add("kubernetes-secret");
        }
    }
}
