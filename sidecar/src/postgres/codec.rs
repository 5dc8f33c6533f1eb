//! The PostgreSQL v3 wire format, both directions: framing, the messages the gateway
//! reads, and the messages it writes. Pure and allocation-bounded: a frame is only
//! taken once all its bytes have arrived, and a declared length above the caller's limit
//! is an error before anything is reserved for it.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// `SSLRequest`'s code in place of a protocol version.
pub const SSL_REQUEST: i32 = 80_877_103;
/// `GSSENCRequest`'s code.
pub const GSSENC_REQUEST: i32 = 80_877_104;
/// `CancelRequest`'s code.
pub const CANCEL_REQUEST: i32 = 80_877_102;
/// Protocol 3.0.
pub const PROTOCOL_3_0: i32 = 196_608;
/// The SQLSTATE of a message that breaks the protocol.
pub const PROTOCOL_VIOLATION: &str = "08P01";

/// Why bytes are not a valid message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// A length below the minimum.
    #[error("message length {0} is invalid")]
    BadLength(i64),
    /// A message larger than this side accepts.
    #[error("message of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Declared length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A message that ends before its fields do.
    #[error("truncated {0} message")]
    Truncated(&'static str),
    /// A string field that is not UTF-8.
    #[error("{0} message holds text that is not UTF-8")]
    NotUtf8(&'static str),
    /// A message that has no place here (or is unknown).
    #[error("unexpected message type {0:?}")]
    Unexpected(char),
    /// A startup packet with a protocol this gateway does not speak.
    #[error("unsupported protocol version {}.{}", .0 >> 16, .0 & 0xffff)]
    UnsupportedVersion(i32),
}

/// The first packet of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Startup {
    /// Asks for TLS.
    Ssl,
    /// Asks for GSSAPI encryption.
    GssEnc,
    /// Cancels the query running in the session with this key.
    Cancel {
        /// Backend process id.
        pid: i32,
        /// Secret key.
        key: Bytes,
    },
    /// Starts a session.
    Startup {
        /// Protocol version (3.x).
        version: i32,
        /// Parameters: `user`, `database`, `application_name`, …
        params: Vec<(String, String)>,
    },
}

/// Takes one startup-phase packet (no type byte) from `buf`, if it is complete.
pub fn decode_startup(buf: &mut BytesMut, max: usize) -> Result<Option<Startup>, ProtocolError> {
    let Some(body) = take(buf, 0, max)? else {
        return Ok(None);
    };
    let mut r = Reader::new(&body, "startup");
    let code = r.i32()?;
    Ok(Some(match code {
        SSL_REQUEST => Startup::Ssl,
        GSSENC_REQUEST => Startup::GssEnc,
        CANCEL_REQUEST => {
            let pid = r.i32()?;
            let key = Bytes::copy_from_slice(r.rest());
            if key.is_empty() || key.len() > 256 {
                return Err(ProtocolError::Truncated("CancelRequest"));
            }
            Startup::Cancel { pid, key }
        }
        v if v >> 16 == 3 => {
            let mut params = Vec::new();
            loop {
                let name = r.cstr()?;
                if name.is_empty() {
                    break;
                }
                params.push((name.to_owned(), r.cstr()?.to_owned()));
            }
            Startup::Startup { version: v, params }
        }
        v => return Err(ProtocolError::UnsupportedVersion(v)),
    }))
}

/// One message after startup: a type byte and its body (without the length).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The type byte.
    pub tag: u8,
    /// The body.
    pub body: Bytes,
}

impl Frame {
    /// A message.
    pub fn new(tag: u8, body: impl Into<Bytes>) -> Self {
        Self {
            tag,
            body: body.into(),
        }
    }

    /// Appends the wire form to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        out.reserve(5 + self.body.len());
        out.put_u8(self.tag);
        out.put_i32(i32::try_from(self.body.len() + 4).unwrap_or(i32::MAX));
        out.put_slice(&self.body);
    }
}

/// Takes one message from `buf`, if it is complete.
pub fn decode_frame(buf: &mut BytesMut, max: usize) -> Result<Option<Frame>, ProtocolError> {
    let Some(&tag) = buf.first() else {
        return Ok(None);
    };
    Ok(take(buf, 1, max)?.map(|body| Frame { tag, body }))
}

