//! HTTP/1 vs HTTP/2 (prior knowledge) detection under the header timeout. hyper's own auto
//! server has no timeout before detection (a slowloris hole), so podproxy reads the first
//! bytes itself and replays them to the chosen protocol through `Prefixed`.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
}

/// What the first read takes. One read usually holds the whole request head (and a small
/// body), so the detection costs no extra syscall: hyper gets the bytes replayed instead
/// of reading them again.
const FIRST_READ: usize = 4096;

/// Reads until the bytes either complete the HTTP/2 preface or diverge from it. Returns
/// `None` when the peer closed before sending anything. Bound it with a timeout.
pub async fn detect<S: AsyncRead + Unpin>(io: &mut S) -> io::Result<Option<(Protocol, Vec<u8>)>> {
    let mut buf = Vec::with_capacity(FIRST_READ);
    loop {
        let n = io.read_buf(&mut buf).await?;
        if n == 0 {
            return Ok(if buf.is_empty() {
                None
            } else {
                Some((Protocol::Http1, buf))
            });
        }
        let head = &buf[..buf.len().min(H2_PREFACE.len())];
        if !H2_PREFACE.starts_with(head) {
            return Ok(Some((Protocol::Http1, buf)));
        }
        if head.len() == H2_PREFACE.len() {
            return Ok(Some((Protocol::Http2, buf)));
        }
    }
}

/// An IO that first yields `prefix`, then reads from `inner`. Writes go straight through.
pub struct Prefixed<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
    /// A read of `inner` returned end of stream: the peer has closed its side.
    eof: bool,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        Prefixed {
            prefix,
            pos: 0,
            inner,
            eof: false,
        }
    }

    /// Whether a read has seen the peer's end of stream (nothing of it is left unread).
    pub fn peer_closed(&self) -> bool {
        self.eof
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.pos < this.prefix.len() {
            let rest = &this.prefix[this.pos..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.pos += n;
            if this.pos == this.prefix.len() {
                this.prefix = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(())))
            && buf.filled().len() == before
            && buf.remaining() > 0
        {
            this.eof = true;
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    async fn run(chunks: &[&[u8]]) -> Option<(Protocol, Vec<u8>)> {
        let (mut a, mut b) = tokio::io::duplex(64);
        for c in chunks {
            a.write_all(c).await.unwrap();
        }
        drop(a);
        detect(&mut b).await.unwrap()
    }

    #[tokio::test]
    async fn detects_both_protocols_and_replays_bytes() {
        let req = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        let (p, buf) = run(&[req]).await.unwrap();
        assert_eq!(p, Protocol::Http1);
        assert!(!buf.is_empty() && req.starts_with(&buf));
        let (p, buf) = run(&[b"PRI * HTTP/2.0\r\n", b"\r\nSM\r\n\r\nrest"])
            .await
            .unwrap();
        assert_eq!(p, Protocol::Http2);
        // Whatever the first reads took past the preface is kept for the replay.
        assert!(buf.starts_with(H2_PREFACE) && b"rest".starts_with(&buf[H2_PREFACE.len()..]));
        let (p, buf) = run(&[b"PRI * HTTP/1.1\r\n"]).await.unwrap();
        assert_eq!(p, Protocol::Http1);
        assert_eq!(buf, b"PRI * HTTP/1.1\r\n");
        assert!(run(&[]).await.is_none());
    }

    #[tokio::test]
    async fn prefixed_replays_then_reads_inner() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(b"world").await.unwrap();
        drop(a);
        let mut p = Prefixed::new(b"hello ".to_vec(), b);
        let mut out = String::new();
        let mut first = [0u8; 6];
        p.read_exact(&mut first).await.unwrap();
        assert!(!p.peer_closed(), "the replay is not the peer's end");
        p.read_to_string(&mut out).await.unwrap();
        assert_eq!(
            format!("{}{out}", String::from_utf8_lossy(&first)),
            "hello world"
        );
        assert!(p.peer_closed(), "the read that returned 0 saw the end");
    }
}
