//! The sidecar's own connections to a postgres Connection's server: TLS as the
//! Connection says, authentication with the Connection's credentials (SCRAM-SHA-256, md5
//! or cleartext, as the server asks), cancel requests, and a small simple-query client
//! for the sidecar's own catalog look-ups. The agent never sees any of it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use agentgate_crds::{ConnectionSpec, TlsMode};
use bytes::{BufMut, Bytes, BytesMut};
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::codec::{
    CANCEL_REQUEST, Frame, ProtocolError, Reader, SSL_REQUEST, decode_frame, parse_data_row,
    parse_notice_fields, startup_message, startup_packet,
};
use crate::tls::{TlsError, client_config, upstream_tls};

/// The largest message accepted from the server (PostgreSQL's own limit is 1 GiB).
pub const MAX_BACKEND_MESSAGE: usize = 1 << 30;

/// A byte stream to the server, plain or TLS.
pub trait PgStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> PgStream for T {}

/// Where and how a postgres Connection's server is reached.
#[derive(Debug)]
pub struct PgUpstream {
    host: String,
    port: u16,
    database: String,
    tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
    credentials: PathBuf,
    /// The Connection's search path, pinned on every session.
    search_path: Vec<String>,
    /// How long connecting, the TLS handshake and the login to the server may take.
    login_timeout: std::time::Duration,
}

/// Why a connection to the server could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Network or TLS failure.
    #[error("cannot reach the database: {0}")]
    Io(#[from] std::io::Error),
    /// The server does not speak TLS although the Connection requires it.
    #[error("the database refused TLS, which the Connection requires")]
    NoTls,
    /// The credential files are missing or unreadable.
    #[error("the credential for this connection is unavailable: {0}")]
    Credential(String),
    /// The server refused the sidecar's credentials or asked for an unsupported method.
    #[error("the database refused the sidecar's login (SQLSTATE {code})")]
    Refused {
        /// SQLSTATE.
        code: String,
        /// The server's message (may name the user; logged, never sent to the agent).
        message: String,
    },
    /// The server sent something that is not the protocol.
    #[error("the database broke the protocol: {0}")]
    Protocol(String),
    /// Connecting, TLS and login together took longer than allowed.
    #[error("the database did not complete the login within {0:?}")]
    Timeout(std::time::Duration),
}

impl From<ProtocolError> for ConnectError {
    fn from(e: ProtocolError) -> Self {
        ConnectError::Protocol(e.to_string())
    }
}

/// An authenticated session with the server, ready for queries.
pub struct Established {
    /// The stream.
    pub stream: Box<dyn PgStream>,
    /// Bytes already read past the startup.
    pub buf: BytesMut,
    /// The server's `ParameterStatus` messages.
    pub parameters: Vec<Frame>,
    /// The server's backend process id, for cancel requests.
    pub pid: i32,
    /// The server's cancel key.
    pub key: Bytes,
}

impl std::fmt::Debug for Established {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Established")
            .field("pid", &self.pid)
            .finish()
    }
}

