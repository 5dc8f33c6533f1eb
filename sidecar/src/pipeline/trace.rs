//! What ties a request to the prompt and the tool call that made it: the W3C
//! `traceparent` and the agent's own ids, as the agent sends them — HTTP headers
//! (`traceparent`, `x-agentgate-prompt-id`, `x-agentgate-tool-call-id`) or a SQL comment
//! in the sqlcommenter form (`/* traceparent='00-…', prompt_id='…' */`). They are the
//! agent's word, recorded as given when well-formed and dropped when not: they decide
//! nothing.

use agentgate_crds::audit::Trace;

/// The longest id kept.
const MAX_ID: usize = 128;

/// `traceparent` as W3C Trace Context spells it: `vv-<32 hex>-<16 hex>-ff`.
fn traceparent(value: &str) -> Option<String> {
    let parts: Vec<&str> = value.split('-').collect();
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    (parts.len() >= 4
        && hex(parts[0], 2)
        && hex(parts[1], 32)
        && hex(parts[2], 16)
        && hex(parts[3], 2))
    .then(|| value.to_ascii_lowercase())
}

/// An agent id: printable ASCII without quotes, at most [`MAX_ID`] characters.
fn id(value: &str) -> Option<String> {
    (!value.is_empty()
        && value.len() <= MAX_ID
        && value
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'\'' && b != b'"' && b != b'\\'))
    .then(|| value.to_owned())
}

/// The trace of `(name, value)` pairs, names as HTTP headers or sqlcommenter keys.
pub(crate) fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Trace {
    let mut trace = Trace::default();
    for (name, value) in pairs {
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "traceparent" => trace.traceparent = traceparent(value),
            "x-agentgate-prompt-id" | "prompt_id" => trace.prompt_id = id(value),
            "x-agentgate-tool-call-id" | "tool_call_id" => trace.tool_call_id = id(value),
            _ => {}
        }
    }
    trace
}

/// The trace of a statement's trailing sqlcommenter comment, if it has one: the last
/// `/* … */` at the end of the text, `key='value'` pairs separated by commas, values
/// percent-encoded.
pub(crate) fn from_sql(text: &str) -> Trace {
    let trimmed = text.trim_end().trim_end_matches(';').trim_end();
    let Some(body) = trimmed.strip_suffix("*/") else {
        return Trace::default();
    };
    let Some(start) = body.rfind("/*") else {
        return Trace::default();
    };
    let decoded: Vec<(String, String)> = body[start + 2..]
        .split(',')
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            let v = v.trim().strip_prefix('\'')?.strip_suffix('\'')?;
            let v = percent_encoding::percent_decode_str(v).decode_utf8().ok()?;
            Some((k.trim().to_owned(), v.into_owned()))
        })
        .collect();
    from_pairs(decoded.iter().map(|(k, v)| (k.as_str(), v.as_str())))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn well_formed_ids_are_kept_and_the_rest_dropped() {
        let t = from_pairs([
            ("traceparent", TP),
            ("X-Agentgate-Prompt-Id", "prompt-17"),
            ("x-agentgate-tool-call-id", "toolu_01A"),
        ]);
        assert_eq!(t.traceparent.as_deref(), Some(TP));
        assert_eq!(t.prompt_id.as_deref(), Some("prompt-17"));
        assert_eq!(t.tool_call_id.as_deref(), Some("toolu_01A"));
        let bad = from_pairs([
            ("traceparent", "00-xyz-01"),
            ("x-agentgate-prompt-id", "a'b"),
            ("x-agentgate-tool-call-id", &"x".repeat(200)),
        ]);
        assert!(bad.is_empty(), "{bad:?}");
    }

    #[test]
    fn a_trailing_sqlcommenter_comment_is_read() {
        let sql = format!(
            "SELECT * FROM orders /*traceparent='{}',prompt_id='p%2D1',tool_call_id='t1'*/;",
            TP.replace('-', "%2D")
        );
        let t = from_sql(&sql);
        assert_eq!(t.traceparent.as_deref(), Some(TP));
        assert_eq!(t.prompt_id.as_deref(), Some("p-1"));
        assert_eq!(t.tool_call_id.as_deref(), Some("t1"));
        assert!(from_sql("SELECT '/* prompt_id=''x'' */' AS a").is_empty());
        assert!(from_sql("SELECT 1").is_empty());
    }
}
