//! One agent session: startup and identity, the upstream login, then two halves.
//!
//! The agent half reads the agent's messages, decides each statement (on `Query`, on
//! `Parse`, and again on `Execute`), forwards what is allowed and, for what is refused,
//! queues the `ErrorResponse` the agent gets in its place. The server half reads the
//! server's messages and matches them, in order, to what was forwarded — a queue of
//! [`Pending`] entries — so it knows which result each row belongs to (its masking, its
//! row limit, its audit record), and it sends the queued refusals at the exact place in
//! the stream where the server's answer would have been. Refused extended-protocol
//! messages are skipped up to the next `Sync`, as the server itself skips after an
//! error, so drivers stay in step.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use agentgate_crds::SqlStatementKind;
use agentgate_policy::classify::{SqlContext, classify_sql_in};
use agentgate_policy::masking::{MaskReport, MaskingProfile};
use agentgate_policy::{RequestAttrs, SqlRequest, SqlStatement, Target, evaluate};
use bytes::{Bytes, BytesMut};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};

use super::codec::{
    self, Field, Frame, Frontend, ProtocolError, Startup, decode_frame, decode_startup,
    error_response, notice_response, parse_frontend, parse_notice_fields, parse_row_description,
    ready_for_query,
};
use super::rows::{Column, mask_row};
use super::upstream::{
    MAX_BACKEND_MESSAGE, PgUpstream, client_encoding_ok, parameter_status, passed_parameters,
    pinned_report,
};
use super::{CancelTarget, Shared};
use crate::body::Completion;
use crate::gateway::{Gateway, Record};
use crate::refusal::Refusal;
use crate::runtime::Runtime;

/// The largest message accepted from the agent.
const MAX_FRONTEND_MESSAGE: usize = 64 << 20;
/// The largest startup packet accepted.
const MAX_STARTUP: usize = 10_000;
/// Refusals and forwarded messages the server half may lag behind by.
const PENDING: usize = 4096;

/// SQLSTATEs the gateway answers with.
const INSUFFICIENT_PRIVILEGE: &str = "42501";
const INVALID_PASSWORD: &str = "28P01";
const INVALID_AUTHORIZATION: &str = "28000";
const CONNECTION_FAILURE: &str = "08006";
const PROTOCOL_VIOLATION: &str = "08P01";
const PROGRAM_LIMIT: &str = "54000";
const FEATURE_NOT_SUPPORTED: &str = "0A000";

type AgentWriter = tokio::net::tcp::OwnedWriteHalf;

/// Runs one agent connection to its end.
pub(super) async fn run(gw: Arc<Gateway>, connection: Arc<str>, mut agent: TcpStream) {
    let mut buf = BytesMut::with_capacity(8192);
    let params = loop {
        match read_startup(&mut agent, &mut buf).await {
            Ok(Startup::Ssl) | Ok(Startup::GssEnc) => {
                // The agent side is loopback inside the pod: plain text.
                if agent.write_all(b"N").await.is_err() {
                    return;
                }
            }
            Ok(Startup::Cancel { pid, key }) => return cancel(&gw.postgres, pid, &key).await,
            Ok(Startup::Startup { version, params }) => {
                if version != codec::PROTOCOL_3_0 && negotiate(&mut agent, &params).await.is_err() {
                    return;
                }
                break params;
            }
            Err(e) => {
                tracing::debug!(connection = %connection, error = %e, "bad startup packet");
                let _ = send(
                    &mut agent,
                    &[error_response(PROTOCOL_VIOLATION, &e.to_string(), None)],
                )
                .await;
                return;
            }
        }
    };
    let Some(session) = Session::start(&gw, &connection, &mut agent, &mut buf, &params).await
    else {
        return;
    };
    session.serve(agent, buf).await;
}

async fn read_startup(agent: &mut TcpStream, buf: &mut BytesMut) -> Result<Startup, ProtocolError> {
    loop {
        if let Some(s) = decode_startup(buf, MAX_STARTUP)? {
            return Ok(s);
        }
        match agent.read_buf(buf).await {
            Ok(0) | Err(_) => return Err(ProtocolError::Truncated("startup")),
            Ok(_) => {}
        }
    }
}

