//! Sidecar injection as a pure function: a Pod and its namespace's Bundle in, a JSON
//! patch (or the reason to leave the Pod alone) out. The webhook only wraps it.

use std::collections::BTreeSet;

use agentgate_crds::{Bundle, BundleEntry, ConnectionSpec, Protocol, SIDECAR_ADMIN_PORT};
use agentgate_policy::selector_matches;
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, DownwardAPIVolumeFile,
    DownwardAPIVolumeSource, EmptyDirVolumeSource, EnvVar, EnvVarSource, HTTPGetAction, KeyToPath,
    ObjectFieldSelector, Pod, Probe, ProjectedVolumeSource, ResourceRequirements, SeccompProfile,
    SecretVolumeSource, SecurityContext, ServiceAccountTokenProjection, Volume, VolumeMount,
    VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// The label or annotation that opts a pod in.
pub const INJECT_KEY: &str = "agentgate.dev/inject";
/// The name of the injected container.
pub const SIDECAR_NAME: &str = "agentgate-sidecar";
/// The ConfigMap the operator renders per namespace.
pub const BUNDLE_CONFIGMAP: &str = "agentgate-bundle";
/// The ConfigMap key of the agent's kubeconfig.
pub const KUBECONFIG_KEY: &str = "kubeconfig";

const BUNDLE_DIR: &str = "/etc/agentgate/bundle";
const PODINFO_DIR: &str = "/etc/agentgate/podinfo";
const CREDENTIALS_DIR: &str = "/var/run/agentgate/credentials";
/// The audit spool: an emptyDir, so the chain survives a restart of the sidecar.
const AUDIT_SPOOL_DIR: &str = "/var/run/agentgate/audit";
/// The most the audit spool may hold on the node; the sidecar refuses new requests well
/// before (`--audit-spool-max-bytes`, 256 MiB).
const AUDIT_SPOOL_SIZE: &str = "512Mi";
const KUBECONFIG_DIR: &str = "/etc/agentgate/kubeconfig";
const TOKEN_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// How the sidecar is injected.
#[derive(Debug, Clone)]
pub struct InjectConfig {
    /// The sidecar image.
    pub image: String,
    /// Its resources.
    pub resources: ResourceRequirements,
    /// The ValidatingWebhookConfiguration whose approvals webhook the sidecar checks
    /// before it trusts a decision (`--approval-webhook`).
    pub approval_webhook: String,
}

impl InjectConfig {
    /// The sidecar `image` with default resources (50m/64Mi requested, 1 CPU/256Mi limit),
    /// checking the approvals webhook of the ValidatingWebhookConfiguration
    /// `approval_webhook`.
    pub fn new(image: impl Into<String>, approval_webhook: impl Into<String>) -> Self {
        let q = |s: &str| Quantity(s.to_owned());
        Self {
            image: image.into(),
            resources: ResourceRequirements {
                requests: Some(
                    [
                        ("cpu".to_owned(), q("50m")),
                        ("memory".to_owned(), q("64Mi")),
                    ]
                    .into(),
                ),
                limits: Some(
                    [
                        ("cpu".to_owned(), q("1")),
                        ("memory".to_owned(), q("256Mi")),
                    ]
                    .into(),
                ),
                ..Default::default()
            },
            approval_webhook: approval_webhook.into(),
        }
    }
}

/// What to do with a pod.
#[derive(Debug, Clone, PartialEq)]
pub enum Injection {
    /// Leave it as it is.
    Skip {
        /// Why.
        reason: String,
    },
    /// Apply this patch.
    Patch {
        /// The JSON patch.
        patch: json_patch::Patch,
        /// What the user should know (env not overridden, no policy selects the pod).
        warnings: Vec<String>,
        /// The Connections the pod's sidecar serves.
        connections: Vec<String>,
    },
}

/// Why a pod cannot be injected.
#[derive(Debug, thiserror::Error)]
#[error("cannot inject the sidecar: {0}")]
pub struct InjectError(String);

fn opted_in(pod: &Pod) -> bool {
    let m = &pod.metadata;
    [m.labels.as_ref(), m.annotations.as_ref()]
        .into_iter()
        .flatten()
        .any(|map| map.get(INJECT_KEY).is_some_and(|v| v == "enabled"))
}

