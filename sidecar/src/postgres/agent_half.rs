//! The agent half of a session: it reads the agent's messages and decides each
//! statement through the shared pipeline — on `Query`, on `Parse`, and again on
//! `Execute` — forwards what is allowed and, for what is refused, queues the
//! `ErrorResponse` the agent gets in its place. Refused extended-protocol messages are
//! skipped up to the next `Sync`, as the server itself skips after an error, so drivers
//! stay in step. Statements and portals are decided on what the server confirmed
//! (`registry`), never on what was merely sent.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use agentgate_crds::{Impact, SqlStatementKind};
use agentgate_policy::classify::{SqlContext, classify_sql_in};
use agentgate_policy::masking::MaskReport;
use agentgate_policy::{Evaluation, RequestAttrs, SqlRequest, SqlStatement, Target};
use bytes::{Bytes, BytesMut};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::Instrument as _;

use super::codec::{
    Frame, Frontend, PROTOCOL_VIOLATION, ProtocolError, decode_frame, error_response,
    parse_frontend,
};
use super::pending::{Execution, Pending};
use super::registry::{Bound, MAX_CURSORS, MAX_PREPARED, Overlay, Prepared, Registry, lock};
use super::upstream::PgUpstream;
use super::{Front, refusal_frame};
use crate::pipeline::{FrontEnd, Record};
use crate::refusal::Refusal;

