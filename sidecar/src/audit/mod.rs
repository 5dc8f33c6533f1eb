//! The audit trail: every request's events, hash-chained (`agentgate_crds::audit`), off
//! the request path and nothing lost.
//!
//! Requests hand events to a bounded queue. One writer thread takes what is queued,
//! chains it, appends it to the spool (`journal`) in one write and — per `--audit-fsync`
//! — one fsync, then acknowledges. A decision to allow (or to hold) is acknowledged only
//! once it is in the spool: nothing reaches an upstream, and no one is asked to approve,
//! unrecorded. Refusals, completions and session starts are queued; the writer takes
//! them in its next batch. Sinks (`sinks`) deliver the spool onward, each at its own pace,
//! and a segment every sink has delivered is deleted. When what is not yet delivered
//! reaches `--audit-spool-max-bytes`, new requests are refused until the sinks catch up.
//!
//! The chain is the pod's, across restarts: a sidecar that starts on an existing spool
//! goes on from its last event with a `restart` event that says whether the previous run
//! ended cleanly (a `shutdown` event) or is a crash boundary.

mod journal;
mod sinks;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use agentgate_crds::audit::{AuditEvent, EventKind, Head, chain_line};
use k8s_openapi::jiff::Timestamp;
use tokio::sync::oneshot;

use crate::metrics::Metrics;
use journal::Journal;
pub use sinks::{AzureAuth, BlobLocation, CollectorUrl, Sink};

/// The audit trail (`docs/audit.md`): a spool on local disk that every event is
/// written to first, and the sinks it is delivered to from there.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct AuditSettings {
    /// Where audit events are delivered, comma-separated: `stdout` (one JSON line per
    /// event), `file:<path>` (appended), an `https://` (or `http://`) collector URL
    /// (batches POSTed as NDJSON; no credentials or query in the URL), and
    /// `azureblob:https://<account>.blob.core.windows.net/<container>/<prefix>` (append
    /// blobs `<prefix>-00001.jsonl`, …; one prefix per pod). Each delivers every event
    /// once, in order (`docs/audit.md`).
    #[arg(long = "audit", env = "AGENTGATE_AUDIT", default_value = "stdout", value_parser = sinks::SinkParser, value_delimiter = ',')]
    pub sinks: Vec<Sink>,

    /// The spool: a directory of this pod's own (an emptyDir), where the chain is kept
    /// across restarts of the sidecar until every sink has delivered it.
    #[arg(
        long = "audit-spool",
        env = "AGENTGATE_AUDIT_SPOOL",
        default_value = "/var/run/agentgate/audit"
    )]
    pub spool: PathBuf,

    /// How much the spool holds not yet delivered to every sink before new requests are
    /// refused (fail closed).
    #[arg(long = "audit-spool-max-bytes", env = "AGENTGATE_AUDIT_SPOOL_MAX_BYTES", default_value_t = 256 << 20)]
    pub max_spool_bytes: u64,

    /// The size at which the spool starts a new segment file (delivered segments are
    /// deleted whole).
    #[arg(long = "audit-segment-bytes", env = "AGENTGATE_AUDIT_SEGMENT_BYTES", default_value_t = 16 << 20)]
    pub segment_bytes: u64,

    /// When the spool is fsynced: `always` (every batch: an acknowledged event survives
    /// the node's crash), a duration such as `1s` (at most that often: an acknowledged
    /// event survives the sidecar's crash, and the node's after at most that long), or
    /// `never` (left to the kernel).
    #[arg(long = "audit-fsync", env = "AGENTGATE_AUDIT_FSYNC", default_value = "1s", value_parser = parse_fsync)]
    pub fsync: Fsync,

    /// The HTTP collector and Azure Blob sinks.
    #[command(flatten)]
    pub remote: RemoteSinkSettings,
}

