//! The HTTP collector sink (`--audit https://collector.example/ingest`): each batch of
//! lines is one `POST` of `application/x-ndjson`, naming its first and last sequence in
//! `X-Agentgate-First-Seq` and `X-Agentgate-Last-Seq`, with `Authorization: Bearer
//! <token>` when `--audit-http-token-file` is set (re-read for every batch, so a rotated
//! token needs no restart). A 2xx answer delivers the batch; anything else — another
//! status, an error, no answer within `--audit-sink-timeout` — fails it, and the batch
//! is sent again after a backoff.
//!
//! Where it stopped is a cursor in the spool (`cursor-http-<hash of the URL>`), kept
//! after each 2xx. A crash between the 2xx and the cursor — or a 2xx lost on the way
//! back — sends that batch again: a collector drops what it already holds, by `seq`
//! (the headers let it do so without reading the body).

use std::path::{Path, PathBuf};

use http::{Request, header};
use sha2::{Digest, Sha256};

use super::remote::Remote;
use super::{Cursor, OpenContext, Target, joined};

/// The largest answer body read (and discarded) from a collector.
const ANSWER_LIMIT: usize = 64 << 10;

/// A collector's URL: `http(s)://host[:port]/path`, with no credentials and no query
/// (a credential goes in `--audit-http-token-file`, never where logs show it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CollectorUrl {
    uri: http::Uri,
}

impl CollectorUrl {
    pub(super) fn parse(s: &str) -> Result<Self, String> {
        // Userinfo, a query or a fragment may be a credential: never repeated in an error.
        if s.contains('@') {
            return Err(
                "a collector URL cannot carry credentials (`user:password@`); use --audit-http-token-file"
                    .into(),
            );
        }
        let shown = s.split(['?', '#']).next().unwrap_or_default();
        if s.contains('?') || s.contains('#') {
            return Err(format!(
                "{shown}…: a collector URL cannot have a query (it may hold a credential, and URLs are logged); use --audit-http-token-file"
            ));
        }
        let uri: http::Uri = s.parse().map_err(|e| format!("{s:?} is not a URL: {e}"))?;
        if uri.host().is_none_or(str::is_empty) {
            return Err(format!("{s:?} has no host"));
        }
        Ok(Self { uri })
    }

    fn https(&self) -> bool {
        self.uri.scheme_str() == Some("https")
    }

    /// The name of its cursor file in the spool: one per URL.
    pub(super) fn cursor_name(&self) -> String {
        let digest = Sha256::digest(self.uri.to_string().as_bytes());
        let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        format!("http-{hex}")
    }
}

impl std::fmt::Display for CollectorUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.uri)
    }
}

/// The bearer token in `path`, checked to fit a header. Errors name the file, never
/// what it holds.
fn bearer(path: &Path) -> Result<http::HeaderValue, String> {
    let token = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the token file {}: {e}", path.display()))?;
    let token = token.trim();
    if token.is_empty() {
        return Err(format!("the token file {} is empty", path.display()));
    }
    let mut value = http::HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
        format!(
            "the token file {} holds characters a header cannot carry",
            path.display()
        )
    })?;
    value.set_sensitive(true);
    Ok(value)
}

/// An opened collector sink.
#[derive(Debug)]
pub(super) struct Collector {
    url: CollectorUrl,
    token_file: Option<PathBuf>,
    remote: Remote,
    cursor: Cursor,
}

impl Collector {
    pub(super) fn open(
        url: &CollectorUrl,
        ctx: OpenContext<'_>,
        cursor: Cursor,
    ) -> Result<Self, String> {
        let token_file = ctx.remote.http_token_file.clone();
        if let Some(path) = &token_file {
            if !url.https() {
                return Err(
                    "--audit-http-token-file needs an https:// collector: the token would travel in the clear"
                        .into(),
                );
            }
            bearer(path)?;
        }
        Ok(Self {
            url: url.clone(),
            token_file,
            remote: Remote::new(url.https(), ctx.extra_ca, ctx.remote.timeout)?,
            cursor,
        })
    }
}

impl Target for Collector {
    fn delivered(&mut self, _head: u64) -> std::io::Result<u64> {
        self.cursor.read()
    }

    fn deliver(&mut self, lines: &[String], last: u64) -> std::io::Result<()> {
        let first = lines.first().and_then(|l| super::seq_of(l)).unwrap_or(last);
        let mut req = Request::post(self.url.uri.clone())
            .header(header::CONTENT_TYPE, "application/x-ndjson")
            .header("x-agentgate-first-seq", first)
            .header("x-agentgate-last-seq", last);
        if let Some(path) = &self.token_file {
            req = req.header(
                header::AUTHORIZATION,
                bearer(path).map_err(std::io::Error::other)?,
            );
        }
        let req = req
            .body(Remote::body(joined(lines)))
            .map_err(std::io::Error::other)?;
        let answer = self
            .remote
            .send(&format!("POST seq {first}..{last}"), req, ANSWER_LIMIT)?;
        if !answer.status.is_success() {
            return Err(std::io::Error::other(format!(
                "the collector answered {} to seq {first}..{last}",
                answer.status
            )));
        }
        self.cursor.write(last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_with_credentials_are_refused_without_repeating_them() {
        let url = CollectorUrl::parse("https://collector.example/ingest").unwrap();
        assert!(url.https());
        assert_eq!(url.cursor_name().len(), "http-".len() + 16);
        assert_ne!(
            url.cursor_name(),
            CollectorUrl::parse("https://collector.example/other")
                .unwrap()
                .cursor_name()
        );
        for bad in [
            "https://alice:s3cret@collector/ingest",
            "https://s3cret@collector/ingest",
            "https://collector/ingest?key=s3cret",
            "https://collector/ingest#s3cret",
            "https:///ingest",
        ] {
            let err = CollectorUrl::parse(bad).unwrap_err();
            assert!(!err.contains("s3cret"), "{err}");
        }
    }

    #[test]
    fn a_token_file_is_checked_and_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "tok-s3cret\n").unwrap();
        let value = bearer(&path).unwrap();
        assert_eq!(value.to_str().unwrap(), "Bearer tok-s3cret");
        assert!(value.is_sensitive());
        std::fs::write(&path, "tok\ns3cret").unwrap();
        let err = bearer(&path).unwrap_err();
        assert!(!err.contains("s3cret"), "{err}");
        std::fs::write(&path, " \n").unwrap();
        assert!(bearer(&path).unwrap_err().contains("empty"));
    }
}
