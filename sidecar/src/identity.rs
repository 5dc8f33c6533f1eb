//! Validation of the launching user's OIDC/JWT token: signature against the issuer's
//! JWKS (OIDC discovery, cached, refreshed on an unknown `kid` at most every
//! [`REFRESH_MIN_INTERVAL`]), `iss`, `aud`, `exp`/`nbf` with [`LEEWAY_SECS`] of skew,
//! `kid` required, and the algorithm taken from the key — never from the token, so
//! neither `none` nor an HMAC-with-the-public-key token can pass.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use agentgate_crds::IdentitySpec;
use agentgate_policy::Identity;
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;
use tokio::sync::Mutex;

use crate::tls::HttpClient;

/// Clock skew tolerated on `exp` and `nbf`.
pub const LEEWAY_SECS: u64 = 30;
/// An unknown `kid` refreshes an issuer's keys at most this often.
pub const REFRESH_MIN_INTERVAL: Duration = Duration::from_secs(30);
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_DOCUMENT_BYTES: usize = 1 << 20;
const MAX_KEYS: usize = 100;

/// Why a token was refused. [`IdentityError::reason`] is the metric label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// Not a JWT.
    #[error("the token is not a well-formed JWT")]
    Malformed,
    /// No `kid` in the header.
    #[error("the token has no `kid` header; the key that signed it cannot be chosen")]
    MissingKid,
    /// `iss` is not one the policies trust.
    #[error("the token's issuer {0:?} is not trusted by any policy for this connection")]
    UntrustedIssuer(String),
    /// No key with the token's `kid`.
    #[error("the issuer has no key {0:?}")]
    UnknownKey(String),
    /// The header's `alg` is not the key's algorithm (or the key is symmetric).
    #[error("the token's algorithm does not match its key's")]
    AlgorithmMismatch,
    /// `exp` has passed.
    #[error("the token has expired; get a fresh one")]
    Expired,
    /// `nbf` is in the future.
    #[error("the token is not valid yet")]
    NotYetValid,
    /// `aud` is not accepted.
    #[error("the token's audience is not one this connection accepts")]
    WrongAudience,
    /// The signature does not verify, or a required claim is missing or wrong.
    #[error("the token is invalid: {0}")]
    Invalid(String),
    /// The issuer's discovery document or keys could not be fetched, and none are cached.
    #[error("the identity provider could not be reached to check the token: {0}")]
    ProviderUnreachable(String),
}

impl IdentityError {
    /// A bounded label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            IdentityError::Malformed => "malformed",
            IdentityError::MissingKid => "missing_kid",
            IdentityError::UntrustedIssuer(_) => "untrusted_issuer",
            IdentityError::UnknownKey(_) => "unknown_kid",
            IdentityError::AlgorithmMismatch => "algorithm_mismatch",
            IdentityError::Expired => "expired",
            IdentityError::NotYetValid => "not_yet_valid",
            IdentityError::WrongAudience => "wrong_audience",
            IdentityError::Invalid(_) => "invalid",
            IdentityError::ProviderUnreachable(_) => "provider_unreachable",
        }
    }
}

#[derive(Debug)]
struct IssuerKeys {
    keys: Option<JwkSet>,
    last_fetch: Option<Instant>,
}

/// Validates tokens, keeping each issuer's keys.
#[derive(Debug)]
pub struct IdentityValidator {
    client: HttpClient,
    issuers: Mutex<HashMap<String, IssuerKeys>>,
    /// Tokens already validated, by a hash of the token and the settings that accepted
    /// it, until the earlier of their `exp` and [`CACHE_TTL`]: an agent sends the same
    /// token on every request, and checking a signature costs more than the rest of
    /// the pipeline.
    validated: std::sync::Mutex<HashMap<[u8; 32], (Identity, Instant)>>,
}

/// How long a validated token is trusted without checking it again (bounded, so a key
/// the issuer withdraws stops being honoured soon).
pub const CACHE_TTL: Duration = Duration::from_secs(60);
const CACHE_CAPACITY: usize = 4096;

