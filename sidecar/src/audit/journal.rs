//! The spool: the pod's audit chain on local disk, in segment files named by their first
//! sequence number (`00000000000000000001.jsonl`, …). One writer appends to the last
//! segment; sinks read behind it; a segment every sink has delivered is deleted. The
//! spool's size is bounded: past `max_bytes` not yet delivered, new requests are refused.
//!
//! On start the spool is taken up where it ended: the last line's sequence and hash are
//! the chain's head. A partly written last line (the process died mid-write; it was never
//! acknowledged, so no answer depended on it) is cut off. A complete last line that does
//! not verify is not continued: the sidecar refuses to start, and says so.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use agentgate_crds::audit::{EventKind, Head, Resumed, check_line};

/// The lock file that keeps two sidecars off one spool.
const LOCK: &str = "spool.lock";
/// The longest line read back when taking a spool up.
const MAX_LINE: u64 = 16 << 20;

/// One segment file.
#[derive(Debug)]
struct Segment {
    path: PathBuf,
    first_seq: u64,
    /// Its last event's sequence (`first_seq - 1` while empty).
    last_seq: u64,
    bytes: u64,
}

/// The spool, open for appending.
#[derive(Debug)]
pub(crate) struct Journal {
    dir: PathBuf,
    segment_bytes: u64,
    segments: VecDeque<Segment>,
    current: File,
    head: Head,
    bytes: u64,
    _lock: File,
}

/// How a spool was taken up.
#[derive(Debug)]
pub(crate) struct Opened {
    pub(crate) journal: Journal,
    /// `None` for a new spool; how the previous run ended otherwise.
    pub(crate) resumed: Option<Resumed>,
}

fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("{first_seq:020}.jsonl"))
}

/// The segments in `dir`, oldest first.
fn list(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let first = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".jsonl"))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(first) = first {
            found.push((first, path));
        }
    }
    found.sort();
    Ok(found)
}

/// The last line of `file` (without its newline), and how many bytes follow the last
/// newline (a partly written line).
fn last_line(file: &mut File) -> io::Result<(Option<String>, u64)> {
    let len = file.metadata()?.len();
    let start = len.saturating_sub(MAX_LINE);
    file.seek(SeekFrom::Start(start))?;
    let mut tail = Vec::with_capacity(usize::try_from(len - start).unwrap_or(0));
    file.read_to_end(&mut tail)?;
    let partial = tail.iter().rev().take_while(|b| **b != b'\n').count() as u64;
    let complete = &tail[..tail.len() - partial as usize];
    let Some(body) = complete.strip_suffix(b"\n") else {
        return Ok((None, partial));
    };
    let from = body.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    if from == 0 && start > 0 {
        return Err(io::Error::other(format!(
            "the spool's last line is longer than {MAX_LINE} bytes"
        )));
    }
    let line = String::from_utf8(body[from..].to_vec())
        .map_err(|_| io::Error::other("the spool's last line is not UTF-8"))?;
    Ok((Some(line), partial))
}