/// A 3.x client newer than 3.0: offer 3.0 and name the options not understood.
async fn negotiate(agent: &mut TcpStream, params: &[(String, String)]) -> std::io::Result<()> {
    let unknown: Vec<&str> = params
        .iter()
        .filter(|(k, _)| k.starts_with("_pq_."))
        .map(|(k, _)| k.as_str())
        .collect();
    let mut body = BytesMut::new();
    bytes::BufMut::put_i32(&mut body, 0);
    bytes::BufMut::put_i32(&mut body, unknown.len() as i32);
    for name in unknown {
        bytes::BufMut::put_slice(&mut body, name.as_bytes());
        bytes::BufMut::put_u8(&mut body, 0);
    }
    send(agent, &[Frame::new(b'v', body)]).await
}

async fn cancel(shared: &Shared, pid: i32, key: &Bytes) {
    // Unknown keys are ignored silently, as the server does.
    if let Some(target) = shared.cancel_target(pid, key)
        && let Err(e) = target.upstream.cancel(target.pid, &target.key).await
    {
        tracing::warn!(error = %e, "cancel request could not reach the database");
    }
}

async fn send<W: AsyncWrite + Unpin>(w: &mut W, frames: &[Frame]) -> std::io::Result<()> {
    let mut out = BytesMut::new();
    for f in frames {
        f.encode(&mut out);
    }
    w.write_all(&out).await?;
    w.flush().await
}

/// A statement the server holds, as the agent parsed it and the gateway classified it.
#[derive(Debug)]
struct Prepared {
    sql: Arc<SqlRequest>,
    text: Arc<str>,
    /// Its result columns, from the sidecar's own `Describe` after the Parse.
    fields: OnceLock<Vec<Field>>,
}

/// A portal the server holds: the exact statement it was bound to — a later Parse of
/// the same name does not change what an existing portal runs — and its parameters.
#[derive(Debug)]
struct Bound {
    statement: Arc<Prepared>,
    /// The parameters as audit records and approvers see them (masked).
    shown: Vec<String>,
    /// The parameters as sent, when all are text (for an impact estimate).
    text: Option<Vec<Option<Bytes>>>,
    /// Bind's result format codes.
    result_formats: Vec<i16>,
    /// Rows sent to the agent so far (the row limit counts across Executes).
    sent: AtomicU64,
}

/// The statements and portals the server has confirmed (ParseComplete, BindComplete,
/// CloseComplete), written by the server half as the confirmations arrive. The agent
/// half decides `Bind`/`Execute` on these — never on what it sent but the server may
/// have refused (a Parse of a name that exists fails, and the old statement stays).
#[derive(Debug, Default)]
struct Registry {
    statements: HashMap<String, Arc<Prepared>>,
    portals: HashMap<String, Arc<Bound>>,
    /// Cursors the server confirmed declaring (`DECLARE CURSOR`) → what they read. SQL
    /// cursors and protocol portals share one namespace at the server.
    cursors: HashMap<String, SqlStatement>,
}

impl Registry {
    /// What a statement run by the server changed in the namespaces: SQL-level
    /// `PREPARE`/`DEALLOCATE`/`DISCARD ALL` and `CLOSE`. Applied in protocol order, as
    /// the server half sees the statement end; a removal is applied even when the
    /// statement failed (forgetting too much only refuses more).
    fn forget(&mut self, statement: &SqlStatement) {
        if statement.ends_transaction {
            // COMMIT, ROLLBACK (TO SAVEPOINT), COMMIT AND CHAIN drop portals and
            // cursors, whatever transaction follows.
            self.portals.clear();
            self.cursors.clear();
        }
        match statement.prepared_statement.as_deref() {
            Some("*") => self.statements.clear(),
            Some(name) => {
                self.statements.remove(name);
            }
            None => {}
        }
        match statement.closes.as_deref() {
            Some("*") => {
                self.portals.clear();
                self.cursors.clear();
            }
            Some(name) => {
                self.portals.remove(name);
                self.cursors.remove(name);
            }
            None => {}
        }
    }
}