/// Splits off `header` bytes, a length and the body it announces, once all are there.
fn take(buf: &mut BytesMut, header: usize, max: usize) -> Result<Option<Bytes>, ProtocolError> {
    let Some(len) = buf.get(header..header + 4) else {
        return Ok(None);
    };
    let len = i32::from_be_bytes([len[0], len[1], len[2], len[3]]);
    let len = usize::try_from(len)
        .ok()
        .filter(|l| *l >= 4)
        .ok_or(ProtocolError::BadLength(i64::from(len)))?;
    if len > max {
        return Err(ProtocolError::TooLarge { len, max });
    }
    if buf.len() < header + len {
        buf.reserve(header + len - buf.len());
        return Ok(None);
    }
    buf.advance(header + 4);
    Ok(Some(buf.split_to(len - 4).freeze()))
}

/// Reads fields from a message body.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    /// Reads `buf`, naming `what` in errors.
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        Self { buf, what }
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if self.buf.len() < n {
            return Err(ProtocolError::Truncated(self.what));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    /// One byte.
    pub fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.bytes(1)?[0])
    }

    /// A big-endian i16.
    pub fn i16(&mut self) -> Result<i16, ProtocolError> {
        let b = self.bytes(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    /// A big-endian i32.
    pub fn i32(&mut self) -> Result<i32, ProtocolError> {
        let b = self.bytes(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A count (an i16 that must not be negative).
    pub fn count(&mut self) -> Result<usize, ProtocolError> {
        usize::try_from(self.i16()?).map_err(|_| ProtocolError::Truncated(self.what))
    }

    /// A NUL-terminated UTF-8 string.
    pub fn cstr(&mut self) -> Result<&'a str, ProtocolError> {
        let end = self
            .buf
            .iter()
            .position(|b| *b == 0)
            .ok_or(ProtocolError::Truncated(self.what))?;
        let s =
            std::str::from_utf8(&self.buf[..end]).map_err(|_| ProtocolError::NotUtf8(self.what))?;
        self.buf = &self.buf[end + 1..];
        Ok(s)
    }

    /// A length-prefixed value (`-1` is NULL).
    pub fn value(&mut self) -> Result<Option<&'a [u8]>, ProtocolError> {
        let len = self.i32()?;
        if len == -1 {
            return Ok(None);
        }
        let len = usize::try_from(len).map_err(|_| ProtocolError::Truncated(self.what))?;
        self.bytes(len).map(Some)
    }

    /// Whatever is left.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
}

/// A message from the agent (frontend), as far as the gateway reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frontend {
    /// `Q`: a simple-protocol query string (possibly several statements).
    Query(String),
    /// `P`: prepare a statement.
    Parse {
        /// Statement name (`""` is the unnamed statement).
        name: String,
        /// Statement text.
        query: String,
    },
    /// `B`: bind parameters to a prepared statement, making a portal.
    Bind {
        /// Portal name.
        portal: String,
        /// Statement name.
        statement: String,
        /// Parameter format codes (0 text, 1 binary).
        param_formats: Vec<i16>,
        /// Parameter values (`None` is NULL).
        params: Vec<Option<Bytes>>,
        /// Result column format codes.
        result_formats: Vec<i16>,
    },
    /// `D`: describe a statement (`S`) or portal (`P`).
    Describe {
        /// `S` or `P`.
        target: u8,
        /// Its name.
        name: String,
    },
    /// `E`: run a portal.
    Execute {
        /// Portal name.
        portal: String,
        /// Row limit (0 = all).
        max_rows: i32,
    },
    /// `C`: close a statement (`S`) or portal (`P`).
    Close {
        /// `S` or `P`.
        target: u8,
        /// Its name.
        name: String,
    },
    /// `S`: end of an extended-protocol batch.
    Sync,
    /// `H`: send what is pending.
    Flush,
    /// `X`: goodbye.
    Terminate,
    /// `d`: COPY data.
    CopyData,
    /// `c`: COPY done.
    CopyDone,
    /// `f`: COPY failed.
    CopyFail,
    /// `p`: a password (or SASL) response.
    Password(Bytes),
    /// `F`: a fast-path function call (by OID, without SQL).
    FunctionCall,
    /// Any other type byte.
    Unknown(u8),
}

fn cstring(r: &mut Reader<'_>) -> Result<String, ProtocolError> {
    r.cstr().map(str::to_owned)
}

