//! Sinks deliver the spool onward, each from where it stopped, at its own pace: a sink
//! that is down holds back only the deletion of what it has not delivered (and, once the
//! spool is full, new requests), never a request. Each delivers every event once, in
//! order, by sequence: on start it asks where it stopped — the last sequence in its file
//! or blob, or the cursor file it keeps in the spool — and goes on after it.
//!
//! A sink is configured (`Sink`, from `--audit`), then opened (`Target`) when the sidecar
//! starts: what can be checked without its peer — a key file, a CA, a URL — is checked
//! there, and a sink that cannot be opened stops the sidecar from starting. A peer that
//! is down is not a configuration error: its events wait in the spool.

mod azure_blob;
mod collector;
mod remote;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub(super) use azure_blob::MAX_BLOB_BYTES as MAX_AZURE_BLOB_BYTES;
pub use azure_blob::{AzureAuth, BlobLocation};
pub use collector::CollectorUrl;

use super::Written;
use super::journal::{Reader, seq_of};
use crate::metrics::Metrics;

/// Lines delivered in one go at most.
const CHUNK: usize = 1024;
/// The longest wait between retries of a failing sink.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Where the audit trail is delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sink {
    /// Standard output, one line per event (for a cluster's log collector). Where it
    /// stopped is kept in the spool (`cursor-stdout`); a crash between writing and
    /// keeping it delivers those lines again, and a collector drops them by `seq`.
    Stdout,
    /// A file, appended to; where it stopped is its own last line.
    File(PathBuf),
    /// An HTTP collector: batches of lines POSTed to a URL (`collector`).
    Http(CollectorUrl),
    /// Azure Blob Storage append blobs (`azure_blob`).
    AzureBlob(BlobLocation),
}

/// What opening a sink needs besides its own setting.
#[derive(Debug, Clone, Copy)]
pub(super) struct OpenContext<'a> {
    pub(super) spool: &'a Path,
    pub(super) extra_ca: Option<&'a Path>,
    pub(super) remote: &'a super::RemoteSinkSettings,
}

/// `s` as it may be shown in an error: without userinfo, a query or a fragment, any of
/// which may be a credential.
fn redacted(s: &str) -> String {
    if s.contains('@') {
        let scheme = s.split_once("://").map_or("", |(scheme, _)| scheme);
        return format!("{scheme}://…");
    }
    match s.split_once(['?', '#']) {
        Some((shown, _)) => format!("{shown}…"),
        None => s.to_owned(),
    }
}

/// Parses `--audit` values. Unlike clap's own parsers, its errors never repeat the value
/// whole: a URL given by mistake with a credential in it is not shown.
#[derive(Debug, Clone, Copy)]
pub struct SinkParser;

impl clap::builder::TypedValueParser for SinkParser {
    type Value = Sink;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        _arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<Sink, clap::Error> {
        let parsed = match value.to_str() {
            Some(s) => Sink::parse(s),
            None => Err("the value is not UTF-8".to_owned()),
        };
        parsed.map_err(|why| {
            clap::Error::raw(
                clap::error::ErrorKind::ValueValidation,
                format!("invalid --audit: {why}\n"),
            )
            .with_cmd(cmd)
        })
    }
}

impl Sink {
    /// Parses one `--audit` value.
    pub fn parse(s: &str) -> Result<Sink, String> {
        if s == "stdout" {
            return Ok(Sink::Stdout);
        }
        if let Some(path) = s.strip_prefix("file:") {
            if path.is_empty() {
                return Err(format!("{s:?}: `file:` needs a path"));
            }
            return Ok(Sink::File(PathBuf::from(path)));
        }
        if let Some(url) = s.strip_prefix("azureblob:") {
            return BlobLocation::parse(url)
                .map(Sink::AzureBlob)
                .map_err(|why| format!("azureblob:…: {why}"));
        }
        if s.starts_with("https://") || s.starts_with("http://") {
            return CollectorUrl::parse(s).map(Sink::Http);
        }
        Err(format!(
            "{:?} is not `stdout`, `file:<path>`, an http(s):// collector URL or `azureblob:<url>`",
            redacted(s)
        ))
    }

