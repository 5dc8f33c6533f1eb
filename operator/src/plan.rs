//! What a namespace's agentgate objects should look like — which are Ready and why not,
//! and the Bundle the sidecars get — computed from what exists, without I/O. The
//! reconciler reads the namespace, calls [`plan`], and writes the result.

use std::collections::{BTreeMap, BTreeSet};

use agentgate_crds::{
    AgentAccessPolicy, AgentAccessPolicySpec, Bundle, BundleEntry, Connection, ConnectionSpec,
    Protocol,
};
use agentgate_policy::{compile, describe, selector_matches};
use kube::ResourceExt;
use sha2::{Digest, Sha256};

/// Everything of one namespace the plan depends on. Secrets appear as their key names
/// only: the operator never keeps a Secret's values.
#[derive(Debug, Clone, Default)]
pub struct NamespaceObjects {
    /// The namespace.
    pub namespace: String,
    /// Its Connections.
    pub connections: Vec<Connection>,
    /// Its policies.
    pub policies: Vec<AgentAccessPolicy>,
    /// Secret name → the keys it holds.
    pub secrets: BTreeMap<String, BTreeSet<String>>,
    /// Service account names.
    pub service_accounts: BTreeSet<String>,
    /// The labels of each pod.
    pub pods: Vec<BTreeMap<String, String>>,
}

/// Whether an object is Ready, and if not, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    /// The object's name.
    pub name: String,
    /// Its generation.
    pub generation: Option<i64>,
    /// `Ok(message)` when Ready, `Err((reason, message))` when not.
    pub ready: Result<String, (String, String)>,
}

/// A policy's readiness and counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyPlan {
    /// Readiness.
    pub readiness: Readiness,
    /// How many of its Connections exist and are Ready.
    pub connections_resolved: i32,
    /// How many pods it selects.
    pub agents_matched: i32,
}

/// The plan for one namespace.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Each Connection's readiness.
    pub connections: Vec<Readiness>,
    /// Each policy's readiness and counts.
    pub policies: Vec<PolicyPlan>,
    /// The Bundle: every Ready Connection and policy.
    pub bundle: Bundle,
    /// A kubeconfig for the agent with one context per kubernetes Connection, pointing at
    /// the sidecar; `None` when there is none.
    pub kubeconfig: Option<String>,
}

fn not_ready(reason: &str, message: String) -> Result<String, (String, String)> {
    Err((reason.to_owned(), message))
}

/// Computes the plan.
pub fn plan(objects: &NamespaceObjects) -> Plan {
    let mut connections: Vec<&Connection> = objects.connections.iter().collect();
    connections.sort_by_key(|c| c.name_any());
    let mut ports: BTreeMap<u16, String> = BTreeMap::new();
    let connection_status: Vec<Readiness> = connections
        .iter()
        .map(|c| {
            let ready = check_connection(&c.name_any(), &c.spec, objects, &mut ports);
            Readiness {
                name: c.name_any(),
                generation: c.metadata.generation,
                ready,
            }
        })
        .collect();
    let ready_connections: Vec<BundleEntry<ConnectionSpec>> = connections
        .iter()
        .zip(&connection_status)
        .filter(|(_, r)| r.ready.is_ok())
        .map(|(c, _)| BundleEntry {
            name: c.name_any(),
            generation: c.metadata.generation.unwrap_or_default(),
            spec: c.spec.clone(),
        })
        .collect();

    let mut policies: Vec<&AgentAccessPolicy> = objects.policies.iter().collect();
    policies.sort_by_key(|p| p.name_any());
    let mut ready_policies = Vec::new();
    let policy_status = policies
        .iter()
        .map(|p| {
            let entry = BundleEntry {
                name: p.name_any(),
                generation: p.metadata.generation.unwrap_or_default(),
                spec: p.spec.clone(),
            };
            let resolved = p
                .spec
                .connections
                .iter()
                .filter(|c| ready_connections.iter().any(|r| &&r.name == c))
                .count();
            let ready = check_policy(&entry, &connection_status, &ready_connections);
            if ready.is_ok() {
                ready_policies.push(entry);
            }
            PolicyPlan {
                readiness: Readiness {
                    name: p.name_any(),
                    generation: p.metadata.generation,
                    ready,
                },
                connections_resolved: i32::try_from(resolved).unwrap_or(i32::MAX),
                agents_matched: i32::try_from(
                    objects
                        .pods
                        .iter()
                        .filter(|l| selector_matches(&p.spec.agent_selector, l))
                        .count(),
                )
                .unwrap_or(i32::MAX),
            }
        })
        .collect();

    let mut bundle = Bundle {
        namespace: objects.namespace.clone(),
        hash: String::new(),
        connections: ready_connections,
        policies: ready_policies,
    };
    bundle.hash = bundle_hash(&bundle);
    let kubeconfig = agent_kubeconfig(&bundle);
    Plan {
        connections: connection_status,
        policies: policy_status,
        bundle,
        kubeconfig,
    }
}