impl IdentityValidator {
    /// A validator that fetches discovery documents and keys with `client`.
    pub fn new(client: HttpClient) -> Self {
        Self {
            client,
            issuers: Mutex::new(HashMap::new()),
            validated: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// Validates `token` against the identity settings of the policies that govern the
    /// connection; the first setting it satisfies gives the groups claim.
    pub async fn validate(
        &self,
        token: &str,
        accepted: &[IdentitySpec],
    ) -> Result<Identity, IdentityError> {
        let cache_key = cache_key(token, accepted);
        let now = Instant::now();
        {
            let cache = self
                .validated
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some((identity, until)) = cache.get(&cache_key)
                && *until > now
            {
                return Ok(identity.clone());
            }
        }
        let (identity, expires_in) = self.validate_uncached(token, accepted).await?;
        let mut cache = self
            .validated
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if cache.len() >= CACHE_CAPACITY {
            cache.retain(|_, (_, until)| *until > now);
            if cache.len() >= CACHE_CAPACITY {
                cache.clear();
            }
        }
        cache.insert(
            cache_key,
            (identity.clone(), now + expires_in.min(CACHE_TTL)),
        );
        Ok(identity)
    }

    /// Validates `token` fully; returns the identity and how long until it expires.
    async fn validate_uncached(
        &self,
        token: &str,
        accepted: &[IdentitySpec],
    ) -> Result<(Identity, Duration), IdentityError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| IdentityError::Malformed)?;
        let kid = header.kid.clone().ok_or(IdentityError::MissingKid)?;
        let issuer = unverified_issuer(token)?;
        let specs: Vec<&IdentitySpec> = accepted.iter().filter(|s| s.issuer == issuer).collect();
        if specs.is_empty() {
            return Err(IdentityError::UntrustedIssuer(issuer));
        }
        let jwk = self.key(&issuer, &kid).await?;
        let algorithm = key_algorithm(&jwk).ok_or(IdentityError::AlgorithmMismatch)?;
        if header.alg != algorithm {
            return Err(IdentityError::AlgorithmMismatch);
        }
        let key = DecodingKey::from_jwk(&jwk).map_err(|e| IdentityError::Invalid(e.to_string()))?;
        let mut last_error = IdentityError::WrongAudience;
        for spec in specs {
            let mut validation = Validation::new(algorithm);
            validation.set_issuer(&[&issuer]);
            validation.set_audience(&spec.audiences);
            validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
            validation.leeway = LEEWAY_SECS;
            validation.validate_nbf = true;
            match jsonwebtoken::decode::<Value>(token, &key, &validation) {
                Ok(data) => {
                    let exp = data.claims["exp"].as_u64().unwrap_or_default();
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap_or_default()
                        .as_secs();
                    let expires_in = Duration::from_secs(exp.saturating_sub(now));
                    return Ok((
                        identity_from_claims(&issuer, &data.claims, &spec.groups_claim),
                        expires_in,
                    ));
                }
                Err(e) => last_error = map_jwt_error(&e),
            }
        }
        Err(last_error)
    }

    /// The key `kid` of `issuer`, refreshing the issuer's keys when it is unknown (at most
    /// every [`REFRESH_MIN_INTERVAL`], so a flood of bad `kid`s cannot flood the issuer).
    async fn key(&self, issuer: &str, kid: &str) -> Result<Jwk, IdentityError> {
        let mut issuers = self.issuers.lock().await;
        let entry = issuers.entry(issuer.to_owned()).or_insert(IssuerKeys {
            keys: None,
            last_fetch: None,
        });
        if let Some(jwk) = entry.keys.as_ref().and_then(|k| k.find(kid)) {
            return Ok(jwk.clone());
        }
        let may_refresh = entry
            .last_fetch
            .is_none_or(|t| t.elapsed() >= REFRESH_MIN_INTERVAL);
        if !may_refresh {
            return Err(IdentityError::UnknownKey(kid.to_owned()));
        }
        entry.last_fetch = Some(Instant::now());
        match self.fetch_keys(issuer).await {
            Ok(keys) => entry.keys = Some(keys),
            Err(e) if entry.keys.is_none() => return Err(IdentityError::ProviderUnreachable(e)),
            Err(e) => {
                tracing::warn!(issuer, error = %e, "refreshing the issuer's keys failed; keeping the cached ones")
            }
        }
        entry
            .keys
            .as_ref()
            .and_then(|k| k.find(kid))
            .cloned()
            .ok_or_else(|| IdentityError::UnknownKey(kid.to_owned()))
    }

    async fn fetch_keys(&self, issuer: &str) -> Result<JwkSet, String> {
        let discovery = format!(
            "{}/.well-known/openid-configuration",
            issuer.trim_end_matches('/')
        );
        let document: Value = self.get_json(&discovery).await?;
        let jwks_uri = document["jwks_uri"]
            .as_str()
            .ok_or("the discovery document has no jwks_uri")?;
        if !jwks_uri.starts_with("https://") {
            return Err(format!("jwks_uri {jwks_uri:?} is not https"));
        }
        let keys: JwkSet = serde_json::from_value(self.get_json(jwks_uri).await?)
            .map_err(|e| format!("bad JWKS: {e}"))?;
        if keys.keys.len() > MAX_KEYS {
            return Err(format!(
                "the JWKS has {} keys, more than {MAX_KEYS}",
                keys.keys.len()
            ));
        }
        Ok(keys)
    }

    async fn get_json(&self, url: &str) -> Result<Value, String> {
        let request = http::Request::get(url)
            .header(http::header::ACCEPT, "application/json")
            .body(
                Full::new(Bytes::new())
                    .map_err(|never| match never {})
                    .boxed(),
            )
            .map_err(|e| format!("{url}: {e}"))?;
        let fetch = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| format!("{url}: {e}"))?;
            if !response.status().is_success() {
                return Err(format!("{url}: HTTP {}", response.status()));
            }
            let body = Limited::new(response.into_body(), MAX_DOCUMENT_BYTES)
                .collect()
                .await
                .map_err(|e| format!("{url}: {e}"))?
                .to_bytes();
            serde_json::from_slice(&body).map_err(|e| format!("{url}: not JSON: {e}"))
        };
        tokio::time::timeout(FETCH_TIMEOUT, fetch)
            .await
            .map_err(|_| format!("{url}: timed out"))?
    }
}