impl PgUpstream {
    /// Reads a postgres Connection's upstream settings.
    pub fn new(
        spec: &ConnectionSpec,
        credentials_dir: &Path,
        extra_ca: Option<&Path>,
        login_timeout: std::time::Duration,
    ) -> Result<Self, String> {
        let address = &spec.upstream.address;
        let (host, port) = address
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h.trim_matches(['[', ']']), p.parse::<u16>().ok()?)))
            .filter(|(h, _)| !h.is_empty())
            .ok_or_else(|| format!("upstream.address {address:?} is not host:port"))?;
        let database = spec
            .upstream
            .database
            .clone()
            .ok_or("a postgres Connection needs upstream.database")?;
        let (settings, roots) =
            upstream_tls(spec, credentials_dir, extra_ca).map_err(|e| e.to_string())?;
        let tls = match settings.mode {
            TlsMode::Disable => None,
            mode => {
                let name = settings
                    .server_name
                    .clone()
                    .unwrap_or_else(|| host.to_owned());
                let name = ServerName::try_from(name.clone())
                    .map_err(|_| TlsError::ServerName(name).to_string())?;
                Some((Arc::new(client_config(roots, mode)), name))
            }
        };
        let credentials = match &spec.credentials.secret_ref {
            Some(secret) => credentials_dir.join(&secret.name),
            None => return Err("postgres Connections take credentials.secretRef (username, password); other sources are not supported for postgres".into()),
        };
        Ok(Self {
            host: host.to_owned(),
            port,
            database,
            tls,
            credentials,
            search_path: spec.upstream.effective_search_path(),
            login_timeout,
        })
    }

    async fn open(&self) -> Result<Box<dyn PgStream>, ConnectError> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port)).await?;
        tcp.set_nodelay(true)?;
        let Some((config, name)) = &self.tls else {
            return Ok(Box::new(tcp));
        };
        let mut tcp = tcp;
        tcp.write_all(&startup_packet(SSL_REQUEST, &[])).await?;
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer).await?;
        if answer[0] != b'S' {
            return Err(ConnectError::NoTls);
        }
        let tls = tokio_rustls::TlsConnector::from(config.clone())
            .connect(name.clone(), tcp)
            .await?;
        Ok(Box::new(tls))
    }

    fn credential(&self, key: &str) -> Result<String, ConnectError> {
        let path = self.credentials.join(key);
        std::fs::read_to_string(&path)
            .map(|s| s.trim_end_matches(['\r', '\n']).to_owned())
            .map_err(|e| ConnectError::Credential(format!("{}: {e}", path.display())))
    }

    /// The search path every session of this Connection is pinned to.
    pub fn search_path(&self) -> &[String] {
        &self.search_path
    }

    /// The settings pinned on every session, as startup parameters: how the server
    /// reads SQL text (UTF-8, standard-conforming strings — as the classifier reads it)
    /// and where unqualified names resolve; read-only when `read_only`. Startup
    /// parameters outrank role and database defaults, and `RESET` returns to them.
    fn pins(&self, read_only: bool) -> Vec<(&'static str, String)> {
        let quoted: Vec<String> = self
            .search_path
            .iter()
            .map(|s| format!("\"{}\"", s.replace('"', "\"\"")))
            .collect();
        let mut pins = vec![
            ("client_encoding", "UTF8".to_owned()),
            ("standard_conforming_strings", "on".to_owned()),
            ("search_path", quoted.join(", ")),
        ];
        if read_only {
            pins.push(("default_transaction_read_only", "on".to_owned()));
        }
        pins
    }

    /// Opens and authenticates a session with the pinned settings (read-only when
    /// `read_only`), passing the agent's harmless startup `parameters` (application
    /// name, date style) along. The server's reported settings are checked against
    /// the pins: a session the server does not pin as asked is not used.
    pub async fn connect(
        &self,
        parameters: &[(String, String)],
        read_only: bool,
    ) -> Result<Established, ConnectError> {
        // A server that accepts TCP and never answers must not hold the agent (or the
        // catalog lock) forever.
        tokio::time::timeout(self.login_timeout, self.login(parameters, read_only))
            .await
            .unwrap_or(Err(ConnectError::Timeout(self.login_timeout)))
    }

    async fn login(
        &self,
        parameters: &[(String, String)],
        read_only: bool,
    ) -> Result<Established, ConnectError> {
        let user = self.credential("username")?;
        let password = self.credential("password")?;
        let mut stream = self.open().await?;
        let pins = self.pins(read_only);
        let mut params = vec![
            ("user", user.as_str()),
            ("database", self.database.as_str()),
        ];
        params.extend(
            parameters
                .iter()
                .filter(|(k, _)| !pins.iter().any(|(p, _)| k.eq_ignore_ascii_case(p)))
                .map(|(k, v)| (k.as_str(), v.as_str())),
        );
        params.extend(pins.iter().map(|(k, v)| (*k, v.as_str())));
        stream.write_all(&startup_message(&params)).await?;
        let mut buf = BytesMut::with_capacity(8192);
        let mut scram: Option<ScramSha256> = None;
        loop {
            let frame = read_frame(&mut stream, &mut buf).await?;
            match frame.tag {
                b'R' => {
                    let mut r = Reader::new(&frame.body, "Authentication");
                    match r.i32()? {
                        0 => break,
                        3 => send_password(&mut stream, password.as_bytes()).await?,
                        5 => {
                            let salt = r.rest();
                            let salt: [u8; 4] = salt.try_into().map_err(|_| {
                                ConnectError::Protocol("md5 salt is not 4 bytes".into())
                            })?;
                            let hash = md5_hash(user.as_bytes(), password.as_bytes(), salt);
                            send_password(&mut stream, hash.as_bytes()).await?;
                        }
                        10 => {
                            let mut offered = Vec::new();
                            while let Ok(m) = r.cstr() {
                                if m.is_empty() {
                                    break;
                                }
                                offered.push(m);
                            }
                            if !offered.contains(&SCRAM_SHA_256) {
                                return Err(ConnectError::Protocol(format!(
                                    "the database offers only SASL {offered:?}"
                                )));
                            }
                            let s = ScramSha256::new(
                                password.as_bytes(),
                                ChannelBinding::unsupported(),
                            );
                            let mut body = BytesMut::new();
                            body.put_slice(SCRAM_SHA_256.as_bytes());
                            body.put_u8(0);
                            body.put_i32(i32::try_from(s.message().len()).unwrap_or(i32::MAX));
                            body.put_slice(s.message());
                            write_frame(&mut stream, &Frame::new(b'p', body)).await?;
                            scram = Some(s);
                        }
                        11 => {
                            let s = scram.as_mut().ok_or_else(|| {
                                ConnectError::Protocol("SASLContinue before SASL".into())
                            })?;
                            s.update(r.rest())
                                .map_err(|e| ConnectError::Protocol(e.to_string()))?;
                            write_frame(&mut stream, &Frame::new(b'p', s.message().to_vec()))
                                .await?;
                        }
                        12 => {
                            let mut s = scram.take().ok_or_else(|| {
                                ConnectError::Protocol("SASLFinal before SASL".into())
                            })?;
                            s.finish(r.rest()).map_err(|e| {
                                ConnectError::Protocol(format!(
                                    "the database's SCRAM proof did not verify: {e}"
                                ))
                            })?;
                        }
                        other => {
                            return Err(ConnectError::Protocol(format!(
                                "unsupported authentication method {other}"
                            )));
                        }
                    }
                }
                b'E' => return Err(refused(&frame)),
                b'N' => {}
                other => {
                    return Err(ConnectError::Protocol(format!(
                        "unexpected message {:?} during authentication",
                        other as char
                    )));
                }
            }
        }
        let (mut parameters, mut pid, mut key) = (Vec::new(), 0, Bytes::new());
        loop {
            let frame = read_frame(&mut stream, &mut buf).await?;
            match frame.tag {
                b'S' => parameters.push(frame),
                b'K' => {
                    let mut r = Reader::new(&frame.body, "BackendKeyData");
                    pid = r.i32()?;
                    key = Bytes::copy_from_slice(r.rest());
                }
                b'Z' => break,
                b'N' => {}
                b'E' => return Err(refused(&frame)),
                other => {
                    return Err(ConnectError::Protocol(format!(
                        "unexpected message {:?} after authentication",
                        other as char
                    )));
                }
            }
        }
        for frame in &parameters {
            if let Some((name, value)) = parameter_status(&frame.body)
                && let Some(wanted) = pinned_report(&name, read_only)
                && !value.eq_ignore_ascii_case(wanted)
            {
                return Err(ConnectError::Protocol(format!(
                    "the database did not pin {name} (it reports {value:?}, agentgate asked for {wanted:?})"
                )));
            }
        }
        Ok(Established {
            stream,
            buf,
            parameters,
            pid,
            key,
        })
    }

    /// Asks the server to cancel what the session `pid` is running.
    pub async fn cancel(&self, pid: i32, key: &[u8]) -> Result<(), ConnectError> {
        let mut stream = self.open().await?;
        let mut body = BytesMut::new();
        body.put_i32(pid);
        body.put_slice(key);
        stream
            .write_all(&startup_packet(CANCEL_REQUEST, &body))
            .await?;
        stream.flush().await?;
        // The server answers by closing the connection.
        let mut sink = [0u8; 16];
        let _ = stream.read(&mut sink).await;
        Ok(())
    }
}