impl Journal {
    /// Opens (or creates) the spool in `dir`, taking the chain up where it ended.
    pub(crate) fn open(dir: &Path, segment_bytes: u64) -> io::Result<Opened> {
        std::fs::create_dir_all(dir)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(LOCK))?;
        lock.try_lock().map_err(|_| {
            io::Error::other(format!(
                "the audit spool {} is in use by another sidecar",
                dir.display()
            ))
        })?;
        let found = list(dir)?;
        let mut segments = VecDeque::new();
        let mut head = agentgate_crds::audit::Head::genesis();
        let mut resumed = None;
        let mut bytes = 0;
        // The chain's last event: in the newest segment that holds one (the newest may
        // have just been started, empty, when the previous run stopped).
        let mut newest = None;
        let mut truncated_bytes = 0;
        for (i, (first_seq, path)) in found.iter().enumerate() {
            let last = i + 1 == found.len();
            let mut file = OpenOptions::new().read(true).write(last).open(path)?;
            let (line, partial) = last_line(&mut file)?;
            let mut len = file.metadata()?.len();
            if last && partial > 0 {
                // Never acknowledged: nothing the agent was told depends on it.
                truncated_bytes = partial;
                len -= partial;
                file.set_len(len)?;
                file.sync_all()?;
            } else if partial > 0 {
                return Err(io::Error::other(format!(
                    "{} ends in a partial line but is not the last segment",
                    path.display()
                )));
            }
            let last_seq = match &line {
                Some(line) => {
                    let checked = check_line(line).map_err(|why| {
                        io::Error::other(format!(
                            "the last event of {} does not verify ({why}); the chain cannot be continued",
                            path.display()
                        ))
                    })?;
                    let seq = checked.envelope.seq;
                    newest = Some(checked);
                    seq
                }
                None => first_seq.saturating_sub(1),
            };
            bytes += len;
            segments.push_back(Segment {
                path: path.clone(),
                first_seq: *first_seq,
                last_seq,
                bytes: len,
            });
        }
        if let Some(checked) = newest {
            resumed = Some(Resumed {
                clean: checked.envelope.event.kind == EventKind::Shutdown,
                truncated_bytes,
            });
            head = Head {
                seq: checked.envelope.seq,
                hash: checked.hash,
            };
        }
        if segments.is_empty() {
            let path = segment_path(dir, 1);
            segments.push_back(Segment {
                path,
                first_seq: 1,
                last_seq: 0,
                bytes: 0,
            });
        }
        let current = match segments.back() {
            Some(s) => OpenOptions::new().create(true).append(true).open(&s.path)?,
            None => unreachable!("a segment was just made"),
        };
        Ok(Opened {
            journal: Journal {
                dir: dir.to_owned(),
                segment_bytes,
                segments,
                current,
                head,
                bytes,
                _lock: lock,
            },
            resumed,
        })
    }

    /// The chain's head: the last event written.
    pub(crate) fn head(&self) -> &Head {
        &self.head
    }

    /// Bytes in the spool (delivered or not, until their segment is deleted).
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Appends `lines` (each ending in a newline), whose last event is `head`. On an error
    /// nothing of them counts as written, and the segment is cut back to where it was.
    pub(crate) fn append(&mut self, lines: &str, first_seq: u64, head: Head) -> io::Result<()> {
        let segment = self
            .segments
            .back_mut()
            .unwrap_or_else(|| unreachable!("a spool always has a segment"));
        if let Err(e) = self.current.write_all(lines.as_bytes()) {
            let _ = self.current.set_len(segment.bytes);
            return Err(e);
        }
        if segment.last_seq < segment.first_seq
            && segment.bytes == 0
            && first_seq != segment.first_seq
        {
            // An empty segment is named for the sequence it starts with.
            let renamed = segment_path(&self.dir, first_seq);
            std::fs::rename(&segment.path, &renamed)?;
            segment.path = renamed;
            segment.first_seq = first_seq;
        }
        let n = lines.len() as u64;
        segment.bytes += n;
        segment.last_seq = head.seq;
        self.bytes += n;
        self.head = head;
        if segment.bytes >= self.segment_bytes {
            let path = segment_path(&self.dir, self.head.seq + 1);
            self.current = OpenOptions::new().create(true).append(true).open(&path)?;
            self.segments.push_back(Segment {
                path,
                first_seq: self.head.seq + 1,
                last_seq: self.head.seq,
                bytes: 0,
            });
        }
        Ok(())
    }

    /// Makes what was appended durable on disk.
    pub(crate) fn sync(&self) -> io::Result<()> {
        self.current.sync_data()
    }

    /// Deletes every segment (but the one being written) whose events all sinks have
    /// delivered.
    pub(crate) fn release(&mut self, delivered: u64) {
        while self.segments.len() > 1 {
            let Some(oldest) = self.segments.front() else {
                break;
            };
            if oldest.last_seq > delivered {
                break;
            }
            if let Err(e) = std::fs::remove_file(&oldest.path) {
                tracing::warn!(path = %oldest.path.display(), error = %e, "a delivered spool segment cannot be deleted");
                break;
            }
            self.bytes -= oldest.bytes;
            self.segments.pop_front();
        }
    }
}

/// Reads the spool from a sequence on, for a sink: only whole lines, only up to what the
/// writer says is written.
#[derive(Debug)]
pub(crate) struct Reader {
    dir: PathBuf,
    /// The segment being read, its first sequence, and the offset read up to.
    open: Option<(File, u64, u64)>,
    /// The last sequence delivered: the caller moves it once a sink has taken what
    /// was handed out.
    pub(crate) delivered: u64,
    /// The last sequence handed out (read past in `open`).
    handed_out: u64,
    buf: Vec<u8>,
}

/// The sequence of a line, read from its fixed prefix `{"v":1,"seq":N,`.
pub(crate) fn seq_of(line: &str) -> Option<u64> {
    let rest = line.split_once("\"seq\":")?.1;
    let end = rest.find(',')?;
    rest[..end].parse().ok()
}

impl Reader {
    pub(crate) fn new(dir: &Path, delivered: u64) -> Self {
        Self {
            dir: dir.to_owned(),
            open: None,
            delivered,
            handed_out: delivered,
            buf: Vec::new(),
        }
    }