/// Prepared statements (and portals) one session may hold at once.
const MAX_PREPARED: usize = 10_000;
/// Cursors one session may have declared at once.
const MAX_CURSORS: usize = 1_000;
/// How long a `Bind`/`Execute` waits for the server to confirm an earlier batch that
/// changed the statement or portal it names.
const CONFIRM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What the current batch (since the last `Sync` or `Query`) changed: within a batch
/// the server runs messages in order and skips the rest after an error, so the agent
/// half may rely on them; across batches only confirmed state counts.
#[derive(Debug, Default)]
struct Overlay {
    statements: HashMap<String, Option<Arc<Prepared>>>,
    portals: HashMap<String, Option<Arc<Bound>>>,
    /// This batch dropped every statement (`DEALLOCATE ALL`, `DISCARD ALL`): a name
    /// not made again since is gone.
    statements_gone: bool,
    /// This batch dropped every portal (`CLOSE ALL`, `DISCARD ALL`, a transaction's
    /// end).
    portals_gone: bool,
}

/// The agent half's view of the session.
struct Session {
    gw: Arc<Gateway>,
    connection: Arc<str>,
    identity: Option<agentgate_policy::Identity>,
    identity_json: Option<serde_json::Value>,
    upstream: Arc<PgUpstream>,
    server: Box<dyn super::upstream::PgStream>,
    server_buf: BytesMut,
    cancel_key: (i32, Bytes),
    modified: Arc<AtomicU64>,
    /// The Connection's masking, for the server's errors and notices.
    masking: Arc<MaskingProfile>,
    /// Whether the upstream session was pinned read-only.
    read_only: bool,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("connection", &self.connection)
            .finish()
    }
}

