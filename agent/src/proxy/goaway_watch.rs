//! Notices an upstream's GOAWAY as its bytes arrive.
//!
//! `h2`'s client does not tell its user that the server sent GOAWAY: it fails the streams above
//! the last-stream-id that exist at that moment, and happily opens new ones on the connection,
//! which the server then ignores. The pool needs to know at once, to stop using the connection
//! and to tell which streams never reached the upstream (those may be retried elsewhere). So
//! the upstream socket is read through this wrapper, which follows the frame boundaries (a
//! 9-byte header and a length, nothing else) and records the lowest last-stream-id of every
//! GOAWAY. It sees the bytes before `h2` does, so a GOAWAY is known here before `h2` acts on it.

use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const GOAWAY: u8 = 0x7;

/// The lowest last-stream-id any GOAWAY on a connection carried; `u32::MAX` until one came.
#[derive(Debug)]
pub struct GoawaySeen(AtomicU32);

impl Default for GoawaySeen {
    fn default() -> Self {
        Self(AtomicU32::new(u32::MAX))
    }
}

impl GoawaySeen {
    pub fn any(&self) -> bool {
        self.0.load(Ordering::SeqCst) != u32::MAX
    }

    /// True when a GOAWAY said the upstream will not process stream `id`: it never reached
    /// the application and may be retried on another connection (RFC 9113 §6.8).
    pub fn refused(&self, id: u32) -> bool {
        id > self.0.load(Ordering::SeqCst)
    }

    fn record(&self, last_stream_id: u32) {
        self.0.fetch_min(last_stream_id, Ordering::SeqCst);
    }
}

/// Follows frame boundaries in a byte stream that starts at a frame header (what a client
/// reads: the server sends no preface of its own).
#[derive(Default)]
struct FrameScan {
    header: [u8; 9],
    header_len: usize,
    /// Payload bytes of the current frame not seen yet.
    payload_left: usize,
    /// The current frame is a GOAWAY: the first 4 payload bytes collected so far.
    goaway: Option<([u8; 4], usize)>,
}

impl FrameScan {
    /// Feeds bytes; calls `found` with the last-stream-id of every complete GOAWAY header.
    fn feed(&mut self, mut bytes: &[u8], mut found: impl FnMut(u32)) {
        while !bytes.is_empty() {
            if self.payload_left == 0 {
                let take = (9 - self.header_len).min(bytes.len());
                self.header[self.header_len..self.header_len + take]
                    .copy_from_slice(&bytes[..take]);
                self.header_len += take;
                bytes = &bytes[take..];
                if self.header_len == 9 {
                    self.header_len = 0;
                    let h = &self.header;
                    self.payload_left =
                        usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
                    // A GOAWAY shorter than 8 bytes is a FRAME_SIZE_ERROR for h2 to report.
                    self.goaway = (h[3] == GOAWAY && self.payload_left >= 8).then_some(([0; 4], 0));
                }
                continue;
            }
            let take = self.payload_left.min(bytes.len());
            if let Some((id, have)) = &mut self.goaway {
                let n = (4 - *have).min(take);
                id[*have..*have + n].copy_from_slice(&bytes[..n]);
                *have += n;
                if *have == 4 {
                    found(u32::from_be_bytes(*id) & 0x7fff_ffff);
                    self.goaway = None;
                }
            }
            self.payload_left -= take;
            bytes = &bytes[take..];
        }
    }
}

/// An upstream socket read through a [`FrameScan`].
pub struct GoawayWatch<T> {
    io: T,
    scan: FrameScan,
    seen: Arc<GoawaySeen>,
}

impl<T> GoawayWatch<T> {
    pub fn new(io: T, seen: Arc<GoawaySeen>) -> Self {
        Self {
            io,
            scan: FrameScan::default(),
            seen,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for GoawayWatch<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            let seen = &this.seen;
            this.scan
                .feed(&buf.filled()[before..], |id| seen.record(id));
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for GoawayWatch<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, 0];
        f.extend(stream.to_be_bytes());
        f.extend(payload);
        f
    }

    fn goaway(last: u32, code: u32, debug: &[u8]) -> Vec<u8> {
        let mut p = last.to_be_bytes().to_vec();
        p.extend(code.to_be_bytes());
        p.extend(debug);
        frame(GOAWAY, 0, &p)
    }

    /// SETTINGS, DATA whose payload looks like a GOAWAY header, GOAWAY(MAX), PING,
    /// GOAWAY(5, R bit set), GOAWAY(3).
    fn wire() -> Vec<u8> {
        let mut w = frame(0x4, 0, &[0, 3, 0, 0, 0, 100]);
        w.extend(frame(0x0, 1, &goaway(1, 0, b"fake")));
        w.extend(goaway(0x7fff_ffff, 0, b"graceful"));
        w.extend(frame(0x6, 0, &[1; 8]));
        w.extend(goaway(0x8000_0005, 0, b""));
        w.extend(goaway(3, 2, b"bye"));
        w
    }

    #[test]
    fn finds_every_goaway_however_the_bytes_are_split() {
        let w = wire();
        for chunk in 1..=w.len() {
            let mut scan = FrameScan::default();
            let mut found = Vec::new();
            for piece in w.chunks(chunk) {
                scan.feed(piece, |id| found.push(id));
            }
            assert_eq!(found, [0x7fff_ffff, 5, 3], "split every {chunk} bytes");
        }
    }

    #[test]
    fn refused_streams_are_those_above_the_lowest_last_stream_id() {
        let seen = GoawaySeen::default();
        assert!(!seen.any() && !seen.refused(1001));
        seen.record(0x7fff_ffff);
        assert!(seen.any() && !seen.refused(1001));
        seen.record(7);
        seen.record(9);
        assert!(!seen.refused(7) && seen.refused(9));
    }
}
