//! The webhook's TLS: by default the operator is its own CA — it creates a CA and a
//! serving certificate, keeps them in a Secret (so every replica serves the same one),
//! renews them well before they expire, and publishes the CA in the webhook
//! configuration's `caBundle`. With `--webhook-certs cert-manager` it only reads the
//! Secret cert-manager maintains.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration, WebhookClientConfig,
};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// The serving certificate lives this long; it is renewed when less than a third is left.
const VALIDITY_DAYS: i64 = 90;
const RENEW_WITHIN_DAYS: i64 = 30;
const NOT_AFTER_ANNOTATION: &str = "agentgate.dev/not-after";
const HOSTS_ANNOTATION: &str = "agentgate.dev/hosts";

/// PEM material of the webhook's TLS.
#[derive(Clone)]
pub struct WebhookTls {
    /// The CA certificate (what `caBundle` carries).
    pub ca_pem: String,
    /// The serving certificate.
    pub cert_pem: String,
    /// Its private key.
    pub key_pem: String,
}

impl std::fmt::Debug for WebhookTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookTls").finish_non_exhaustive()
    }
}

/// Why TLS material could not be made or loaded.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// Certificate generation failed.
    #[error("cannot generate the webhook certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// The API server refused a call.
    #[error("{0}: {1}")]
    Api(&'static str, kube::Error),
    /// The Secret lacks a key, or holds unusable PEM.
    #[error("webhook TLS Secret: {0}")]
    Material(String),
}

/// A new CA and a serving certificate for `hosts` (DNS names or IP addresses).
pub fn generate(hosts: &[String]) -> Result<(WebhookTls, Timestamp), CertError> {
    let now = Timestamp::now();
    let not_after = now + SignedDuration::from_hours(24 * VALIDITY_DAYS);
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.distinguished_name
        .push(DnType::CommonName, "agentgate-webhook-ca");
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate()?;
    let mut leaf = CertificateParams::new(Vec::new())?;
    leaf.distinguished_name.push(
        DnType::CommonName,
        hosts.first().map_or("agentgate-webhook", String::as_str),
    );
    for host in hosts {
        leaf.subject_alt_names.push(match host.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(host.clone().try_into()?),
        });
    }
    let expiry = not_after.to_zoned(k8s_openapi::jiff::tz::TimeZone::UTC);
    leaf.not_after = rcgen::date_time_ymd(
        i32::from(expiry.year()),
        expiry.month().unsigned_abs(),
        expiry.day().unsigned_abs(),
    );
    let cert = leaf.signed_by(&key, &issuer)?;
    Ok((
        WebhookTls {
            ca_pem: ca_cert.pem(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        },
        not_after,
    ))
}

fn secret_text(secret: &Secret, key: &str) -> Result<String, CertError> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
        .ok_or_else(|| CertError::Material(format!("no key {key}")))
}

fn from_secret(secret: &Secret) -> Result<WebhookTls, CertError> {
    Ok(WebhookTls {
        ca_pem: secret_text(secret, "ca.crt")?,
        cert_pem: secret_text(secret, "tls.crt")?,
        key_pem: secret_text(secret, "tls.key")?,
    })
}

/// Whether a self-managed Secret is still good for `hosts`: it names the same hosts and
/// more than [`RENEW_WITHIN_DAYS`] are left.
fn still_good(secret: &Secret, hosts: &[String]) -> bool {
    let annotations = secret.metadata.annotations.clone().unwrap_or_default();
    let hosts_ok = annotations
        .get(HOSTS_ANNOTATION)
        .is_some_and(|h| *h == hosts.join(","));
    let time_ok = annotations
        .get(NOT_AFTER_ANNOTATION)
        .and_then(|t| t.parse::<Timestamp>().ok())
        .is_some_and(|t| t > Timestamp::now() + SignedDuration::from_hours(24 * RENEW_WITHIN_DAYS));
    hosts_ok && time_ok
}

/// The webhook's TLS material: read from the Secret, or (self-managed) created or renewed
/// there first. Concurrent replicas converge: a create that loses the race reads the
/// winner's Secret.
pub async fn ensure(
    client: &Client,
    namespace: &str,
    name: &str,
    hosts: &[String],
    self_managed: bool,
) -> Result<WebhookTls, CertError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let existing = api
        .get_opt(name)
        .await
        .map_err(|e| CertError::Api("read the webhook TLS Secret", e))?;
    if !self_managed {
        return from_secret(&existing.ok_or_else(|| {
            CertError::Material(format!("Secret {namespace}/{name} does not exist"))
        })?);
    }
    if let Some(secret) = &existing
        && still_good(secret, hosts)
        && let Ok(tls) = from_secret(secret)
    {
        return Ok(tls);
    }
    let (tls, not_after) = generate(hosts)?;
    let data = BTreeMap::from([
        (
            "ca.crt".to_owned(),
            ByteString(tls.ca_pem.clone().into_bytes()),
        ),
        (
            "tls.crt".to_owned(),
            ByteString(tls.cert_pem.clone().into_bytes()),
        ),
        (
            "tls.key".to_owned(),
            ByteString(tls.key_pem.clone().into_bytes()),
        ),
    ]);
    let mut secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            annotations: Some(BTreeMap::from([
                (NOT_AFTER_ANNOTATION.to_owned(), not_after.to_string()),
                (HOSTS_ANNOTATION.to_owned(), hosts.join(",")),
            ])),
            labels: Some(BTreeMap::from([(
                crate::reconcile::MANAGED_BY.0.into(),
                crate::reconcile::MANAGED_BY.1.into(),
            )])),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(data),
        ..Default::default()
    };
    let written = match existing {
        None => api.create(&PostParams::default(), &secret).await,
        Some(old) => {
            secret.metadata.resource_version = old.metadata.resource_version;
            api.replace(name, &PostParams::default(), &secret).await
        }
    };
    match written {
        Ok(_) => {
            tracing::info!(secret = name, not_after = %not_after, "webhook certificate issued");
            Ok(tls)
        }
        // Another replica wrote it first: use theirs.
        Err(kube::Error::Api(s)) if s.code == 409 => {
            let secret = api
                .get(name)
                .await
                .map_err(|e| CertError::Api("read the webhook TLS Secret", e))?;
            from_secret(&secret)
        }
        Err(e) => Err(CertError::Api("write the webhook TLS Secret", e)),
    }
}

