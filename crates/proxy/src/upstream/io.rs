//! The socket under one upstream connection: plain TCP, or a TLS session over it.
//!
//! hyper-rustls's `MaybeHttpsStream` keeps the TLS session inline, so every connection,
//! plain ones too, is as large as a rustls client session (1,112 bytes against 40 for the
//! TCP stream). Upstreams are mostly plain HTTP on loopback and each open stream holds
//! one connection, so the session is boxed here: a plain connection's socket is no larger
//! than its TCP stream.

use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_rustls::MaybeHttpsStream;
use hyper_util::rt::TokioIo;
use std::io::IoSlice;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::net::TcpStream;

/// A TLS session to a backend, over its TCP stream (hyper-rustls wraps the stream once
/// more for tokio's I/O traits).
pub type TlsIo = TokioIo<tokio_rustls::client::TlsStream<TokioIo<TokioIo<TcpStream>>>>;

pub enum Io {
    Plain(TokioIo<TcpStream>),
    Tls(Box<TlsIo>),
}

impl From<MaybeHttpsStream<TokioIo<TcpStream>>> for Io {
    fn from(s: MaybeHttpsStream<TokioIo<TcpStream>>) -> Io {
        match s {
            MaybeHttpsStream::Http(tcp) => Io::Plain(tcp),
            MaybeHttpsStream::Https(tls) => Io::Tls(Box::new(tls)),
        }
    }
}

impl Read for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl Write for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_connection_does_not_carry_a_tls_session() {
        let plain = std::mem::size_of::<TokioIo<TcpStream>>();
        assert!(std::mem::size_of::<Io>() <= plain + 8);
        assert!(std::mem::size_of::<TlsIo>() > 4 * plain);
    }
}