    /// Its name, for metrics and logs. It never holds a credential: URLs with one are
    /// refused when parsed.
    pub fn name(&self) -> String {
        match self {
            Sink::Stdout => "stdout".into(),
            Sink::File(path) => format!("file:{}", path.display()),
            Sink::Http(url) => url.to_string(),
            Sink::AzureBlob(location) => format!("azureblob:{location}"),
        }
    }

    /// Opens it: reads its key or token, builds its client. A sink that cannot be
    /// opened is a configuration error.
    pub(super) fn open(&self, ctx: OpenContext<'_>) -> std::io::Result<Box<dyn Target>> {
        let bad = |why: String| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("--audit {}: {why}", self.name()),
            )
        };
        Ok(match self {
            Sink::Stdout => Box::new(Stdout {
                cursor: Cursor::new(ctx.spool, "stdout"),
            }),
            Sink::File(path) => Box::new(File { path: path.clone() }),
            Sink::Http(url) => Box::new(
                collector::Collector::open(url, ctx, Cursor::new(ctx.spool, &url.cursor_name()))
                    .map_err(bad)?,
            ),
            Sink::AzureBlob(location) => {
                Box::new(azure_blob::AppendBlobs::open(location, ctx).map_err(bad)?)
            }
        })
    }
}

/// An opened sink.
pub(super) trait Target: Send {
    /// The last sequence it holds, so that it goes on after it. `head` is the spool's
    /// last sequence when the sidecar started.
    fn delivered(&mut self, head: u64) -> std::io::Result<u64>;

    /// Delivers `lines` — consecutive, in order, the first one following what it holds
    /// (or, after a failure, what it held before the failed attempt) — whose last
    /// sequence is `last`.
    fn deliver(&mut self, lines: &[String], last: u64) -> std::io::Result<()>;
}

