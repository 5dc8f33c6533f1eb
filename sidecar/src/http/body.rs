//! Response bodies on their way to the agent: masked on the fly with bounded memory,
//! held to `limits.maxResponseBytes`, and reported (bytes, masked values) when they end.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use agentgate_policy::masking::{LiteralStream, MaskReport, MaskStream, MaskingProfile};
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;

use super::upstream::CredentialMask;
use crate::pipeline::Completion;
pub use crate::tls::{Body, BodyError};

/// How a body is masked.
#[derive(Debug)]
pub enum Mode {
    /// Nothing to mask: bytes pass as they are (still counted and limited).
    Pass,
    /// Text masked line by line.
    Text(MaskStream),
    /// Newline-delimited JSON (Kubernetes watch events): each line masked as a JSON
    /// document, so structure-aware rules (Secret data, JSON paths) apply to streams too.
    /// A line that is not JSON ends the body: it cannot be masked as the policy says.
    JsonLines(Vec<u8>),
}

type OnEnd = Box<dyn FnOnce(Completion) + Send + Sync>;

/// What a body is masked with.
#[derive(Debug)]
pub struct BodyMasks {
    /// The policy's masking.
    pub profile: Arc<MaskingProfile>,
    /// The injected credential, searched for in everything the mode lets out.
    pub credential: Arc<CredentialMask>,
    /// What the response's headers had masked: the body's report starts from it.
    pub headers: MaskReport,
}

/// A masked, limited response body.
pub struct MaskedBody {
    inner: Incoming,
    mode: Mode,
    profile: Arc<MaskingProfile>,
    /// The injected credential, searched for in everything the mode lets out.
    credential: Arc<CredentialMask>,
    literal: LiteralStream,
    limit: Option<u64>,
    max_line: usize,
    sent: u64,
    report: MaskReport,
    pending: Option<Bytes>,
    finished: bool,
    on_end: Option<OnEnd>,
}

impl std::fmt::Debug for MaskedBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MaskedBody")
            .field("mode", &self.mode)
            .field("sent", &self.sent)
            .finish_non_exhaustive()
    }
}

impl MaskedBody {
    /// Wraps an upstream body. `on_end` runs once, when the body ends or is dropped.
    pub fn new(
        inner: Incoming,
        mode: Mode,
        masks: BodyMasks,
        limit: Option<u64>,
        max_line: usize,
        on_end: impl FnOnce(Completion) + Send + Sync + 'static,
    ) -> Self {
        let BodyMasks {
            profile,
            credential,
            headers: report,
        } = masks;
        Self {
            inner,
            mode,
            profile,
            credential,
            literal: LiteralStream::default(),
            limit,
            max_line,
            sent: 0,
            report,
            pending: None,
            finished: false,
            on_end: Some(Box::new(on_end)),
        }
    }

    fn process(&mut self, data: &[u8], last: bool) -> Result<Vec<u8>, String> {
        let mut out = Vec::with_capacity(data.len());
        match &mut self.mode {
            Mode::Pass => out.extend_from_slice(data),
            Mode::Text(stream) => {
                stream.push(&self.profile, data, &mut out, &mut self.report);
                if last {
                    stream.finish(&self.profile, &mut out, &mut self.report);
                }
            }
            Mode::JsonLines(buf) => {
                buf.extend_from_slice(data);
                let complete = if last {
                    buf.len()
                } else {
                    buf.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1)
                };
                for line in buf[..complete].split_inclusive(|b| *b == b'\n') {
                    mask_json_line(&self.profile, line, &mut out, &mut self.report)?;
                }
                buf.drain(..complete);
                if buf.len() > self.max_line {
                    return Err(format!(
                        "a streamed JSON line exceeds {} bytes and cannot be masked",
                        self.max_line
                    ));
                }
            }
        }
        let mut released = Vec::with_capacity(out.len());
        self.literal.push(
            self.credential.literals(),
            &out,
            last,
            &mut released,
            &mut self.report,
        );
        let out = released;
        self.sent += out.len() as u64;
        if let Some(limit) = self.limit.filter(|l| self.sent > *l) {
            return Err(format!(
                "the response exceeds limits.maxResponseBytes ({limit} bytes) and was cut off"
            ));
        }
        Ok(out)
    }

    fn end(&mut self, error: Option<String>) {
        if let Some(on_end) = self.on_end.take() {
            on_end(Completion {
                bytes: self.sent,
                report: std::mem::take(&mut self.report),
                error,
            });
        }
    }
}

/// Masks one line of newline-delimited JSON. A line that is not JSON is an error: the
/// structure rules cannot apply to it, and text detectors alone would be a weaker mask
/// than the policy asked for.
pub fn mask_json_line(
    profile: &MaskingProfile,
    line: &[u8],
    out: &mut Vec<u8>,
    report: &mut MaskReport,
) -> Result<(), String> {
    let trimmed = line.trim_ascii();
    if trimmed.is_empty() {
        out.extend_from_slice(line);
        return Ok(());
    }
    let mut doc = serde_json::from_slice::<serde_json::Value>(trimmed).map_err(|e| {
        format!("a line of the streamed JSON response is not JSON ({e}), so it cannot be masked; the stream was cut off")
    })?;
    profile.mask_json(&mut doc, report);
    out.extend_from_slice(doc.to_string().as_bytes());
    if line.ends_with(b"\n") {
        out.push(b'\n');
    }
    Ok(())
}

impl HttpBody for MaskedBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        loop {
            if let Some(data) = this.pending.take() {
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            if this.finished {
                return Poll::Ready(None);
            }
            let next = ready!(Pin::new(&mut this.inner).poll_frame(cx));
            let (data, last) = match next {
                // The upstream's last bytes end the body: with a known length, hyper
                // need not ask for the end once it has them.
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let last = this.inner.is_end_stream();
                        this.finished = last;
                        (data, last)
                    }
                    // Trailers carry no body bytes; they are not passed on.
                    Err(_) => continue,
                },
                Some(Err(e)) => {
                    this.finished = true;
                    this.end(Some(format!("upstream body failed: {e}")));
                    return Poll::Ready(Some(Err(Box::new(e))));
                }
                None => {
                    this.finished = true;
                    (Bytes::new(), true)
                }
            };
            match this.process(&data, last) {
                Ok(out) => {
                    if last {
                        this.end(None);
                    }
                    if !out.is_empty() {
                        this.pending = Some(Bytes::from(out));
                    }
                }
                Err(reason) => {
                    this.finished = true;
                    this.end(Some(reason.clone()));
                    return Poll::Ready(Some(Err(reason.into())));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.finished && self.pending.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match self.mode {
            // The credential mask can change the length.
            Mode::Pass if self.credential.is_empty() => self.inner.size_hint(),
            _ => SizeHint::default(),
        }
    }
}

impl Drop for MaskedBody {
    fn drop(&mut self) {
        // An empty body of known length may never be polled at all.
        let complete = self.pending.is_none() && self.inner.is_end_stream();
        self.end(
            (!complete)
                .then(|| "the agent closed the connection before the response ended".to_owned()),
        );
    }
}