impl Session {
    /// Authenticates the agent (its password is the launching user's token), logs in
    /// upstream, and greets the agent as the server would. `None` when the session
    /// ends here (the agent has been told why).
    async fn start(
        gw: &Arc<Gateway>,
        connection: &Arc<str>,
        agent: &mut TcpStream,
        buf: &mut BytesMut,
        params: &[(String, String)],
    ) -> Option<Session> {
        let runtime = gw.config.load_full();
        let mut record = Record::new(gw, connection, json!({ "startup": true }));
        let refuse = |record: &mut Record, code: &str, refusal: Refusal| {
            gw.note_refusal(record, &refusal);
            error_response(code, &refusal.reason(), Some(refusal.next_step()))
        };
        let (Some(conn), Some(Ok(upstream))) = (
            runtime.policy.connection(connection),
            runtime.pg_upstreams.get(&**connection),
        ) else {
            let reason = match runtime.pg_upstreams.get(&**connection) {
                Some(Err(e)) => e.clone(),
                _ => format!("Connection {connection} is not configured for this pod"),
            };
            let e = refuse(
                &mut record,
                INVALID_AUTHORIZATION,
                Refusal::Upstream(reason),
            );
            let _ = send(agent, &[e]).await;
            return None;
        };
        let upstream = upstream.clone();

        // 1. identity: the password is the launching user's token
        let identity = if conn.identities.is_empty() {
            None
        } else {
            let _ = send(agent, &[codec::authentication(3)]).await;
            let token = loop {
                match decode_frame(buf, MAX_STARTUP) {
                    Ok(Some(f)) if f.tag == b'p' => {
                        break String::from_utf8_lossy(
                            f.body.strip_suffix(&[0]).unwrap_or(&f.body),
                        )
                        .into_owned();
                    }
                    Ok(Some(_)) | Err(_) => {
                        let e =
                            error_response(PROTOCOL_VIOLATION, "expected a password message", None);
                        let _ = send(agent, &[e]).await;
                        return None;
                    }
                    Ok(None) => match agent.read_buf(buf).await {
                        Ok(n) if n > 0 => {}
                        _ => return None,
                    },
                }
            };
            match gw.identity.validate(&token, &conn.identities).await {
                Ok(identity) => Some(identity),
                Err(e) => {
                    gw.metrics
                        .jwt_failures
                        .with_label_values(&[e.reason()])
                        .inc();
                    let reason =
                        format!("the password must be the launching user's token (a JWT): {e}");
                    gw.note_refusal(&mut record, &Refusal::Identity(e));
                    let hint = "Connect with the launching user's token as the password; get a fresh token if it expired.";
                    let _ = send(
                        agent,
                        &[error_response(INVALID_PASSWORD, &reason, Some(hint))],
                    )
                    .await;
                    return None;
                }
            }
        };
        let identity_json = identity
            .as_ref()
            .map(|i| json!({ "issuer": i.issuer, "subject": i.subject, "email": i.email }));
        record.event.identity = identity_json.clone();

        // 2. the sidecar's own login upstream, with what changes how SQL is read pinned,
        // and read-only when no policy lets this session write (a write the
        // classification missed then still fails at the server).
        if let Err(reason) = client_encoding_ok(params) {
            let refusal = Refusal::Denied {
                rule: None,
                policy: None,
                reason,
            };
            let e = refuse(&mut record, FEATURE_NOT_SUPPORTED, refusal);
            let _ = send(agent, &[e]).await;
            return None;
        }
        let read_only = agentgate_policy::session_is_read_only(&runtime.policy, connection);
        record.event.request["readOnly"] = json!(read_only);
        let established = match upstream
            .connect(&passed_parameters(params), read_only)
            .await
        {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(connection = %connection, error = %e, detail = ?e, "upstream login failed");
                let err = refuse(
                    &mut record,
                    CONNECTION_FAILURE,
                    Refusal::Upstream(e.to_string()),
                );
                let _ = send(agent, &[err]).await;
                return None;
            }
        };
        let cancel_key = gw.postgres.register_cancel(CancelTarget {
            upstream: upstream.clone(),
            pid: established.pid,
            key: established.key.clone(),
        });
        let mut greeting = vec![codec::authentication(0)];
        greeting.extend(established.parameters.iter().cloned());
        greeting.push(codec::backend_key_data(cancel_key.0, &cancel_key.1));
        greeting.push(ready_for_query(b'I'));
        if send(agent, &greeting).await.is_err() {
            gw.postgres.unregister_cancel(cancel_key.0, &cancel_key.1);
            return None;
        }
        record.event.kind = "session";
        record.event.decision = "allow".into();
        if let Err(e) = gw.audit.record(&record.event) {
            tracing::error!(error = %e, "a session start could not be recorded");
        }
        Some(Session {
            gw: gw.clone(),
            connection: connection.clone(),
            identity,
            identity_json,
            upstream,
            server: established.stream,
            server_buf: established.buf,
            cancel_key,
            modified: Arc::new(AtomicU64::new(0)),
            masking: conn.masking.clone(),
            read_only,
        })
    }

    /// Runs both halves until either side closes.
    async fn serve(self, agent: TcpStream, agent_buf: BytesMut) {
        let (agent_read, agent_write) = agent.into_split();
        let (server_read, server_write) = tokio::io::split(self.server);
        let (tx, rx) = mpsc::channel(PENDING);
        let registry = Arc::new(std::sync::Mutex::new(Registry::default()));
        let (resolved_tx, resolved) = watch::channel(0u64);
        let server_half = ServerHalf {
            gw: self.gw.clone(),
            connection: self.connection.clone(),
            upstream: self.upstream.clone(),
            agent: agent_write,
            pending: VecDeque::new(),
            rx,
            status: b'I',
            registry: registry.clone(),
            resolved: resolved_tx,
            modified: self.modified.clone(),
            seeking_sync: false,
            discarding: false,
            masking: self.masking.clone(),
            read_only: self.read_only,
        };
        let server_task = tokio::spawn(server_half.run(server_read, self.server_buf));
        let mut agent_half = AgentHalf {
            gw: self.gw.clone(),
            connection: self.connection.clone(),
            identity: self.identity,
            identity_json: self.identity_json,
            server: server_write,
            tx,
            registry,
            overlay: Overlay::default(),
            touched: HashMap::new(),
            sent_batches: 0,
            resolved,
            touched_all: 0,
            overlay_all: false,
            context: SqlContext {
                search_path: self.upstream.search_path().to_vec(),
            },
            hold: None,
            upstream: self.upstream.clone(),
            skipping: false,
            modified: self.modified,
            out: BytesMut::new(),
        };
        let result = agent_half.run(agent_read, agent_buf).await;
        if let Err(e) = &result {
            tracing::debug!(connection = %self.connection, error = %e, "agent session ended");
        }
        drop(agent_half);
        let _ = server_task.await;
        self.gw
            .postgres
            .unregister_cancel(self.cancel_key.0, &self.cancel_key.1);
    }
}