/// Reads an agent message.
pub fn parse_frontend(frame: &Frame) -> Result<Frontend, ProtocolError> {
    let body = &frame.body[..];
    Ok(match frame.tag {
        b'Q' => Frontend::Query(cstring(&mut Reader::new(body, "Query"))?),
        b'P' => {
            let mut r = Reader::new(body, "Parse");
            let name = cstring(&mut r)?;
            let query = cstring(&mut r)?;
            let types = r.count()?;
            for _ in 0..types {
                r.i32()?;
            }
            Frontend::Parse { name, query }
        }
        b'B' => {
            let mut r = Reader::new(body, "Bind");
            let portal = cstring(&mut r)?;
            let statement = cstring(&mut r)?;
            let n = r.count()?;
            let param_formats = (0..n).map(|_| r.i16()).collect::<Result<_, _>>()?;
            let n = r.count()?;
            let params = (0..n)
                .map(|_| r.value().map(|v| v.map(Bytes::copy_from_slice)))
                .collect::<Result<_, _>>()?;
            let n = r.count()?;
            let result_formats = (0..n).map(|_| r.i16()).collect::<Result<_, _>>()?;
            Frontend::Bind {
                portal,
                statement,
                param_formats,
                params,
                result_formats,
            }
        }
        b'D' | b'C' => {
            let mut r = Reader::new(body, "Describe/Close");
            let target = r.u8()?;
            if target != b'S' && target != b'P' {
                return Err(ProtocolError::Truncated("Describe/Close"));
            }
            let name = cstring(&mut r)?;
            if frame.tag == b'D' {
                Frontend::Describe { target, name }
            } else {
                Frontend::Close { target, name }
            }
        }
        b'E' => {
            let mut r = Reader::new(body, "Execute");
            let portal = cstring(&mut r)?;
            let max_rows = r.i32()?;
            Frontend::Execute { portal, max_rows }
        }
        b'S' => Frontend::Sync,
        b'H' => Frontend::Flush,
        b'X' => Frontend::Terminate,
        b'd' => Frontend::CopyData,
        b'c' => Frontend::CopyDone,
        b'f' => Frontend::CopyFail,
        b'p' => Frontend::Password(frame.body.clone()),
        b'F' => Frontend::FunctionCall,
        other => Frontend::Unknown(other),
    })
}

/// A column of a `RowDescription`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    /// Column name (or alias).
    pub name: String,
    /// OID of the table the column comes from (0 for expressions).
    pub table_oid: u32,
    /// Attribute number in that table.
    pub column: i16,
    /// Type OID.
    pub type_oid: u32,
    /// Format code (0 text, 1 binary; 0 in a statement's description).
    pub format: i16,
}

/// Reads a `RowDescription` (`T`).
pub fn parse_row_description(body: &[u8]) -> Result<Vec<Field>, ProtocolError> {
    let mut r = Reader::new(body, "RowDescription");
    let n = r.count()?;
    let mut fields = Vec::with_capacity(n.min(body.len() / 19 + 1));
    for _ in 0..n {
        let name = cstring(&mut r)?;
        let table_oid = r.i32()? as u32;
        let column = r.i16()?;
        let type_oid = r.i32()? as u32;
        let _len = r.i16()?;
        let _typmod = r.i32()?;
        let format = r.i16()?;
        fields.push(Field {
            name,
            table_oid,
            column,
            type_oid,
            format,
        });
    }
    Ok(fields)
}

/// Reads a `DataRow` (`D`): each cell's value, `None` for NULL.
pub fn parse_data_row(body: &[u8]) -> Result<Vec<Option<&[u8]>>, ProtocolError> {
    let mut r = Reader::new(body, "DataRow");
    let n = r.count()?;
    let mut cells = Vec::with_capacity(n.min(body.len() / 4 + 1));
    for _ in 0..n {
        cells.push(r.value()?);
    }
    Ok(cells)
}

/// Writes a `DataRow`.
pub fn data_row<'a>(cells: impl ExactSizeIterator<Item = Option<&'a [u8]>>) -> Frame {
    let mut body = BytesMut::new();
    body.put_i16(i16::try_from(cells.len()).unwrap_or(i16::MAX));
    for cell in cells {
        match cell {
            None => body.put_i32(-1),
            Some(v) => {
                body.put_i32(i32::try_from(v.len()).unwrap_or(i32::MAX));
                body.put_slice(v);
            }
        }
    }
    Frame::new(b'D', body)
}

