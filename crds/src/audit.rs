//! The audit trail's contract: what one event says, how events are chained, and how a
//! trail is verified. The sidecar writes it; `kubectl agentgate audit verify` and any
//! collector read it with the same code.
//!
//! A trail is JSON lines. Each line is an [`Envelope`] — schema version, sequence, time,
//! the previous line's hash, the event's fields — serialized compactly in the order the
//! types declare, with `"hash"` spliced in as the last member: the SHA-256, in lower-case
//! hex, of the line's bytes without it (everything before `,"hash":` plus the closing
//! `}`). Verification hashes the bytes as they are, never a re-serialization, so a reader
//! needs no knowledge of the fields to check the chain. The first event of a pod's chain
//! links to [`GENESIS`]; a restart of the sidecar continues the chain with a `restart`
//! event (see `docs/audit.md`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The version of the event schema written in every line (`"v"`).
pub const SCHEMA_VERSION: u32 = 1;

/// The `prevHash` of a chain's first event.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What an event records.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum EventKind {
    /// A request's decision (allow or refusal), written before anything is forwarded.
    #[default]
    Decision,
    /// A request held for a human, written before the Approval is created.
    Held,
    /// A request's end: status, bytes, rows, what was masked.
    Completed,
    /// A database session's start (its login).
    Session,
    /// The sidecar started again on an existing trail: the chain goes on from here.
    Restart,
    /// The sidecar stopped cleanly.
    Shutdown,
}

/// The W3C trace context and the agent's own ids, when the agent sent them, so a request
/// can be tied to the prompt and tool call that caused it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Trace {
    /// `traceparent` (W3C Trace Context).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// The prompt the request belongs to (`x-agentgate-prompt-id`, or `prompt_id` in a
    /// SQL comment).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_id: Option<String>,
    /// The tool call that made the request (`x-agentgate-tool-call-id`, or
    /// `tool_call_id` in a SQL comment).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl Trace {
    /// Whether nothing was sent.
    pub fn is_empty(&self) -> bool {
        self.traceparent.is_none() && self.prompt_id.is_none() && self.tool_call_id.is_none()
    }
}

/// Where a restarted sidecar took the chain up.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Resumed {
    /// Whether the previous run ended with a `shutdown` event; `false` marks a crash
    /// boundary (events queued but not yet written when it died are lost, and none of
    /// them had been answered).
    pub clean: bool,
    /// Bytes of a partly written last line that were cut off (never acknowledged).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub truncated_bytes: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One audit event. Only masked data ever goes in.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AuditEvent {
    /// What it records.
    pub kind: EventKind,
    /// Correlates the events of one request; unique across restarts and pods.
    #[serde(default)]
    pub request_id: String,
    /// The database session a statement ran in (its `session` event's request id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// The agent pod.
    #[serde(default)]
    pub pod: String,
    /// The agent pod's namespace.
    #[serde(default)]
    pub namespace: String,
    /// The Connection.
    #[serde(default)]
    pub connection: String,
    /// The validated identity (subject, e-mail, issuer), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<serde_json::Value>,
    /// What was asked: the classified request (method/verb, path/resource, …).
    #[serde(default)]
    pub request: serde_json::Value,
    /// The agent's trace and prompt ids.
    #[serde(default, skip_serializing_if = "Trace::is_empty")]
    pub trace: Trace,
    /// `allow`, `deny`, `approve` or `error`.
    #[serde(default)]
    pub decision: String,
    /// The deciding rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// The deciding policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// Why a request was refused (masked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Response status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Response body bytes sent to the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    /// Milliseconds from arrival to the end of the response.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<f64>,
    /// Values masked, by detector.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub masked: BTreeMap<String, u64>,
    /// The Approval that held the request (its decision and outcome are on it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<String>,
    /// SQL: rows sent to the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows_returned: Option<u64>,
    /// SQL: rows the statement inserted, updated, deleted or copied in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows_affected: Option<u64>,
    /// SQL: the statement's bind parameters, masked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Vec<String>>,
    /// Held requests: what the impact preview showed the approver (masked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub impact: Option<crate::Impact>,
    /// For upgraded streams (exec, port-forward): bytes relayed each way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relayed: Option<serde_json::Value>,
    /// `restart` events: how the chain was taken up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed: Option<Resumed>,
}

/// One line of a trail, without its hash: what the hash covers.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Envelope<E> {
    /// [`SCHEMA_VERSION`].
    pub v: u32,
    /// 1 for a chain's first event, then one more for each.
    pub seq: u64,
    /// When it was written (RFC 3339).
    pub time: String,
    /// The previous line's hash ([`GENESIS`] for the first).
    pub prev_hash: String,
    /// The event.
    #[serde(flatten)]
    pub event: E,
}

