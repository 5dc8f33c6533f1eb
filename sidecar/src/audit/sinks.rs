//! Sinks deliver the spool onward, each from where it stopped, at its own pace: a sink
//! that is down holds back only the deletion of what it has not delivered (and, once the
//! spool is full, new requests), never a request. Each delivers every event once, in
//! order, by sequence: on start it asks where it stopped — the last sequence in its file,
//! or the cursor file it keeps in the spool — and goes on after it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

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
}

impl Sink {
    /// Its name, for metrics and logs.
    pub fn name(&self) -> String {
        match self {
            Sink::Stdout => "stdout".into(),
            Sink::File(path) => format!("file:{}", path.display()),
        }
    }

    /// The last sequence it holds, so that it goes on after it.
    fn delivered(&self, spool: &Path) -> std::io::Result<u64> {
        match self {
            Sink::Stdout => match std::fs::read_to_string(spool.join("cursor-stdout")) {
                Ok(s) => Ok(s.trim().parse().unwrap_or(0)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
                Err(e) => Err(e),
            },
            Sink::File(path) => {
                let text = match std::fs::read(path) {
                    Ok(t) => t,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
                    Err(e) => return Err(e),
                };
                let text = String::from_utf8_lossy(&text);
                Ok(text.lines().rev().find_map(seq_of).unwrap_or(0))
            }
        }
    }

    fn deliver(&self, spool: &Path, lines: &[String], last: u64) -> std::io::Result<()> {
        let mut out = String::with_capacity(lines.iter().map(|l| l.len() + 1).sum());
        for line in lines {
            out.push_str(line);
            out.push('\n');
        }
        match self {
            Sink::Stdout => {
                let mut stdout = std::io::stdout().lock();
                stdout.write_all(out.as_bytes())?;
                stdout.flush()?;
                std::fs::write(spool.join("cursor-stdout"), last.to_string())
            }
            Sink::File(path) => {
                let mut file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?;
                let len = file.metadata()?.len();
                let written = file.write_all(out.as_bytes()).and_then(|()| file.flush());
                if written.is_err() {
                    // No partial line stays behind to be delivered after.
                    let _ = file.set_len(len);
                }
                written
            }
        }
    }
}

/// Starts `sink`'s delivery thread. `cursor` is kept at the last sequence it delivered.
pub(super) fn start(
    sink: Sink,
    spool: &Path,
    written: Arc<Written>,
    cursor: Arc<AtomicU64>,
    head: u64,
    metrics: Metrics,
) -> std::io::Result<()> {
    cursor.store(0, Ordering::Release);
    let spool = spool.to_owned();
    std::thread::Builder::new()
        .name(format!("audit-sink-{}", sink.name()))
        .spawn(move || {
            let fail = |e: &std::io::Error, backoff: &mut Duration| {
                metrics
                    .audit_failures
                    .with_label_values(&[&sink.name()])
                    .inc();
                tracing::warn!(sink = %sink.name(), error = %e, retry_in = ?*backoff, "an audit sink failed; its events wait in the spool");
                std::thread::sleep(*backoff);
                *backoff = (*backoff * 2).min(MAX_BACKOFF);
            };
            let mut backoff = Duration::from_millis(100);
            // Where it stopped. A sink that holds more than the spool (its file outlived
            // the spool) goes on from the spool's head: the spool is the chain. Until
            // that is known, nothing it has not delivered is deleted.
            let from = loop {
                match sink.delivered(&spool) {
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
                    sink.deliver(&spool, &lines, last).map(|()| Some(last))
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
