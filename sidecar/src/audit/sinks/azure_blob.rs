//! The Azure Blob Storage sink (`--audit azureblob:https://<account>.blob.core.windows.net/<container>/<prefix>`):
//! the chain in append blobs `<prefix>-00001.jsonl`, `<prefix>-00002.jsonl`, …, each
//! holding whole events in order, through the Blob REST API signed with Shared Key.
//!
//! Exactly once, by construction:
//! - every Append Block carries `x-ms-blob-condition-appendpos` = the length the sink
//!   believes the blob has, so an append sent twice (its answer was lost, or it arrived
//!   late) is refused the second time (412) instead of written twice;
//! - after any failure, and on start, the sink reads where the blobs end — the newest
//!   blob (List Blobs), its length (HEAD) and its last whole event (a ranged GET of the
//!   tail) — and skips, by `seq`, what they already hold. An event longer than a block is
//!   split across blocks; a tail cut between them is completed, never repeated.
//!
//! One prefix holds one chain, from seq 1: the blobs' last event must be this spool's
//! (same `seq`, same hash), or the sink refuses to write and says why — two pods, or a
//! pod and its predecessor of the same name, must not share a prefix (put the pod's UID
//! in it). A new blob is started before an append blob's limits (50,000 blocks, 195 GiB)
//! or at `--audit-azure-max-blob-bytes`, always at an event's start.
//!
//! Authentication is Shared Key (`--audit-azure-key-file`, the account key in base64);
//! the key is never sent, logged, or put in an error. Workload identity is not
//! implemented yet and is refused at start.

use std::ops::Range;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode};
use sha2::Sha256;

use super::remote::{Answer, Remote};
use super::{OpenContext, Target, joined, seq_of};
use crate::audit::journal::Reader;
use crate::tls::Body;

/// The REST API version the requests are signed for.
const VERSION: &str = "2021-12-02";
/// The largest block this API version takes.
const MAX_BLOCK: usize = 4 << 20;
/// An append blob's block limit, less room for one event split across blocks (an
/// event is never split across blobs).
const MAX_BLOCKS: u64 = 50_000 - 16;
/// The most `--audit-azure-max-blob-bytes` may be: an append blob's limit (195 GiB),
/// less room for the event that starts just under it.
pub(crate) const MAX_BLOB_BYTES: u64 = 190 << 30;
/// The most of a blob's tail read to find its last event (an event is at most 16 MiB).
const MAX_TAIL: u64 = 40 << 20;
/// The first look at a blob's tail.
const TAIL: u64 = 64 << 10;
/// Pages of List Blobs read at most.
const MAX_PAGES: usize = 10_000;

/// How the Azure Blob sink authenticates.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum AzureAuth {
    /// Shared Key: the storage account's key, from `--audit-azure-key-file`.
    #[default]
    SharedKey,
    /// Azure AD workload identity (not implemented yet: refused at start).
    WorkloadIdentity,
}

/// Where the blobs go: the account's endpoint, the container and the blob name prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobLocation {
    /// `scheme://host[:port]`.
    origin: String,
    https: bool,
    account: String,
    /// The URL path up to and including the container: `/container`, or for an
    /// emulator addressed by IP (path-style) `/account/container`.
    container_path: String,
    prefix: String,
}

