//! One agent session: the startup (the agent's startup packet, its token as the
//! password, the sidecar's own login upstream with what changes how SQL is read pinned),
//! then its two halves — `agent_half` reads and decides the agent's messages,
//! `server_half` matches the server's answers to them — until either side closes.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use agentgate_crds::audit::EventKind;
use agentgate_policy::classify::SqlContext;
use agentgate_policy::masking::MaskingProfile;
use bytes::{Bytes, BytesMut};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tracing::Instrument as _;

use super::agent_half::AgentHalf;
use super::codec::{
    self, Frame, PROTOCOL_VIOLATION, ProtocolError, Startup, decode_frame, decode_startup,
    error_response, ready_for_query,
};
use super::registry::{Overlay, Registry};
use super::server_half::ServerHalf;
use super::upstream::{PgUpstream, client_encoding_ok, passed_parameters};
use super::{CancelTarget, Front, refusal_frame};
use crate::pipeline::Record;
use crate::refusal::Refusal;

/// The largest startup packet (and password message) accepted.
const MAX_STARTUP: usize = 10_000;
/// How long an agent has from connecting to a greeting: its startup packet and token,
/// and the sidecar's own login upstream.
const STARTUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// Refusals and forwarded messages the server half may lag behind by.
const PENDING: usize = 4096;

/// Runs one agent connection to its end.
pub(super) async fn run(front: Arc<Front>, connection: Arc<str>, agent: TcpStream) {
    let record = front
        .gateway
        .record(&connection, json!({ "startup": true }));
    let span = tracing::info_span!("session", session_id = %record.event.request_id, connection = %connection);
    async move {
        let started =
            tokio::time::timeout(STARTUP_TIMEOUT, start(&front, &connection, agent, record));
        match started.await {
            Ok(Some((session, agent, buf))) => session.serve(agent, buf).await,
            Ok(None) => {}
            Err(_) => tracing::debug!(
                "the agent did not complete its startup within {}s",
                STARTUP_TIMEOUT.as_secs()
            ),
        }
    }
    .instrument(span)
    .await
}

/// The startup: the agent's startup packet, its token, the upstream login. `None` when
/// the session ends here (the agent has been told why).
async fn start(
    front: &Arc<Front>,
    connection: &Arc<str>,
    mut agent: TcpStream,
    record: Record,
) -> Option<(Session, TcpStream, BytesMut)> {
    let mut buf = BytesMut::with_capacity(8192);
    let params = loop {
        match read_startup(&mut agent, &mut buf).await {
            Ok(Startup::Ssl) | Ok(Startup::GssEnc) => {
                // The agent side is loopback inside the pod: plain text.
                if agent.write_all(b"N").await.is_err() {
                    return None;
                }
            }
            Ok(Startup::Cancel { pid, key }) => {
                cancel(front, pid, &key).await;
                return None;
            }
            Ok(Startup::Startup { version, params }) => {
                if version != codec::PROTOCOL_3_0 && negotiate(&mut agent, &params).await.is_err() {
                    return None;
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
                return None;
            }
        }
    };
    let session = Session::start(front, connection, &mut agent, &mut buf, &params, record).await?;
    Some((session, agent, buf))
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

async fn cancel(front: &Front, pid: i32, key: &Bytes) {
    // Unknown keys are ignored silently, as the server does.
    if let Some(target) = front.cancel_target(pid, key)
        && let Err(e) = target.upstream.cancel(target.pid, &target.key).await
    {
        tracing::warn!(error = %e, "cancel request could not reach the database");
    }
}

pub(super) async fn send<W: AsyncWrite + Unpin>(
    w: &mut W,
    frames: &[Frame],
) -> std::io::Result<()> {
    let mut out = BytesMut::new();
    for f in frames {
        f.encode(&mut out);
    }
    w.write_all(&out).await?;
    w.flush().await
}

/// The agent half's view of the session.
struct Session {
    front: Arc<Front>,
    connection: Arc<str>,
    identity: Option<agentgate_policy::Identity>,
    identity_json: Option<serde_json::Value>,
    /// The id of the session's `session` event, on every event of its statements.
    session_id: String,
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
    /// ends here (the agent has been told why, and the refusal is recorded).
    async fn start(
        front: &Arc<Front>,
        connection: &Arc<str>,
        agent: &mut TcpStream,
        buf: &mut BytesMut,
        params: &[(String, String)],
        mut record: Record,
    ) -> Option<Session> {
        let gw = &front.gateway;
        let runtime = gw.config.load_full();
        let refused = |record: &mut Record, refusal: Refusal| {
            gw.refuse(record, &refusal);
            refusal_frame(&refusal)
        };
        let (conn, upstream) = match (
            runtime.policy.connection(connection),
            runtime.pg_upstreams.get(&**connection),
        ) {
            (Some(conn), Some(Ok(upstream))) => (conn, upstream.clone()),
            (_, Some(Err(e))) => {
                let e = refused(&mut record, Refusal::UpstreamUnavailable(e.clone()));
                let _ = send(agent, &[e]).await;
                return None;
            }
            _ => {
                let e = refused(&mut record, Refusal::NotConfigured(connection.to_string()));
                let _ = send(agent, &[e]).await;
                return None;
            }
        };

        // 1. identity: the password is the launching user's token
        let token = if conn.identities.is_empty() {
            None
        } else {
            let _ = send(agent, &[codec::authentication(3)]).await;
            Some(loop {
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
            })
        };
        let identity = match gw
            .identify(token.as_deref(), &conn.identities, &mut record)
            .await
        {
            Ok(identity) => identity,
            Err(refusal) => {
                let e = refused(&mut record, refusal);
                let _ = send(agent, &[e]).await;
                return None;
            }
        };

        // 2. the sidecar's own login upstream, with what changes how SQL is read pinned,
        // and read-only when no policy lets this session write (a write the
        // classification missed then still fails at the server).
        if let Err(reason) = client_encoding_ok(params) {
            let e = refused(&mut record, Refusal::Unsupported(reason));
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
                tracing::warn!(error = %e, detail = ?e, "upstream login failed");
                let err = refused(&mut record, Refusal::UpstreamFailed(e.to_string()));
                let _ = send(agent, &[err]).await;
                return None;
            }
        };
        let cancel_key = front.register_cancel(CancelTarget {
            upstream: upstream.clone(),
            pid: established.pid,
            key: established.key.clone(),
        });
        let mut greeting = vec![codec::authentication(0)];
        greeting.extend(established.parameters.iter().cloned());
        greeting.push(codec::backend_key_data(cancel_key.0, &cancel_key.1));
        greeting.push(ready_for_query(b'I'));
        if send(agent, &greeting).await.is_err() {
            front.unregister_cancel(cancel_key.0, &cancel_key.1);
            return None;
        }
        record.event.kind = EventKind::Session;
        record.event.decision = "allow".into();
        gw.record_event(record.event.clone());
        Some(Session {
            front: front.clone(),
            connection: connection.clone(),
            identity_json: record.event.identity.clone(),
            session_id: record.event.request_id.clone(),
            identity,
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
            front: self.front.clone(),
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
            front: self.front.clone(),
            connection: self.connection.clone(),
            identity: self.identity,
            identity_json: self.identity_json,
            session_id: self.session_id,
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
            tracing::debug!(error = %e, "agent session ended");
        }
        drop(agent_half);
        let _ = server_task.await;
        self.front
            .unregister_cancel(self.cancel_key.0, &self.cancel_key.1);
    }
}
