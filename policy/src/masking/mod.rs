//! The masking engine: finds secrets and sensitive values in responses and replaces them
//! before the agent — or an audit record — sees them.
//!
//! Three ways in, one set of detectors:
//! - [`MaskingProfile::mask_bytes`]: a whole text body;
//! - [`MaskStream`]: a body arriving in chunks, with bounded memory, catching a secret
//!   split across two chunks;
//! - [`MaskingProfile::mask_json`]: a parsed JSON document, for what text alone cannot
//!   see — JSON paths, credential-named keys, and Kubernetes `Secret` data (base64, so no
//!   text detector would recognize it).
//!
//! It reports what it masked (detector and count), never the values.

mod detectors;
mod json;
mod literal;
mod stream;

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};

use agentgate_crds::{DetectorSet, Masking, Replacement};
use hmac::{Hmac, Mac};
use regex::bytes::RegexSet;
use serde_json_path::JsonPath;
use sha2::Sha256;

use crate::glob::{Glob, GlobKind, any_match};
use detectors::{Detector, builtin};
pub use detectors::{MAX_MATCH_LEN, is_credential_key, luhn_valid};
pub use literal::{CREDENTIAL_ECHO, LiteralMask, LiteralStream};
pub use stream::MaskStream;

/// A masking profile compiled from a policy's `masking` section.
#[derive(Debug, Clone)]
pub struct MaskingProfile {
    detectors: Vec<Detector>,
    prefilter: Option<RegexSet>,
    credential_keys: bool,
    kubernetes_secrets: bool,
    json_paths: Vec<JsonPath>,
    columns: Vec<Glob>,
    /// The table part of each column pattern (`customers` of `customers.email`).
    column_tables: Vec<Glob>,
    replacement: Replacement,
    hash_key: Vec<u8>,
}

/// Why a masking section does not compile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MaskingError {
    /// A custom pattern is not a valid regular expression.
    #[error("masking pattern {name:?} is not a valid regular expression: {reason}")]
    BadPattern {
        /// The pattern's name.
        name: String,
        /// The regex error.
        reason: String,
    },
    /// A JSON path does not parse.
    #[error("masking jsonPath {path:?} is not a valid JSON path: {reason}")]
    BadJsonPath {
        /// The path.
        path: String,
        /// The parse error.
        reason: String,
    },
    /// A column glob does not compile.
    #[error("masking column {column:?} is not a valid glob: {reason}")]
    BadColumn {
        /// The glob.
        column: String,
        /// The error.
        reason: String,
    },
}

/// What was masked: a count per detector. Never the values.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MaskReport {
    counts: BTreeMap<String, u64>,
}

impl MaskReport {
    /// Counts one masked value found by `detector`.
    pub fn add(&mut self, detector: &str) {
        *self.counts.entry(detector.to_owned()).or_default() += 1;
    }

    /// Adds another report's counts to this one.
    pub fn merge(&mut self, other: &MaskReport) {
        for (k, v) in &other.counts {
            *self.counts.entry(k.clone()).or_default() += v;
        }
    }

    /// Values masked per detector.
    pub fn counts(&self) -> &BTreeMap<String, u64> {
        &self.counts
    }

    /// Values masked in all.
    pub fn total(&self) -> u64 {
        self.counts.values().sum()
    }
}

/// One detector hit in a haystack: the whole match, and the part to replace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Hit {
    pub(crate) start: usize,
    pub(crate) end: usize,
    pub(crate) mask_start: usize,
    pub(crate) mask_end: usize,
    pub(crate) detector: usize,
}

impl MaskingProfile {
    /// A profile that masks nothing.
    pub fn none() -> Self {
        Self {
            detectors: Vec::new(),
            prefilter: None,
            credential_keys: false,
            kubernetes_secrets: false,
            json_paths: Vec::new(),
            columns: Vec::new(),
            column_tables: Vec::new(),
            replacement: Replacement::Redact,
            hash_key: Vec::new(),
        }
    }