/// The fields of an `ErrorResponse` or `NoticeResponse`, by field code.
pub fn parse_notice_fields(body: &[u8]) -> Vec<(u8, String)> {
    let mut r = Reader::new(body, "ErrorResponse");
    let mut fields = Vec::new();
    while let Ok(code) = r.u8() {
        if code == 0 {
            break;
        }
        let Ok(value) = r.cstr() else { break };
        fields.push((code, value.to_owned()));
    }
    fields
}

/// An `ErrorResponse` with severity ERROR.
pub fn error_response(code: &str, message: &str, hint: Option<&str>) -> Frame {
    report(b'E', "ERROR", code, message, hint)
}

/// A `NoticeResponse` with severity WARNING (SQLSTATE 01000): what the agent is told
/// without failing its statement.
pub fn notice_response(message: &str) -> Frame {
    report(b'N', "WARNING", "01000", message, None)
}

fn report(tag: u8, severity: &str, code: &str, message: &str, hint: Option<&str>) -> Frame {
    let mut body = BytesMut::new();
    for (field, value) in [
        (b'S', severity),
        (b'V', severity),
        (b'C', code),
        (b'M', message),
    ]
    .into_iter()
    .chain(hint.map(|h| (b'H', h)))
    {
        body.put_u8(field);
        // NUL cannot appear inside a field.
        body.put_slice(value.replace('\0', " ").as_bytes());
        body.put_u8(0);
    }
    body.put_u8(0);
    Frame::new(tag, body)
}

/// A `ReadyForQuery` with transaction status `I`, `T` or `E`.
pub fn ready_for_query(status: u8) -> Frame {
    Frame::new(b'Z', vec![status])
}

/// An `Authentication` message of `kind` (0 ok, 3 cleartext password, …).
pub fn authentication(kind: i32) -> Frame {
    Frame::new(b'R', kind.to_be_bytes().to_vec())
}

/// A `BackendKeyData`.
pub fn backend_key_data(pid: i32, key: &[u8]) -> Frame {
    let mut body = BytesMut::new();
    body.put_i32(pid);
    body.put_slice(key);
    Frame::new(b'K', body)
}

/// A startup packet (`StartupMessage`, `SSLRequest`, `CancelRequest`) in wire form.
pub fn startup_packet(code: i32, body: &[u8]) -> BytesMut {
    let mut out = BytesMut::with_capacity(8 + body.len());
    out.put_i32(i32::try_from(8 + body.len()).unwrap_or(i32::MAX));
    out.put_i32(code);
    out.put_slice(body);
    out
}

/// A `StartupMessage` with these parameters.
pub fn startup_message(params: &[(&str, &str)]) -> BytesMut {
    let mut body = BytesMut::new();
    for (k, v) in params {
        body.put_slice(k.as_bytes());
        body.put_u8(0);
        body.put_slice(v.as_bytes());
        body.put_u8(0);
    }
    body.put_u8(0);
    startup_packet(PROTOCOL_3_0, &body)
}

/// Rows a `CommandComplete` tag reports as changed: `INSERT 0 5`, `UPDATE 3`,
/// `DELETE 1`, `MERGE 2`, `COPY 10` (from a COPY FROM). `None` for reads and the rest.
pub fn rows_modified(tag: &str, copy_in: bool) -> Option<u64> {
    let mut words = tag.split(' ');
    let verb = words.next()?;
    let count = words.next_back()?.parse().ok()?;
    match verb {
        "INSERT" | "UPDATE" | "DELETE" | "MERGE" => Some(count),
        "COPY" if copy_in => Some(count),
        _ => None,
    }
}

/// Rows a `CommandComplete` tag reports as returned (`SELECT 5`, `FETCH 3`, `COPY 10`
/// to the client).
pub fn rows_returned(tag: &str) -> Option<u64> {
    let (verb, count) = tag.rsplit_once(' ')?;
    matches!(verb, "SELECT" | "FETCH" | "COPY" | "MOVE")
        .then(|| count.parse().ok())
        .flatten()
}

#[cfg(test)]
#[path = "codec_tests.rs"]
mod tests;