/// What the server half expects next, in the order the agent half forwarded (or
/// refused) messages.
#[derive(Debug)]
enum Pending {
    /// A simple-protocol query: results up to `ReadyForQuery`.
    Query(Box<Execution>),
    /// `ParseComplete`: the statement is then the server's.
    Parse {
        name: String,
        prepared: Arc<Prepared>,
    },
    /// The sidecar's own `Describe` of a statement it saw parsed: swallowed, its row
    /// description kept for masking.
    DescribeStatement(Arc<Prepared>),
    /// `BindComplete`: the portal is then the server's.
    Bind { portal: String, bound: Arc<Bound> },
    /// The agent's `Describe`: up to `RowDescription` or `NoData`.
    Describe,
    /// A portal's rows, up to `CommandComplete`, `EmptyQueryResponse` or
    /// `PortalSuspended`.
    Execute(Box<Execution>),
    /// `CloseComplete`: the statement (`S`) or portal (`P`) is gone.
    Close { target: u8, name: String },
    /// `ReadyForQuery`, answering batch `batch`.
    Sync { batch: u64 },
    /// A refusal in place of the server's answer; with `ready`, a `ReadyForQuery` too
    /// (a refused simple query or function call).
    Refused { error: Frame, ready: bool },
}

/// One statement (or simple query string) on its way, for masking, limits and audit.
#[derive(Debug)]
struct Execution {
    record: Record,
    masking: Arc<MaskingProfile>,
    max_rows: Option<u64>,
    /// The portal, for extended-protocol executions (its rows count across Executes).
    portal: Option<Arc<Bound>>,
    /// Told whether the result was replaced (cut off, refused) when it ends, so the
    /// agent half can hold back the rest of the batch until then.
    done: Option<oneshot::Sender<bool>>,
    /// The cursors it declares, in order: each is registered when the server
    /// confirms it (`DECLARE CURSOR`).
    declares: VecDeque<(String, SqlStatement)>,
    /// For a simple query: the batch its `ReadyForQuery` answers.
    ends_batch: Option<u64>,
    /// The statements, as classified.
    sql: Arc<SqlRequest>,
    /// The current result's columns.
    columns: Vec<Column>,
    /// Whether `columns` has been worked out for the current result.
    described: bool,
    rows: u64,
    report: MaskReport,
    copy_in: bool,
    /// Set when the row limit cut the result: rows are dropped until the result ends.
    cut_off: bool,
    /// A column-masked COPY TO: its data is dropped, the agent gets an error.
    copy_refused: bool,
    /// A simple query whose result was replaced by an error: everything up to
    /// `ReadyForQuery` is dropped.
    silenced: bool,
}

impl Execution {
    /// Ends the current result: its record (rows returned and `affected`) and masking
    /// report, and a clean slate for the next result of the same execution.
    fn end_result(&mut self, affected: Option<u64>) -> (Record, MaskReport) {
        let mut record = self.record.clone();
        record.event.rows_returned = Some(self.rows);
        record.event.rows_affected = affected;
        self.rows = 0;
        self.columns.clear();
        self.described = false;
        self.copy_in = false;
        (record, std::mem::take(&mut self.report))
    }
}