/// The end of a chain: the last event's sequence and hash.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Head {
    /// Its sequence number (0 before the first event).
    pub seq: u64,
    /// Its hash ([`GENESIS`] before the first event).
    pub hash: String,
}

impl Head {
    /// The head of an empty chain.
    pub fn genesis() -> Self {
        Self {
            seq: 0,
            hash: GENESIS.to_owned(),
        }
    }
}

/// The line for `event` following `head`, written at `time`, and the new head. The line
/// ends with a newline.
pub fn chain_line(
    head: &Head,
    time: String,
    event: &AuditEvent,
) -> Result<(String, Head), serde_json::Error> {
    let seq = head.seq + 1;
    let body = serde_json::to_string(&Envelope {
        v: SCHEMA_VERSION,
        seq,
        time,
        prev_hash: head.hash.clone(),
        event,
    })?;
    let hash = hex(&Sha256::digest(body.as_bytes()));
    // `body` is a JSON object: the hash goes in as its last member.
    let line = format!("{},\"hash\":\"{hash}\"}}\n", &body[..body.len() - 1]);
    Ok((line, Head { seq, hash }))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A line of a trail, checked: its envelope, read back, and its hash.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckedLine {
    /// The envelope and event.
    pub envelope: Envelope<AuditEvent>,
    /// The line's hash.
    pub hash: String,
}

/// Checks one line's own hash; `what` says how it fails.
pub fn check_line(line: &str) -> Result<CheckedLine, String> {
    let Some((body, rest)) = line.rsplit_once(",\"hash\":\"") else {
        return Err("it has no hash".into());
    };
    let Some(hash) = rest.strip_suffix("\"}") else {
        return Err("it is cut off after its hash".into());
    };
    let body = format!("{body}}}");
    if hex(&Sha256::digest(body.as_bytes())) != hash {
        return Err("its hash does not match its content: it was changed".into());
    }
    let envelope = serde_json::from_str::<Envelope<AuditEvent>>(&body)
        .map_err(|e| format!("it is not an event of this schema ({e})"))?;
    Ok(CheckedLine {
        envelope,
        hash: hash.to_owned(),
    })
}

/// The sequence a line says it has, read without trusting it (for naming a bad line).
fn line_seq(line: &str) -> Option<u64> {
    let rest = line.split_once("\"seq\":")?.1;
    rest[..rest.find(',')?].parse().ok()
}

/// A trail that verified.
#[derive(Debug, Clone, PartialEq)]
pub struct Verified {
    /// Its events.
    pub events: Vec<CheckedLine>,
    /// Its last event.
    pub head: Head,
    /// The sequence of its first event.
    pub first_seq: u64,
    /// `restart` events that were not clean (crash boundaries).
    pub crashes: usize,
}

/// Where and why a trail does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}{}: {what}", seq.map(|s| format!(" (seq {s})")).unwrap_or_default())]
pub struct ChainError {
    /// The first bad line (1-based).
    pub line: usize,
    /// Its sequence number, when it could be read.
    pub seq: Option<u64>,
    /// What is wrong with it.
    pub what: String,
}

/// Verifies a trail: every line's hash matches its bytes, links to the line before, and
/// follows it by one. A trail that starts mid-chain (a sink that began after events were
/// delivered elsewhere) is checked from its first line on; one that starts at seq 1 must
/// link to [`GENESIS`]. With `expected` — a head recorded elsewhere, such as the
/// `AgentSession`'s `status.audit` in etcd — the trail must hold that very event: one
/// cut off before it, or rewritten up to it, is found.
pub fn verify(text: &str, expected: Option<&Head>) -> Result<Verified, ChainError> {
    let mut events: Vec<CheckedLine> = Vec::new();
    let mut crashes = 0;
    if !text.is_empty() && !text.ends_with('\n') {
        let line = text.lines().count();
        return Err(ChainError {
            line,
            seq: None,
            what: "the last line is cut off (no newline): the trail was truncated".into(),
        });
    }
    for (i, line) in text.lines().enumerate() {
        let fail = |seq, what: String| ChainError {
            line: i + 1,
            seq,
            what,
        };
        let checked = check_line(line).map_err(|what| fail(line_seq(line), what))?;
        let seq = checked.envelope.seq;
        match events.last() {
            None if seq == 1 && checked.envelope.prev_hash != GENESIS => {
                return Err(fail(
                    Some(seq),
                    "the first event does not start a chain".into(),
                ));
            }
            None => {}
            Some(prev) if seq != prev.envelope.seq + 1 => {
                let what = if seq <= prev.envelope.seq {
                    format!(
                        "it comes after seq {}: events are out of order",
                        prev.envelope.seq
                    )
                } else {
                    format!(
                        "it follows seq {}: {} events are missing",
                        prev.envelope.seq,
                        seq - prev.envelope.seq - 1
                    )
                };
                return Err(fail(Some(seq), what));
            }
            Some(prev) if checked.envelope.prev_hash != prev.hash => {
                return Err(fail(
                    Some(seq),
                    format!(
                        "it does not link to seq {}: an event before it was replaced",
                        prev.envelope.seq
                    ),
                ));
            }
            Some(_) => {}
        }
        if checked.envelope.event.kind == EventKind::Restart
            && checked
                .envelope
                .event
                .resumed
                .as_ref()
                .is_some_and(|r| !r.clean)
        {
            crashes += 1;
        }
        events.push(checked);
    }
    let head = events.last().map_or_else(Head::genesis, |l| Head {
        seq: l.envelope.seq,
        hash: l.hash.clone(),
    });
    if let Some(expected) = expected {
        let at = events.iter().position(|l| l.envelope.seq == expected.seq);
        let what = match at.map(|i| &events[i]) {
            Some(l) if l.hash == expected.hash => None,
            Some(_) => Some(format!(
                "its event seq {} is not the one recorded (its hash differs): the trail was rewritten",
                expected.seq
            )),
            None if expected.seq > head.seq => Some(format!(
                "the trail ends at seq {}, but the recorded head is seq {}: events were removed from its end",
                head.seq, expected.seq
            )),
            None => Some(format!(
                "the trail starts after the recorded head (seq {})",
                expected.seq
            )),
        };
        if let Some(what) = what {
            return Err(ChainError {
                line: at.map_or(events.len(), |i| i + 1),
                seq: Some(expected.seq),
                what,
            });
        }
    }
    Ok(Verified {
        first_seq: events.first().map_or(0, |l| l.envelope.seq),
        events,
        head,
        crashes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trail(n: u64) -> String {
        let mut head = Head::genesis();
        let mut out = String::new();
        for i in 0..n {
            let event = AuditEvent {
                kind: EventKind::Decision,
                request_id: format!("r{i}"),
                decision: if i == 1 { "deny" } else { "allow" }.into(),
                ..Default::default()
            };
            let (line, next) = chain_line(&head, "2026-12-06T00:00:00Z".into(), &event).unwrap();
            out.push_str(&line);
            head = next;
        }
        out
    }

    fn lines(text: &str) -> Vec<&str> {
        text.lines().collect()
    }

    fn join(lines: &[&str]) -> String {
        lines.iter().map(|l| format!("{l}\n")).collect()
    }

    #[test]
    fn an_untouched_trail_verifies_and_each_kind_of_tampering_is_named() {
        let text = trail(4);
        let verified = verify(&text, None).unwrap();
        assert_eq!((verified.first_seq, verified.head.seq), (1, 4));
        assert!(verify(&text, Some(&verified.head)).is_ok());

        let edited = text.replacen("\"deny\"", "\"allow\"", 1);
        let e = verify(&edited, None).unwrap_err();
        assert_eq!((e.line, e.what.contains("was changed")), (2, true), "{e}");

        let flipped = {
            let mut bytes = text.clone().into_bytes();
            let at = text.find("r2").unwrap();
            bytes[at] = b's';
            String::from_utf8(bytes).unwrap()
        };
        assert_eq!(verify(&flipped, None).unwrap_err().line, 3);

        let l = lines(&text);
        let e = verify(&join(&[l[0], l[2], l[3]]), None).unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.what.contains("1 events are missing"), "{e}");

        let e = verify(&join(&[l[0], l[2], l[1], l[3]]), None).unwrap_err();
        assert!(
            e.what.contains("missing") || e.what.contains("out of order"),
            "{e}"
        );

        let e = verify(&join(&l[..3]), Some(&verified.head)).unwrap_err();
        assert!(e.what.contains("removed from its end"), "{e}");

        let e = verify(&text[..text.len() - 10], None).unwrap_err();
        assert!(e.what.contains("cut off"), "{e}");

        // A trail starting mid-chain verifies from there; one starting at seq 1 must
        // start a chain.
        assert_eq!(verify(&join(&l[2..]), None).unwrap().first_seq, 3);
    }

    #[test]
    fn a_line_is_the_envelope_and_the_hash_of_its_bytes() {
        let text = trail(1);
        let line = text.trim_end();
        assert!(line.starts_with("{\"v\":1,\"seq\":1,\"time\":"), "{line}");
        let checked = check_line(line).unwrap();
        assert_eq!(checked.envelope.event.request_id, "r0");
        assert_eq!(checked.envelope.prev_hash, GENESIS);
        assert_eq!(checked.hash.len(), 64);
    }
}