fn refused(frame: &Frame) -> ConnectError {
    let fields = parse_notice_fields(&frame.body);
    let get = |c: u8| {
        fields
            .iter()
            .find(|(k, _)| *k == c)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    ConnectError::Refused {
        code: get(b'C'),
        message: get(b'M'),
    }
}

async fn send_password(stream: &mut Box<dyn PgStream>, password: &[u8]) -> std::io::Result<()> {
    let mut body = password.to_vec();
    body.push(0);
    write_frame(stream, &Frame::new(b'p', body)).await
}

/// Writes one message and flushes.
pub async fn write_frame<W: AsyncWrite + Unpin + ?Sized>(
    stream: &mut W,
    frame: &Frame,
) -> std::io::Result<()> {
    let mut out = BytesMut::new();
    frame.encode(&mut out);
    stream.write_all(&out).await?;
    stream.flush().await
}

/// Reads one message from the server.
pub async fn read_frame<R: AsyncRead + Unpin + ?Sized>(
    stream: &mut R,
    buf: &mut BytesMut,
) -> Result<Frame, ConnectError> {
    loop {
        if let Some(frame) = decode_frame(buf, MAX_BACKEND_MESSAGE)? {
            return Ok(frame);
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(ConnectError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
    }
}

impl Established {
    /// Runs one simple-protocol query and returns its rows as text (the sidecar's own
    /// catalog look-ups; never agent text).
    pub async fn simple_query(
        &mut self,
        sql: &str,
    ) -> Result<Vec<Vec<Option<String>>>, ConnectError> {
        let mut body = sql.as_bytes().to_vec();
        body.push(0);
        write_frame(&mut self.stream, &Frame::new(b'Q', body)).await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let frame = read_frame(&mut self.stream, &mut self.buf).await?;
            match frame.tag {
                b'D' => rows.push(
                    parse_data_row(&frame.body)?
                        .into_iter()
                        .map(|c| c.map(|v| String::from_utf8_lossy(v).into_owned()))
                        .collect(),
                ),
                b'E' => error = Some(refused(&frame)),
                b'Z' => break,
                _ => {}
            }
        }
        match error {
            Some(e) => Err(e),
            None => Ok(rows),
        }
    }
}

impl Established {
    /// The planner's estimate of the rows a single UPDATE or DELETE changes: `EXPLAIN
    /// (FORMAT JSON)` — never `ANALYZE`, so nothing runs — over the extended protocol,
    /// which refuses more than one statement, with the agent's text-format parameters.
    pub async fn estimate_rows(
        &mut self,
        statement: &str,
        parameters: &[Option<Bytes>],
    ) -> Result<i64, ConnectError> {
        let mut out = BytesMut::new();
        let mut parse = BytesMut::new();
        parse.put_u8(0);
        parse.put_slice(b"EXPLAIN (FORMAT JSON) ");
        parse.put_slice(statement.as_bytes());
        parse.put_u8(0);
        parse.put_i16(0);
        Frame::new(b'P', parse).encode(&mut out);
        let mut bind = BytesMut::new();
        bind.put_slice(&[0, 0]);
        bind.put_i16(0);
        bind.put_i16(i16::try_from(parameters.len()).unwrap_or(i16::MAX));
        for p in parameters {
            match p {
                None => bind.put_i32(-1),
                Some(v) => {
                    bind.put_i32(i32::try_from(v.len()).unwrap_or(i32::MAX));
                    bind.put_slice(v);
                }
            }
        }
        bind.put_i16(0);
        Frame::new(b'B', bind).encode(&mut out);
        Frame::new(b'E', vec![0, 0, 0, 0, 0]).encode(&mut out);
        Frame::new(b'S', Vec::new()).encode(&mut out);
        self.stream.write_all(&out).await?;
        self.stream.flush().await?;
        let (mut plan, mut error) = (None, None);
        loop {
            let frame = read_frame(&mut self.stream, &mut self.buf).await?;
            match frame.tag {
                b'D' => {
                    plan = parse_data_row(&frame.body)?
                        .first()
                        .copied()
                        .flatten()
                        .and_then(|v| serde_json::from_slice::<serde_json::Value>(v).ok());
                }
                b'E' => error = Some(refused(&frame)),
                b'Z' => break,
                _ => {}
            }
        }
        if let Some(e) = error {
            return Err(e);
        }
        // A write's top node (ModifyTable) plans 0 rows; what it changes is its input's.
        let top = plan
            .as_ref()
            .and_then(|p| p.get(0)?.get("Plan"))
            .ok_or_else(|| ConnectError::Protocol("EXPLAIN returned no plan".into()))?;
        let node = match top.get("Node Type").and_then(|t| t.as_str()) {
            Some("ModifyTable") => top.get("Plans").and_then(|p| p.get(0)).unwrap_or(top),
            _ => top,
        };
        node.get("Plan Rows")
            .and_then(serde_json::Value::as_f64)
            .map(|rows| rows.round() as i64)
            .ok_or_else(|| ConnectError::Protocol("the plan has no row estimate".into()))
    }
}

/// The agent's startup parameters that are passed to the server: presentation settings
/// only. `user`, `database`, `options` (which could set the role or search path) and
/// `replication` are never taken from the agent.
pub fn passed_parameters(params: &[(String, String)]) -> Vec<(String, String)> {
    // `client_encoding` is pinned (see `PgUpstream::pins`), never passed.
    const PASSED: [&str; 5] = [
        "application_name",
        "datestyle",
        "timezone",
        "intervalstyle",
        "extra_float_digits",
    ];
    params
        .iter()
        .filter(|(k, _)| PASSED.contains(&k.to_ascii_lowercase().as_str()))
        .cloned()
        .collect()
}

/// A `ParameterStatus` body: name and value.
pub fn parameter_status(body: &[u8]) -> Option<(String, String)> {
    let mut parts = body.split(|b| *b == 0);
    let name = std::str::from_utf8(parts.next()?).ok()?;
    let value = std::str::from_utf8(parts.next()?).ok()?;
    Some((name.to_owned(), value.to_owned()))
}

/// The value a pinned setting must report (`ParameterStatus`), if `name` is one the
/// server reports.
pub fn pinned_report(name: &str, read_only: bool) -> Option<&'static str> {
    match name {
        "client_encoding" => Some("UTF8"),
        "standard_conforming_strings" => Some("on"),
        "default_transaction_read_only" if read_only => Some("on"),
        _ => None,
    }
}

/// Whether the agent's startup `client_encoding` (if any) can be served: the gateway
/// reads SQL as UTF-8 and pins the session to it. SQL_ASCII is ASCII-compatible and
/// needs no conversion; an encoding whose multibyte characters can hold a quote or a
/// backslash byte (GBK, SJIS, BIG5, …) would have the server read a string literal
/// differently from the gateway, and others are refused alike rather than converted.
pub fn client_encoding_ok(params: &[(String, String)]) -> Result<(), String> {
    for (k, v) in params {
        if k.eq_ignore_ascii_case("client_encoding") {
            let norm: String = v
                .chars()
                .filter(|c| c.is_ascii_alphanumeric())
                .collect::<String>()
                .to_ascii_lowercase();
            if !matches!(norm.as_str(), "utf8" | "unicode" | "sqlascii") {
                return Err(format!(
                    "agentgate reads SQL as UTF-8 and pins client_encoding to UTF8; connect with client_encoding UTF8 (PGCLIENTENCODING=UTF8), not {v:?}"
                ));
            }
        }
    }
    Ok(())
}