    /// Up to `max` lines after `self.delivered` and at most `until`, in order. Empty
    /// when there is nothing new. Does not advance `delivered`: the caller does, once
    /// the lines are delivered; lines it did not take (the sink failed) are handed out
    /// again.
    pub(crate) fn next(&mut self, until: u64, max: usize) -> io::Result<Vec<String>> {
        if self.handed_out != self.delivered {
            // Read again from the start of the segment holding what comes next.
            self.open = None;
            self.handed_out = self.delivered;
        }
        let out = self.read(until, max)?;
        if let Some(last) = out.last().and_then(|l| seq_of(l)) {
            self.handed_out = last;
        }
        Ok(out)
    }

    fn read(&mut self, until: u64, max: usize) -> io::Result<Vec<String>> {
        let mut out = Vec::new();
        let mut want = self.delivered + 1;
        while out.len() < max && want <= until {
            if self.open.is_none() {
                // The segment holding `want`: the last one starting at or before it.
                let segments = list(&self.dir)?;
                let Some((first, path)) = segments.into_iter().rev().find(|(f, _)| *f <= want)
                else {
                    return Err(io::Error::other(format!(
                        "event {want} is no longer in the spool"
                    )));
                };
                self.open = Some((File::open(path)?, first, 0));
                self.buf.clear();
            }
            let Some((file, first, offset)) = self.open.as_mut() else {
                break;
            };
            file.seek(SeekFrom::Start(*offset))?;
            let mut chunk = Vec::new();
            Read::by_ref(file).take(1 << 20).read_to_end(&mut chunk)?;
            if chunk.is_empty() {
                // The end of this segment: the next one, if the writer moved on.
                let next_first = list(&self.dir)?
                    .into_iter()
                    .map(|(f, _)| f)
                    .find(|f| *f > *first);
                match next_first {
                    Some(f) if f <= want => {
                        self.open = None;
                        continue;
                    }
                    _ => break,
                }
            }
            let whole = chunk.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
            if whole == 0 {
                break;
            }
            for line in chunk[..whole]
                .split(|b| *b == b'\n')
                .filter(|l| !l.is_empty())
            {
                *offset += line.len() as u64 + 1;
                let line = String::from_utf8_lossy(line).into_owned();
                let Some(seq) = seq_of(&line) else { continue };
                if seq < want {
                    continue;
                }
                if seq > until || out.len() >= max {
                    *offset -= line.len() as u64 + 1;
                    return Ok(out);
                }
                want = seq + 1;
                out.push(line);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentgate_crds::audit::{AuditEvent, EventKind, chain_line};

    fn append(journal: &mut Journal, kind: EventKind) {
        let head = journal.head().clone();
        let event = AuditEvent {
            kind,
            ..AuditEvent::default()
        };
        let (line, next) = chain_line(&head, "t".into(), &event).unwrap();
        journal.append(&line, head.seq + 1, next).unwrap();
    }

    #[test]
    fn a_spool_whose_newest_segment_is_empty_goes_on_from_the_one_before() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::open(dir.path(), 64).unwrap().journal;
        append(&mut journal, EventKind::Decision);
        // The segment is full: the next one is started, empty, and the sidecar stops
        // before writing to it.
        append(&mut journal, EventKind::Shutdown);
        let head = journal.head().clone();
        assert_eq!(
            list(dir.path()).unwrap().len(),
            3,
            "an empty segment was started"
        );
        drop(journal);
        let opened = Journal::open(dir.path(), 64).unwrap();
        assert_eq!(
            opened.journal.head(),
            &head,
            "the chain goes on, not from 0"
        );
        let resumed = opened.resumed.expect("an existing spool is resumed");
        assert!(resumed.clean, "its last event was a shutdown");
        let mut journal = opened.journal;
        append(&mut journal, EventKind::Restart);
        assert_eq!(journal.head().seq, 3);
        let text: String = list(dir.path())
            .unwrap()
            .iter()
            .map(|(_, p)| std::fs::read_to_string(p).unwrap())
            .collect();
        let verified = agentgate_crds::audit::verify(&text, None).unwrap();
        assert_eq!(verified.events.len(), 3);
    }

    #[test]
    fn lines_a_sink_did_not_take_are_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::open(dir.path(), 1 << 20).unwrap().journal;
        for _ in 0..5 {
            append(&mut journal, EventKind::Decision);
        }
        let mut reader = Reader::new(dir.path(), 0);
        let seqs =
            |lines: Vec<String>| lines.iter().map(|l| seq_of(l).unwrap()).collect::<Vec<_>>();
        assert_eq!(seqs(reader.next(5, 2).unwrap()), vec![1, 2]);
        // The sink failed to deliver them: the next read hands them out again.
        assert_eq!(seqs(reader.next(5, 2).unwrap()), vec![1, 2]);
        reader.delivered = 2;
        assert_eq!(seqs(reader.next(5, 2).unwrap()), vec![3, 4]);
        reader.delivered = 4;
        assert_eq!(seqs(reader.next(5, 2).unwrap()), vec![5]);
    }
}