/// The largest message accepted from the agent.
const MAX_FRONTEND_MESSAGE: usize = 64 << 20;
/// How long a `Bind`/`Execute` waits for the server to confirm an earlier batch that
/// changed the statement or portal it names.
const CONFIRM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// The agent half of a session: reads the agent's messages, decides each statement,
/// forwards what is allowed and queues what the server half must answer.
pub(super) struct AgentHalf {
    pub(super) front: Arc<Front>,
    pub(super) connection: Arc<str>,
    pub(super) identity: Option<agentgate_policy::Identity>,
    pub(super) identity_json: Option<serde_json::Value>,
    /// The id of the session's `session` event.
    pub(super) session_id: String,
    pub(super) server: tokio::io::WriteHalf<Box<dyn super::upstream::PgStream>>,
    pub(super) tx: mpsc::Sender<Pending>,
    /// What the server confirmed.
    pub(super) registry: Arc<std::sync::Mutex<Registry>>,
    /// What the current batch changed.
    pub(super) overlay: Overlay,
    /// Statement (`S`) and portal (`P`) names → the batch that last changed them.
    pub(super) touched: HashMap<(u8, String), u64>,
    /// Batches (`Sync`s and `Query`s) forwarded to the server.
    pub(super) sent_batches: u64,
    /// Batches the server has answered (`ReadyForQuery`s), from the server half.
    pub(super) resolved: watch::Receiver<u64>,
    /// The batch of the last change of every name at once (`DEALLOCATE ALL`, `CLOSE
    /// ALL`, `DISCARD ALL`).
    pub(super) touched_all: u64,
    /// Whether the current batch may change every name (see `touched_all`).
    pub(super) overlay_all: bool,
    /// How this session's SQL is read (its pinned search path).
    pub(super) context: SqlContext,
    /// An execution whose result may still be replaced by a refusal (a row limit, a
    /// column-masked COPY): nothing more of its batch goes to the server until its
    /// outcome is known, so nothing the agent is told was not run runs unseen.
    pub(super) hold: Option<oneshot::Receiver<bool>>,
    pub(super) upstream: Arc<PgUpstream>,
    /// After a refusal inside an extended-protocol batch: drop messages up to `Sync`.
    pub(super) skipping: bool,
    pub(super) modified: Arc<AtomicU64>,
    pub(super) out: BytesMut,
}

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub(super) enum SessionEnd {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Protocol(#[from] ProtocolError),
    #[error("the server half ended")]
    ServerGone,
    #[error("the agent said goodbye")]
    Terminated,
    #[error("the server did not confirm an earlier batch within {0:?}")]
    Unconfirmed(std::time::Duration),
}

impl AgentHalf {
    pub(super) async fn run(
        &mut self,
        mut agent: tokio::net::tcp::OwnedReadHalf,
        mut buf: BytesMut,
    ) -> Result<(), SessionEnd> {
        loop {
            loop {
                let message = match decode_frame(&mut buf, MAX_FRONTEND_MESSAGE) {
                    Ok(Some(frame)) => self.message(frame).await,
                    Ok(None) => break,
                    Err(e) => Err(e.into()),
                };
                if let Err(SessionEnd::Protocol(e)) = &message {
                    // What cannot be read ends the session, after an error that says why.
                    self.flush().await?;
                    let error = error_response(PROTOCOL_VIOLATION, &e.to_string(), None);
                    let _ = self
                        .queue(Pending::Refused {
                            error,
                            ready: false,
                        })
                        .await;
                }
                message?;
            }
            self.flush().await?;
            if agent.read_buf(&mut buf).await? == 0 {
                return Ok(());
            }
        }
    }

    /// Sends what has been forwarded so far to the server.
    async fn flush(&mut self) -> Result<(), SessionEnd> {
        if !self.out.is_empty() {
            self.server.write_all(&self.out).await?;
            self.server.flush().await?;
            self.out.clear();
        }
        Ok(())
    }

    fn forward(&mut self, frame: &Frame) {
        frame.encode(&mut self.out);
    }

    async fn queue(&mut self, pending: Pending) -> Result<(), SessionEnd> {
        self.tx
            .send(pending)
            .await
            .map_err(|_| SessionEnd::ServerGone)
    }

    async fn message(&mut self, frame: Frame) -> Result<(), SessionEnd> {
        let message = parse_frontend(&frame)?;
        if self.skipping && !matches!(message, Frontend::Sync | Frontend::Terminate) {
            return Ok(());
        }
        if !matches!(
            message,
            Frontend::Sync | Frontend::Flush | Frontend::Terminate
        ) && self.held_result_replaced().await?
        {
            // The agent was told the earlier result failed: the server must not run
            // the rest of the batch either.
            self.skipping = true;
            return Ok(());
        }
        match message {
            Frontend::Query(text) => {
                let sql = Arc::new(classify_sql_in(&text, &self.context));
                // Decide before anything reaches the server; flush first so earlier
                // messages are not held back behind an approval.
                self.flush().await?;
                match self.decide(&sql, &text, None, Some(&[]), false).await {
                    Ok(mut execution) => {
                        execution.ends_batch = Some(self.sent_batches + 1);
                        self.note_namespace_changes(&sql);
                        self.forward(&frame);
                        self.queue(Pending::Query(execution)).await?;
                        // A simple query destroys the unnamed statement and portal.
                        self.end_batch(true);
                    }
                    Err(error) => self.queue(Pending::Refused { error, ready: true }).await?,
                }
            }
            Frontend::Parse { name, query } => {
                let sql = Arc::new(classify_sql_in(&query, &self.context));
                self.flush().await?;
                if sql.statements.iter().any(|s| s.cursor.is_some()) {
                    // A prepared FETCH's columns are those of whatever the cursor is when
                    // it runs, not when it was described: it cannot be masked reliably.
                    let refusal = Refusal::Unsupported(
                        "FETCH and MOVE are not taken as prepared statements (their columns change with the cursor); send them as a simple query, or use a portal with a row limit".into(),
                    );
                    let error = self.refusal(summary(&sql), refusal);
                    return self.refuse_in_batch(error).await;
                }
                if !name.is_empty()
                    && self.statement(&name).await?.is_none()
                    && self.statements_held() >= MAX_PREPARED
                {
                    let refusal = Refusal::Limit {
                        rule: None,
                        policy: None,
                        reason: format!(
                            "this session holds {MAX_PREPARED} prepared statements, the most it may; Close some"
                        ),
                    };
                    let error = self.refusal(summary(&sql), refusal);
                    return self.refuse_in_batch(error).await;
                }
                match self.decide(&sql, &query, None, None, true).await {
                    Ok(_) => {
                        let prepared = Arc::new(Prepared {
                            sql,
                            text: query.into(),
                            fields: OnceLock::new(),
                        });
                        self.forward(&frame);
                        self.queue(Pending::Parse {
                            name: name.clone(),
                            prepared: prepared.clone(),
                        })
                        .await?;
                        // Ask for the statement's columns, so its rows can be masked
                        // however the agent binds and describes it.
                        let mut describe = vec![b'S'];
                        describe.extend_from_slice(name.as_bytes());
                        describe.push(0);
                        self.forward(&Frame::new(b'D', describe));
                        self.queue(Pending::DescribeStatement(prepared.clone()))
                            .await?;
                        self.change(b'S', &name);
                        self.overlay.statements.insert(name, Some(prepared));
                    }
                    Err(error) => self.refuse_in_batch(error).await?,
                }
            }
            Frontend::Bind {
                portal,
                statement,
                param_formats,
                params,
                result_formats,
            } => {
                let Some(prepared) = self.statement(&statement).await? else {
                    let error = error_response(
                        "26000",
                        &format!("prepared statement {statement:?} does not exist"),
                        None,
                    );
                    return self.refuse_in_batch(error).await;
                };
                let shown = self.parameters(&param_formats, &params);
                let text = param_formats
                    .iter()
                    .all(|f| *f == 0)
                    .then(|| params.clone());
                let bound = Arc::new(Bound {
                    statement: prepared,
                    shown,
                    text,
                    result_formats,
                    sent: AtomicU64::new(0),
                });
                self.forward(&frame);
                self.queue(Pending::Bind {
                    portal: portal.clone(),
                    bound: bound.clone(),
                })
                .await?;
                self.change(b'P', &portal);
                self.overlay.portals.insert(portal, Some(bound));
            }
            Frontend::Execute { portal, .. } => {
                // Re-checked now: the policy may have changed, the session's write
                // budget may be spent. Decided on the statement the portal was bound
                // to, as the server runs it.
                let Some(bound) = self.portal(&portal).await? else {
                    let error =
                        error_response("34000", &format!("portal {portal:?} does not exist"), None);
                    return self.refuse_in_batch(error).await;
                };
                self.flush().await?;
                let statement = bound.statement.clone();
                match self
                    .decide(
                        &statement.sql,
                        &statement.text,
                        Some(&bound.shown),
                        bound.text.as_deref(),
                        false,
                    )
                    .await
                {
                    Ok(mut execution) => {
                        self.note_namespace_changes(&statement.sql);
                        execution.portal = Some(bound);
                        self.hold_if_replaceable(&mut execution);
                        self.forward(&frame);
                        self.queue(Pending::Execute(execution)).await?;
                    }
                    Err(error) => self.refuse_in_batch(error).await?,
                }
            }
            Frontend::Describe { target, name } => {
                let known = if target == b'S' {
                    self.statement(&name).await?.is_some()
                } else {
                    self.portal(&name).await?.is_some()
                };
                if !known {
                    let error = error_response("26000", &format!("{name:?} does not exist"), None);
                    return self.refuse_in_batch(error).await;
                }
                self.forward(&frame);
                self.queue(Pending::Describe).await?;
            }
            Frontend::Close { target, name } => {
                self.change(target, &name);
                if target == b'S' {
                    self.overlay.statements.insert(name.clone(), None);
                } else {
                    self.overlay.portals.insert(name.clone(), None);
                }
                self.forward(&frame);
                self.queue(Pending::Close { target, name }).await?;
            }
            Frontend::Sync => {
                self.skipping = false;
                self.hold = None;
                self.forward(&frame);
                self.queue(Pending::Sync {
                    batch: self.sent_batches + 1,
                })
                .await?;
                self.end_batch(false);
            }
            Frontend::Flush | Frontend::CopyData | Frontend::CopyDone | Frontend::CopyFail => {
                self.forward(&frame)
            }
            Frontend::Terminate => {
                self.forward(&frame);
                self.flush().await?;
                return Err(SessionEnd::Terminated);
            }
            Frontend::FunctionCall => {
                let refusal = Refusal::Unsupported(
                    "fast-path function calls run functions by OID, out of sight of SQL classification; use SQL".into(),
                );
                let error = self.refusal(json!({ "functionCall": true }), refusal);
                self.queue(Pending::Refused { error, ready: true }).await?;
            }
            Frontend::Password(_) | Frontend::Unknown(_) => {
                return Err(ProtocolError::Unexpected(frame.tag as char).into());
            }
        }
        Ok(())
    }

    /// How many named statements the server holds once the current batch has run.
    fn statements_held(&self) -> usize {
        let registry = lock(&self.registry);
        let confirmed =
            |name: &str| !self.overlay.statements_gone && registry.statements.contains_key(name);
        let mut held = if self.overlay.statements_gone {
            0
        } else {
            registry.statements.len()
        };
        for (name, statement) in &self.overlay.statements {
            match (statement.is_some(), confirmed(name)) {
                (true, false) => held += 1,
                (false, true) => held = held.saturating_sub(1),
                _ => {}
            }
        }
        held
    }

    /// Notes that the current batch changes statement (`S`) or portal (`P`) `name`.
    fn change(&mut self, target: u8, name: &str) {
        self.touched
            .insert((target, name.to_owned()), self.sent_batches + 1);
    }

    /// Marks what SQL-level `PREPARE`/`DEALLOCATE`/`DISCARD`/`CLOSE` in `sql` may change
    /// in this batch, so later batches wait for the server's answer before relying on
    /// those names (the server half applies the change in order).
    fn note_namespace_changes(&mut self, sql: &SqlRequest) {
        for s in &sql.statements {
            if s.ends_transaction {
                self.overlay.portals.clear();
                self.overlay.portals_gone = true;
                self.overlay_all = true;
            }
            for (target, name) in [(b'S', &s.prepared_statement), (b'P', &s.closes)] {
                match name.as_deref() {
                    Some("*") => {}
                    Some(name) => {
                        self.change(target, name);
                        if target == b'S' {
                            self.overlay.statements.insert(name.to_owned(), None);
                        } else {
                            self.overlay.portals.insert(name.to_owned(), None);
                        }
                    }
                    None => {}
                }
            }
            if s.prepared_statement.as_deref() == Some("*") {
                self.overlay.statements.clear();
                self.overlay.statements_gone = true;
                self.overlay_all = true;
            }
            if s.closes.as_deref() == Some("*") {
                self.overlay.portals.clear();
                self.overlay.portals_gone = true;
                self.overlay_all = true;
            }
        }
    }

    /// The current batch went to the server (`Sync`, or a simple `Query`, which also
    /// destroys the unnamed statement and portal).
    fn end_batch(&mut self, query: bool) {
        if query {
            self.change(b'S', "");
            self.change(b'P', "");
        }
        if self.overlay_all {
            self.touched_all = self.sent_batches + 1;
            self.overlay_all = false;
        }
        self.sent_batches += 1;
        self.overlay = Overlay::default();
        // Names whose changes the server has answered need no waiting any more.
        let resolved = *self.resolved.borrow();
        self.touched.retain(|_, batch| *batch > resolved);
    }

    /// Waits, when an earlier batch changed `name` and the server has not answered it
    /// yet, until it has: what the server did with it is then in the registry.
    async fn confirmed(&mut self, target: u8, name: &str) -> Result<(), SessionEnd> {
        if self.touched.is_empty() && self.touched_all <= *self.resolved.borrow() {
            return Ok(());
        }
        let batch = self
            .touched
            .get(&(target, name.to_owned()))
            .copied()
            .unwrap_or(0)
            .max(self.touched_all);
        // Changes of the batch being sent are in the overlay; its answer cannot come
        // before its Sync, so it is never waited for.
        if *self.resolved.borrow() >= batch || batch > self.sent_batches {
            return Ok(());
        }
        self.flush().await?;
        let wait = self.resolved.wait_for(|r| *r >= batch);
        match tokio::time::timeout(CONFIRM_TIMEOUT, wait).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(SessionEnd::ServerGone),
            Err(_) => Err(SessionEnd::Unconfirmed(CONFIRM_TIMEOUT)),
        }
    }

    /// The statement `name` as the server holds it (or as this batch made it).
    async fn statement(&mut self, name: &str) -> Result<Option<Arc<Prepared>>, SessionEnd> {
        if let Some(s) = self.overlay.statements.get(name) {
            return Ok(s.clone());
        }
        if self.overlay.statements_gone {
            return Ok(None);
        }
        self.confirmed(b'S', name).await?;
        Ok(lock(&self.registry).statements.get(name).cloned())
    }

    /// The portal `name` as the server holds it (or as this batch made it).
    async fn portal(&mut self, name: &str) -> Result<Option<Arc<Bound>>, SessionEnd> {
        if let Some(p) = self.overlay.portals.get(name) {
            return Ok(p.clone());
        }
        if self.overlay.portals_gone {
            return Ok(None);
        }
        self.confirmed(b'P', name).await?;
        Ok(lock(&self.registry).portals.get(name).cloned())
    }

    /// An execution whose result a limit could replace holds back the rest of its
    /// batch until its outcome is known.
    fn hold_if_replaceable(&mut self, execution: &mut Execution) {
        let copies = execution
            .sql
            .statements
            .iter()
            .any(|s| s.kind == SqlStatementKind::Copy);
        if execution.max_rows.is_some() || (copies && execution.masking.masks_columns()) {
            let (tx, rx) = oneshot::channel();
            execution.done = Some(tx);
            self.hold = Some(rx);
        }
    }

    /// Whether a held execution's result was replaced (waiting for it first).
    async fn held_result_replaced(&mut self) -> Result<bool, SessionEnd> {
        let Some(rx) = self.hold.take() else {
            return Ok(false);
        };
        // The server keeps its answers buffered until a Sync or a Flush: ask for them.
        self.forward(&Frame::new(b'H', Vec::new()));
        self.flush().await?;
        // A result that ends without saying (the server half gave up on it) counts as
        // replaced: the batch stops.
        Ok(rx.await.unwrap_or(true))
    }

    /// The statements of `sql` with every `FETCH`/`MOVE` decided as everything its name
    /// may be at the server — a cursor declared earlier in the same text, a cursor the
    /// server confirmed declaring, a protocol portal (SQL `FETCH` runs those too) — at
    /// once. A name that is none of them is refused: what it reads is unknown.
    /// `None` when nothing in `sql` is a FETCH/MOVE (the common case: no copy).
    async fn with_cursors(
        &mut self,
        sql: &SqlRequest,
    ) -> Result<Result<Option<SqlRequest>, String>, SessionEnd> {
        if !sql.statements.iter().any(|s| s.cursor.is_some()) {
            return Ok(Ok(None));
        }
        let mut out = sql.clone();
        for i in 0..sql.statements.len() {
            let Some(name) = sql.statements[i].cursor.clone() else {
                continue;
            };
            let earlier = sql.statements[..i]
                .iter()
                .rev()
                .find(|s| s.declares.as_deref() == Some(name.as_str()))
                .cloned();
            let portal = self.portal(&name).await?;
            let confirmed = lock(&self.registry).cursors.get(&name).cloned();
            let mut sources = earlier.into_iter().chain(confirmed).chain(
                portal
                    .iter()
                    .flat_map(|p| p.statement.sql.statements.clone()),
            );
            let Some(mut decided) = sources.next() else {
                return Ok(Err(format!(
                    "cursor {name:?} was not declared in this session through agentgate, so what it reads is unknown; DECLARE it in this session"
                )));
            };
            for other in sources {
                agentgate_policy::classify::merge_statements(&mut decided, &other);
            }
            // What a FETCH of a writing portal writes, the server does not count.
            decided.uncounted_writes |= writes_rows(decided.kind);
            decided.cursor = Some(name);
            decided.declares = None;
            out.statements[i] = decided;
        }
        Ok(Ok(Some(out)))
    }

    /// A refusal inside an extended-protocol batch: the error now, then skip to `Sync`.
    async fn refuse_in_batch(&mut self, error: Frame) -> Result<(), SessionEnd> {
        self.skipping = true;
        self.queue(Pending::Refused {
            error,
            ready: false,
        })
        .await
    }

    fn record(&self, request: serde_json::Value) -> Record {
        let mut record = self.front.gateway.record(&self.connection, request);
        record.event.identity = self.identity_json.clone();
        record.event.session_id = Some(self.session_id.clone());
        record
    }

    /// Records a refusal of `request` and renders it.
    fn refusal(&self, request: serde_json::Value, refusal: Refusal) -> Frame {
        let mut record = self.record(request);
        self.refused(&mut record, refusal)
    }

    /// Records a refusal of the request `record` describes, and renders it.
    fn refused(&self, record: &mut Record, refusal: Refusal) -> Frame {
        self.front.gateway.refuse(record, &refusal);
        refusal_frame(&refusal)
    }

    /// Bind parameters as the audit record shows them: text masked, binary by size.
    fn parameters(&self, formats: &[i16], params: &[Option<Bytes>]) -> Vec<String> {
        params
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let binary = match formats {
                    [] => false,
                    [one] => *one == 1,
                    many => many.get(i) == Some(&1),
                };
                match p {
                    None => "NULL".to_owned(),
                    Some(v) if binary => format!("<{} binary bytes>", v.len()),
                    Some(v) => {
                        let mut report = MaskReport::default();
                        let masked = self.front.gateway.audit_masking.mask_bytes(v, &mut report);
                        let text = String::from_utf8_lossy(&masked);
                        text.chars().take(256).collect()
                    }
                }
            })
            .collect()
    }

    /// One statement text through the pipeline (decide, approve, record). `Err` is the
    /// `ErrorResponse` the agent gets instead.
    ///
    /// A statement that needs approval is held at `Execute`, when its parameters are
    /// known and it is about to run — not at `Parse` (`at_parse`), which runs nothing.
    async fn decide(
        &mut self,
        sql: &Arc<SqlRequest>,
        text: &str,
        parameters: Option<&[String]>,
        raw_parameters: Option<&[Option<Bytes>]>,
        at_parse: bool,
    ) -> Result<Box<Execution>, Frame> {
        let gw = self.front.gateway.clone();
        let runtime = gw.config.load_full();
        let mut record = self.record(summary(sql));
        record.event.parameters = parameters.map(<[String]>::to_vec);
        record.event.trace = crate::pipeline::trace::from_sql(text);
        let span = tracing::info_span!("statement", request_id = %record.event.request_id);
        // A FETCH is decided as what its cursor reads.
        let with_cursors = match self.with_cursors(sql).await {
            Ok(r) => r,
            Err(_) => Err("the session is ending".to_owned()),
        };
        let decided = match with_cursors {
            Ok(Some(resolved)) => {
                // The record shows what was decided: a FETCH as what its cursor reads.
                record.event.request["statements"] = json!(resolved.statements);
                resolved
            }
            Ok(None) => (**sql).clone(),
            Err(reason) => {
                let refusal = Refusal::Denied {
                    rule: None,
                    policy: None,
                    reason,
                };
                return Err(self.refused(&mut record, refusal));
            }
        };
        let declares: VecDeque<(String, SqlStatement)> = decided
            .statements
            .iter()
            .filter_map(|s| s.declares.clone().map(|n| (n, s.clone())))
            .collect();
        let too_many_cursors = {
            let registry = lock(&self.registry);
            declares
                .iter()
                .any(|(n, _)| !registry.cursors.contains_key(n))
                && registry.cursors.len() + declares.len() > MAX_CURSORS
        };
        let mut statement = Statement {
            attrs: RequestAttrs {
                connection: self.connection.to_string(),
                identity: self.identity.clone(),
                target: Target::Postgres(decided),
            },
            sql,
            text,
            parameters,
            raw_parameters,
            at_parse,
            too_many_cursors,
            modified: &self.modified,
            front: &self.front,
            connection: &self.connection,
            upstream: &self.upstream,
        };
        let decided = gw
            .decide(&runtime, &mut statement, &mut record)
            .instrument(span)
            .await;
        let evaluation = match decided {
            Ok(evaluation) => evaluation,
            Err(refusal) => return Err(self.refused(&mut record, refusal)),
        };
        Ok(Box::new(Execution {
            record,
            masking: evaluation.masking,
            max_rows: evaluation.limits.max_rows_per_query,
            portal: None,
            done: None,
            declares,
            ends_batch: None,
            sql: sql.clone(),
            columns: Vec::new(),
            described: false,
            rows: 0,
            report: MaskReport::default(),
            copy_in: false,
            cut_off: false,
            copy_refused: false,
            silenced: false,
        }))
    }
}

