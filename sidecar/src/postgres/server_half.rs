//! The server half of a session: it reads the server's messages and matches them, in
//! order, to what the agent half forwarded — the queue of [`Pending`] entries — so it
//! knows which result each row belongs to (its masking, its row limit, its audit
//! record), and it sends the queued refusals at the exact place in the stream where the
//! server's answer would have been. It writes what the server confirms into the
//! session's `registry`.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use agentgate_policy::masking::{MaskReport, MaskingProfile};
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

use super::codec::{
    self, Field, Frame, PROTOCOL_VIOLATION, ProtocolError, decode_frame, error_response,
    notice_response, parse_notice_fields, parse_row_description, ready_for_query,
};
use super::pending::{Execution, Pending};
use super::registry::{Registry, lock};
use super::rows::{Column, mask_row};
use super::upstream::{MAX_BACKEND_MESSAGE, PgUpstream, parameter_status, pinned_report};
use super::{Front, refusal_frame};
use crate::pipeline::{Completion, Record};
use crate::refusal::Refusal;

type AgentWriter = tokio::net::tcp::OwnedWriteHalf;

/// The server half of a session: reads the server's messages and matches them, in order,
/// to what the agent half forwarded.
pub(super) struct ServerHalf {
    pub(super) front: Arc<Front>,
    pub(super) connection: Arc<str>,
    pub(super) upstream: Arc<PgUpstream>,
    pub(super) agent: AgentWriter,
    pub(super) pending: VecDeque<Pending>,
    pub(super) rx: mpsc::Receiver<Pending>,
    /// The transaction status of the last `ReadyForQuery`, for refusals of simple
    /// queries.
    pub(super) status: u8,
    /// What the server confirmed, shared with the agent half.
    pub(super) registry: Arc<std::sync::Mutex<Registry>>,
    /// `ReadyForQuery`s seen: the batches the server has answered.
    pub(super) resolved: watch::Sender<u64>,
    pub(super) modified: Arc<AtomicU64>,
    /// After an error inside a batch: entries are dropped until its `Sync` arrives.
    pub(super) seeking_sync: bool,
    /// After an error inside a batch: server messages are dropped until `ReadyForQuery`.
    pub(super) discarding: bool,
    /// The Connection's masking, for the server's errors and notices (a constraint
    /// violation's DETAIL quotes the offending values).
    pub(super) masking: Arc<MaskingProfile>,
    /// Whether the session was pinned read-only (its setting must stay on).
    pub(super) read_only: bool,
}

