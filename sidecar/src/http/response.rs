//! Masking a response before the agent sees it: its headers, and its body as what it
//! is — a JSON document with the policy's structure rules, a stream line by line, text
//! through the detectors — or not at all: what cannot be masked is refused.

use std::sync::Arc;

use agentgate_crds::Protocol;
use agentgate_policy::EffectiveLimits;
use agentgate_policy::masking::{MaskReport, MaskStream, MaskingProfile};
use bytes::Bytes;
use http::Response;
use http::header::{self, HeaderMap, HeaderValue};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;

use super::body::{Body, BodyMasks, MaskedBody, Mode};
use super::upstream::CredentialMask;
use super::{Front, forward, headers};
use crate::pipeline::{Completion, Record};
use crate::refusal::Refusal;

/// What a response is masked with: the policy's profile, and the injected credential.
pub(super) struct Masks {
    pub(super) profile: Arc<MaskingProfile>,
    pub(super) credential: Arc<CredentialMask>,
}

impl Front {
    /// Refuses a response that cannot be passed on, counted by why.
    fn refuse_response(
        &self,
        record: Record,
        protocol: Protocol,
        refusal: Refusal,
    ) -> Response<Body> {
        self.gateway
            .metrics
            .responses_refused
            .with_label_values(&[refusal.kind()])
            .inc();
        self.refuse(record, protocol, refusal)
    }

    /// Chooses how to mask the response, and wraps or buffers its body accordingly.
    pub(super) async fn masked_response(
        self: &Arc<Self>,
        record: Record,
        protocol: Protocol,
        mut response: Response<Incoming>,
        masks: Masks,
        limits: EffectiveLimits,
        is_watch: bool,
    ) -> Response<Body> {
        // The codings are checked before the hop-by-hop headers (Transfer-Encoding
        // among them) are gone.
        if let Err(reason) = headers::check_codings(response.headers()) {
            return self.refuse_response(record, protocol, Refusal::Unmaskable(reason));
        }
        forward::strip_hop_by_hop(response.headers_mut(), false);
        let Masks {
            profile: masking,
            credential,
        } = masks;
        let (mut parts, body) = response.into_parts();
        // Counted with the body's masking, in the completion record and the metrics.
        let header_report = mask_headers(&mut parts.headers, &masking, &credential, &record);
        let mode = match body_mode(&masking, &parts.headers, is_watch, protocol) {
            Ok(mode) => mode,
            Err(reason) => {
                return self.refuse_response(record, protocol, Refusal::Unmaskable(reason));
            }
        };
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if let (Some(limit), Some(length)) = (limits.max_response_bytes, declared)
            && length > limit
        {
            let reason = format!(
                "the response ({length} bytes) exceeds limits.maxResponseBytes ({limit} bytes)"
            );
            return self.refuse_response(record, protocol, Refusal::TooLarge(reason));
        }
        let status = parts.status;
        let Some(mode) = mode else {
            // A whole JSON document, masked with its structure.
            let cap = limits.max_response_bytes.unwrap_or(self.max_buffered_bytes);
            let bytes = match Limited::new(body, usize::try_from(cap).unwrap_or(usize::MAX))
                .collect()
                .await
            {
                Ok(collected) => collected.to_bytes(),
                Err(e) => {
                    let reason = format!(
                        "the response could not be read whole for masking (limit {cap} bytes): {e}"
                    );
                    return self.refuse_response(record, protocol, Refusal::TooLarge(reason));
                }
            };
            let mut report = header_report;
            let masked = match serde_json::from_slice::<serde_json::Value>(&bytes) {
                Ok(mut doc) => {
                    masking.mask_json(&mut doc, &mut report);
                    doc.to_string().into_bytes()
                }
                // No body (a HEAD, a 204) has nothing to mask.
                Err(_) if bytes.trim_ascii().is_empty() => bytes.to_vec(),
                // Labelled JSON but not JSON: the structure rules cannot apply, and the
                // text detectors alone are not what the policy asked for.
                Err(e) => {
                    let reason = format!(
                        "the response is labelled JSON but does not parse as JSON ({e}), so it cannot be masked"
                    );
                    return self.refuse_response(record, protocol, Refusal::Unmaskable(reason));
                }
            };
            let masked = Bytes::from(credential.mask(&masked, &mut report).into_owned());
            parts
                .headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(masked.len()));
            self.gateway.complete(
                record,
                Some(status),
                Completion {
                    bytes: masked.len() as u64,
                    report,
                    error: None,
                },
            );
            return Response::from_parts(
                parts,
                Full::new(masked).map_err(|never| match never {}).boxed(),
            );
        };
        // Masking changes lengths (of the credential too, in any mode).
        if !matches!(mode, Mode::Pass) || !credential.is_empty() {
            parts.headers.remove(header::CONTENT_LENGTH);
        }
        let gw = self.gateway.clone();
        let max_line =
            usize::try_from(limits.max_response_bytes.unwrap_or(self.max_buffered_bytes))
                .unwrap_or(usize::MAX);
        let body = MaskedBody::new(
            body,
            mode,
            BodyMasks {
                profile: masking,
                credential,
                headers: header_report,
            },
            limits.max_response_bytes,
            max_line,
            move |done| gw.complete(record, Some(status), done),
        );
        Response::from_parts(parts, body.boxed())
    }
}