fn is_loopback(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl BlobLocation {
    /// Parses `https://<account>.blob.core.windows.net/<container>/<prefix>` (the
    /// account is the host's first label) or, where the host is an IP address or
    /// `localhost` (an emulator such as Azurite), `http(s)://<host>:<port>/<account>/<container>/<prefix>`.
    /// Plain `http` is only for a loopback host.
    pub(super) fn parse(s: &str) -> Result<Self, String> {
        // Userinfo, a query (a SAS) or a fragment may be a credential: never repeated.
        if s.contains('@') || s.contains('?') || s.contains('#') {
            return Err(
                "the URL cannot carry credentials or a query (a SAS is not supported; use --audit-azure-key-file)"
                    .into(),
            );
        }
        let uri: http::Uri = s.parse().map_err(|e| format!("{s:?} is not a URL: {e}"))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(format!("{s:?} is not an http(s):// URL")),
        };
        let host = uri.host().unwrap_or_default();
        if host.is_empty() {
            return Err(format!("{s:?} has no host"));
        }
        if !https && !is_loopback(host) {
            return Err(format!(
                "{s:?}: plain http is only for an emulator on a loopback address; use https"
            ));
        }
        let path_style = host == "localhost"
            || host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<std::net::IpAddr>()
                .is_ok();
        let segments: Vec<&str> = uri.path().trim_matches('/').split('/').collect();
        let (account, rest) = if path_style {
            match segments.split_first() {
                Some((account, rest)) => ((*account).to_owned(), rest),
                None => return Err(format!("{s:?} names no account")),
            }
        } else {
            (
                host.split('.').next().unwrap_or_default().to_owned(),
                &segments[..],
            )
        };
        if account.is_empty()
            || account.len() > 24
            || !account
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            return Err(format!(
                "{s:?}: {account:?} is not a storage account name (up to 24 lower-case letters and digits)"
            ));
        }
        let Some((container, prefix)) = rest.split_first() else {
            return Err(format!("{s:?} names no container"));
        };
        if !(3..=63).contains(&container.len())
            || !container
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(format!(
                "{s:?}: {container:?} is not a container name (3 to 63 lower-case letters, digits and hyphens)"
            ));
        }
        let prefix = prefix.join("/");
        if prefix.is_empty()
            || prefix.len() > 900
            || prefix.split('/').any(str::is_empty)
            || !prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._~/".contains(&b))
        {
            return Err(format!(
                "{s:?}: the blob name prefix after the container must be letters, digits, `-._~` and `/` (e.g. audit/<namespace>/<pod>-<uid>)"
            ));
        }
        let origin = format!(
            "{}://{}",
            if https { "https" } else { "http" },
            uri.authority().map(|a| a.as_str()).unwrap_or(host)
        );
        let container_path = if path_style {
            format!("/{account}/{container}")
        } else {
            format!("/{container}")
        };
        Ok(Self {
            origin,
            https,
            account,
            container_path,
            prefix,
        })
    }

    /// The URL path of blob `index`.
    fn blob_path(&self, index: u32) -> String {
        format!("{}/{}", self.container_path, blob_name(&self.prefix, index))
    }
}

impl std::fmt::Display for BlobLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{}/{}", self.origin, self.container_path, self.prefix)
    }
}

/// The name of blob `index` under `prefix`.
fn blob_name(prefix: &str, index: u32) -> String {
    format!("{prefix}-{index:05}.jsonl")
}

/// The index of a blob named by [`blob_name`] for `prefix`.
fn blob_index(prefix: &str, name: &str) -> Option<u32> {
    let digits = name
        .strip_prefix(prefix)?
        .strip_prefix('-')?
        .strip_suffix(".jsonl")?;
    if digits.len() < 5 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// A storage account key. Never shown.
struct AccountKey(Vec<u8>);

impl std::fmt::Debug for AccountKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AccountKey([redacted])")
    }
}

impl AccountKey {
    /// Reads the base64 key in `path`. Errors name the file, never what it holds.
    fn read(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the key file {}: {e}", path.display()))?;
        let key = base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|_| {
                format!(
                    "the key file {} does not hold a base64 account key",
                    path.display()
                )
            })?;
        if key.is_empty() {
            return Err(format!("the key file {} is empty", path.display()));
        }
        Ok(Self(key))
    }
}

/// The standard headers in a Shared Key string-to-sign, in order (after the verb).
const SIGNED_HEADERS: [&str; 11] = [
    "content-encoding",
    "content-language",
    "content-length",
    "content-md5",
    "content-type",
    "date",
    "if-modified-since",
    "if-match",
    "if-none-match",
    "if-unmodified-since",
    "range",
];

