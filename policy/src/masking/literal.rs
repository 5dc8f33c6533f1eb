//! Masking of known values: the credential a Connection injects, which an upstream may
//! echo back (in a header, in a body, base64-encoded). Unlike the detectors these are
//! exact byte strings, found wherever they are, in any content type.

use std::borrow::Cow;

use regex::bytes::Regex;

use super::MaskReport;

/// What an echoed credential is replaced with, and the detector name it is counted as.
pub const CREDENTIAL_ECHO: &str = "upstream-credential";

/// Values shorter than this are not masked: they would match ordinary text.
const MIN_LEN: usize = 8;

/// A set of exact values to mask.
#[derive(Debug, Clone)]
pub struct LiteralMask {
    regex: Option<Regex>,
    max_len: usize,
    /// No value holds a newline (header values cannot), so none spans one: a stream
    /// need not hold back what comes before its last newline.
    newline_free: bool,
    replacement: String,
}

impl LiteralMask {
    /// Masks each of `values` (those of at least 8 bytes), longest first. An error (a
    /// set too large to compile) means the values cannot be masked.
    pub fn new(values: &[Vec<u8>]) -> Result<Self, String> {
        let mut values: Vec<&Vec<u8>> = values.iter().filter(|v| v.len() >= MIN_LEN).collect();
        values.sort_by_key(|v| std::cmp::Reverse(v.len()));
        values.dedup();
        let max_len = values.first().map_or(0, |v| v.len());
        let pattern = values
            .iter()
            .map(|v| {
                // Bytes, not text: each one escaped as a hex byte.
                v.iter().map(|b| format!("\\x{b:02x}")).collect::<String>()
            })
            .collect::<Vec<_>>()
            .join("|");
        let regex = if values.is_empty() {
            None
        } else {
            Some(Regex::new(&format!("(?-u){pattern}")).map_err(|e| e.to_string())?)
        };
        let newline_free = values.iter().all(|v| !v.contains(&b'\n'));
        Ok(Self {
            regex,
            max_len,
            newline_free,
            replacement: format!("[masked:{CREDENTIAL_ECHO}]"),
        })
    }

    /// Whether there is nothing to mask.
    pub fn is_empty(&self) -> bool {
        self.regex.is_none()
    }

    /// Masks a whole value.
    pub fn mask<'a>(&self, input: &'a [u8], report: &mut MaskReport) -> Cow<'a, [u8]> {
        let Some(regex) = &self.regex else {
            return Cow::Borrowed(input);
        };
        if !regex.is_match(input) {
            return Cow::Borrowed(input);
        }
        let mut out = Vec::with_capacity(input.len());
        let mut pos = 0;
        for m in regex.find_iter(input) {
            out.extend_from_slice(&input[pos..m.start()]);
            out.extend_from_slice(self.replacement.as_bytes());
            report.add(CREDENTIAL_ECHO);
            pos = m.end();
        }
        out.extend_from_slice(&input[pos..]);
        Cow::Owned(out)
    }
}

/// The state of masking known values in a body that arrives in chunks: the last
/// `longest - 1` bytes are held back, since a value may begin there.
#[derive(Debug, Default)]
pub struct LiteralStream {
    carry: Vec<u8>,
}

impl LiteralStream {
    /// Takes the next chunk (`last`: the body ends with it) and appends what can be
    /// released, masked, to `out`.
    pub fn push(
        &mut self,
        mask: &LiteralMask,
        chunk: &[u8],
        last: bool,
        out: &mut Vec<u8>,
        report: &mut MaskReport,
    ) {
        let Some(regex) = &mask.regex else {
            out.extend_from_slice(&self.carry);
            self.carry.clear();
            out.extend_from_slice(chunk);
            return;
        };
        self.carry.extend_from_slice(chunk);
        let buf = std::mem::take(&mut self.carry);
        let hold = if last { 0 } else { mask.max_len - 1 };
        // A value starting before `safe` lies wholly inside `buf`, so it is found now;
        // one cannot start before a newline and end after it, so a line that ended is
        // released at once (watch events and server-sent events are not delayed).
        let mut safe = buf.len().saturating_sub(hold);
        if mask.newline_free
            && let Some(newline) = buf.iter().rposition(|b| *b == b'\n')
        {
            safe = safe.max(newline + 1);
        }
        let mut pos = 0;
        for m in regex.find_iter(&buf) {
            if m.start() >= safe {
                break;
            }
            out.extend_from_slice(&buf[pos..m.start()]);
            out.extend_from_slice(mask.replacement.as_bytes());
            report.add(CREDENTIAL_ECHO);
            pos = m.end();
        }
        let release = safe.max(pos);
        out.extend_from_slice(&buf[pos..release]);
        self.carry = buf[release..].to_vec();
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const TOKEN: &[u8] = b"upstream-secret-token-4711";

    #[test]
    fn exact_values_are_masked_and_short_ones_ignored() {
        let mask = LiteralMask::new(&[TOKEN.to_vec(), b"short".to_vec()]).unwrap();
        let mut report = MaskReport::default();
        let out = mask.mask(b"a upstream-secret-token-4711 b short", &mut report);
        assert_eq!(&*out, b"a [masked:upstream-credential] b short".as_slice());
        assert_eq!(report.total(), 1);
        assert!(LiteralMask::new(&[b"short".to_vec()]).unwrap().is_empty());
    }

    proptest! {
        /// However the body is cut into chunks, the value never comes out whole and
        /// everything else comes out unchanged.
        #[test]
        fn a_value_split_across_chunks_is_still_masked(
            prefix in "[a-z \n]{0,40}", suffix in "[a-z \n]{0,40}",
            cuts in proptest::collection::vec(0usize..120, 0..6)
        ) {
            let mask = LiteralMask::new(&[TOKEN.to_vec()]).unwrap();
            let body = [prefix.as_bytes(), TOKEN, suffix.as_bytes(), TOKEN].concat();
            let mut cuts = cuts;
            cuts.retain(|c| *c < body.len());
            cuts.sort_unstable();
            cuts.dedup();
            let mut stream = LiteralStream::default();
            let (mut out, mut report, mut at) = (Vec::new(), MaskReport::default(), 0);
            for cut in cuts {
                stream.push(&mask, &body[at..cut], false, &mut out, &mut report);
                at = cut;
            }
            stream.push(&mask, &body[at..], true, &mut out, &mut report);
            let expected = format!("{prefix}[masked:upstream-credential]{suffix}[masked:upstream-credential]");
            prop_assert_eq!(String::from_utf8(out).unwrap(), expected);
            prop_assert_eq!(report.total(), 2);
        }
    }
}