/// Why the server half ends a session.
#[derive(Debug, thiserror::Error)]
enum ServerEnd {
    #[error("{0}")]
    Protocol(#[from] ProtocolError),
    #[error("the server reports {name} = {value:?}, but agentgate pinned it to {pinned:?}")]
    Unpinned {
        name: String,
        value: String,
        pinned: &'static str,
    },
}

impl ServerHalf {
    pub(super) async fn run<R: AsyncRead + Unpin>(mut self, mut server: R, mut buf: BytesMut) {
        let mut out = BytesMut::new();
        loop {
            // Refusals at the head of the queue go out now: nothing is owed before them.
            self.send_refusals(&mut out);
            if !out.is_empty() {
                if self.agent.write_all(&out).await.is_err() {
                    return;
                }
                out.clear();
            }
            tokio::select! {
                biased;
                p = self.rx.recv() => match p {
                    Some(p) => self.push(p),
                    None => {
                        // The agent half ended (goodbye, a closed socket or a protocol
                        // error): send it the refusals it is owed, then close both sides.
                        self.send_refusals(&mut out);
                        let _ = self.agent.write_all(&out).await;
                        let _ = self.agent.shutdown().await;
                        return;
                    }
                },
                n = server.read_buf(&mut buf) => {
                    match n {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                    // Entries for what the server answers are queued before it is sent.
                    while let Ok(p) = self.rx.try_recv() {
                        self.push(p);
                    }
                    loop {
                        match decode_frame(&mut buf, MAX_BACKEND_MESSAGE) {
                            Ok(Some(frame)) => {
                                if let Err(e) = self.message(frame, &mut out).await {
                                    tracing::warn!(connection = %self.connection, error = %e, "closing the session");
                                    if let ServerEnd::Unpinned { .. } = e {
                                        let message = format!("agentgate: {e}; the session is closed");
                                        error_response(PROTOCOL_VIOLATION, &message, None).encode(&mut out);
                                    }
                                    let _ = self.agent.write_all(&out).await;
                                    return;
                                }
                            }
                            Ok(None) => break,
                            Err(e) => {
                                tracing::warn!(connection = %self.connection, error = %e, "server broke the protocol; closing the session");
                                return;
                            }
                        }
                    }
                }
            }
        }
    }

    /// Queues an entry — unless the batch it belongs to failed, in which case it is
    /// dropped (the agent expects no answer to it; see [`Self::fail_batch`]).
    fn push(&mut self, p: Pending) {
        if !self.seeking_sync {
            self.pending.push_back(p);
            return;
        }
        match p {
            Pending::Sync { .. } => {
                self.seeking_sync = false;
                self.pending.push_back(p);
            }
            Pending::Execute(e) | Pending::Query(e) => {
                // The server ignores a simple query inside a failed batch: it answers
                // nothing for it, and it changes nothing.
                if let Some(batch) = e.ends_batch {
                    self.resolve(batch);
                }
                self.complete(
                    *e,
                    Some("not run: an earlier message in its batch failed".into()),
                );
            }
            _ => {}
        }
    }

    /// An error inside an extended-protocol batch: the agent now expects nothing until
    /// the batch's `ReadyForQuery`. Entries up to the `Sync` are dropped, and whatever
    /// the server still sends for them (it does when the error was the sidecar's) is
    /// swallowed.
    fn fail_batch(&mut self) {
        self.seeking_sync = true;
        self.discarding = true;
        let rest: Vec<Pending> = self.pending.drain(..).collect();
        for p in rest {
            self.push(p);
        }
    }

    /// The server answered batch `batch` (or ignored it): what it changed is in the
    /// registry now.
    fn resolve(&self, batch: u64) {
        self.resolved.send_if_modified(|r| {
            let newer = batch > *r;
            if newer {
                *r = batch;
            }
            newer
        });
    }

    /// A `ReadyForQuery` for `batch`. Outside a transaction the server has dropped every
    /// portal and every cursor not declared WITH HOLD: so does the registry (a WITH
    /// HOLD cursor is then refused as unknown — refusing too much, never too little).
    fn ready(&mut self, batch: u64) {
        if self.status == b'I' {
            let mut registry = lock(&self.registry);
            registry.portals.clear();
            registry.cursors.clear();
        }
        self.resolve(batch);
    }

    fn send_refusals(&mut self, out: &mut BytesMut) {
        while let Some(Pending::Refused { .. }) = self.pending.front() {
            if let Some(Pending::Refused { error, ready }) = self.pending.pop_front() {
                error.encode(out);
                if ready {
                    ready_for_query(self.status).encode(out);
                }
            }
        }
    }

    fn complete(&self, mut e: Execution, error: Option<String>) {
        let done = e.end_result(None);
        self.record_result(done, error);
    }

    /// The audit record of one statement's result.
    fn record_result(&self, (record, report): (Record, MaskReport), error: Option<String>) {
        self.front.gateway.complete(
            record,
            None,
            Completion {
                bytes: 0,
                report,
                error,
            },
        );
    }

    fn head(&mut self) -> Option<&mut Execution> {
        match self.pending.front_mut() {
            Some(Pending::Query(e) | Pending::Execute(e)) => Some(e),
            _ => None,
        }
    }

    async fn message(&mut self, frame: Frame, out: &mut BytesMut) -> Result<(), ServerEnd> {
        if frame.tag == b'S'
            && let Some((name, value)) = parameter_status(&frame.body)
            && let Some(pinned) = pinned_report(&name, self.read_only)
            && !value.eq_ignore_ascii_case(pinned)
        {
            // Every way to change a pinned setting is refused; if the server still
            // reports another value, SQL would be read differently from here on.
            return Err(ServerEnd::Unpinned {
                name,
                value,
                pinned,
            });
        }
        self.answer(frame, out).await?;
        Ok(())
    }

    async fn answer(&mut self, frame: Frame, out: &mut BytesMut) -> Result<(), ProtocolError> {
        let frame = if matches!(frame.tag, b'E' | b'N') {
            // Fields are NUL-terminated text; replacements never hold a NUL.
            let mut report = MaskReport::default();
            match self.masking.mask_bytes(&frame.body, &mut report) {
                std::borrow::Cow::Borrowed(_) => frame,
                std::borrow::Cow::Owned(masked) => Frame::new(frame.tag, masked),
            }
        } else {
            frame
        };
        // Asynchronous messages belong to no request.
        if matches!(frame.tag, b'N' | b'S' | b'A') {
            frame.encode(out);
            return Ok(());
        }
        if self.discarding && frame.tag != b'Z' {
            return Ok(());
        }
        self.send_refusals(out);
        let Some(head) = self.pending.front_mut() else {
            // Nothing was asked: the server is ending the session (a FATAL error).
            frame.encode(out);
            return Ok(());
        };
        let ends = match head {
            Pending::Query(_) => return self.result(frame, out, true).await,
            Pending::Execute(_) => return self.result(frame, out, false).await,
            Pending::Parse { name, prepared } => {
                if frame.tag == b'1' {
                    lock(&self.registry)
                        .statements
                        .insert(std::mem::take(name), prepared.clone());
                }
                frame.tag == b'1'
            }
            Pending::DescribeStatement(prepared) => {
                match frame.tag {
                    b't' => {}
                    b'T' => {
                        let _ = prepared.fields.set(parse_row_description(&frame.body)?);
                        self.pending.pop_front();
                    }
                    b'n' => {
                        let _ = prepared.fields.set(Vec::new());
                        self.pending.pop_front();
                    }
                    _ => {
                        frame.encode(out);
                        self.pending.pop_front();
                        if frame.tag == b'E' {
                            self.fail_batch();
                        }
                    }
                }
                return Ok(());
            }
            Pending::Bind { portal, bound } => {
                if frame.tag == b'2' {
                    lock(&self.registry)
                        .portals
                        .insert(std::mem::take(portal), bound.clone());
                }
                frame.tag == b'2'
            }
            Pending::Describe => matches!(frame.tag, b'T' | b'n'),
            Pending::Close { target, name } => {
                if frame.tag == b'3' {
                    let mut registry = lock(&self.registry);
                    if *target == b'S' {
                        registry.statements.remove(name.as_str());
                    } else {
                        registry.portals.remove(name.as_str());
                    }
                }
                frame.tag == b'3'
            }
            Pending::Sync { batch } => {
                if frame.tag == b'Z' {
                    let batch = *batch;
                    self.status = frame.body.first().copied().unwrap_or(b'I');
                    self.discarding = false;
                    self.ready(batch);
                }
                frame.tag == b'Z'
            }
            Pending::Refused { .. } => unreachable!("refusals at the head were sent above"),
        };
        frame.encode(out);
        if frame.tag == b'E' {
            self.pending.pop_front();
            self.fail_batch();
        } else if ends {
            self.pending.pop_front();
        }
        Ok(())
    }

    /// A message of a statement's result (simple query or portal execution).
    async fn result(
        &mut self,
        frame: Frame,
        out: &mut BytesMut,
        is_query: bool,
    ) -> Result<(), ProtocolError> {
        let Some(e) = self.head() else { return Ok(()) };
        if e.silenced && frame.tag != b'Z' {
            return self.after_replaced(frame, out);
        }
        match frame.tag {
            b'T' => {
                let masking = e.masking.clone();
                let fields = parse_row_description(&frame.body)?;
                let formats: Vec<i16> = fields.iter().map(|f| f.format).collect();
                let columns = self.columns(&fields, &formats, &masking).await;
                if let Some(e) = self.head() {
                    e.columns = columns;
                    e.described = true;
                }
                frame.encode(out);
            }
            b'D' => {
                if e.cut_off {
                    return Ok(());
                }
                let portal = e.portal.clone();
                let described = e.described;
                let masking = e.masking.clone();
                let sent = portal
                    .as_ref()
                    .map_or(0, |p| p.sent.load(Ordering::Relaxed));
                if !described && let Some(portal) = &portal {
                    // A portal's rows come without a RowDescription: its columns are its
                    // statement's, in the formats it was bound with. Unknown columns
                    // (no description arrived) are all masked.
                    let columns = match portal.statement.fields.get() {
                        Some(fields) => {
                            let formats = expand(&portal.result_formats, fields.len());
                            self.columns(fields, &formats, &masking).await
                        }
                        None => Vec::new(),
                    };
                    if let Some(e) = self.head() {
                        e.columns = columns;
                        e.described = true;
                    }
                }
                let Some(e) = self.head() else { return Ok(()) };
                if e.max_rows.is_some_and(|max| sent + e.rows >= max) {
                    e.cut_off = true;
                    return Ok(());
                }
                e.rows += 1;
                match mask_row(&e.columns, &e.masking, &frame.body, &mut e.report)? {
                    Some(masked) => masked.encode(out),
                    None => frame.encode(out),
                }
            }
            b'G' => {
                e.copy_in = true;
                frame.encode(out);
            }
            b'H' if e.masking.masks_columns() => {
                // COPY names no columns: refuse it when any table it reads has a masked
                // column (or when that cannot be looked up).
                let tables: Vec<String> = e
                    .sql
                    .statements
                    .iter()
                    .flat_map(|s| s.tables.iter().cloned())
                    .collect();
                let masking = e.masking.clone();
                let masked = self
                    .front
                    .catalogs
                    .tables_have_masked_columns(&self.connection, &self.upstream, &tables, &masking)
                    .await
                    .unwrap_or(true);
                if let Some(e) = self.head() {
                    e.copy_refused = masked;
                }
                if !masked {
                    frame.encode(out);
                }
            }
            b'd' | b'c' if e.copy_refused || e.cut_off => {}
            b'd' => {
                e.rows += 1;
                match e.masking.mask_bytes(&frame.body, &mut e.report) {
                    std::borrow::Cow::Borrowed(_) => frame.encode(out),
                    std::borrow::Cow::Owned(masked) => Frame::new(b'd', masked).encode(out),
                }
            }
            b'C' | b'I' | b's' => self.statement_done(frame, out, is_query),
            b'E' => {
                frame.encode(out);
                let message = parse_notice_fields(&frame.body)
                    .into_iter()
                    .find(|(c, _)| *c == b'M')
                    .map_or_else(|| "the database returned an error".to_owned(), |(_, m)| m);
                if is_query {
                    // The server skips the rest of the string; ReadyForQuery follows.
                    if let Some(e) = self.head() {
                        let done = e.end_result(None);
                        self.record_result(done, Some(message));
                    }
                } else if let Some(Pending::Execute(e)) = self.pending.pop_front() {
                    self.complete(*e, Some(message));
                    self.fail_batch();
                }
            }
            b'Z' if is_query => {
                self.status = frame.body.first().copied().unwrap_or(b'I');
                frame.encode(out);
                if let Some(Pending::Query(e)) = self.pending.pop_front() {
                    {
                        // A simple query destroys the unnamed statement and portal, and
                        // its PREPARE/DEALLOCATE/CLOSE change the names they name.
                        let mut registry = lock(&self.registry);
                        registry.statements.remove("");
                        registry.portals.remove("");
                        for s in &e.sql.statements {
                            registry.forget(s);
                        }
                    }
                    if let Some(batch) = e.ends_batch {
                        self.ready(batch);
                    }
                }
            }
            _ if e.cut_off => {}
            _ => frame.encode(out),
        }
        Ok(())
    }

    /// A result of a simple query string after an earlier one of the same string was
    /// replaced by a refusal. The server runs the whole string; the agent, told of an
    /// error, expects only `ReadyForQuery`. So each later statement's end is recorded
    /// as run, charged to the write limit, and reported to the agent in a notice —
    /// nothing it was not told of runs unseen.
    fn after_replaced(&mut self, frame: Frame, out: &mut BytesMut) -> Result<(), ProtocolError> {
        let modified = self.modified.clone();
        let Some(e) = self.head() else { return Ok(()) };
        let outcome = match frame.tag {
            b'G' => {
                e.copy_in = true;
                None
            }
            b'C' => {
                let tag =
                    String::from_utf8_lossy(frame.body.strip_suffix(&[0]).unwrap_or(&frame.body))
                        .into_owned();
                let affected = codec::rows_modified(&tag, e.copy_in);
                if let Some(n) = affected {
                    modified.fetch_add(n, Ordering::Relaxed);
                }
                Some((affected, tag, None))
            }
            b'E' => {
                let message = parse_notice_fields(&frame.body)
                    .into_iter()
                    .find(|(c, _)| *c == b'M')
                    .map_or_else(|| "an error".to_owned(), |(_, m)| m);
                Some((None, "ERROR".to_owned(), Some(message)))
            }
            // Rows and descriptions of results the agent does not expect are dropped.
            _ => None,
        };
        let Some((affected, tag, error)) = outcome else {
            return Ok(());
        };
        let done = e.end_result(affected);
        let note = match &error {
            Some(m) => {
                format!("ran after an earlier result of its query was cut off, and failed: {m}")
            }
            None => format!(
                "ran after an earlier result of its query was cut off ({tag}); its result was not shown"
            ),
        };
        self.record_result(done, Some(note.clone()));
        notice_response(&format!(
            "agentgate: a later statement of this query {note}"
        ))
        .encode(out);
        Ok(())
    }

    /// The end of one statement's result: count what it changed, apply a cut-off,
    /// record it.
    fn statement_done(&mut self, frame: Frame, out: &mut BytesMut, is_query: bool) {
        let modified = self.modified.clone();
        let registry = self.registry.clone();
        let Some(e) = self.head() else { return };
        let tag = if frame.tag == b'C' {
            String::from_utf8_lossy(frame.body.strip_suffix(&[0]).unwrap_or(&frame.body))
                .into_owned()
        } else {
            String::new()
        };
        let affected = codec::rows_modified(&tag, e.copy_in);
        if let Some(n) = affected {
            modified.fetch_add(n, Ordering::Relaxed);
        }
        if tag == "DECLARE CURSOR"
            && let Some((name, statement)) = e.declares.pop_front()
        {
            // Confirmed: the server has the cursor now.
            lock(&registry).cursors.insert(name, statement);
        }
        if !is_query {
            let mut registry = lock(&registry);
            for s in &e.sql.statements {
                registry.forget(s);
            }
        }
        let rows = e.rows;
        // The result is replaced: the agent gets the refusal where the server's answer
        // would have been.
        let replaced = if e.copy_refused {
            Some(Refusal::Unmaskable("COPY TO cannot be column-masked, and this policy masks columns; read the rows with SELECT".to_owned()))
        } else if e.cut_off {
            Some(Refusal::TooLarge(format!(
                "the result was cut off after {} rows: limits.maxRowsPerQuery is {}",
                rows,
                e.max_rows.unwrap_or(0)
            )))
        } else {
            None
        };
        match &replaced {
            Some(refusal) => refusal_frame(refusal).encode(out),
            None => frame.encode(out),
        }
        let error = replaced.map(|r| r.reason());
        let replaced = error.is_some();
        if let Some(done) = e.done.take() {
            let _ = done.send(replaced);
        }
        if let Some(portal) = &e.portal {
            portal.sent.fetch_add(rows, Ordering::Relaxed);
        }
        let done = e.end_result(affected);
        if replaced {
            self.front
                .gateway
                .metrics
                .responses_refused
                .with_label_values(&["cut_off"])
                .inc();
        }
        self.record_result(done, error);
        if is_query {
            // After a replaced result the agent expects only ReadyForQuery: the rest of
            // the string's results are recorded and reported as notices.
            if replaced && let Some(e) = self.head() {
                e.silenced = true;
            }
            return;
        }
        self.pending.pop_front();
        if replaced {
            self.fail_batch();
        }
    }

    /// Each column's masking, naming its origin through the catalog when the policy
    /// masks columns.
    async fn columns(
        &self,
        fields: &[Field],
        formats: &[i16],
        masking: &MaskingProfile,
    ) -> Vec<Column> {
        let wanted: Vec<(u32, i16)> = fields
            .iter()
            .filter(|f| f.table_oid != 0)
            .map(|f| (f.table_oid, f.column))
            .collect();
        let names = if masking.masks_columns() && !wanted.is_empty() {
            self.front
                .catalogs
                .column_names(&self.connection, &self.upstream, &wanted)
                .await
        } else {
            Some(HashMap::new())
        };
        fields
            .iter()
            .zip(formats.iter().copied().chain(std::iter::repeat(0)))
            .map(|(f, format)| match &names {
                // A whole row of a table (`SELECT c FROM customers c`): every column.
                _ if f.table_oid != 0 && f.column <= 0 && masking.masks_columns() => {
                    Column::masked(f, format)
                }
                Some(names) => Column::new(
                    f,
                    format,
                    names.get(&(f.table_oid, f.column)).map(String::as_str),
                    masking,
                ),
                // The catalog could not be asked: every column from a table is masked.
                None if f.table_oid != 0 => Column::masked(f, format),
                None => Column::new(f, format, None, masking),
            })
            .collect()
    }
}

/// Bind's result format codes for `n` columns: none means text, one applies to all.
fn expand(formats: &[i16], n: usize) -> Vec<i16> {
    match formats {
        [] => vec![0; n],
        [one] => vec![*one; n],
        many => many.to_vec(),
    }
}