/// Decides how to inject the sidecar into `pod`, given its namespace's `bundle` (`None`
/// when the namespace has none yet).
pub fn inject(
    pod: &Pod,
    bundle: Option<&Bundle>,
    config: &InjectConfig,
) -> Result<Injection, InjectError> {
    if !opted_in(pod) {
        return Ok(Injection::Skip {
            reason: format!("not opted in ({INJECT_KEY}: enabled is not set)"),
        });
    }
    let spec = pod
        .spec
        .as_ref()
        .ok_or_else(|| InjectError("the pod has no spec".into()))?;
    if spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .any(|c| c.name == SIDECAR_NAME)
    {
        return Ok(Injection::Skip {
            reason: "already injected".into(),
        });
    }
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    let mut warnings = Vec::new();
    let connections = used_connections(bundle, &labels);
    if connections.is_empty() {
        warnings.push(
            "no Ready AgentAccessPolicy selects this pod: its agentgate sidecar denies every request".to_owned(),
        );
    }

    let mut new = pod.clone();
    let new_spec = new.spec.get_or_insert_with(Default::default);
    new_spec.automount_service_account_token = Some(false);
    // The projected token needs a service account; say "default" explicitly, as the
    // ServiceAccount admission plugin does when it runs first.
    if new_spec.service_account_name.is_none() {
        new_spec.service_account_name = Some("default".into());
    }
    let volumes = new_spec.volumes.get_or_insert_with(Vec::new);
    let mut sidecar_mounts = vec![
        mount("agentgate-bundle", BUNDLE_DIR),
        mount("agentgate-podinfo", PODINFO_DIR),
        mount("agentgate-token", TOKEN_DIR),
        VolumeMount {
            read_only: Some(false),
            ..mount("agentgate-audit", AUDIT_SPOOL_DIR)
        },
    ];
    volumes.push(configmap_volume(
        "agentgate-bundle",
        agentgate_crds::BUNDLE_KEY,
    ));
    volumes.push(Volume {
        name: "agentgate-podinfo".into(),
        downward_api: Some(DownwardAPIVolumeSource {
            items: Some(vec![DownwardAPIVolumeFile {
                path: "labels".into(),
                field_ref: Some(ObjectFieldSelector {
                    field_path: "metadata.labels".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    });
    volumes.push(token_volume());
    volumes.push(Volume {
        name: "agentgate-audit".into(),
        empty_dir: Some(EmptyDirVolumeSource {
            size_limit: Some(Quantity(AUDIT_SPOOL_SIZE.into())),
            ..Default::default()
        }),
        ..Default::default()
    });
    for (i, secret) in secrets(&connections).iter().enumerate() {
        let name = format!("agentgate-credentials-{i}");
        volumes.push(Volume {
            name: name.clone(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret.secret.clone()),
                ..Default::default()
            }),
            ..Default::default()
        });
        sidecar_mounts.push(mount(&name, &format!("{CREDENTIALS_DIR}/{}", secret.dir)));
    }
    let has_kubernetes = connections
        .iter()
        .any(|c| c.spec.protocol == Protocol::Kubernetes);
    if has_kubernetes {
        volumes.push(configmap_volume("agentgate-kubeconfig", KUBECONFIG_KEY));
    }

    let env = agent_env(&connections);
    for container in &mut new_spec.containers {
        let existing: BTreeSet<String> = container
            .env
            .iter()
            .flatten()
            .map(|e| e.name.clone())
            .collect();
        let container_env = container.env.get_or_insert_with(Vec::new);
        for var in &env {
            if existing.contains(&var.name) {
                warnings.push(format!(
                    "container {}: {} is set by the pod and was not overridden",
                    container.name, var.name
                ));
            } else {
                container_env.push(var.clone());
            }
        }
        if has_kubernetes {
            container
                .volume_mounts
                .get_or_insert_with(Vec::new)
                .push(mount("agentgate-kubeconfig", KUBECONFIG_DIR));
        }
    }
    new_spec
        .init_containers
        .get_or_insert_with(Vec::new)
        .insert(0, sidecar_container(config, sidecar_mounts));

    let before = serde_json::to_value(pod).map_err(|e| InjectError(e.to_string()))?;
    let after = serde_json::to_value(&new).map_err(|e| InjectError(e.to_string()))?;
    Ok(Injection::Patch {
        patch: json_patch::diff(&before, &after),
        warnings,
        connections: connections.iter().map(|c| c.name.clone()).collect(),
    })
}

/// The Connections used by the bundle's policies that select a pod with `labels`.
fn used_connections<'a>(
    bundle: Option<&'a Bundle>,
    labels: &std::collections::BTreeMap<String, String>,
) -> Vec<&'a BundleEntry<ConnectionSpec>> {
    let Some(bundle) = bundle else {
        return Vec::new();
    };
    let names: BTreeSet<&String> = bundle
        .policies
        .iter()
        .filter(|p| selector_matches(&p.spec.agent_selector, labels))
        .flat_map(|p| &p.spec.connections)
        .collect();
    bundle
        .connections
        .iter()
        .filter(|c| names.contains(&c.name))
        .collect()
}

struct MountedSecret {
    secret: String,
    dir: String,
}

/// The Secrets a pod's sidecar needs, each with the directory the sidecar reads it from.
fn secrets(connections: &[&BundleEntry<ConnectionSpec>]) -> Vec<MountedSecret> {
    let mut out: Vec<(String, String)> = Vec::new();
    for c in connections {
        let creds = &c.spec.credentials;
        if let Some(s) = &creds.secret_ref {
            out.push((s.name.clone(), s.name.clone()));
        }
        if let Some(sa) = &creds.service_account {
            // A token Secret the operator keeps for that service account.
            out.push((
                service_account_token_secret(&sa.name),
                format!("serviceaccount-{}", sa.name),
            ));
        }
        if let Some(ca) = c
            .spec
            .upstream
            .tls
            .as_ref()
            .and_then(|t| t.ca_secret_ref.as_ref())
        {
            out.push((ca.name.clone(), ca.name.clone()));
        }
    }
    out.sort();
    out.dedup();
    out.into_iter()
        .map(|(secret, dir)| MountedSecret { secret, dir })
        .collect()
}

/// The name of the token Secret the operator keeps for a Connection's service account.
pub fn service_account_token_secret(service_account: &str) -> String {
    format!("agentgate-sa-{service_account}")
}

/// `AGENTGATE_<CONNECTION>_URL` for every Connection, and the libpq variables and
/// `KUBECONFIG` for the first postgres and any kubernetes Connection.
fn agent_env(connections: &[&BundleEntry<ConnectionSpec>]) -> Vec<EnvVar> {
    let var = |name: String, value: String| EnvVar {
        name,
        value: Some(value),
        ..Default::default()
    };
    let mut env = Vec::new();
    if let Some(pg) = connections
        .iter()
        .find(|c| c.spec.protocol == Protocol::Postgres)
    {
        env.push(var("PGHOST".into(), "127.0.0.1".into()));
        env.push(var("PGPORT".into(), pg.spec.listen.port.to_string()));
        env.push(var(
            "PGDATABASE".into(),
            pg.spec.upstream.database.clone().unwrap_or_default(),
        ));
        // The loopback leg to the sidecar is plain; the sidecar → database leg is TLS.
        env.push(var("PGSSLMODE".into(), "disable".into()));
    }
    if connections
        .iter()
        .any(|c| c.spec.protocol == Protocol::Kubernetes)
    {
        env.push(var(
            "KUBECONFIG".into(),
            format!("{KUBECONFIG_DIR}/{KUBECONFIG_KEY}"),
        ));
    }
    for c in connections {
        let key: String = c
            .name
            .chars()
            .map(|ch| {
                if ch.is_ascii_alphanumeric() {
                    ch.to_ascii_uppercase()
                } else {
                    '_'
                }
            })
            .collect();
        let port = c.spec.listen.port;
        let url = match c.spec.protocol {
            Protocol::Postgres => {
                format!(
                    "postgres://127.0.0.1:{port}/{}?sslmode=disable",
                    c.spec.upstream.database.clone().unwrap_or_default()
                )
            }
            _ => format!("http://127.0.0.1:{port}"),
        };
        env.push(var(format!("AGENTGATE_{key}_URL"), url));
    }
    env
}

fn mount(name: &str, path: &str) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: Some(true),
        ..Default::default()
    }
}

/// The bundle ConfigMap's `key` only; optional, so a pod starts before its namespace's
/// first bundle exists (its sidecar then denies everything and is not ready).
fn configmap_volume(name: &str, key: &str) -> Volume {
    Volume {
        name: name.into(),
        config_map: Some(ConfigMapVolumeSource {
            name: BUNDLE_CONFIGMAP.into(),
            items: Some(vec![KeyToPath {
                key: key.into(),
                path: key.into(),
                ..Default::default()
            }]),
            optional: Some(true),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The pod's service-account token, for the sidecar alone (the agent's containers get
/// none: `automountServiceAccountToken` is off).
fn token_volume() -> Volume {
    Volume {
        name: "agentgate-token".into(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(vec![
                VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        path: "token".into(),
                        expiration_seconds: Some(3600),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                VolumeProjection {
                    config_map: Some(k8s_openapi::api::core::v1::ConfigMapProjection {
                        name: "kube-root-ca.crt".into(),
                        items: Some(vec![KeyToPath {
                            key: "ca.crt".into(),
                            path: "ca.crt".into(),
                            ..Default::default()
                        }]),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                VolumeProjection {
                    downward_api: Some(k8s_openapi::api::core::v1::DownwardAPIProjection {
                        items: Some(vec![DownwardAPIVolumeFile {
                            path: "namespace".into(),
                            field_ref: Some(ObjectFieldSelector {
                                field_path: "metadata.namespace".into(),
                                ..Default::default()
                            }),
                            ..Default::default()
                        }]),
                    }),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn sidecar_container(config: &InjectConfig, mounts: Vec<VolumeMount>) -> Container {
    let field = |path: &str| EnvVarSource {
        field_ref: Some(ObjectFieldSelector {
            field_path: path.into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let probe = |path: &str, period: i32, failures: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(i32::from(SIDECAR_ADMIN_PORT)),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        ..Default::default()
    };
    Container {
        name: SIDECAR_NAME.into(),
        image: Some(config.image.clone()),
        args: Some(vec![
            format!("--bundle={BUNDLE_DIR}/{}", agentgate_crds::BUNDLE_KEY),
            format!("--pod-labels={PODINFO_DIR}/labels"),
            format!("--credentials-dir={CREDENTIALS_DIR}"),
            format!("--admin-addr=0.0.0.0:{SIDECAR_ADMIN_PORT}"),
            "--audit=stdout".into(),
            format!("--audit-spool={AUDIT_SPOOL_DIR}"),
            format!("--approval-webhook={}", config.approval_webhook),
        ]),
        env: Some(vec![
            EnvVar {
                name: "AGENTGATE_POD_NAME".into(),
                value_from: Some(field("metadata.name")),
                ..Default::default()
            },
            EnvVar {
                name: "AGENTGATE_POD_NAMESPACE".into(),
                value_from: Some(field("metadata.namespace")),
                ..Default::default()
            },
            // Shown on the Approvals the sidecar creates.
            EnvVar {
                name: "AGENTGATE_SERVICE_ACCOUNT".into(),
                value_from: Some(field("spec.serviceAccountName")),
                ..Default::default()
            },
        ]),
        ports: Some(vec![ContainerPort {
            name: Some("agentgate-admin".into()),
            container_port: i32::from(SIDECAR_ADMIN_PORT),
            ..Default::default()
        }]),
        // A native sidecar: an init container that keeps running, started before the
        // agent and stopped after it.
        restart_policy: Some("Always".into()),
        startup_probe: Some(probe("/healthz", 1, 30)),
        liveness_probe: Some(probe("/healthz", 10, 3)),
        readiness_probe: Some(probe("/readyz", 5, 1)),
        resources: Some(config.resources.clone()),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(65532),
            run_as_group: Some(65532),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        volume_mounts: Some(mounts),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests;