/// How the sinks that send the trail over the network — an HTTP collector, Azure Blob
/// Storage — authenticate and how long they wait.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct RemoteSinkSettings {
    /// A file holding a bearer token for the HTTP collector (`Authorization: Bearer`),
    /// read again for every batch. Only with an `https://` collector.
    #[arg(
        long = "audit-http-token-file",
        env = "AGENTGATE_AUDIT_HTTP_TOKEN_FILE"
    )]
    pub http_token_file: Option<PathBuf>,

    /// How the Azure Blob sink authenticates: `shared-key` (the account key in
    /// `--audit-azure-key-file`). `workload-identity` is not implemented yet and is
    /// refused at start.
    #[arg(long = "audit-azure-auth", env = "AGENTGATE_AUDIT_AZURE_AUTH", value_enum, default_value_t = AzureAuth::SharedKey)]
    pub azure_auth: AzureAuth,

    /// A file holding the storage account's key (base64), for Shared Key.
    #[arg(long = "audit-azure-key-file", env = "AGENTGATE_AUDIT_AZURE_KEY_FILE")]
    pub azure_key_file: Option<PathBuf>,

    /// The size at which the Azure Blob sink starts a new blob (at an event's start);
    /// at most 190 GiB (an append blob holds 195 GiB and 50,000 blocks).
    #[arg(long = "audit-azure-max-blob-bytes", env = "AGENTGATE_AUDIT_AZURE_MAX_BLOB_BYTES", default_value_t = sinks::MAX_AZURE_BLOB_BYTES)]
    pub azure_max_blob_bytes: u64,

    /// How long one exchange with a collector or the blob service may take (connect,
    /// send, the whole answer); past it the attempt fails and is retried.
    #[arg(long = "audit-sink-timeout", env = "AGENTGATE_AUDIT_SINK_TIMEOUT", default_value = "30s", value_parser = parse_timeout)]
    pub timeout: Duration,
}

impl Default for RemoteSinkSettings {
    fn default() -> Self {
        Self {
            http_token_file: None,
            azure_auth: AzureAuth::SharedKey,
            azure_key_file: None,
            azure_max_blob_bytes: sinks::MAX_AZURE_BLOB_BYTES,
            timeout: Duration::from_secs(30),
        }
    }
}

/// When the audit spool is fsynced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fsync {
    /// After every batch.
    Always,
    /// At most this often.
    Every(Duration),
    /// Never (left to the kernel).
    Never,
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    match agentgate_policy::parse_duration(s) {
        Ok(d) if d.is_zero() => Err("must be more than 0s".to_owned()),
        other => other,
    }
}

fn parse_fsync(s: &str) -> Result<Fsync, String> {
    match s {
        "always" => Ok(Fsync::Always),
        "never" => Ok(Fsync::Never),
        _ => agentgate_policy::parse_duration(s)
            .and_then(|d| {
                if d.is_zero() {
                    Err("must be more than 0s".to_owned())
                } else {
                    Ok(d)
                }
            })
            .map(Fsync::Every)
            .map_err(|e| format!("{s:?} is not `always`, `never` or a duration: {e}")),
    }
}

/// The largest line an event is written as; a larger event is recorded without its
/// bulk (see [`slimmed`]). Far below what the spool reads back when it starts.
const MAX_EVENT_BYTES: usize = 256 << 10;

/// `event` without what made it `size` bytes: the request as its kind and fingerprint,
/// no parameters, the reason cut to 1 KiB.
fn slimmed(event: &AuditEvent, size: usize) -> AuditEvent {
    let mut slim = event.clone();
    let keep = |key: &str| event.request.get(key).cloned();
    slim.request = serde_json::json!({
        "cutFromBytes": size,
        "method": keep("method"),
        "verb": keep("verb"),
        "fingerprint": keep("fingerprint"),
    });
    slim.parameters = slim
        .parameters
        .map(|p| vec![format!("<{} parameters>", p.len())]);
    slim.reason = slim.reason.map(|r| r.chars().take(1024).collect());
    slim.impact = None;
    slim
}

/// Events the writer may lag behind by; a request waits for room past it.
const QUEUE: usize = 8192;
/// Events written in one batch at most.
const BATCH: usize = 1024;

/// Told of every event once it is written, in order, with the chain's head after it
/// (the AgentSessions are counted this way). Called on the writer thread: it must be
/// quick and never block.
pub trait Observer: Send + Sync + std::fmt::Debug {
    /// `event` was written, and is the chain's `head`.
    fn observe(&self, event: &AuditEvent, head: &Head);
}

/// Why an event could not be recorded.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuditError {
    /// The spool holds as much undelivered as it may.
    #[error("the audit spool is full ({0} bytes not yet delivered to every sink)")]
    Full(u64),
    /// The spool could not be written.
    #[error("the audit spool cannot be written: {0}")]
    Io(String),
    /// The writer has stopped.
    #[error("the audit writer has stopped")]
    Stopped,
}

