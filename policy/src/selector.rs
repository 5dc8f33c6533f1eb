//! Kubernetes label selectors, as the API server evaluates them.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// Whether `labels` satisfy `selector`. An empty selector matches every pod; an unknown
/// operator matches none (fail closed).
pub fn selector_matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let labels_ok = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let expressions_ok = selector.match_expressions.iter().flatten().all(|e| {
        let values = e.values.as_deref().unwrap_or_default();
        match e.operator.as_str() {
            "In" => labels.get(&e.key).is_some_and(|v| values.contains(v)),
            "NotIn" => labels.get(&e.key).is_none_or(|v| !values.contains(v)),
            "Exists" => labels.contains_key(&e.key),
            "DoesNotExist" => !labels.contains_key(&e.key),
            _ => false,
        }
    });
    labels_ok && expressions_ok
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: Some(values.iter().map(|v| (*v).to_owned()).collect()),
        }
    }

    #[test]
    fn match_labels_and_expressions() {
        let pod = labels(&[("agentgate.dev/agent", "claude"), ("team", "payments")]);
        let sel = |ml: &[(&str, &str)], me: Vec<LabelSelectorRequirement>| LabelSelector {
            match_labels: Some(labels(ml)),
            match_expressions: Some(me),
        };
        assert!(selector_matches(&LabelSelector::default(), &pod));
        assert!(selector_matches(
            &sel(&[("agentgate.dev/agent", "claude")], vec![]),
            &pod
        ));
        assert!(!selector_matches(
            &sel(&[("agentgate.dev/agent", "gpt")], vec![]),
            &pod
        ));
        assert!(selector_matches(
            &sel(&[], vec![expr("team", "In", &["payments", "orders"])]),
            &pod
        ));
        assert!(!selector_matches(
            &sel(&[], vec![expr("team", "NotIn", &["payments"])]),
            &pod
        ));
        assert!(selector_matches(
            &sel(&[], vec![expr("env", "NotIn", &["prod"])]),
            &pod
        ));
        assert!(selector_matches(
            &sel(&[], vec![expr("team", "Exists", &[])]),
            &pod
        ));
        assert!(!selector_matches(
            &sel(&[], vec![expr("team", "DoesNotExist", &[])]),
            &pod
        ));
        assert!(!selector_matches(
            &sel(&[], vec![expr("team", "Bogus", &[])]),
            &pod
        ));
    }
}