/// The Shared Key string-to-sign of a Blob service request (versions 2015-02-21 and
/// later): the verb, the standard headers (Content-Length empty when 0), the
/// canonicalized `x-ms-*` headers (lower-case, sorted, `name:value\n`) and the
/// canonicalized resource (`/account/path`, then each query parameter, lower-case and
/// sorted, as `\nname:value` with the value decoded). `query` holds decoded values.
fn string_to_sign(
    method: &Method,
    headers: &HeaderMap,
    account: &str,
    path: &str,
    query: &[(&str, &str)],
) -> String {
    let mut out = String::new();
    out.push_str(method.as_str());
    out.push('\n');
    for name in SIGNED_HEADERS {
        let value = headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if !(name == "content-length" && value == "0") {
            out.push_str(value);
        }
        out.push('\n');
    }
    let mut ms: Vec<(String, String)> = headers
        .iter()
        .filter(|(name, _)| name.as_str().starts_with("x-ms-"))
        .map(|(name, value)| {
            let value = String::from_utf8_lossy(value.as_bytes());
            (
                name.as_str().to_owned(),
                value.split_whitespace().collect::<Vec<_>>().join(" "),
            )
        })
        .collect();
    ms.sort();
    for (name, value) in ms {
        out.push_str(&name);
        out.push(':');
        out.push_str(&value);
        out.push('\n');
    }
    out.push('/');
    out.push_str(account);
    out.push_str(path);
    let mut params: Vec<(String, &str)> = query
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), *v))
        .collect();
    params.sort();
    for (name, value) in params {
        out.push('\n');
        out.push_str(&name);
        out.push(':');
        out.push_str(value);
    }
    out
}

/// `SharedKey <account>:<base64 HMAC-SHA256 of the string-to-sign>`.
fn authorization(key: &AccountKey, account: &str, string_to_sign: &str) -> HeaderValue {
    let mut mac = Hmac::<Sha256>::new_from_slice(&key.0)
        .unwrap_or_else(|_| unreachable!("HMAC takes a key of any length"));
    mac.update(string_to_sign.as_bytes());
    let signature = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    let mut value = HeaderValue::from_str(&format!("SharedKey {account}:{signature}"))
        .unwrap_or_else(|_| unreachable!("an account name and base64 fit a header"));
    value.set_sensitive(true);
    value
}

/// Percent-encodes a query value: everything but the unreserved characters.
fn encode_query(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The text of each `<tag>…</tag>` in `xml` (none of List Blobs' answers nest them).
fn elements<'a>(xml: &'a str, tag: &str) -> Vec<&'a str> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(start) = rest.find(&open) {
        rest = &rest[start + open.len()..];
        let Some(end) = rest.find(&close) else { break };
        out.push(&rest[..end]);
        rest = &rest[end + close.len()..];
    }
    out
}

/// From a List Blobs answer: the blob names (XML-escaped names are not ours, and left
/// out) and the marker of the next page, if any.
fn parse_list(xml: &str) -> (Vec<String>, Option<String>) {
    let names = elements(xml, "Name")
        .into_iter()
        .filter(|n| !n.contains('&'))
        .map(str::to_owned)
        .collect();
    let marker = elements(xml, "NextMarker")
        .into_iter()
        .next()
        .filter(|m| !m.is_empty())
        .map(|m| {
            m.replace("&lt;", "<")
                .replace("&gt;", ">")
                .replace("&quot;", "\"")
                .replace("&apos;", "'")
                .replace("&amp;", "&")
        });
    (names, marker)
}

/// How `data` is cut into blocks: at most `max` bytes each, ending at a line's end
/// wherever a line fits (a longer line is split).
fn blocks(data: &[u8], max: usize) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < data.len() {
        let end = (start + max).min(data.len());
        let cut = if end == data.len() {
            end
        } else {
            data[start..end]
                .iter()
                .rposition(|b| *b == b'\n')
                .map_or(end, |i| start + i + 1)
        };
        out.push(start..cut);
        start = cut;
    }
    out
}

/// A blob's tail: the last whole line in it (if the tail holds one, and whether the
/// tail is the whole blob), and the bytes after its last newline.
#[derive(Debug, PartialEq, Eq)]
struct Tail<'a> {
    line: Option<&'a [u8]>,
    partial: &'a [u8],
}

/// Reads `tail`, the last bytes of a blob; `whole` says whether it is the whole blob
/// (else a line that starts before it is not whole, and `None` means: read more).
fn split_tail(tail: &[u8], whole: bool) -> Option<Tail<'_>> {
    let Some(end) = tail.iter().rposition(|b| *b == b'\n') else {
        return whole.then_some(Tail {
            line: None,
            partial: tail,
        });
    };
    let partial = &tail[end + 1..];
    match tail[..end].iter().rposition(|b| *b == b'\n') {
        Some(start) => Some(Tail {
            line: Some(&tail[start + 1..end]),
            partial,
        }),
        None if whole => Some(Tail {
            line: Some(&tail[..end]),
            partial,
        }),
        None => None,
    }
}

