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
                // Fields already replaced by the Secret masking are not walked again: a
                // credential-named key in `data` would turn the base64 of the mask back
                // into text that is not base64.
                let mut done: &[&str] = &[];
                if self.kubernetes_secrets && kind == "Secret" {
                    self.mask_secret_object(map, report);
                    done = &["data", "stringData"];
                } else {
                    // Any other object's last-applied copy: a Table row or a metadata-only
                    // list shows a Secret's metadata without `kind: Secret`.
                    self.mask_last_applied(map, false, report);
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
                    if done.contains(&key.as_str()) {
                        continue;
                    }
                    if kind == "SecretList" && key == "items" && self.kubernetes_secrets {
                        // Each item: everything but its already masked data.
                        for item in v.as_array_mut().into_iter().flatten() {
                            if let Some(item) = item.as_object_mut() {
                                for (k, field) in item.iter_mut() {
                                    if !matches!(k.as_str(), "data" | "stringData") {
                                        self.walk(field, report);
                                    }
                                }
                            }
                        }
                        continue;
                    }
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
    /// the last-applied annotation. `data` values become the base64 of the mask text, so
    /// the object stays a valid Secret (`kubectl describe secret` decodes them).
    fn mask_secret_object(
        &self,
        secret: &mut serde_json::Map<String, Value>,
        report: &mut MaskReport,
    ) {
        for field in ["data", "stringData"] {
            if let Some(Value::Object(data)) = secret.get_mut(field) {
                for v in data.values_mut() {
                    let mask = self.replacement_for("kubernetes-secret", v.to_string().as_bytes());
                    *v = Value::String(if field == "data" {
                        base64(mask.as_bytes())
                    } else {
                        mask
                    });
                    report.add("kubernetes-secret");
                }
            }
        }
        self.mask_last_applied(secret, true, report);
    }

    /// The last-applied annotation of an object, masked as the object it copies: parsed,
    /// its Secret data masked when it is a Secret's (or `secret` says the object is one,
    /// or it names no kind), and written back as JSON. One that does not parse is
    /// replaced whole when Secrets are masked: what it holds cannot be known.
    fn mask_last_applied(
        &self,
        object: &mut serde_json::Map<String, Value>,
        secret: bool,
        report: &mut MaskReport,
    ) {
        let Some(Value::Object(annotations)) = object
            .get_mut("metadata")
            .and_then(|m| m.get_mut("annotations"))
        else {
            return;
        };
        let Some(Value::String(text)) = annotations.get_mut(LAST_APPLIED) else {
            return;
        };
        match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(mut copy)) => {
                let kind = copy.get("kind").and_then(Value::as_str).unwrap_or_default();
                let before = report.total();
                if self.kubernetes_secrets && (secret || kind == "Secret" || kind.is_empty()) {
                    // Its own last-applied annotation is not looked at again.
                    for field in ["data", "stringData"] {
                        if let Some(Value::Object(data)) = copy.get_mut(field) {
                            for v in data.values_mut() {
                                let mask = self
                                    .replacement_for("kubernetes-secret", v.to_string().as_bytes());
                                *v = Value::String(if field == "data" {
                                    base64(mask.as_bytes())
                                } else {
                                    mask
                                });
                                report.add("kubernetes-secret");
                            }
                        }
                    }
                }
                if report.total() > before {
                    *text = Value::Object(copy).to_string();
                }
            }
            Ok(_) | Err(_) if self.kubernetes_secrets => {
                *text = self.replacement_for("kubernetes-secret", text.as_bytes());
                report.add("kubernetes-secret");
            }
            _ => {}
        }
    }
}

/// Standard, padded base64 (RFC 4648), as Kubernetes encodes Secret data.
fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod base64_tests {
    #[test]
    fn base64_is_rfc4648() {
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            (
                "[masked:kubernetes-secret]",
                "W21hc2tlZDprdWJlcm5ldGVzLXNlY3JldF0=",
            ),
        ] {
            assert_eq!(super::base64(plain.as_bytes()), encoded);
        }
    }
}
