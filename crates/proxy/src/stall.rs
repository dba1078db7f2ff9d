//! The client-side send timeout (nginx's `send_timeout`): a connection whose peer accepts no
//! bytes for `limit` while podproxy has bytes for it is ended with an error, which makes
//! hyper abort it. Without it, a client that stops reading holds its connection, the
//! upstream request (a GPU generation) and a backend slot for as long as it likes: the
//! relay reads the upstream only when the client has room, so no body idle timer runs.
//!
//! Only a write that cannot proceed arms the timer, so a client that keeps up never pays
//! for it; an idle keep-alive connection is the header timeout's business, not this one's.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

pub struct WriteStall<S> {
    inner: S,
    limit: Duration,
    /// Allocated on the first stalled write only; re-armed (not re-allocated) after that.
    timer: Option<Pin<Box<Sleep>>>,
    armed: bool,
}

impl<S> WriteStall<S> {
    pub fn new(inner: S, limit: Duration) -> Self {
        WriteStall {
            inner,
            limit,
            timer: None,
            armed: false,
        }
    }

    /// Called when a write made no progress: starts the clock (once per stall) and fails
    /// when it has run out.
    fn stalled(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let limit = self.limit;
        let timer = match &mut self.timer {
            Some(t) => {
                if !self.armed {
                    t.as_mut().reset(Instant::now() + limit);
                }
                t
            }
            None => self.timer.insert(Box::pin(tokio::time::sleep(limit))),
        };
        self.armed = true;
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "client accepted no data for {:?} (send_timeout)",
                    self.limit
                ),
            )),
            Poll::Pending => Poll::Pending,
        }
    }

    fn watch<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match r {
            Poll::Ready(r) => {
                self.armed = false;
                Poll::Ready(r)
            }
            Poll::Pending => match self.stalled(cx) {
                Poll::Ready(e) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteStall<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteStall<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.watch(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.watch(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        this.watch(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// A peer that never reads: the writer fills the socket buffers, then the guard fires.
    #[tokio::test(start_paused = true)]
    async fn a_peer_that_stops_reading_is_cut_after_the_limit() {
        let (a, _b) = tokio::io::duplex(1024);
        let mut w = WriteStall::new(a, Duration::from_secs(60));
        let started = Instant::now();
        let chunk = [0u8; 512];
        let err = loop {
            match w.write_all(&chunk).await {
                Ok(()) => continue,
                Err(e) => break e,
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_secs(60));
        assert!(err.to_string().contains("send_timeout"), "{err}");
    }

    /// A slow peer that keeps reading is never cut, however long the whole transfer takes.
    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_that_keeps_up_is_not_cut() {
        use tokio::io::AsyncReadExt;
        let (a, mut b) = tokio::io::duplex(64);
        let mut w = WriteStall::new(a, Duration::from_secs(1));
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 64];
            let mut total = 0;
            while total < 64 * 40 {
                tokio::time::sleep(Duration::from_millis(500)).await;
                match b.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => total += n,
                }
            }
            total
        });
        for _ in 0..40 {
            w.write_all(&[1u8; 64]).await.expect("no send timeout");
        }
        assert_eq!(reader.await.expect("reader"), 64 * 40);
    }
}