/// A spool line's `hash`, read from its fixed end `,"hash":"<hex>"}`.
fn hash_of(line: &str) -> Option<&str> {
    line.rsplit_once(",\"hash\":\"")?.1.strip_suffix("\"}")
}

/// A spool line's `prevHash`.
fn prev_hash_of(line: &str) -> Option<&str> {
    let rest = line.split_once("\"prevHash\":\"")?.1;
    rest.get(..rest.find('"')?)
}

/// Where the blobs end.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Position {
    /// The blob appended to, and whether it exists yet.
    index: u32,
    exists: bool,
    /// Its length and committed blocks.
    len: u64,
    blocks: u64,
    /// The last whole event in the blobs.
    last: LastEvent,
    /// What follows the current blob's last newline: the start of the next event, when
    /// its delivery was cut between two blocks.
    partial: Vec<u8>,
}

/// One request to the blob service.
struct Call<'a> {
    /// What it is, for errors.
    what: &'a str,
    method: Method,
    /// The URL path.
    path: &'a str,
    /// Query parameters, values not encoded.
    query: &'a [(&'a str, &'a str)],
    /// Headers besides the date, version, length and signature.
    headers: &'a [(&'a str, String)],
    body: Bytes,
    /// The most of the answer's body read.
    limit: usize,
}

/// The last whole event in the blobs: its sequence and hash.
type LastEvent = Option<(u64, String)>;

/// An opened Azure Blob sink.
#[derive(Debug)]
pub(super) struct AppendBlobs {
    location: BlobLocation,
    name: String,
    key: AccountKey,
    remote: Remote,
    spool: PathBuf,
    max_blob_bytes: u64,
    /// Where the blobs end, as far as this sink knows; `None` after a failure, so that
    /// it is read again.
    at: Option<Position>,
}

/// A blob service answer that is not the one expected.
fn refused(what: &str, answer: &Answer) -> std::io::Error {
    let code = answer.header("x-ms-error-code").unwrap_or("no error code");
    std::io::Error::other(format!("{what}: {} ({code})", answer.status))
}

impl AppendBlobs {
    pub(super) fn open(location: &BlobLocation, ctx: OpenContext<'_>) -> Result<Self, String> {
        let key = match ctx.remote.azure_auth {
            AzureAuth::WorkloadIdentity => {
                return Err("--audit-azure-auth workload-identity is not implemented yet; use shared-key with --audit-azure-key-file".into());
            }
            AzureAuth::SharedKey => match &ctx.remote.azure_key_file {
                Some(path) => AccountKey::read(path)?,
                None => {
                    return Err(
                        "needs --audit-azure-key-file (the storage account's key, base64)".into(),
                    );
                }
            },
        };
        let max_blob_bytes = ctx.remote.azure_max_blob_bytes;
        if !(4096..=MAX_BLOB_BYTES).contains(&max_blob_bytes) {
            return Err(format!(
                "--audit-azure-max-blob-bytes must be between 4096 and {MAX_BLOB_BYTES}"
            ));
        }
        Ok(Self {
            location: location.clone(),
            name: format!("azureblob:{location}"),
            key,
            remote: Remote::new(location.https, ctx.extra_ca, ctx.remote.timeout)?,
            spool: ctx.spool.to_owned(),
            max_blob_bytes,
            at: None,
        })
    }

    /// Sends `call`, signed, and reads up to `call.limit` bytes of the answer.
    fn send(&mut self, call: Call<'_>) -> std::io::Result<Answer> {
        let Call {
            what,
            method,
            path,
            query,
            headers,
            body,
            limit,
        } = call;
        let mut url = format!("{}{path}", self.location.origin);
        for (i, (name, value)) in query.iter().enumerate() {
            url.push(if i == 0 { '?' } else { '&' });
            url.push_str(name);
            url.push('=');
            url.push_str(&encode_query(value));
        }
        let mut req = Request::builder().method(method.clone()).uri(url);
        let map = req
            .headers_mut()
            .unwrap_or_else(|| unreachable!("the builder has no error yet"));
        let date = k8s_openapi::jiff::Timestamp::now()
            .strftime("%a, %d %b %Y %H:%M:%S GMT")
            .to_string();
        let mut set = |name: &str, value: &str| {
            let value = HeaderValue::from_str(value).map_err(std::io::Error::other)?;
            let name =
                http::HeaderName::from_bytes(name.as_bytes()).map_err(std::io::Error::other)?;
            map.insert(name, value);
            Ok::<_, std::io::Error>(())
        };
        set("x-ms-date", &date)?;
        set("x-ms-version", VERSION)?;
        if method == Method::PUT {
            set("content-length", &body.len().to_string())?;
        }
        for (name, value) in headers {
            set(name, value)?;
        }
        let signed = string_to_sign(&method, map, &self.location.account, path, query);
        map.insert(
            http::header::AUTHORIZATION,
            authorization(&self.key, &self.location.account, &signed),
        );
        let req: Request<Body> = req
            .body(Remote::body(body))
            .map_err(std::io::Error::other)?;
        self.remote.send(what, req, limit)
    }