/// Masks response header values (a `Location` can carry a SAS token, a `Set-Cookie` a
/// session), dropping any value the masking turns into something not sendable.
///
/// Headers that carry credentials (`Set-Cookie`, `X-Api-Key`, the Connection's own
/// credential header, …) are masked whatever the policy masks, and so is any copy of the
/// injected credential: the agent is never to hold a credential.
fn mask_headers(
    headers: &mut HeaderMap,
    masking: &MaskingProfile,
    credential: &CredentialMask,
    record: &Record,
) -> MaskReport {
    let mut report = MaskReport::default();
    for (name, value) in headers.iter_mut() {
        if headers::is_credential_response_header(name, &credential.header) {
            *value = HeaderValue::from_static("[masked:credential-header]");
            report.add("credential-header");
            continue;
        }
        let mut masked = credential.mask(value.as_bytes(), &mut report).into_owned();
        if !masking.is_empty()
            && let std::borrow::Cow::Owned(m) = masking.mask_bytes(&masked, &mut report)
        {
            masked = m;
        }
        if masked != value.as_bytes() {
            *value = HeaderValue::from_bytes(&masked)
                .unwrap_or_else(|_| HeaderValue::from_static("[masked]"));
        }
    }
    if report.total() > 0 {
        tracing::debug!(request_id = %record.event.request_id, masked = report.total(), "response headers masked");
    }
    report
}

/// How a response body is masked: `Ok(None)` means "buffer the whole JSON document";
/// an error means it cannot be masked and must not be passed on.
///
/// A body is masked as what it is or not passed on: JSON with the policy's structure
/// rules (as a document, or line by line for watch streams however the request spelled
/// watch), text through the detectors. A structured format the structure rules cannot
/// read (YAML, CBOR, protobuf, …) is refused rather than masked as text, and on a
/// kubernetes Connection, which always asks for JSON, so is anything else that is not
/// text.
fn body_mode(
    masking: &MaskingProfile,
    headers: &HeaderMap,
    is_watch: bool,
    protocol: Protocol,
) -> Result<Option<Mode>, String> {
    if masking.is_empty() {
        return Ok(Some(Mode::Pass));
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let media = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned();
    let json = media.contains("json");
    let watch = is_watch || content_type.contains("stream=watch");
    let streaming = watch || media == "text/event-stream";
    let unmaskable = || {
        Err(format!(
            "the response's content type {content_type:?} cannot be masked (ask for JSON)"
        ))
    };
    let structured = ["yaml", "cbor", "protobuf", "msgpack", "bson", "avro"]
        .iter()
        .any(|f| media.contains(f));
    if !json && structured && (masking.needs_json_structure() || protocol == Protocol::Kubernetes) {
        return unmaskable();
    }
    if watch && !json && protocol == Protocol::Kubernetes {
        // A watch is only ever asked for as JSON.
        return unmaskable();
    }
    Ok(match () {
        _ if streaming && json && masking.needs_json_structure() => {
            Some(Mode::JsonLines(Vec::new()))
        }
        _ if streaming => Some(Mode::Text(MaskStream::new())),
        _ if json && masking.needs_json_structure() => None,
        _ if media.is_empty()
            || json
            || media.starts_with("text/")
            || media.contains("xml")
            // Text, so the detectors read it; reached only when no structure rule applies.
            || media.contains("yaml")
            || media.contains("x-www-form-urlencoded") =>
        {
            Some(Mode::Text(MaskStream::new()))
        }
        _ => return unmaskable(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_masked_as_what_they_are_or_refused() {
        use agentgate_crds::{DetectorSet, Masking};
        let profile = |sets: Vec<DetectorSet>| {
            MaskingProfile::compile(
                &Masking {
                    detectors: sets,
                    ..Default::default()
                },
                b"k",
            )
            .unwrap()
        };
        let structured = profile(vec![DetectorSet::Secrets]);
        let text_only = profile(vec![DetectorSet::Pii]);
        let ct = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_str(v).unwrap());
            h
        };
        let mode = |p: &MaskingProfile, v: &str, watch: bool, proto: Protocol| {
            body_mode(p, &ct(v), watch, proto).map(|m| match m {
                None => "document",
                Some(Mode::Pass) => "pass",
                Some(Mode::Text(_)) => "text",
                Some(Mode::JsonLines(_)) => "json-lines",
            })
        };
        use Protocol::{Http, Kubernetes};
        assert_eq!(
            mode(&structured, "application/json", false, Kubernetes),
            Ok("document")
        );
        assert_eq!(
            mode(&structured, "application/json", true, Kubernetes),
            Ok("json-lines")
        );
        assert_eq!(
            mode(
                &structured,
                "application/json;stream=watch",
                false,
                Kubernetes
            ),
            Ok("json-lines"),
            "a stream the classifier did not see is still masked event by event"
        );
        for refused in [
            "application/yaml",
            "application/vnd.kubernetes.protobuf",
            "application/cbor",
            "application/vnd.kubernetes.protobuf;stream=watch",
        ] {
            assert!(
                mode(&structured, refused, false, Kubernetes).is_err(),
                "{refused}"
            );
            assert!(
                mode(&structured, refused, false, Http).is_err(),
                "{refused}"
            );
            assert!(
                mode(&text_only, refused, false, Kubernetes).is_err(),
                "{refused}"
            );
        }
        assert!(
            mode(&structured, "text/plain", true, Kubernetes).is_err(),
            "a watch is JSON"
        );
        assert_eq!(
            mode(&text_only, "application/yaml", false, Http),
            Ok("text")
        );
        assert_eq!(
            mode(&structured, "text/plain", false, Kubernetes),
            Ok("text")
        );
        assert_eq!(
            mode(&structured, "text/event-stream", false, Kubernetes),
            Ok("text")
        );
        assert_eq!(
            mode(&structured, "application/xml", false, Http),
            Ok("text")
        );
        assert!(mode(&structured, "application/octet-stream", false, Http).is_err());
        assert_eq!(
            mode(
                &MaskingProfile::none(),
                "application/octet-stream",
                false,
                Http
            ),
            Ok("pass")
        );
    }
}
