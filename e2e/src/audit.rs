//! Reading a sidecar's audit trail in a test. The sidecar writes every event to its
//! spool first and delivers it to a file sink a moment later, so a test that has just
//! had its answer reads the sink once it holds everything the spool does.

use std::path::Path;
use std::time::{Duration, Instant};

/// The last sequence number in a trail's text (0 when it has none).
pub fn last_seq(text: &str) -> u64 {
    text.lines()
        .rev()
        .find_map(|line| {
            let rest = line.split_once("\"seq\":")?.1;
            rest[..rest.find(',')?].parse().ok()
        })
        .unwrap_or(0)
}

/// The last sequence number written to the spool in `spool`: in its newest segment
/// that holds an event (the newest one may have just been started, empty).
pub fn spool_seq(spool: &Path) -> u64 {
    let mut segments: Vec<_> = std::fs::read_dir(spool)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    segments.sort();
    segments
        .iter()
        .rev()
        .map(|p| std::fs::read_to_string(p).map_or(0, |t| last_seq(&t)))
        .find(|seq| *seq > 0)
        .unwrap_or(0)
}

/// The file sink `sink` once it has caught up with the spool `spool` and neither moved
/// for a moment (at most 10 s; then as it is).
pub fn settled(sink: &Path, spool: &Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = None;
    loop {
        let text = std::fs::read_to_string(sink).unwrap_or_default();
        let (written, delivered) = (spool_seq(spool), last_seq(&text));
        if written == delivered && seen == Some(written) || Instant::now() > deadline {
            return text;
        }
        seen = (written == delivered).then_some(written);
        std::thread::sleep(Duration::from_millis(30));
    }
}