    /// Compiles a masking section. `hash_key` keys the `hash` replacement, so hashes
    /// cannot be reversed by hashing guesses without it.
    pub fn compile(spec: &Masking, hash_key: &[u8]) -> Result<Self, Vec<MaskingError>> {
        let mut errors = Vec::new();
        let sets: BTreeSet<DetectorSet> = spec.detectors.iter().copied().collect();
        let mut detectors: Vec<Detector> = sets.iter().flat_map(|s| builtin(*s)).collect();
        for p in &spec.patterns {
            match regex::bytes::Regex::new(&p.regex) {
                Ok(regex) => detectors.push(Detector {
                    name: p.name.clone(),
                    regex,
                    group: 0,
                    validate: None,
                }),
                Err(e) => errors.push(MaskingError::BadPattern {
                    name: p.name.clone(),
                    reason: e.to_string(),
                }),
            }
        }
        let json_paths = spec
            .json_paths
            .iter()
            .filter_map(|path| match JsonPath::parse(path) {
                Ok(p) => Some(p),
                Err(e) => {
                    errors.push(MaskingError::BadJsonPath {
                        path: path.clone(),
                        reason: e.to_string(),
                    });
                    None
                }
            })
            .collect();
        let columns = spec
            .columns
            .iter()
            .filter_map(|c| match Glob::new(c, GlobKind::Dotted) {
                Ok(g) => Some(g),
                Err(e) => {
                    errors.push(MaskingError::BadColumn {
                        column: c.clone(),
                        reason: e.to_string(),
                    });
                    None
                }
            })
            .collect();
        let column_tables = spec
            .columns
            .iter()
            .filter_map(|c| {
                let table = c.rsplit_once('.').map_or("*", |(t, _)| t);
                Glob::new(table, GlobKind::Dotted).ok()
            })
            .collect();
        if !errors.is_empty() {
            return Err(errors);
        }
        let prefilter = if detectors.is_empty() {
            None
        } else {
            // Every member compiled on its own above, so the set compiles too.
            RegexSet::new(detectors.iter().map(|d| d.regex.as_str())).ok()
        };
        Ok(Self {
            detectors,
            prefilter,
            credential_keys: sets.contains(&DetectorSet::Credentials),
            kubernetes_secrets: sets.contains(&DetectorSet::Secrets),
            json_paths,
            columns,
            column_tables,
            replacement: spec.replacement,
            hash_key: hash_key.to_vec(),
        })
    }

    /// Whether this profile can change anything at all (a fast path for callers).
    pub fn is_empty(&self) -> bool {
        self.detectors.is_empty()
            && !self.credential_keys
            && !self.kubernetes_secrets
            && self.json_paths.is_empty()
    }

    /// Whether the profile has rules only a parsed JSON document can apply (JSON paths,
    /// credential keys, Kubernetes Secret data).
    pub fn needs_json_structure(&self) -> bool {
        !self.json_paths.is_empty() || self.credential_keys || self.kubernetes_secrets
    }

    /// Whether any SQL result column is masked by name.
    pub fn masks_columns(&self) -> bool {
        !self.columns.is_empty()
    }

    /// Whether the SQL result column `table.column` is masked.
    pub fn masks_column(&self, qualified_column: &str) -> bool {
        !self.columns.is_empty() && any_match(&self.columns, qualified_column)
    }

    /// Whether some column of the table (relation) `table` may be masked.
    pub fn may_mask_columns_of(&self, table: &str) -> bool {
        self.column_tables.iter().any(|g| g.is_match(table))
    }