fn check_connection(
    name: &str,
    spec: &ConnectionSpec,
    objects: &NamespaceObjects,
    ports: &mut BTreeMap<u16, String>,
) -> Result<String, (String, String)> {
    if let Some(other) = ports.get(&spec.listen.port) {
        return not_ready(
            "PortConflict",
            format!(
                "listen.port {} is already used by Connection {other}",
                spec.listen.port
            ),
        );
    }
    ports.insert(spec.listen.port, name.to_owned());
    let has = |secret: &str, key: &str| {
        objects
            .secrets
            .get(secret)
            .is_some_and(|keys| keys.contains(key))
    };
    if let Some(secret) = &spec.credentials.secret_ref {
        let Some(keys) = objects.secrets.get(&secret.name) else {
            return not_ready(
                "SecretMissing",
                format!(
                    "Secret {} (credentials.secretRef) does not exist",
                    secret.name
                ),
            );
        };
        let missing: Vec<&str> = match spec.protocol {
            Protocol::Postgres => ["username", "password"]
                .into_iter()
                .filter(|k| !keys.contains(*k))
                .collect(),
            _ if keys.contains("token") => vec![],
            _ if keys.contains("header") && keys.contains("value") => vec![],
            _ => vec!["token (or header and value)"],
        };
        if !missing.is_empty() {
            return not_ready(
                "SecretKeyMissing",
                format!("Secret {} has no key {}", secret.name, missing.join(", ")),
            );
        }
    }
    if let Some(ca) = spec
        .upstream
        .tls
        .as_ref()
        .and_then(|t| t.ca_secret_ref.as_ref())
        && !has(&ca.name, &ca.key)
    {
        return not_ready(
            "SecretKeyMissing",
            format!(
                "Secret {} has no key {} (upstream.tls.caSecretRef)",
                ca.name, ca.key
            ),
        );
    }
    if let Some(sa) = &spec.credentials.service_account
        && !objects.service_accounts.contains(&sa.name)
    {
        return not_ready(
            "ServiceAccountMissing",
            format!(
                "ServiceAccount {} (credentials.serviceAccount) does not exist",
                sa.name
            ),
        );
    }
    let entry = BundleEntry {
        name: name.to_owned(),
        generation: 0,
        spec: spec.clone(),
    };
    match compile(&[], &[entry], b"") {
        Ok(_) => Ok("the upstream's credentials are in place".to_owned()),
        Err(errors) => not_ready("Invalid", describe(&errors)),
    }
}

fn check_policy(
    policy: &BundleEntry<AgentAccessPolicySpec>,
    connections: &[Readiness],
    ready: &[BundleEntry<ConnectionSpec>],
) -> Result<String, (String, String)> {
    for name in &policy.spec.connections {
        match connections.iter().find(|c| &c.name == name) {
            None => {
                return not_ready(
                    "ConnectionMissing",
                    format!("Connection {name} does not exist"),
                );
            }
            Some(Readiness {
                ready: Err((_, why)),
                ..
            }) => {
                return not_ready(
                    "ConnectionNotReady",
                    format!("Connection {name} is not Ready: {why}"),
                );
            }
            Some(_) => {}
        }
    }
    let used: Vec<BundleEntry<ConnectionSpec>> = ready
        .iter()
        .filter(|c| policy.spec.connections.contains(&c.name))
        .cloned()
        .collect();
    match compile(std::slice::from_ref(policy), &used, b"") {
        Ok(_) => Ok(format!("compiled with {} rule(s)", policy.spec.rules.len())),
        Err(errors) => not_ready("Invalid", describe(&errors)),
    }
}

/// A stable hash of what the sidecars act on.
pub fn bundle_hash(bundle: &Bundle) -> String {
    let mut h = Sha256::new();
    h.update(serde_json::to_vec(&bundle.connections).unwrap_or_default());
    h.update(serde_json::to_vec(&bundle.policies).unwrap_or_default());
    hex::encode(h.finalize())
}

/// The agent's kubeconfig: a context per kubernetes Connection, at the sidecar's port, with
/// no credential (the sidecar holds it).
fn agent_kubeconfig(bundle: &Bundle) -> Option<String> {
    let clusters: Vec<&BundleEntry<ConnectionSpec>> = bundle
        .connections
        .iter()
        .filter(|c| c.spec.protocol == Protocol::Kubernetes)
        .collect();
    let first = clusters.first()?;
    let mut out = String::from("apiVersion: v1\nkind: Config\nclusters:\n");
    for c in &clusters {
        out.push_str(&format!(
            "- name: {}\n  cluster:\n    server: http://127.0.0.1:{}\n",
            c.name, c.spec.listen.port
        ));
    }
    out.push_str("users:\n- name: agent\n  user: {}\ncontexts:\n");
    for c in &clusters {
        out.push_str(&format!(
            "- name: {0}\n  context:\n    cluster: {0}\n    user: agent\n",
            c.name
        ));
    }
    out.push_str(&format!("current-context: {}\n", first.name));
    Some(out)
}

#[cfg(test)]
mod tests;
