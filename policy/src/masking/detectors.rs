//! The built-in detectors: regular expressions (with a checksum where the format has
//! one), each naming the capture group that holds the sensitive part.

use agentgate_crds::DetectorSet;
use regex::bytes::Regex;

/// The longest secret the streaming masker is sure to catch when it is split across
/// chunks (a 4096-bit RSA private key in PEM is about 3.3 KiB).
pub const MAX_MATCH_LEN: usize = 16 * 1024;

/// One detector: a name (reported in audit records), a regex, the capture group that
/// holds the sensitive part (0 = the whole match), and an optional checksum.
#[derive(Debug, Clone)]
pub struct Detector {
    pub(crate) name: String,
    pub(crate) regex: Regex,
    pub(crate) group: usize,
    pub(crate) validate: Option<fn(&[u8]) -> bool>,
}

impl Detector {
    pub(crate) fn new(
        name: &str,
        pattern: &str,
        group: usize,
        validate: Option<fn(&[u8]) -> bool>,
    ) -> Self {
        // The built-in patterns are constants covered by tests; a failure here is a bug.
        #[allow(clippy::expect_used)]
        // ASCII semantics (`\b`, `\d`): secrets are ASCII, and it keeps the automata small.
        let regex =
            Regex::new(&format!("(?-u){pattern}")).expect("built-in detector pattern compiles");
        Self {
            name: name.to_owned(),
            regex,
            group,
            validate,
        }
    }
}

/// JSON keys whose values are credentials: the key, lower-cased and without `_`, `-`
/// and `.`, ends with one of these.
pub(crate) const CREDENTIAL_KEY_SUFFIXES: [&str; 13] = [
    "password",
    "passwd",
    "passphrase",
    "secret",
    "token",
    "apikey",
    "privatekey",
    "connectionstring",
    "accesskey",
    "secretkey",
    "credential",
    "credentials",
    "sastoken",
];

/// Whether a JSON key names a credential (`password`, `clientSecret`, `api_key`,
/// `refresh-token`, …) — but not `secretName` or `tokenType`.
pub fn is_credential_key(key: &str) -> bool {
    let normalized: String = key
        .chars()
        .filter(|c| !matches!(c, '_' | '-' | '.'))
        .map(|c| c.to_ascii_lowercase())
        .collect();
    CREDENTIAL_KEY_SUFFIXES
        .iter()
        .any(|s| normalized.ends_with(s))
}