    /// Masks a whole text body.
    pub fn mask_bytes<'a>(&self, input: &'a [u8], report: &mut MaskReport) -> Cow<'a, [u8]> {
        let hits = select(self.scan(input, 0));
        if hits.is_empty() {
            return Cow::Borrowed(input);
        }
        let mut out = Vec::with_capacity(input.len());
        self.splice(input, 0, input.len(), &hits, &mut out, report);
        Cow::Owned(out)
    }

    /// Every validated detector hit in `hay[from..]` (with `hay[..from]` as look-behind
    /// context), sorted by start.
    pub(crate) fn scan(&self, hay: &[u8], from: usize) -> Vec<Hit> {
        let Some(prefilter) = &self.prefilter else {
            return Vec::new();
        };
        let candidates = prefilter.matches(&hay[from..]);
        let mut hits = Vec::new();
        for idx in candidates.iter() {
            let d = &self.detectors[idx];
            let mut at = from;
            while at <= hay.len() {
                let Some(caps) = d.regex.captures_at(hay, at) else {
                    break;
                };
                let Some(whole) = caps.get(0) else { break };
                let part = caps.get(d.group).unwrap_or(whole);
                if d.validate.is_none_or(|valid| valid(part.as_bytes())) && !part.is_empty() {
                    hits.push(Hit {
                        start: whole.start(),
                        end: whole.end(),
                        mask_start: part.start(),
                        mask_end: part.end(),
                        detector: idx,
                    });
                }
                at = if whole.end() > whole.start() {
                    whole.end()
                } else {
                    whole.end() + 1
                };
            }
        }
        hits.sort_by_key(|h| (h.start, std::cmp::Reverse(h.end)));
        hits
    }

    /// Writes `hay[from..to]` to `out` with the hits inside that range replaced.
    pub(crate) fn splice(
        &self,
        hay: &[u8],
        from: usize,
        to: usize,
        hits: &[Hit],
        out: &mut Vec<u8>,
        report: &mut MaskReport,
    ) {
        let mut pos = from;
        for h in hits
            .iter()
            .filter(|h| h.mask_start >= from && h.mask_end <= to)
        {
            out.extend_from_slice(&hay[pos..h.mask_start]);
            let name = &self.detectors[h.detector].name;
            out.extend_from_slice(
                self.replacement_for(name, &hay[h.mask_start..h.mask_end])
                    .as_bytes(),
            );
            report.add(name);
            pos = h.mask_end;
        }
        out.extend_from_slice(&hay[pos..to]);
    }

    /// The text that replaces a masked `value` found by `detector`.
    pub fn replacement_for(&self, detector: &str, value: &[u8]) -> String {
        match self.replacement {
            Replacement::Redact => format!("[masked:{detector}]"),
            Replacement::Hash => {
                // HMAC accepts keys of any length.
                let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.hash_key)
                    .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
                mac.update(value);
                let digest = hex::encode(mac.finalize().into_bytes());
                format!("[masked:{detector}:{}]", &digest[..16])
            }
            Replacement::Partial => {
                // Keep two characters at each end, but only plain ones, so the
                // replacement can never end in half an escape sequence.
                let keep = |b: Option<&u8>| {
                    b.filter(|b| b.is_ascii_alphanumeric())
                        .map_or('*', |b| char::from(*b))
                };
                if value.len() >= 10 {
                    format!(
                        "{}{}****{}{}",
                        keep(value.first()),
                        keep(value.get(1)),
                        keep(value.get(value.len() - 2)),
                        keep(value.last())
                    )
                } else {
                    format!("[masked:{detector}]")
                }
            }
        }
    }
}

/// Orders hits by the part they mask and merges overlapping parts, so that a value two
/// detectors both found is replaced once and no byte of either is left out.
pub(crate) fn select(mut hits: Vec<Hit>) -> Vec<Hit> {
    hits.sort_by_key(|h| (h.mask_start, std::cmp::Reverse(h.mask_end)));
    let mut chosen: Vec<Hit> = Vec::with_capacity(hits.len());
    for h in hits {
        match chosen.last_mut() {
            Some(last) if h.mask_start < last.mask_end => {
                last.mask_end = last.mask_end.max(h.mask_end)
            }
            _ => chosen.push(h),
        }
    }
    chosen
}

#[cfg(test)]
mod tests;
