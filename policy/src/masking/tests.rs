use agentgate_crds::{DetectorSet, MaskPattern, Masking, Replacement};
use proptest::prelude::*;
use serde_json::json;

use super::*;

fn profile(sets: &[DetectorSet]) -> MaskingProfile {
    MaskingProfile::compile(
        &Masking {
            detectors: sets.to_vec(),
            ..Default::default()
        },
        b"test-key",
    )
    .expect("compiles")
}

fn all() -> MaskingProfile {
    profile(&[
        DetectorSet::Secrets,
        DetectorSet::Credentials,
        DetectorSet::Pii,
    ])
}

fn mask(p: &MaskingProfile, text: &str) -> (String, MaskReport) {
    let mut report = MaskReport::default();
    let out =
        String::from_utf8(p.mask_bytes(text.as_bytes(), &mut report).into_owned()).expect("utf-8");
    (out, report)
}

const PEM: &str = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gun\nVTLw7onLRnrq0/IzW7yWR7QkrmBL7jTKEn5u+qKhbwKfBstIs+bMY2Zkp18gnTxK\n-----END RSA PRIVATE KEY-----";
const JWT: &str = "eyJhbGciOiJSUzI1NiIsImtpZCI6ImFiYyJ9.eyJzdWIiOiJ1LTEyMyIsImF1ZCI6ImFnZW50Z2F0ZSJ9.c2lnbmF0dXJlLWJ5dGVzLWhlcmU";