/// The cache key of a token under the identity settings that judged it.
fn cache_key(token: &str, accepted: &[IdentitySpec]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(token.as_bytes());
    for spec in accepted {
        h.update([0]);
        h.update(spec.issuer.as_bytes());
        h.update([0]);
        h.update(spec.groups_claim.as_bytes());
        for audience in &spec.audiences {
            h.update([1]);
            h.update(audience.as_bytes());
        }
    }
    h.finalize().into()
}

/// The `iss` claim, read before the signature is checked — only to choose which issuer's
/// keys check it.
fn unverified_issuer(token: &str) -> Result<String, IdentityError> {
    let payload = token.split('.').nth(1).ok_or(IdentityError::Malformed)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| IdentityError::Malformed)?;
    let claims: Value = serde_json::from_slice(&bytes).map_err(|_| IdentityError::Malformed)?;
    claims["iss"]
        .as_str()
        .map(str::to_owned)
        .ok_or(IdentityError::Invalid("no iss claim".into()))
}

/// The algorithm a key is for: its `alg`, or the one its type implies. Symmetric keys
/// have none: a JWKS is public, so an HMAC key in it proves nothing.
fn key_algorithm(jwk: &Jwk) -> Option<Algorithm> {
    let from_alg = |alg: KeyAlgorithm| match alg {
        KeyAlgorithm::RS256 => Some(Algorithm::RS256),
        KeyAlgorithm::RS384 => Some(Algorithm::RS384),
        KeyAlgorithm::RS512 => Some(Algorithm::RS512),
        KeyAlgorithm::PS256 => Some(Algorithm::PS256),
        KeyAlgorithm::PS384 => Some(Algorithm::PS384),
        KeyAlgorithm::PS512 => Some(Algorithm::PS512),
        KeyAlgorithm::ES256 => Some(Algorithm::ES256),
        KeyAlgorithm::ES384 => Some(Algorithm::ES384),
        KeyAlgorithm::EdDSA => Some(Algorithm::EdDSA),
        _ => None,
    };
    match (&jwk.algorithm, jwk.common.key_algorithm) {
        (AlgorithmParameters::OctetKey(_), _) => None,
        (_, Some(alg)) => from_alg(alg),
        (AlgorithmParameters::RSA(_), None) => Some(Algorithm::RS256),
        (AlgorithmParameters::EllipticCurve(ec), None) => match ec.curve {
            EllipticCurve::P256 => Some(Algorithm::ES256),
            EllipticCurve::P384 => Some(Algorithm::ES384),
            _ => None,
        },
        (AlgorithmParameters::OctetKeyPair(_), None) => Some(Algorithm::EdDSA),
        _ => None,
    }
}

fn map_jwt_error(e: &jsonwebtoken::errors::Error) -> IdentityError {
    use jsonwebtoken::errors::ErrorKind;
    match e.kind() {
        ErrorKind::ExpiredSignature => IdentityError::Expired,
        ErrorKind::ImmatureSignature => IdentityError::NotYetValid,
        ErrorKind::InvalidAudience => IdentityError::WrongAudience,
        ErrorKind::InvalidAlgorithm => IdentityError::AlgorithmMismatch,
        other => IdentityError::Invalid(format!("{other:?}")),
    }
}

fn identity_from_claims(issuer: &str, claims: &Value, groups_claim: &str) -> Identity {
    let text = |key: &str| claims[key].as_str().map(str::to_owned);
    let groups = match &claims[groups_claim] {
        Value::Array(items) => items
            .iter()
            .filter_map(|g| g.as_str().map(str::to_owned))
            .collect(),
        Value::String(g) => vec![g.clone()],
        _ => Vec::new(),
    };
    Identity {
        issuer: issuer.to_owned(),
        subject: text("sub").unwrap_or_default(),
        email: text("email")
            .or_else(|| text("preferred_username"))
            .or_else(|| text("upn")),
        groups,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(audience: &str) -> IdentitySpec {
        IdentitySpec {
            issuer: "https://issuer.example".into(),
            audiences: vec![audience.into()],
            groups_claim: "groups".into(),
            required: true,
        }
    }

    #[test]
    fn a_cached_validation_is_bound_to_the_token_and_the_settings() {
        let a = cache_key("token-1", &[spec("api://a")]);
        assert_eq!(a, cache_key("token-1", &[spec("api://a")]));
        assert_ne!(a, cache_key("token-2", &[spec("api://a")]), "another token");
        assert_ne!(
            a,
            cache_key("token-1", &[spec("api://b")]),
            "a policy that accepts another audience"
        );
    }
}
