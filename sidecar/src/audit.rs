//! The audit trail (first cut): one JSON line per decision and per completed request, to
//! stdout or a file, hash-chained so that a removed or edited line breaks the chain.
//!
//! A request whose decision cannot be recorded is refused: nothing happens unrecorded.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Mutex;

use k8s_openapi::jiff::Timestamp;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::config::AuditTarget;

/// One audit event. Only masked data ever goes in.
#[derive(Debug, Clone, Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct AuditEvent {
    /// `decision` (before anything reaches the upstream) or `completed`.
    pub kind: &'static str,
    /// Correlates the decision and completion events of one request.
    pub request_id: String,
    /// The agent pod.
    pub pod: String,
    /// The agent pod's namespace.
    pub namespace: String,
    /// The Connection.
    pub connection: String,
    /// The validated identity (subject, e-mail, issuer), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<serde_json::Value>,
    /// What was asked: the classified request (method/verb, path/resource, …).
    pub request: serde_json::Value,
    /// `allow`, `deny`, `approve` or `error`.
    pub decision: String,
    /// The deciding rule.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// The deciding policy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// Why a request was refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Response status.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Response body bytes sent to the agent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    /// Milliseconds from arrival to the end of the response.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<f64>,
    /// Values masked, by detector.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub masked: BTreeMap<String, u64>,
    /// The Approval that held the request (its decision and outcome are on it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approval: Option<String>,
    /// SQL: rows sent to the agent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rows_returned: Option<u64>,
    /// SQL: rows the statement inserted, updated, deleted or copied in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rows_affected: Option<u64>,
    /// SQL: the statement's bind parameters, masked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Vec<String>>,
    /// Held requests: what the impact preview showed the approver (masked).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub impact: Option<agentgate_crds::Impact>,
    /// For upgraded streams (exec, port-forward): bytes relayed each way.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relayed: Option<serde_json::Value>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Envelope<'a> {
    seq: u64,
    time: String,
    prev_hash: &'a str,
    #[serde(flatten)]
    event: &'a AuditEvent,
}

/// Why an event could not be recorded.
#[derive(Debug, thiserror::Error)]
#[error("audit sink {sink} failed: {source}")]
pub struct AuditError {
    sink: String,
    #[source]
    source: std::io::Error,
}

struct Chain {
    out: Box<dyn Write + Send>,
    seq: u64,
    head: String,
}

/// The audit sink.
pub struct Audit {
    sink: String,
    chain: Mutex<Chain>,
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Audit")
            .field("sink", &self.sink)
            .finish_non_exhaustive()
    }
}

impl Audit {
    /// Opens the sink.
    pub fn open(target: &AuditTarget) -> std::io::Result<Self> {
        let (sink, out): (String, Box<dyn Write + Send>) = match target {
            AuditTarget::Stdout => ("stdout".into(), Box::new(std::io::stdout())),
            AuditTarget::File(path) => (
                format!("file:{}", path.display()),
                Box::new(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(path)?,
                ),
            ),
        };
        Ok(Self {
            sink,
            chain: Mutex::new(Chain {
                out,
                seq: 0,
                head: "0".repeat(64),
            }),
        })
    }

    /// The sink's name, for metrics and status.
    pub fn sink(&self) -> &str {
        &self.sink
    }

    /// Writes one event as a line `{"seq", "time", "prevHash", ...event, "hash"}`, where
    /// `hash` is the SHA-256 of the line without it, and becomes the next `prevHash`.
    pub fn record(&self, event: &AuditEvent) -> Result<(), AuditError> {
        let fail = |source| AuditError {
            sink: self.sink.clone(),
            source,
        };
        let mut chain = self
            .chain
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let seq = chain.seq + 1;
        let body = serde_json::to_string(&Envelope {
            seq,
            time: Timestamp::now().to_string(),
            prev_hash: &chain.head,
            event,
        })
        .map_err(|e| fail(std::io::Error::other(e)))?;
        let hash = hex::encode(Sha256::digest(body.as_bytes()));
        // `body` is a JSON object: splice the hash in as its last member.
        let line = format!("{},\"hash\":\"{hash}\"}}\n", &body[..body.len() - 1]);
        chain
            .out
            .write_all(line.as_bytes())
            .and_then(|()| chain.out.flush())
            .map_err(fail)?;
        chain.seq = seq;
        chain.head = hash;
        Ok(())
    }
}

/// Checks a chain of audit lines: every line's hash matches its content and links to the
/// line before. Returns the number of lines, or the first broken line (1-based).
pub fn verify_chain(text: &str) -> Result<usize, usize> {
    let mut prev = "0".repeat(64);
    for (i, line) in text.lines().enumerate() {
        let Some((body, hash)) = line.rsplit_once(",\"hash\":\"") else {
            return Err(i + 1);
        };
        let hash = hash.trim_end_matches("\"}");
        let body = format!("{body}}}");
        let linked = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .is_some_and(|v| v["prevHash"].as_str() == Some(prev.as_str()));
        if !linked || hex::encode(Sha256::digest(body.as_bytes())) != hash {
            return Err(i + 1);
        }
        prev = hash.to_owned();
    }
    Ok(text.lines().count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chain_detects_edits_and_removals() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        let audit = Audit::open(&AuditTarget::File(path.clone())).expect("opens");
        for decision in ["allow", "deny", "allow"] {
            let event = AuditEvent {
                kind: "decision",
                decision: decision.into(),
                connection: "db".into(),
                ..Default::default()
            };
            audit.record(&event).expect("records");
        }
        let text = std::fs::read_to_string(&path).expect("readable");
        assert_eq!(verify_chain(&text), Ok(3));
        assert_eq!(
            verify_chain(&text.replacen("\"deny\"", "\"allow\"", 1)),
            Err(2),
            "an edited line"
        );
        let without_second: String = text
            .lines()
            .enumerate()
            .filter(|(i, _)| *i != 1)
            .map(|(_, l)| format!("{l}\n"))
            .collect();
        assert_eq!(verify_chain(&without_second), Err(2), "a removed line");
    }
}