enum Job {
    Event {
        event: Box<AuditEvent>,
        /// Whether the spool's bound applies (the decision of a new request); events of
        /// requests already admitted are always written.
        admit: bool,
        ack: Option<oneshot::Sender<Result<u64, AuditError>>>,
    },
    /// Write a `shutdown` event and stop.
    Close(std::sync::mpsc::Sender<()>),
}

/// What the writer has made durable, for sinks to wait on.
#[derive(Debug, Default)]
pub(crate) struct Written {
    seq: Mutex<u64>,
    changed: Condvar,
}

impl Written {
    fn publish(&self, seq: u64) {
        let mut s = self
            .seq
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *s = seq;
        self.changed.notify_all();
    }

    /// The last written sequence, once it is past `after` or `timeout` passed.
    pub(crate) fn wait_past(&self, after: u64, timeout: Duration) -> u64 {
        let s = self
            .seq
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (s, _) = self
            .changed
            .wait_timeout_while(s, timeout, |s| *s <= after)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *s
    }
}

/// The audit trail of this sidecar.
pub struct Audit {
    tx: SyncSender<Job>,
    sinks: String,
    metrics: Metrics,
    written: Arc<Written>,
    delivered: Vec<(String, Arc<AtomicU64>)>,
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Audit")
            .field("sinks", &self.sinks)
            .finish_non_exhaustive()
    }
}