    /// The indices of the blobs under the prefix, in order.
    fn list(&mut self) -> std::io::Result<Vec<u32>> {
        let prefix = format!("{}-", self.location.prefix);
        let container_path = self.location.container_path.clone();
        let mut found = Vec::new();
        let mut marker: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let mut query = vec![
                ("restype", "container"),
                ("comp", "list"),
                ("prefix", prefix.as_str()),
            ];
            if let Some(m) = &marker {
                query.push(("marker", m.as_str()));
            }
            let answer = self.send(Call {
                what: "List Blobs",
                method: Method::GET,
                path: &container_path,
                query: &query,
                headers: &[],
                body: Bytes::new(),
                limit: 16 << 20,
            })?;
            if answer.status != StatusCode::OK {
                return Err(refused("List Blobs", &answer));
            }
            let (names, next) = parse_list(&String::from_utf8_lossy(&answer.body));
            found.extend(
                names
                    .iter()
                    .filter_map(|n| blob_index(&self.location.prefix, n)),
            );
            match next {
                Some(m) => marker = Some(m),
                None => {
                    found.sort_unstable();
                    found.dedup();
                    return Ok(found);
                }
            }
        }
        Err(std::io::Error::other(format!(
            "List Blobs: more than {MAX_PAGES} pages"
        )))
    }

    /// Blob `index`'s length and committed blocks.
    fn properties(&mut self, index: u32) -> std::io::Result<(u64, u64)> {
        let path = self.location.blob_path(index);
        let what = format!("HEAD {}", blob_name(&self.location.prefix, index));
        let answer = self.send(Call {
            what: &what,
            method: Method::HEAD,
            path: &path,
            query: &[],
            headers: &[],
            body: Bytes::new(),
            limit: 0,
        })?;
        if answer.status != StatusCode::OK {
            return Err(refused(&what, &answer));
        }
        if answer.header("x-ms-blob-type") != Some("AppendBlob") {
            return Err(std::io::Error::other(format!("{what}: not an append blob")));
        }
        let number = |name: &str| {
            answer
                .header(name)
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| std::io::Error::other(format!("{what}: no {name}")))
        };
        Ok((
            number("content-length")?,
            number("x-ms-blob-committed-block-count")?,
        ))
    }

    /// The last whole event in blob `index` (of length `len`) — its sequence and hash —
    /// and what follows its last newline.
    fn tail(&mut self, index: u32, len: u64) -> std::io::Result<(LastEvent, Vec<u8>)> {
        if len == 0 {
            return Ok((None, Vec::new()));
        }
        let name = blob_name(&self.location.prefix, index);
        let path = self.location.blob_path(index);
        let mut window = TAIL.min(len);
        loop {
            let what = format!("GET the tail of {name}");
            let range = format!("bytes={}-{}", len - window, len - 1);
            let answer = self.send(Call {
                what: &what,
                method: Method::GET,
                path: &path,
                query: &[],
                headers: &[("x-ms-range", range)],
                body: Bytes::new(),
                limit: usize::try_from(window).unwrap_or(usize::MAX),
            })?;
            if answer.status != StatusCode::PARTIAL_CONTENT && answer.status != StatusCode::OK {
                return Err(refused(&what, &answer));
            }
            let whole = window == len;
            if let Some(tail) = split_tail(&answer.body, whole) {
                let last = match tail.line {
                    None => None,
                    Some(line) => {
                        let line = std::str::from_utf8(line).map_err(|_| {
                            std::io::Error::other(format!("{name}'s last event is not UTF-8"))
                        })?;
                        let checked = agentgate_crds::audit::check_line(line).map_err(|why| {
                            std::io::Error::other(format!(
                                "{name}'s last event does not verify ({why}); nothing more is appended"
                            ))
                        })?;
                        Some((checked.envelope.seq, checked.hash))
                    }
                };
                return Ok((last, tail.partial.to_vec()));
            }
            if window >= MAX_TAIL.min(len) {
                return Err(std::io::Error::other(format!(
                    "{name} has no whole event in its last {window} bytes"
                )));
            }
            window = (window * 4).min(MAX_TAIL).min(len);
        }
    }

    /// Reads where the blobs end.
    fn locate(&mut self) -> std::io::Result<Position> {
        let indices = self.list()?;
        let Some(&current) = indices.last() else {
            return Ok(Position {
                index: 1,
                exists: false,
                len: 0,
                blocks: 0,
                last: None,
                partial: Vec::new(),
            });
        };
        let (len, blocks) = self.properties(current)?;
        let (mut last, partial) = self.tail(current, len)?;
        // A blob just started (or holding only the start of an event): the last whole
        // event is in an older one.
        for &older in indices.iter().rev().skip(1) {
            if last.is_some() {
                break;
            }
            let (len, _) = self.properties(older)?;
            last = self.tail(older, len)?.0;
        }
        Ok(Position {
            index: current,
            exists: true,
            len,
            blocks,
            last,
            partial,
        })
    }

    /// Line `seq` of the spool, if it is still there.
    fn spool_line(&self, seq: u64) -> Option<String> {
        let mut reader = Reader::new(&self.spool, seq - 1);
        reader
            .next(seq, 1)
            .ok()?
            .into_iter()
            .next()
            .filter(|l| seq_of(l) == Some(seq))
    }

    /// Checks that the blobs' last event (`seq`, `hash`) is this spool's, whose last
    /// event at start was `head`.
    fn same_chain(&self, seq: u64, hash: &str, head: u64) -> std::io::Result<()> {
        let another = |why: String| {
            std::io::Error::other(format!(
                "{}: {why}; one prefix holds one chain — give each pod its own (e.g. its UID in it)",
                self.name
            ))
        };
        if head == 0 {
            return Err(another(format!(
                "the blobs already hold events (up to seq {seq}) and this spool is new"
            )));
        }
        if seq > head {
            return Err(another(format!(
                "the blobs hold seq {seq}, past this spool's last event (seq {head})"
            )));
        }
        if let Some(line) = self.spool_line(seq) {
            return match hash_of(&line) {
                Some(h) if h == hash => Ok(()),
                _ => Err(another(format!("the blobs' seq {seq} is not this spool's"))),
            };
        }
        if let Some(next) = self.spool_line(seq + 1) {
            return match prev_hash_of(&next) {
                Some(h) if h == hash => Ok(()),
                _ => Err(another(format!(
                    "the blobs' seq {seq} is not the one this spool's seq {} follows",
                    seq + 1
                ))),
            };
        }
        Err(std::io::Error::other(format!(
            "the blobs end at seq {seq}, and neither it nor the event after it is in the spool to check them against"
        )))
    }

    /// Creates append blob `index`, empty. One that exists already (a create whose
    /// answer was lost) is taken as it is: the append that follows is conditional on
    /// its length.
    fn create(&mut self, index: u32) -> std::io::Result<()> {
        let name = blob_name(&self.location.prefix, index);
        let what = format!("Create {name}");
        let path = self.location.blob_path(index);
        let answer = self.send(Call {
            what: &what,
            method: Method::PUT,
            path: &path,
            query: &[],
            headers: &[
                ("x-ms-blob-type", "AppendBlob".to_owned()),
                ("x-ms-blob-content-type", "application/x-ndjson".to_owned()),
                ("if-none-match", "*".to_owned()),
            ],
            body: Bytes::new(),
            limit: 64 << 10,
        })?;
        match answer.status {
            StatusCode::CREATED => {
                tracing::info!(sink = %self.name, blob = %name, "started a new audit blob");
                Ok(())
            }
            StatusCode::CONFLICT | StatusCode::PRECONDITION_FAILED => Ok(()),
            _ => Err(refused(&what, &answer)),
        }
    }

    /// Appends `data` to blob `index` where it is `len` long; its committed blocks.
    fn append_block(&mut self, index: u32, len: u64, data: Bytes) -> std::io::Result<u64> {
        let name = blob_name(&self.location.prefix, index);
        let what = format!("Append Block to {name} at {len}");
        let path = self.location.blob_path(index);
        let answer = self.send(Call {
            what: &what,
            method: Method::PUT,
            path: &path,
            query: &[("comp", "appendblock")],
            headers: &[("x-ms-blob-condition-appendpos", len.to_string())],
            body: data,
            limit: 64 << 10,
        })?;
        if answer.status != StatusCode::CREATED {
            // 412 (AppendPositionConditionNotMet): the blob is not `len` long — an
            // earlier attempt landed after all. Where it ends is read again.
            return Err(refused(&what, &answer));
        }
        answer
            .header("x-ms-blob-committed-block-count")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("{what}: no committed block count")))
    }

    /// Appends what of `lines` the blobs at `at` do not hold yet, moving `at` along.
    fn append(&mut self, at: &mut Position, lines: &[String], last: u64) -> std::io::Result<()> {
        let first = lines.first().and_then(|l| seq_of(l)).unwrap_or(last);
        let held = at.last.as_ref().map_or(0, |(seq, _)| *seq);
        if held + 1 < first {
            return Err(std::io::Error::other(format!(
                "{}: the blobs end at seq {held}, before seq {first}: events are missing from them",
                self.name
            )));
        }
        if let Some((seq, hash)) = &at.last {
            let ours = if *seq >= first {
                lines
                    .get(usize::try_from(seq - first).unwrap_or(usize::MAX))
                    .and_then(|l| hash_of(l))
            } else {
                lines.first().and_then(|l| prev_hash_of(l))
            };
            // Past this batch: checked when the batch it is in was delivered.
            if *seq <= last && ours != Some(hash.as_str()) {
                return Err(std::io::Error::other(format!(
                    "{}: the blobs' seq {seq} is not this spool's; one prefix holds one chain",
                    self.name
                )));
            }
        }
        if held >= last {
            return Ok(());
        }
        let rest = &lines[usize::try_from(held + 1 - first).unwrap_or(usize::MAX)..];
        let mut data = joined(rest).into_bytes();
        if !at.partial.is_empty() {
            // The start of the next event is there already: deliver the rest of it.
            if !data.starts_with(&at.partial) {
                return Err(std::io::Error::other(format!(
                    "{}: the blob ends in part of an event that is not seq {}",
                    self.name,
                    held + 1
                )));
            }
            data.drain(..at.partial.len());
        }
        let data = Bytes::from(data);
        let max = MAX_BLOCK.min(usize::try_from(self.max_blob_bytes).unwrap_or(MAX_BLOCK));
        for block in blocks(&data, max) {
            let starts_event = if block.start == 0 {
                at.partial.is_empty()
            } else {
                data[block.start - 1] == b'\n'
            };
            let full = at.blocks >= MAX_BLOCKS
                || (at.len > 0 && at.len + block.len() as u64 > self.max_blob_bytes);
            if at.exists && starts_event && full {
                at.index += 1;
                at.exists = false;
                at.len = 0;
                at.blocks = 0;
            }
            if !at.exists {
                self.create(at.index)?;
                at.exists = true;
            }
            let n = block.len() as u64;
            at.blocks = self.append_block(at.index, at.len, data.slice(block))?;
            at.len += n;
        }
        at.partial.clear();
        let hash = rest.last().and_then(|l| hash_of(l)).unwrap_or_default();
        at.last = Some((last, hash.to_owned()));
        Ok(())
    }
}

impl Target for AppendBlobs {
    fn delivered(&mut self, head: u64) -> std::io::Result<u64> {
        let at = self.locate()?;
        let from = match &at.last {
            None => 0,
            Some((seq, hash)) => {
                self.same_chain(*seq, hash, head)?;
                *seq
            }
        };
        tracing::info!(
            sink = %self.name,
            blob = %blob_name(&self.location.prefix, at.index),
            delivered = from,
            "the Azure blob sink goes on after the last event its blobs hold"
        );
        self.at = Some(at);
        Ok(from)
    }

    fn deliver(&mut self, lines: &[String], last: u64) -> std::io::Result<()> {
        let mut at = match self.at.take() {
            Some(at) => at,
            None => self.locate()?,
        };
        self.append(&mut at, lines, last)?;
        self.at = Some(at);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