/// Sets `caBundle` on every webhook of the MutatingWebhookConfiguration `mutating` and
/// the ValidatingWebhookConfiguration `validating`. Returns whether both exist; a
/// missing one is not an error (it may be installed later; the next check publishes).
pub async fn publish_ca(
    client: &Client,
    mutating: &str,
    validating: &str,
    ca_pem: &str,
) -> Result<bool, CertError> {
    let bundle = ByteString(ca_pem.as_bytes().to_vec());
    let m = publish_to(
        Api::<MutatingWebhookConfiguration>::all(client.clone()),
        mutating,
        &bundle,
        |c| {
            c.webhooks
                .iter_mut()
                .flatten()
                .map(|w| &mut w.client_config)
                .collect()
        },
    )
    .await?;
    let v = publish_to(
        Api::<ValidatingWebhookConfiguration>::all(client.clone()),
        validating,
        &bundle,
        |c| {
            c.webhooks
                .iter_mut()
                .flatten()
                .map(|w| &mut w.client_config)
                .collect()
        },
    )
    .await?;
    Ok(m && v)
}

async fn publish_to<K>(
    api: Api<K>,
    name: &str,
    bundle: &ByteString,
    configs: impl Fn(&mut K) -> Vec<&mut WebhookClientConfig>,
) -> Result<bool, CertError>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::Serialize
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let Some(mut config) = api
        .get_opt(name)
        .await
        .map_err(|e| CertError::Api("read the webhook configuration", e))?
    else {
        return Ok(false);
    };
    let mut changed = false;
    for client_config in configs(&mut config) {
        if client_config.ca_bundle.as_ref() != Some(bundle) {
            client_config.ca_bundle = Some(bundle.clone());
            changed = true;
        }
    }
    if changed {
        api.replace(name, &PostParams::default(), &config)
            .await
            .map_err(|e| CertError::Api("publish the caBundle", e))?;
        tracing::info!(webhook = name, kind = %K::kind(&()), "caBundle published");
    }
    Ok(true)
}

/// A certificate resolver whose certificate can be swapped while serving.
#[derive(Debug)]
pub struct RotatingCert(arc_swap::ArcSwap<CertifiedKey>);

impl RotatingCert {
    /// Loads `tls`.
    pub fn new(tls: &WebhookTls) -> Result<Self, CertError> {
        Ok(Self(arc_swap::ArcSwap::from_pointee(certified_key(tls)?)))
    }

    /// Serves `tls` from now on.
    pub fn swap(&self, tls: &WebhookTls) -> Result<(), CertError> {
        self.0.store(Arc::new(certified_key(tls)?));
        Ok(())
    }
}

impl ResolvesServerCert for RotatingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

fn certified_key(tls: &WebhookTls) -> Result<CertifiedKey, CertError> {
    use rustls::pki_types::pem::PemObject;
    let certs = rustls::pki_types::CertificateDer::pem_slice_iter(tls.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::Material(format!("tls.crt: {e}")))?;
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(tls.key_pem.as_bytes())
        .map_err(|e| CertError::Material(format!("tls.key: {e}")))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| CertError::Material(format!("tls.key: {e}")))?;
    Ok(CertifiedKey::new(certs, signer))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(hosts: &str, days_left: i64) -> Secret {
        let not_after = Timestamp::now() + SignedDuration::from_hours(24 * days_left);
        Secret {
            metadata: ObjectMeta {
                annotations: Some(BTreeMap::from([
                    (NOT_AFTER_ANNOTATION.to_owned(), not_after.to_string()),
                    (HOSTS_ANNOTATION.to_owned(), hosts.to_owned()),
                ])),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn certificates_are_renewed_before_they_expire_or_when_hosts_change() {
        let hosts = ["agentgate-webhook.agentgate-system.svc".to_owned()];
        assert!(still_good(&secret(&hosts[0], 60), &hosts));
        assert!(
            !still_good(&secret(&hosts[0], 10), &hosts),
            "within the renewal window"
        );
        assert!(
            !still_good(&secret("old.example", 60), &hosts),
            "the hosts changed"
        );
        assert!(
            !still_good(&Secret::default(), &hosts),
            "not ours (no annotations)"
        );
    }

    #[test]
    fn generated_material_loads_and_names_the_hosts() {
        let hosts = [
            "127.0.0.1".to_owned(),
            "agentgate-webhook.agentgate-system.svc".to_owned(),
        ];
        let (tls, not_after) = generate(&hosts).expect("generates");
        assert!(not_after > Timestamp::now() + SignedDuration::from_hours(24 * 89));
        let resolver = RotatingCert::new(&tls).expect("loads");
        let (other, _) = generate(&hosts).expect("generates");
        resolver.swap(&other).expect("swaps");
        assert!(tls.ca_pem.starts_with("-----BEGIN CERTIFICATE-----"));
    }
}