impl Audit {
    /// Opens the spool (taking its chain up), starts the writer and the sinks, and — on
    /// an existing spool — writes the `restart` event. `template` carries the pod's
    /// fields for the events the trail writes itself; `extra_ca` is trusted, besides the
    /// system roots, by the sinks that speak TLS. A sink that cannot be opened (a key,
    /// a token, a CA that cannot be read) fails it.
    pub fn open(
        settings: &AuditSettings,
        extra_ca: Option<&Path>,
        metrics: &Metrics,
        template: AuditEvent,
        observer: Option<Arc<dyn Observer>>,
    ) -> std::io::Result<Self> {
        if settings.segment_bytes.saturating_mul(2) > settings.max_spool_bytes {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "--audit-segment-bytes must be at most half of --audit-spool-max-bytes (a spool is freed a whole segment at a time)",
            ));
        }
        // Every sink is opened before anything starts (or the spool is touched): one that
        // cannot be is a configuration error, and nothing runs.
        let ctx = sinks::OpenContext {
            spool: &settings.spool,
            extra_ca,
            remote: &settings.remote,
        };
        let targets = settings
            .sinks
            .iter()
            .map(|sink| Ok((sink.name(), sink.open(ctx)?)))
            .collect::<std::io::Result<Vec<_>>>()?;
        let opened = Journal::open(&settings.spool, settings.segment_bytes)?;
        let written = Arc::new(Written::default());
        written.publish(opened.journal.head().seq);
        let mut delivered = Vec::new();
        for (name, target) in targets {
            let cursor = Arc::new(AtomicU64::new(0));
            sinks::start(
                target,
                name.clone(),
                &settings.spool,
                written.clone(),
                cursor.clone(),
                opened.journal.head().seq,
                metrics.clone(),
            )?;
            delivered.push((name, cursor));
        }
        let (tx, rx) = sync_channel(QUEUE);
        let writer = Writer {
            journal: opened.journal,
            rx,
            fsync: settings.fsync,
            max_bytes: settings.max_spool_bytes,
            last_sync: Instant::now(),
            unsynced: false,
            written: written.clone(),
            delivered: delivered.iter().map(|(_, c)| c.clone()).collect(),
            metrics: metrics.clone(),
            template: template.clone(),
            observer,
        };
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer.run())?;
        let audit = Self {
            tx,
            sinks: settings
                .sinks
                .iter()
                .map(Sink::name)
                .collect::<Vec<_>>()
                .join(","),
            metrics: metrics.clone(),
            written,
            delivered,
        };
        if let Some(resumed) = opened.resumed {
            if !resumed.clean {
                tracing::warn!(
                    truncated_bytes = resumed.truncated_bytes,
                    "the previous run of this sidecar did not end cleanly; the audit chain goes on from its last written event"
                );
            }
            audit.queue(AuditEvent {
                kind: EventKind::Restart,
                resumed: Some(resumed),
                ..template
            });
        }
        Ok(audit)
    }

    /// The sinks' names, for metrics and logs.
    pub fn sink(&self) -> &str {
        &self.sinks
    }

    /// Records `event` and waits until it is in the spool: for a decision to allow or
    /// to hold, which nothing may follow unrecorded. The spool's bound applies.
    pub async fn durable(&self, event: &AuditEvent) -> Result<(), AuditError> {
        let (ack, done) = oneshot::channel();
        let job = Job::Event {
            event: Box::new(event.clone()),
            admit: true,
            ack: Some(ack),
        };
        match self.tx.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(job)) => {
                // The writer is behind: wait for room off the async workers.
                let tx = self.tx.clone();
                tokio::task::spawn_blocking(move || tx.send(job))
                    .await
                    .map_err(|_| AuditError::Stopped)?
                    .map_err(|_| AuditError::Stopped)?;
            }
            Err(TrySendError::Disconnected(_)) => return Err(AuditError::Stopped),
        }
        done.await.map_err(|_| AuditError::Stopped)?.map(|_| ())
    }

    /// Queues `event` (a refusal, a completion, a session's start): written in the
    /// writer's next batch, whatever the spool's bound. Waits for room when the queue is
    /// full.
    pub fn queue(&self, event: AuditEvent) {
        let job = Job::Event {
            event: Box::new(event),
            admit: false,
            ack: None,
        };
        if self.tx.send(job).is_err() {
            self.metrics
                .audit_failures
                .with_label_values(&["writer"])
                .inc();
            tracing::error!("the audit writer has stopped; an event is lost");
        }
    }

    /// Writes the `shutdown` event, and waits (up to `timeout`) for the sinks to deliver
    /// everything.
    pub fn close(&self, timeout: Duration) {
        let (tx, rx) = std::sync::mpsc::channel();
        if self.tx.send(Job::Close(tx)).is_ok() {
            let _ = rx.recv_timeout(timeout);
        }
        let deadline = Instant::now() + timeout;
        let last = self.written.wait_past(0, Duration::ZERO);
        while Instant::now() < deadline
            && self
                .delivered
                .iter()
                .any(|(_, d)| d.load(Ordering::Acquire) < last)
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The writer thread's state.
struct Writer {
    journal: Journal,
    rx: Receiver<Job>,
    fsync: Fsync,
    max_bytes: u64,
    last_sync: Instant,
    /// Written since the last fsync.
    unsynced: bool,
    written: Arc<Written>,
    delivered: Vec<Arc<AtomicU64>>,
    metrics: Metrics,
    /// The pod's fields, for the events the writer writes itself.
    template: AuditEvent,
    observer: Option<Arc<dyn Observer>>,
}

impl Writer {
    fn run(mut self) {
        loop {
            // With `--audit-fsync <interval>`, what was written is fsynced within the
            // interval even when no later batch comes to do it.
            let first = match (self.fsync, self.unsynced) {
                (Fsync::Every(interval), true) => {
                    let left = interval.saturating_sub(self.last_sync.elapsed());
                    match self.rx.recv_timeout(left) {
                        Ok(job) => job,
                        Err(RecvTimeoutError::Timeout) => {
                            if let Err(e) = self.sync() {
                                tracing::error!(error = %e, "the audit spool cannot be synced");
                            }
                            continue;
                        }
                        Err(RecvTimeoutError::Disconnected) => return,
                    }
                }
                _ => match self.rx.recv() {
                    Ok(job) => job,
                    Err(_) => return,
                },
            };
            let mut batch = vec![first];
            while batch.len() < BATCH {
                match self.rx.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            if let Some(closed) = self.write(batch) {
                let _ = closed.send(());
                return;
            }
        }
    }

    /// Fsyncs what was written since the last fsync.
    fn sync(&mut self) -> Result<(), AuditError> {
        self.journal
            .sync()
            .map_err(|e| AuditError::Io(e.to_string()))?;
        self.last_sync = Instant::now();
        self.unsynced = false;
        Ok(())
    }

    /// Writes one batch; returns the closer when it held a `Close`.
    fn write(&mut self, batch: Vec<Job>) -> Option<std::sync::mpsc::Sender<()>> {
        let delivered = self
            .delivered
            .iter()
            .map(|d| d.load(Ordering::Acquire))
            .min()
            .unwrap_or(u64::MAX);
        self.journal.release(delivered);
        let undelivered = self.journal.bytes();
        let mut head = self.journal.head().clone();
        let first_seq = head.seq + 1;
        let mut lines = String::new();
        let mut acks = Vec::new();
        let mut observed: Vec<(Box<AuditEvent>, Head)> = Vec::new();
        let mut closed = None;
        let time = Timestamp::now().to_string();
        let append = |event: &AuditEvent, head: &mut Head, lines: &mut String| {
            let chained = chain_line(head, time.clone(), event).and_then(|(line, next)| {
                if line.len() <= MAX_EVENT_BYTES {
                    return Ok((line, next));
                }
                // An event this large (a statement of megabytes, thousands of
                // parameters) is recorded without its bulk, saying so.
                chain_line(head, time.clone(), &slimmed(event, line.len()))
            });
            match chained {
                Ok((line, next)) => {
                    lines.push_str(&line);
                    *head = next;
                    Ok(head.seq)
                }
                Err(e) => Err(AuditError::Io(e.to_string())),
            }
        };
        for job in batch {
            match job {
                Job::Event { event, admit, ack } => {
                    let result = if admit && undelivered >= self.max_bytes {
                        self.metrics
                            .audit_failures
                            .with_label_values(&["spool_full"])
                            .inc();
                        Err(AuditError::Full(undelivered))
                    } else {
                        append(&event, &mut head, &mut lines)
                    };
                    if result.is_ok() && self.observer.is_some() {
                        observed.push((event, head.clone()));
                    }
                    acks.push((ack, result));
                }
                Job::Close(done) => {
                    let event = AuditEvent {
                        kind: EventKind::Shutdown,
                        ..self.template.clone()
                    };
                    let _ = append(&event, &mut head, &mut lines);
                    closed = Some(done);
                }
            }
        }
        let mut outcome = Ok(());
        if !lines.is_empty() {
            outcome = self
                .journal
                .append(&lines, first_seq, head.clone())
                .map_err(|e| AuditError::Io(e.to_string()));
            let sync = match self.fsync {
                Fsync::Always => true,
                Fsync::Never => false,
                Fsync::Every(interval) => closed.is_some() || self.last_sync.elapsed() >= interval,
            };
            self.unsynced |= outcome.is_ok();
            if outcome.is_ok() && sync {
                outcome = self.sync();
            }
            if let Err(e) = &outcome {
                self.metrics
                    .audit_failures
                    .with_label_values(&["spool"])
                    .inc();
                tracing::error!(error = %e, "the audit spool cannot be written");
            }
            self.written.publish(self.journal.head().seq);
        }
        if let (Ok(()), Some(observer)) = (&outcome, &self.observer) {
            for (event, head) in &observed {
                observer.observe(event, head);
            }
        }
        for (ack, result) in acks {
            let result = match (&outcome, result) {
                (Err(e), _) => Err(e.clone()),
                (Ok(()), result) => result,
            };
            if let Some(ack) = ack {
                let _ = ack.send(result);
            }
        }
        closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_of_megabytes_is_written_without_its_bulk() {
        let dir = tempfile::tempdir().unwrap();
        let settings = AuditSettings {
            sinks: vec![Sink::File(dir.path().join("audit.jsonl"))],
            spool: dir.path().join("spool"),
            max_spool_bytes: 64 << 20,
            segment_bytes: 16 << 20,
            fsync: Fsync::Never,
            remote: Default::default(),
        };
        let audit = Audit::open(
            &settings,
            None,
            &Metrics::new(),
            AuditEvent::default(),
            None,
        )
        .unwrap();
        let huge = AuditEvent {
            request: serde_json::json!({ "sql": "x".repeat(4 << 20), "fingerprint": "f1" }),
            parameters: Some(vec!["p".repeat(200); 30_000]),
            ..Default::default()
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(audit.durable(&huge)).unwrap();
        audit.close(Duration::from_secs(5));
        let trail = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
        let verified = agentgate_crds::audit::verify(&trail, None).unwrap();
        let written = &verified.events[0].envelope.event;
        assert!(trail.lines().all(|l| l.len() <= MAX_EVENT_BYTES));
        assert_eq!(written.request["fingerprint"], "f1");
        assert!(written.request["cutFromBytes"].as_u64().unwrap() > 4 << 20);
        assert_eq!(
            written.parameters.as_deref(),
            Some(&["<30000 parameters>".to_owned()][..])
        );
        // A sidecar starting on it takes the chain up.
        drop(audit);
        let again = journal::Journal::open(&settings.spool, settings.segment_bytes).unwrap();
        assert_eq!(again.journal.head().seq, verified.head.seq);
    }
}