struct AgentHalf {
    gw: Arc<Gateway>,
    connection: Arc<str>,
    identity: Option<agentgate_policy::Identity>,
    identity_json: Option<serde_json::Value>,
    server: tokio::io::WriteHalf<Box<dyn super::upstream::PgStream>>,
    tx: mpsc::Sender<Pending>,
    /// What the server confirmed.
    registry: Arc<std::sync::Mutex<Registry>>,
    /// What the current batch changed.
    overlay: Overlay,
    /// Statement (`S`) and portal (`P`) names → the batch that last changed them.
    touched: HashMap<(u8, String), u64>,
    /// Batches (`Sync`s and `Query`s) forwarded to the server.
    sent_batches: u64,
    /// Batches the server has answered (`ReadyForQuery`s), from the server half.
    resolved: watch::Receiver<u64>,
    /// The batch of the last change of every name at once (`DEALLOCATE ALL`, `CLOSE
    /// ALL`, `DISCARD ALL`).
    touched_all: u64,
    /// Whether the current batch may change every name (see `touched_all`).
    overlay_all: bool,
    /// How this session's SQL is read (its pinned search path).
    context: SqlContext,
    /// An execution whose result may still be replaced by a refusal (a row limit, a
    /// column-masked COPY): nothing more of its batch goes to the server until its
    /// outcome is known, so nothing the agent is told was not run runs unseen.
    hold: Option<oneshot::Receiver<bool>>,
    upstream: Arc<PgUpstream>,
    /// After a refusal inside an extended-protocol batch: drop messages up to `Sync`.
    skipping: bool,
    modified: Arc<AtomicU64>,
    out: BytesMut,
}

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
enum SessionEnd {
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
    async fn run(
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
                    let error = error_response(
                        FEATURE_NOT_SUPPORTED,
                        "agentgate: FETCH and MOVE are not taken as prepared statements (their columns change with the cursor); send them as a simple query, or use a portal with a row limit",
                        None,
                    );
                    return self.refuse_in_batch(error).await;
                }
                if !name.is_empty()
                    && self.statement(&name).await?.is_none()
                    && lock(&self.registry).statements.len() + self.overlay.statements.len()
                        >= MAX_PREPARED
                {
                    let error = error_response(
                        PROGRAM_LIMIT,
                        &format!(
                            "agentgate: this session holds {MAX_PREPARED} prepared statements, the most it may; Close some"
                        ),
                        None,
                    );
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
                        Some(bound.shown.clone()),
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
                let mut record = self.record(json!({ "functionCall": true }));
                let refusal = Refusal::Denied {
                    rule: None,
                    policy: None,
                    reason: "fast-path function calls run functions by OID, out of sight of SQL classification; use SQL".into(),
                };
                self.gw.note_refusal(&mut record, &refusal);
                let error = error_response(
                    FEATURE_NOT_SUPPORTED,
                    &refusal.reason(),
                    Some(refusal.next_step()),
                );
                self.queue(Pending::Refused { error, ready: true }).await?;
            }
            Frontend::Password(_) | Frontend::Unknown(_) => {
                return Err(ProtocolError::Unexpected(frame.tag as char).into());
            }
        }
        Ok(())
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
        let mut record = Record::new(&self.gw, &self.connection, request);
        record.event.identity = self.identity_json.clone();
        record
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
                        let masked = self.gw.audit_masking.mask_bytes(v, &mut report);
                        let text = String::from_utf8_lossy(&masked);
                        text.chars().take(256).collect()
                    }
                }
            })
            .collect()
    }

    /// The pipeline's identity → classification → decision → approval → record steps
    /// for one statement text. `Err` is the `ErrorResponse` the agent gets instead.
    ///
    /// A statement that needs approval is held at `Execute`, when its parameters are
    /// known and it is about to run — not at `Parse` (`at_parse`), which runs nothing.
    async fn decide(
        &mut self,
        sql: &Arc<SqlRequest>,
        text: &str,
        parameters: Option<Vec<String>>,
        raw_parameters: Option<&[Option<Bytes>]>,
        at_parse: bool,
    ) -> Result<Box<Execution>, Frame> {
        let runtime: Arc<Runtime> = self.gw.config.load_full();
        let mut record = self.record(summary(sql));
        record.event.parameters = parameters;
        // A FETCH is decided as what its cursor reads.
        let with_cursors = match self.with_cursors(sql).await {
            Ok(r) => r,
            Err(_) => Err("the session is ending".to_owned()),
        };
        let decided = match &with_cursors {
            Ok(Some(resolved)) => {
                // The record shows what was decided: a FETCH as what its cursor reads.
                record.event.request["statements"] = json!(resolved.statements);
                resolved.clone()
            }
            _ => (**sql).clone(),
        };
        let declares: Vec<(String, SqlStatement)> = decided
            .statements
            .iter()
            .filter_map(|s| s.declares.clone().map(|n| (n, s.clone())))
            .collect();
        let attrs = RequestAttrs {
            connection: self.connection.to_string(),
            identity: self.identity.clone(),
            target: Target::Postgres(decided),
        };
        let evaluation = evaluate(&runtime.policy, &attrs);
        record.event.policy = evaluation.policy.clone();
        record.event.rule = evaluation.decision.rule().map(str::to_owned);
        let refuse = |record: &mut Record, refusal: Refusal| {
            self.gw.note_refusal(record, &refusal);
            let code = match refusal {
                Refusal::Denied { .. } | Refusal::NotApproved { .. } => INSUFFICIENT_PRIVILEGE,
                _ => CONNECTION_FAILURE,
            };
            let message = match refusal.rule() {
                Some(rule) => format!("agentgate: rule {rule}: {}", refusal.reason()),
                None => format!("agentgate: {}", refusal.reason()),
            };
            error_response(code, &message, Some(refusal.next_step()))
        };
        if let Err(reason) = with_cursors {
            let refusal = Refusal::Denied {
                rule: None,
                policy: evaluation.policy.clone(),
                reason,
            };
            return Err(refuse(&mut record, refusal));
        }
        let too_many_cursors = {
            let registry = lock(&self.registry);
            declares
                .iter()
                .any(|(n, _)| !registry.cursors.contains_key(n))
                && registry.cursors.len() + declares.len() > MAX_CURSORS
        };
        if !at_parse && too_many_cursors {
            let refusal = Refusal::Denied {
                rule: None,
                policy: evaluation.policy.clone(),
                reason: format!(
                    "this session has declared {MAX_CURSORS} cursors, the most it may; CLOSE some"
                ),
            };
            return Err(refuse(&mut record, refusal));
        }
        let held_for_execute = at_parse
            && matches!(
                evaluation.decision,
                agentgate_policy::Decision::RequireApproval { .. }
            );
        if held_for_execute {
            record.event.reason =
                Some("needs approval; it is asked when the statement is executed".into());
        } else {
            // What an approver is shown: the statement as sent and its (already masked)
            // parameters, masked as responses and audit records are.
            let needs_approval = matches!(
                evaluation.decision,
                agentgate_policy::Decision::RequireApproval { .. }
            );
            let parameters = needs_approval
                .then(|| record.event.parameters.clone())
                .flatten();
            let summary = || {
                let mut shown = text.to_owned();
                if let Some(p) = parameters.as_ref().filter(|p| !p.is_empty()) {
                    shown.push_str(" -- parameters: ");
                    shown.push_str(&p.join(", "));
                }
                let mut report = MaskReport::default();
                let masked = evaluation.masking.mask_bytes(shown.as_bytes(), &mut report);
                let masked = self.gw.audit_masking.mask_bytes(&masked, &mut report);
                String::from_utf8_lossy(&masked).into_owned()
            };
            let impact = match (needs_approval, &sql.statements[..]) {
                // EXPLAIN runs nothing, but the planner folds stable functions: only a
                // statement that calls nothing but side-effect-free built-ins is
                // planned before a human approved it.
                (true, [one])
                    if matches!(
                        one.kind,
                        SqlStatementKind::Update | SqlStatementKind::Delete
                    ) && !one.functions.iter().all(|f| agentgate_policy::classify::is_safe(f)) =>
                {
                    Some(agentgate_crds::Impact {
                        estimated_rows: None,
                        detail: "no estimate: the statement calls functions agentgate does not plan before approval".into(),
                    })
                }
                (true, [one])
                    if matches!(
                        one.kind,
                        SqlStatementKind::Update | SqlStatementKind::Delete
                    ) =>
                {
                    Some(
                        self.gw
                            .postgres
                            .impact(&self.connection, &self.upstream, text, raw_parameters)
                            .await,
                    )
                }
                _ => None,
            };
            if let Err(refusal) = self
                .gw
                .approve(&evaluation, &attrs, summary, impact, &mut record)
                .await
            {
                return Err(refuse(&mut record, refusal));
            }
        }
        if let Some(limit) = evaluation.limits.max_rows_modified_per_session
            && attrs_sql(&attrs).is_some_and(|s| s.statements.iter().any(|s| writes_rows(s.kind)))
        {
            let done = self.modified.load(Ordering::Relaxed);
            if done >= limit {
                let refusal = Refusal::Denied {
                    rule: None,
                    policy: evaluation.policy.clone(),
                    reason: format!(
                        "this session has already changed {done} rows; limits.maxRowsModifiedPerSession is {limit}, so no further writes are allowed in it"
                    ),
                };
                return Err(refuse(&mut record, refusal));
            }
        }
        if let Err(refusal) = self.gw.record_allowed(&mut record) {
            return Err(refuse(&mut record, refusal));
        }
        if evaluation.limits.max_rows_modified_per_session.is_some()
            && attrs_sql(&attrs).is_some_and(|s| s.statements.iter().any(|s| s.uncounted_writes))
        {
            let refusal = Refusal::Denied {
                rule: None,
                policy: evaluation.policy.clone(),
                reason: "the statement writes rows inside a CTE, EXPLAIN ANALYZE or COPY, which the server does not count, so limits.maxRowsModifiedPerSession cannot be kept; write with a plain INSERT, UPDATE, DELETE or MERGE".into(),
            };
            return Err(refuse(&mut record, refusal));
        }
        Ok(Box::new(Execution {
            record,
            masking: evaluation.masking.clone(),
            max_rows: evaluation.limits.max_rows_per_query,
            portal: None,
            done: None,
            declares: declares.into_iter().collect(),
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

fn attrs_sql(attrs: &RequestAttrs) -> Option<&SqlRequest> {
    match &attrs.target {
        Target::Postgres(sql) => Some(sql),
        _ => None,
    }
}

fn writes_rows(kind: SqlStatementKind) -> bool {
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

struct ServerHalf {
    gw: Arc<Gateway>,
    connection: Arc<str>,
    upstream: Arc<PgUpstream>,
    agent: AgentWriter,
    pending: VecDeque<Pending>,
    rx: mpsc::Receiver<Pending>,
    /// The transaction status of the last `ReadyForQuery`, for refusals of simple
    /// queries.
    status: u8,
    /// What the server confirmed, shared with the agent half.
    registry: Arc<std::sync::Mutex<Registry>>,
    /// `ReadyForQuery`s seen: the batches the server has answered.
    resolved: watch::Sender<u64>,
    modified: Arc<AtomicU64>,
    /// After an error inside a batch: entries are dropped until its `Sync` arrives.
    seeking_sync: bool,
    /// After an error inside a batch: server messages are dropped until `ReadyForQuery`.
    discarding: bool,
    /// The Connection's masking, for the server's errors and notices (a constraint
    /// violation's DETAIL quotes the offending values).
    masking: Arc<MaskingProfile>,
    /// Whether the session was pinned read-only (its setting must stay on).
    read_only: bool,
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
    async fn run<R: AsyncRead + Unpin>(mut self, mut server: R, mut buf: BytesMut) {
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
        self.gw.complete(
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
                    .gw
                    .postgres
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
        let error = if e.copy_refused {
            Some("COPY TO cannot be column-masked, and this policy masks columns; read the rows with SELECT".to_owned())
        } else if e.cut_off {
            Some(format!(
                "the result was cut off after {} rows: limits.maxRowsPerQuery is {}",
                rows,
                e.max_rows.unwrap_or(0)
            ))
        } else {
            None
        };
        match &error {
            Some(message) => {
                error_response(PROGRAM_LIMIT, &format!("agentgate: {message}"), None).encode(out)
            }
            None => frame.encode(out),
        }
        let replaced = error.is_some();
        if let Some(done) = e.done.take() {
            let _ = done.send(replaced);
        }
        if let Some(portal) = &e.portal {
            portal.sent.fetch_add(rows, Ordering::Relaxed);
        }
        let done = e.end_result(affected);
        if replaced {
            self.gw
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
            self.gw
                .postgres
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