/// (detector, text containing a secret, the secret) — each must be masked.
fn true_positives() -> Vec<(&'static str, String, &'static str)> {
    let storage_key =
        "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
    vec![
        ("private-key", format!("key:\n{PEM}\nthanks"), "MIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gun"),
        ("jwt", format!("token {JWT} end"), JWT),
        ("azure-storage-key", format!("DefaultEndpointsProtocol=https;AccountName=acct;AccountKey={storage_key};EndpointSuffix=core.windows.net"), storage_key),
        ("azure-storage-key", format!("{{\"key1\": \"{storage_key}\"}}"), storage_key),
        ("azure-storage-key", storage_key.to_owned(), storage_key),
        ("azure-sas-signature", "https://acct.blob.core.windows.net/c/b?sv=2022-11-02&sig=Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5MA%3D%3D&se=2030".into(), "Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5MA%3D%3D"),
        ("connection-string-password", "Server=db;Database=orders;User Id=app;Password=Hunter2Secret!;".into(), "Hunter2Secret!"),
        ("url-password", "postgres://app:s3cr3t-pw@db:5432/orders".into(), "s3cr3t-pw"),
        ("aws-access-key-id", "id=AKIAIOSFODNN7EXAMPLE x".into(), "AKIAIOSFODNN7EXAMPLE"),
        ("aws-secret-access-key", "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY".into(), "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
        ("gcp-api-key", "key=AIzaSyA1234567890abcdefghijklmnopqrstuv ok".into(), "AIzaSyA1234567890abcdefghijklmnopqrstuv"),
        ("github-token", "GITHUB_TOKEN=ghp_abcdefghijklmnopqrstuvwxyz0123456789 ".into(), "ghp_abcdefghijklmnopqrstuvwxyz0123456789"),
        ("slack-token", "xoxb-123456789012-abcdefghijkl".into(), "xoxb-123456789012-abcdefghijkl"),
        ("anthropic-api-key", "ANTHROPIC_API_KEY=sk-ant-api03-abcdefghijklmnopqrstuvwxyz".into(), "sk-ant-api03-abcdefghijklmnopqrstuvwxyz"),
        ("bearer-token", "Authorization: Bearer abcdefghijklmnop.qrstuvwx".into(), "abcdefghijklmnop.qrstuvwx"),
        ("password-field", "login with password: CorrectHorse9".into(), "CorrectHorse9"),
        ("credential-field", r#"{"clientSecret": "abc\"def-123", "secretName": "tls-cert"}"#.into(), r#"abc\"def-123"#),
        ("email", "contact jane.doe@example.co.uk today".into(), "jane.doe@example.co.uk"),
        ("credit-card", "card 4111 1111 1111 1111 exp".into(), "4111 1111 1111 1111"),
        ("iban", "pay to GB82 WEST 1234 5698 7654 32 now".into(), "GB82 WEST 1234 5698 7654 32"),
        ("us-ssn", "ssn 123-45-6789.".into(), "123-45-6789"),
        ("phone", "call +1 415-555-0132 or (415) 555-0133".into(), "415-555-0132"),
    ]
}

#[test]
fn every_detector_finds_its_secret() {
    let p = all();
    for (detector, text, secret) in true_positives() {
        let (out, report) = mask(&p, &text);
        assert!(
            !out.contains(secret),
            "{detector}: {secret} survived in {out}"
        );
        assert!(
            report.counts().contains_key(detector),
            "{detector} not reported for {text}: {report:?}"
        );
    }
}

#[test]
fn lookalikes_are_left_alone() {
    let p = all();
    for text in [
        "card 4111 1111 1111 1112 fails Luhn",
        "GB82 WEST 1234 5698 7654 33 fails mod 97",
        "000-12-3456 and 666-12-3456 and 900-12-3456 are not SSNs",
        "version 1.2.3 build 2024-01-02",
        r#"{"secretName": "tls-cert", "tokenType": "Bearer", "passwordPolicy": {"min": 8}}"#,
        "the word password alone",
        "user@localhost has no domain",
        "eyJnotajwt",
        "sk-short",
        "AKIA123",
    ] {
        let (out, report) = mask(&p, text);
        assert_eq!(out, text, "{text} was changed: {report:?}");
    }
}

#[test]
fn replacement_modes() {
    let text = "contact jane.doe@example.com";
    let with = |replacement| {
        MaskingProfile::compile(
            &Masking {
                detectors: vec![DetectorSet::Pii],
                replacement,
                ..Default::default()
            },
            b"k1",
        )
        .expect("compiles")
    };
    assert_eq!(
        mask(&with(Replacement::Redact), text).0,
        "contact [masked:email]"
    );
    let hashed = mask(&with(Replacement::Hash), text).0;
    assert!(
        hashed.starts_with("contact [masked:email:")
            && hashed.len() == "contact [masked:email:]".len() + 16,
        "{hashed}"
    );
    assert_eq!(
        hashed,
        mask(&with(Replacement::Hash), text).0,
        "hashing is stable"
    );
    let other_key = MaskingProfile::compile(
        &Masking {
            detectors: vec![DetectorSet::Pii],
            replacement: Replacement::Hash,
            ..Default::default()
        },
        b"k2",
    )
    .expect("compiles");
    assert_ne!(hashed, mask(&other_key, text).0, "the hash is keyed");
    assert_eq!(
        mask(&with(Replacement::Partial), text).0,
        "contact ja****om"
    );
}

#[test]
fn custom_patterns_and_bad_ones() {
    let spec = Masking {
        patterns: vec![MaskPattern {
            name: "employee-id".into(),
            regex: r"EMP-\d{6}".into(),
        }],
        ..Default::default()
    };
    let p = MaskingProfile::compile(&spec, b"k").expect("compiles");
    assert_eq!(
        mask(&p, "owner EMP-123456.").0,
        "owner [masked:employee-id]."
    );
    let bad = Masking {
        patterns: vec![MaskPattern {
            name: "broken".into(),
            regex: "(unclosed".into(),
        }],
        ..Default::default()
    };
    let errors = MaskingProfile::compile(&bad, b"k").expect_err("bad regex");
    assert!(
        errors[0].to_string().contains("masking pattern \"broken\""),
        "{errors:?}"
    );
    let bad = Masking {
        json_paths: vec!["$..[".into()],
        ..Default::default()
    };
    assert!(matches!(
        MaskingProfile::compile(&bad, b"k").expect_err("bad path")[0],
        MaskingError::BadJsonPath { .. }
    ));
}

fn stream_chunks(p: &MaskingProfile, chunks: &[&[u8]]) -> (Vec<u8>, MaskReport, Vec<usize>) {
    let mut stream = MaskStream::new();
    let mut out = Vec::new();
    let mut report = MaskReport::default();
    let mut released = Vec::new();
    for chunk in chunks {
        stream.push(p, chunk, &mut out, &mut report);
        released.push(out.len());
    }
    stream.finish(p, &mut out, &mut report);
    (out, report, released)
}

#[test]
fn a_secret_split_across_chunks_is_masked() {
    let p = all();
    let text = format!("line one\nkey={JWT} and more\nlast");
    let whole = p
        .mask_bytes(text.as_bytes(), &mut MaskReport::default())
        .into_owned();
    for split in 1..text.len() {
        let (a, b) = text.as_bytes().split_at(split);
        let (out, report, _) = stream_chunks(&p, &[a, b]);
        assert_eq!(out, whole, "split at {split}");
        assert_eq!(report.counts().get("jwt"), Some(&1), "split at {split}");
    }
    // A private key arriving a line at a time.
    let text = format!("begin\n{PEM}\nend\n");
    let lines: Vec<&[u8]> = text.as_bytes().split_inclusive(|b| *b == b'\n').collect();
    let (out, report, _) = stream_chunks(&p, &lines);
    assert_eq!(
        String::from_utf8_lossy(&out),
        "begin\n[masked:private-key]\nend\n"
    );
    assert_eq!(report.total(), 1);
}

#[test]
fn complete_lines_are_released_at_once() {
    let p = all();
    let (out, _, released) = stream_chunks(
        &p,
        &[b"{\"type\":\"ADDED\"}\n{\"type\":", b"\"MODIFIED\"}\n"],
    );
    assert_eq!(
        released,
        vec![17, out.len()],
        "the first event must not wait for the second"
    );
    // Without a newline, output waits — but never more than the window.
    let mut stream = MaskStream::new();
    let mut out = Vec::new();
    let mut report = MaskReport::default();
    for _ in 0..100 {
        stream.push(&p, &[b'x'; 1024], &mut out, &mut report);
        assert!(
            stream.held() <= MAX_MATCH_LEN + 1024,
            "held {}",
            stream.held()
        );
    }
}

#[test]
fn json_paths_credential_keys_and_kubernetes_secrets() {
    let spec = Masking {
        detectors: vec![DetectorSet::Secrets, DetectorSet::Credentials],
        json_paths: vec!["$..connectionString".into(), "$.items[*].spec.owner".into()],
        ..Default::default()
    };
    let p = MaskingProfile::compile(&spec, b"k").expect("compiles");
    let mut doc = json!({
        "kind": "SecretList",
        "items": [{
            "metadata": { "name": "db", "annotations": {
                "kubectl.kubernetes.io/last-applied-configuration": "{\"data\":{\"password\":\"aHVudGVyMg==\"}}" } },
            "data": { "password": "aHVudGVyMg==", "username": "YWRtaW4=" },
            "spec": { "owner": { "team": "payments" } }
        }],
        "config": { "connectionString": "Server=x", "apiKey": 12345, "secretName": "tls" },
        "note": "Bearer abcdefghijklmnopqrstuvwxyz"
    });
    let mut report = MaskReport::default();
    p.mask_json(&mut doc, &mut report);
    let text = doc.to_string();
    for leaked in [
        "aHVudGVyMg==",
        "YWRtaW4=",
        "payments",
        "Server=x",
        "12345",
        "abcdefghijklmnopqrstuvwxyz",
    ] {
        assert!(!text.contains(leaked), "{leaked} leaked: {text}");
    }
    assert_eq!(
        doc["config"]["secretName"], "tls",
        "a secret's name is not a secret"
    );
    assert_eq!(report.counts().get("kubernetes-secret"), Some(&3));
    assert_eq!(report.counts().get("json-path"), Some(&2));
    // A single Secret, as `kubectl get secret -o json` returns it.
    let mut secret =
        json!({ "kind": "Secret", "apiVersion": "v1", "data": { "tls.key": "LS0tLS1CRUdJTg==" } });
    p.mask_json(&mut secret, &mut MaskReport::default());
    // The base64 of the mask text: still a valid Secret for `kubectl describe`.
    assert_eq!(
        secret["data"]["tls.key"],
        "W21hc2tlZDprdWJlcm5ldGVzLXNlY3JldF0="
    );
}

#[test]
fn secret_data_stays_base64_and_no_copy_of_it_leaks() {
    let p = MaskingProfile::compile(
        &Masking {
            detectors: vec![DetectorSet::Secrets, DetectorSet::Credentials],
            ..Default::default()
        },
        b"k",
    )
    .expect("compiles");
    let last_applied = json!({ "apiVersion": "v1", "kind": "Secret",
        "metadata": { "name": "db" }, "data": { "password": "aHVudGVyMg==" },
        "stringData": { "token": "plain-hunter2" } })
    .to_string();
    let mut secret = json!({ "kind": "Secret", "apiVersion": "v1",
        "metadata": { "name": "db", "annotations": {
            "kubectl.kubernetes.io/last-applied-configuration": last_applied.clone() } },
        "data": { "password": "aHVudGVyMg==", "username": "YWRtaW4=" } });
    let mut report = MaskReport::default();
    p.mask_json(&mut secret, &mut report);
    assert_eq!(
        secret["data"]["password"], "W21hc2tlZDprdWJlcm5ldGVzLXNlY3JldF0=",
        "a credential-named key in data is still base64 of the mask"
    );
    let copy: serde_json::Value = serde_json::from_str(
        secret["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"]
            .as_str()
            .unwrap(),
    )
    .expect("the annotation is still JSON");
    assert_eq!(copy["metadata"]["name"], "db");
    let text = secret.to_string();
    for leaked in ["aHVudGVyMg==", "YWRtaW4=", "plain-hunter2"] {
        assert!(!text.contains(leaked), "{leaked} leaked: {text}");
    }
    assert_eq!(report.counts().get("kubernetes-secret"), Some(&4));

    // A Table row (kubectl get secret) carries the metadata without `kind: Secret`.
    let mut table = json!({ "kind": "Table", "apiVersion": "meta.k8s.io/v1",
        "rows": [{ "cells": ["db", "Opaque", 2], "object": { "kind": "PartialObjectMetadata",
            "metadata": { "name": "db", "annotations": {
                "kubectl.kubernetes.io/last-applied-configuration": last_applied } } } }] });
    p.mask_json(&mut table, &mut MaskReport::default());
    assert!(!table.to_string().contains("aHVudGVyMg=="), "{table}");
    assert!(!table.to_string().contains("plain-hunter2"), "{table}");

    // A ConfigMap's copy is left as it is; one that is not JSON is replaced.
    let cm_copy = json!({ "kind": "ConfigMap", "data": { "region": "westeurope" } }).to_string();
    let mut cm = json!({ "kind": "ConfigMap", "metadata": { "annotations": {
        "kubectl.kubernetes.io/last-applied-configuration": cm_copy.clone() } } });
    p.mask_json(&mut cm, &mut MaskReport::default());
    assert_eq!(
        cm["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"],
        cm_copy.as_str()
    );
    let mut odd = json!({ "kind": "PartialObjectMetadata", "metadata": { "annotations": {
        "kubectl.kubernetes.io/last-applied-configuration": "data: {password: aHVudGVyMg==}" } } });
    p.mask_json(&mut odd, &mut MaskReport::default());
    assert!(!odd.to_string().contains("aHVudGVyMg=="), "{odd}");
}

fn secret_strategy() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(JWT.to_owned()),
        Just("jane.doe@example.com".to_owned()),
        Just("4111 1111 1111 1111".to_owned()),
        Just("ghp_abcdefghijklmnopqrstuvwxyz0123456789".to_owned()),
        Just("Password=Hunter2".to_owned()),
        Just(PEM.to_owned()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// However a body is cut into chunks, streaming masks it exactly as masking it whole
    /// does, and no embedded secret survives.
    #[test]
    fn streaming_equals_whole_body_masking(
        parts in prop::collection::vec(prop_oneof![ "[a-z =:\n]{0,40}", secret_strategy() ], 1..12),
        cuts in prop::collection::vec(0usize..2000, 0..8),
    ) {
        let p = all();
        let text = parts.join(" ");
        let whole = p.mask_bytes(text.as_bytes(), &mut MaskReport::default()).into_owned();
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (text.len() + 1)).collect();
        cuts.sort_unstable();
        let mut chunks = Vec::new();
        let mut last = 0;
        for c in cuts { chunks.push(&text.as_bytes()[last..c]); last = c; }
        chunks.push(&text.as_bytes()[last..]);
        let (out, _, _) = stream_chunks(&p, &chunks);
        prop_assert_eq!(&out, &whole);
        let out = String::from_utf8_lossy(&out);
        for secret in [JWT, "jane.doe@example.com", "4111 1111 1111 1111", "ghp_abcdefghijklmnopqrstuvwxyz0123456789", "Hunter2"] {
            prop_assert!(!out.contains(secret), "{} survived", secret);
        }
    }

    /// Masking never panics on arbitrary bytes, and its output never grows without bound.
    #[test]
    fn masking_arbitrary_bytes_is_total(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
        let p = all();
        let out = p.mask_bytes(&bytes, &mut MaskReport::default());
        prop_assert!(out.len() <= bytes.len() * 40 + 64);
    }
}