/// The text detectors of a built-in set.
pub fn builtin(set: DetectorSet) -> Vec<Detector> {
    match set {
        DetectorSet::Secrets => vec![
            Detector::new(
                "private-key",
                r"(?s)-----BEGIN [A-Z0-9 ]{0,40}PRIVATE KEY( BLOCK)?-----.*?-----END [A-Z0-9 ]{0,40}PRIVATE KEY( BLOCK)?-----",
                0,
                None,
            ),
            Detector::new(
                "jwt",
                r"\beyJ[A-Za-z0-9_-]{4,}\.eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*",
                0,
                None,
            ),
            Detector::new(
                "azure-storage-key",
                // A storage account key is 64 random bytes: 88 base64 characters ending
                // in `==`, found bare as well as after `AccountKey=`.
                r"(?:\A|[^A-Za-z0-9+/])([A-Za-z0-9+/]{86}==)(?:[^A-Za-z0-9+/=]|\z)",
                1,
                None,
            ),
            Detector::new(
                "azure-sas-signature",
                r"(?i)[?&;]sig=([A-Za-z0-9%+/=]{16,})",
                1,
                None,
            ),
            Detector::new(
                "connection-string-password",
                r"(?i)\b(?:password|pwd)[ \t]{0,4}=[ \t]{0,4}([^;'\x22\s]+)",
                1,
                None,
            ),
            Detector::new(
                "url-password",
                r"\b[A-Za-z][A-Za-z0-9+.-]{1,20}://[^/\s:@\x22']+:([^@\s/\x22']+)@",
                1,
                None,
            ),
            Detector::new(
                "aws-access-key-id",
                r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA)[0-9A-Z]{16}\b",
                0,
                None,
            ),
            Detector::new(
                "aws-secret-access-key",
                r"(?i)aws[_-]?secret[_-]?access[_-]?key\x22?[ \t]{0,4}[:=][ \t]{0,4}\x22?([A-Za-z0-9/+=]{40})\b",
                1,
                None,
            ),
            Detector::new("gcp-api-key", r"\bAIza[0-9A-Za-z_-]{35}\b", 0, None),
            Detector::new(
                "github-token",
                r"\b(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,})\b",
                0,
                None,
            ),
            Detector::new("slack-token", r"\bxox[abposr]-[A-Za-z0-9-]{10,}\b", 0, None),
            Detector::new(
                "slack-webhook",
                r"https://hooks\.slack\.com/services/[A-Za-z0-9/_-]{20,}",
                0,
                None,
            ),
            Detector::new("anthropic-api-key", r"\bsk-ant-[A-Za-z0-9_-]{20,}", 0, None),
            Detector::new(
                "openai-api-key",
                r"\bsk-(?:proj-)?[A-Za-z0-9_-]{32,}",
                0,
                None,
            ),
            Detector::new(
                "bearer-token",
                r"(?i)\bbearer[ \t]{1,4}([A-Za-z0-9._~+/-]{16,}=*)",
                1,
                None,
            ),
            Detector::new(
                "password-field",
                r"(?i)\b(?:password|passwd|pwd)\x22?[ \t]{0,4}[:=][ \t]{0,4}\x22?([^\x22\s,;&]+)",
                1,
                None,
            ),
        ],
        DetectorSet::Credentials => vec![Detector::new(
            "credential-field",
            // "<key>": "<value>" where the key ends in a credential word (JSON text).
            r#"(?i)"[A-Za-z0-9_.-]{0,64}(?:password|passwd|passphrase|secret|token|api[_-]?key|private[_-]?key|connection[_-]?string|access[_-]?key|secret[_-]?key|credentials?|sas[_-]?token)"[ \t]{0,8}:[ \t]{0,8}"((?:[^"\\]|\\.)+)""#,
            1,
            None,
        )],
        DetectorSet::Pii => vec![
            Detector::new(
                "email",
                r"\b[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63}){0,8}\.[A-Za-z]{2,24}\b",
                0,
                None,
            ),
            Detector::new(
                "credit-card",
                r"\b\d(?:[ -]?\d){12,18}\b",
                0,
                Some(luhn_valid),
            ),
            Detector::new(
                "iban",
                r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b",
                0,
                Some(iban_valid),
            ),
            Detector::new("us-ssn", r"\b\d{3}-\d{2}-\d{4}\b", 0, Some(ssn_valid)),
            Detector::new(
                "phone",
                r"(?:\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]\d{2,4}){2,4}|\(\d{3}\) ?\d{3}-\d{4}|\b\d{3}-\d{3}-\d{4})\b",
                0,
                None,
            ),
        ],
    }
}

fn digits(text: &[u8]) -> Vec<u32> {
    text.iter()
        .filter(|b| b.is_ascii_digit())
        .map(|b| u32::from(b - b'0'))
        .collect()
}

/// The Luhn checksum of a card number (13–19 digits).
pub fn luhn_valid(text: &[u8]) -> bool {
    let d = digits(text);
    if !(13..=19).contains(&d.len()) {
        return false;
    }
    let sum: u32 = d
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &n)| {
            if i % 2 == 1 {
                if n * 2 > 9 { n * 2 - 9 } else { n * 2 }
            } else {
                n
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// The ISO 13616 mod-97 check of an IBAN.
pub fn iban_valid(text: &[u8]) -> bool {
    let compact: Vec<u8> = text.iter().copied().filter(|b| *b != b' ').collect();
    if !(15..=34).contains(&compact.len()) {
        return false;
    }
    let (head, tail) = compact.split_at(4);
    let mut remainder: u32 = 0;
    for &b in tail.iter().chain(head) {
        let value = match b {
            b'0'..=b'9' => u32::from(b - b'0'),
            b'A'..=b'Z' => u32::from(b - b'A') + 10,
            _ => return false,
        };
        remainder = if value >= 10 {
            (remainder * 100 + value) % 97
        } else {
            (remainder * 10 + value) % 97
        };
    }
    remainder == 1
}

/// US SSN structure: area not 000, 666 or 9xx; group not 00; serial not 0000.
pub fn ssn_valid(text: &[u8]) -> bool {
    let d = digits(text);
    if d.len() != 9 {
        return false;
    }
    let area = d[0] * 100 + d[1] * 10 + d[2];
    let group = d[3] * 10 + d[4];
    let serial = d[5] * 1000 + d[6] * 100 + d[7] * 10 + d[8];
    area != 0 && area != 666 && area < 900 && group != 0 && serial != 0
}
