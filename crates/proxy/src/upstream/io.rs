//! The socket under one upstream connection: plain TCP, or a TLS session over it.
//!
//! hyper-rustls's `MaybeHttpsStream` keeps the TLS session inline, so every connection,
//! plain ones too, is as large as a rustls client session (1,112 bytes against 40 for the
//! TCP stream). Upstreams are mostly plain HTTP on loopback and each open stream holds
//! one connection, so the session is boxed here: a plain connection's socket is no larger
//! than its TCP stream.

use hyper_rustls::MaybeHttpsStream;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_util::either::Either;

/// A TLS session to a backend, over its TCP stream (hyper-rustls wraps the stream once
/// more for tokio's I/O traits).
pub type TlsIo = tokio_rustls::client::TlsStream<TokioIo<TokioIo<TcpStream>>>;

/// What hyper's client connection runs over: `Left` plain, `Right` the boxed session.
pub type Io = TokioIo<Either<TcpStream, Box<TlsIo>>>;

/// Takes the connector's stream apart and boxes the TLS session, if there is one.
pub fn from_connector(s: MaybeHttpsStream<TokioIo<TcpStream>>) -> Io {
    TokioIo::new(match s {
        MaybeHttpsStream::Http(tcp) => Either::Left(tcp.into_inner()),
        MaybeHttpsStream::Https(tls) => Either::Right(Box::new(tls.into_inner())),
    })
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
