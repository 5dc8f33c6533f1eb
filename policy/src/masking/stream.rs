//! Masking of a body that arrives in chunks, with bounded memory.
//!
//! Output is released a line at a time: a complete line is masked and passed on at once
//! (so `watch` events and server-sent events are not delayed), while an incomplete line
//! waits for the rest of it — which is how a secret split across two chunks is still
//! caught. Two things hold output back further: a `-----BEGIN` that is not yet followed by
//! its `-----END` (a private key spans lines), and a match that reaches the end of what has
//! arrived. A line longer than [`MAX_MATCH_LEN`] is released in windows of that size; only
//! a custom pattern whose matches can be longer than that could be split there.

use super::{MAX_MATCH_LEN, MaskReport, MaskingProfile, select};

/// Bytes of already-released text kept as look-behind for `\b` at the next scan.
const CONTEXT: usize = 8;
/// The most an unmatched pattern may hold back before output is forced out.
const MAX_HELD: usize = 4 * MAX_MATCH_LEN;
const PEM_BEGIN: &[u8] = b"-----BEGIN";

/// The state of masking one streamed body; each call takes the profile, so the stream
/// can live next to an `Arc` of it.
#[derive(Debug, Default)]
pub struct MaskStream {
    buf: Vec<u8>,
    /// `buf[..ctx]` was released already and is only look-behind.
    ctx: usize,
}

impl MaskStream {
    /// Starts masking a body.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes the next chunk and appends what can be released, masked, to `out`.
    pub fn push(
        &mut self,
        profile: &MaskingProfile,
        chunk: &[u8],
        out: &mut Vec<u8>,
        report: &mut MaskReport,
    ) {
        self.buf.extend_from_slice(chunk);
        if chunk.contains(&b'\n') || self.held() > MAX_MATCH_LEN {
            self.flush(profile, false, out, report);
        }
    }

    /// Ends the body: releases everything still held, masked.
    pub fn finish(&mut self, profile: &MaskingProfile, out: &mut Vec<u8>, report: &mut MaskReport) {
        self.flush(profile, true, out, report);
    }

    /// Bytes held back, not yet released.
    pub fn held(&self) -> usize {
        self.buf.len() - self.ctx
    }

    fn flush(
        &mut self,
        profile: &MaskingProfile,
        last: bool,
        out: &mut Vec<u8>,
        report: &mut MaskReport,
    ) {
        let hits = profile.scan(&self.buf, self.ctx);
        let len = self.buf.len();
        let cut = if last { len } else { self.cut_point(&hits) };
        let released: Vec<_> = hits.into_iter().filter(|h| h.mask_end <= cut).collect();
        profile.splice(&self.buf, self.ctx, cut, &select(released), out, report);
        let keep_from = cut.saturating_sub(CONTEXT);
        self.buf.drain(..keep_from);
        self.ctx = cut - keep_from;
    }

    /// How far output can be released without cutting through a possible secret.
    fn cut_point(&self, hits: &[super::Hit]) -> usize {
        let (ctx, len) = (self.ctx, self.buf.len());
        let window_cut = len.saturating_sub(MAX_MATCH_LEN).max(ctx);
        let line_cut = self.buf[ctx..]
            .iter()
            .rposition(|b| *b == b'\n')
            .map_or(ctx, |i| ctx + i + 1);
        let mut cut = line_cut.max(window_cut);
        // A private key whose END has not arrived pins the cut to its BEGIN.
        if let Some(begin) = self.buf[ctx..cut]
            .windows(PEM_BEGIN.len())
            .rposition(|w| w == PEM_BEGIN)
            .map(|i| ctx + i)
            .filter(|b| {
                len - b < MAX_MATCH_LEN && !hits.iter().any(|h| h.start <= *b && *b < h.end)
            })
        {
            cut = begin;
        }
        // Never cut through a match: the rest of it may change what it is.
        while let Some(start) = hits
            .iter()
            .filter(|h| h.start < cut && h.end > cut)
            .map(|h| h.start)
            .min()
        {
            cut = start;
        }
        if len - ctx > MAX_HELD {
            cut = cut.max(window_cut);
        }
        cut
    }
}