/// `lines`, each followed by a newline.
fn joined(lines: &[String]) -> String {
    let mut out = String::with_capacity(lines.iter().map(|l| l.len() + 1).sum());
    for line in lines {
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Where a sink that cannot be asked stopped, kept in the spool: `cursor-<name>`.
#[derive(Debug)]
pub(super) struct Cursor {
    path: PathBuf,
}

impl Cursor {
    fn new(spool: &Path, name: &str) -> Self {
        Self {
            path: spool.join(format!("cursor-{name}")),
        }
    }

    /// The sequence kept (0 when there is none yet).
    pub(super) fn read(&self) -> std::io::Result<u64> {
        match std::fs::read_to_string(&self.path) {
            Ok(s) => s.trim().parse().map_err(|_| {
                std::io::Error::other(format!(
                    "{} does not hold a sequence number",
                    self.path.display()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// Keeps `seq`: written aside and renamed, so a crash leaves the old or the new one.
    pub(super) fn write(&self, seq: u64) -> std::io::Result<()> {
        let mut tmp = self.path.clone().into_os_string();
        tmp.push(".tmp");
        std::fs::write(&tmp, seq.to_string())?;
        std::fs::rename(&tmp, &self.path)
    }
}

#[derive(Debug)]
struct Stdout {
    cursor: Cursor,
}

impl Target for Stdout {
    fn delivered(&mut self, _head: u64) -> std::io::Result<u64> {
        self.cursor.read()
    }

    fn deliver(&mut self, lines: &[String], last: u64) -> std::io::Result<()> {
        let mut stdout = std::io::stdout().lock();
        stdout.write_all(joined(lines).as_bytes())?;
        stdout.flush()?;
        self.cursor.write(last)
    }
}

#[derive(Debug)]
struct File {
    path: PathBuf,
}

impl Target for File {
    fn delivered(&mut self, _head: u64) -> std::io::Result<u64> {
        let text = match std::fs::read(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        let text = String::from_utf8_lossy(&text);
        Ok(text.lines().rev().find_map(seq_of).unwrap_or(0))
    }

    fn deliver(&mut self, lines: &[String], _last: u64) -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        let len = file.metadata()?.len();
        let written = file
            .write_all(joined(lines).as_bytes())
            .and_then(|()| file.flush());
        if written.is_err() {
            // No partial line stays behind to be delivered after.
            let _ = file.set_len(len);
        }
        written
    }
}

/// Starts the delivery thread of `target` (named `name`). `cursor` is kept at the last
/// sequence it delivered.
pub(super) fn start(
    mut target: Box<dyn Target>,
    name: String,
    spool: &Path,
    written: Arc<Written>,
    cursor: Arc<AtomicU64>,
    head: u64,
    metrics: Metrics,
) -> std::io::Result<()> {
    cursor.store(0, Ordering::Release);
    let spool = spool.to_owned();
    std::thread::Builder::new()
        .name(format!("audit-sink-{name}"))
        .spawn(move || {
            let fail = |e: &std::io::Error, backoff: &mut Duration| {
                metrics.audit_failures.with_label_values(&[&name]).inc();
                tracing::warn!(sink = %name, error = %e, retry_in = ?*backoff, "an audit sink failed; its events wait in the spool");
                std::thread::sleep(*backoff);
                *backoff = (*backoff * 2).min(MAX_BACKOFF);
            };
            let mut backoff = Duration::from_millis(100);
            // Where it stopped. A sink that holds more than the spool (its file outlived
            // the spool) goes on from the spool's head: the spool is the chain. Until
            // that is known, nothing it has not delivered is deleted.
            let from = loop {
                match target.delivered(head) {
                    Ok(seq) => break seq.min(head),
                    Err(e) => fail(&e, &mut backoff),
                }
            };
            cursor.store(from, Ordering::Release);
            let mut reader = Reader::new(&spool, from);
            loop {
                let until = written.wait_past(reader.delivered, Duration::from_secs(1));
                if until <= reader.delivered {
                    continue;
                }
                let delivered = reader.next(until, CHUNK).and_then(|lines| {
                    let Some(last) = lines.last().and_then(|l| seq_of(l)) else {
                        return Ok(None);
                    };
                    target.deliver(&lines, last).map(|()| Some(last))
                });
                match delivered {
                    Ok(Some(last)) => {
                        reader.delivered = last;
                        cursor.store(last, Ordering::Release);
                        backoff = Duration::from_millis(100);
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                    Err(e) => fail(&e, &mut backoff),
                }
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sinks_parse_and_are_named_without_credentials() {
        assert_eq!(Sink::parse("stdout"), Ok(Sink::Stdout));
        assert_eq!(
            Sink::parse("file:/tmp/a.jsonl"),
            Ok(Sink::File("/tmp/a.jsonl".into()))
        );
        let http = Sink::parse("https://collector.example:8443/ingest").unwrap();
        assert_eq!(http.name(), "https://collector.example:8443/ingest");
        let blob =
            Sink::parse("azureblob:https://acct.blob.core.windows.net/audit/agents/pod-1").unwrap();
        assert_eq!(
            blob.name(),
            "azureblob:https://acct.blob.core.windows.net/audit/agents/pod-1"
        );
        for bad in [
            "syslog",
            "file:",
            "ftp://x/y",
            "https://user:pw@collector/ingest",
            "https://collector/ingest?code=s3cret",
            "azureblob:https://acct.blob.core.windows.net/audit/p?sv=2022&sig=s3cret",
            "ftp://user:s3cret@host/x",
            "syslog://host/x?token=s3cret",
        ] {
            let err = Sink::parse(bad).unwrap_err();
            assert!(!err.contains("s3cret") && !err.contains(":pw@"), "{err}");
        }
    }

    #[test]
    fn a_cursor_is_kept_whole() {
        let dir = tempfile::tempdir().unwrap();
        let cursor = Cursor::new(dir.path(), "stdout");
        assert_eq!(cursor.read().unwrap(), 0);
        cursor.write(4711).unwrap();
        assert_eq!(cursor.read().unwrap(), 4711);
        std::fs::write(dir.path().join("cursor-stdout"), "").unwrap();
        assert!(
            cursor.read().is_err(),
            "a cursor that says nothing is not 0"
        );
    }
}