/// What the pipeline asks of one statement while deciding it.
struct Statement<'a> {
    attrs: RequestAttrs,
    /// The statement as sent (a FETCH as a FETCH; `attrs` has it as what it reads).
    sql: &'a SqlRequest,
    text: &'a str,
    /// Bind parameters as records show them.
    parameters: Option<&'a [String]>,
    /// Bind parameters as sent, when all are text.
    raw_parameters: Option<&'a [Option<Bytes>]>,
    at_parse: bool,
    too_many_cursors: bool,
    /// Rows this session has changed so far.
    modified: &'a AtomicU64,
    front: &'a Front,
    connection: &'a str,
    upstream: &'a Arc<PgUpstream>,
}

impl Statement<'_> {
    fn statements(&self) -> &[SqlStatement] {
        match &self.attrs.target {
            Target::Postgres(sql) => &sql.statements,
            _ => &[],
        }
    }
}

impl FrontEnd for Statement<'_> {
    fn attrs(&self) -> &RequestAttrs {
        &self.attrs
    }

    fn defers_approval(&self) -> bool {
        self.at_parse
    }

    /// The session's cursors, and its write budget: rows already changed, and writes
    /// the server would not count.
    fn limits(&self, evaluation: &Evaluation) -> Result<(), Refusal> {
        let limit = |reason| {
            Err(Refusal::Limit {
                rule: evaluation.decision.rule().map(str::to_owned),
                policy: evaluation.policy.clone(),
                reason,
            })
        };
        if !self.at_parse && self.too_many_cursors {
            return limit(format!(
                "this session has declared {MAX_CURSORS} cursors, the most it may; CLOSE some"
            ));
        }
        let Some(max) = evaluation.limits.max_rows_modified_per_session else {
            return Ok(());
        };
        let statements = self.statements();
        if statements.iter().any(|s| writes_rows(s.kind)) {
            let done = self.modified.load(Ordering::Relaxed);
            if done >= max {
                return limit(format!(
                    "this session has already changed {done} rows; limits.maxRowsModifiedPerSession is {max}, so no further writes are allowed in it"
                ));
            }
        }
        if statements.iter().any(|s| s.uncounted_writes) {
            return limit(
                "the statement writes rows inside a CTE, EXPLAIN ANALYZE or COPY, which the server does not count, so limits.maxRowsModifiedPerSession cannot be kept; write with a plain INSERT, UPDATE, DELETE or MERGE".into(),
            );
        }
        Ok(())
    }

    /// The planner's estimate of a held UPDATE or DELETE. EXPLAIN runs nothing, but the
    /// planner folds stable functions: only a statement that calls nothing but
    /// side-effect-free built-ins is planned before a human approved it.
    async fn preview(&mut self, _evaluation: &Evaluation) -> Result<Option<Impact>, Refusal> {
        let [one] = &self.sql.statements[..] else {
            return Ok(None);
        };
        if !matches!(
            one.kind,
            SqlStatementKind::Update | SqlStatementKind::Delete
        ) {
            return Ok(None);
        }
        if !one
            .functions
            .iter()
            .all(|f| agentgate_policy::classify::is_safe(f))
        {
            return Ok(Some(Impact {
                estimated_rows: None,
                detail: "no estimate: the statement calls functions agentgate does not plan before approval".into(),
            }));
        }
        Ok(Some(
            self.front
                .catalogs
                .impact(
                    self.connection,
                    self.upstream,
                    self.text,
                    self.raw_parameters,
                )
                .await,
        ))
    }

    /// The statement as sent and its (already masked) parameters, masked as the
    /// policy masks responses.
    fn summary(&self, evaluation: &Evaluation) -> String {
        let mut shown = self.text.to_owned();
        if let Some(p) = self.parameters.filter(|p| !p.is_empty()) {
            shown.push_str(" -- parameters: ");
            shown.push_str(&p.join(", "));
        }
        let mut report = MaskReport::default();
        String::from_utf8_lossy(&evaluation.masking.mask_bytes(shown.as_bytes(), &mut report))
            .into_owned()
    }
}

pub(super) fn writes_rows(kind: SqlStatementKind) -> bool {
    use SqlStatementKind as K;
    matches!(kind, K::Insert | K::Update | K::Delete | K::Merge | K::Copy)
}

/// What the audit record shows of a statement: its normalized text (literals replaced,
/// so values typed into it are not kept), its classification and fingerprint.
fn summary(sql: &SqlRequest) -> serde_json::Value {
    json!({
        "sql": sql.normalized.clone().unwrap_or_else(|| "<text the parser rejects>".into()),
        "statements": sql.statements,
        "fingerprint": sql.fingerprint,
    })
}
