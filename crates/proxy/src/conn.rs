//! One accepted connection: TLS handshake (if any), protocol detection under the header
//! timeout, hyper serving, and the graceful drain when its listener stops.

use crate::config::defaults::{H2_MAX_STREAMS, MAX_BUF_SIZE};
use crate::detect::{detect, Prefixed, Protocol};
use crate::forward;
use crate::runtime::ListenerCtx;
use crate::stall::WriteStall;
use arc_swap::ArcSwap;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulConnection;
use std::convert::Infallible;
use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::watch;

/// Serves one accepted TCP connection. TLS and the header timeout come from the listener
/// context at accept time; every request then takes the context current when it starts, so
/// a reload reaches open keep-alive connections too (routes, tokens, allowlists), while a
/// request or stream already running finishes on the context it started with.
///
/// Written as a function returning an `async` block rather than an `async fn`, here and in
/// `serve_connection`: an `async fn`'s future keeps its arguments twice (as passed, and
/// moved into the body), which made every connection's task a 2 KiB allocation; the block
/// keeps them once, and the task fits jemalloc's 1,792-byte class.
#[allow(clippy::manual_async_fn)] // on purpose: see above
pub fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    current: Arc<ArcSwap<ListenerCtx>>,
    stop: watch::Receiver<bool>,
) -> impl std::future::Future<Output = ()> + Send {
    async move {
        let ctx = current.load_full();
        let header_timeout = ctx.header_timeout;
        let stream = WriteStall::new(stream, ctx.send_timeout);
        // On a TLS listener a refused source gets no handshake at all (plain listeners answer
        // 403 in `forward`, where the client can read it).
        if ctx.tls.is_some() && ctx.gate.check_source(peer.ip()).is_err() {
            tracing::debug!(listener = &*ctx.name, %peer, "source not allowed; closing before the TLS handshake");
            return;
        }
        match ctx.tls.clone() {
            None => {
                serve_connection(stream, peer, current, header_timeout, None, false, stop).await
            }
            // Boxed: a plain connection's task must not reserve room for TLS state.
            Some(acceptor) => {
                Box::pin(serve_tls(
                    acceptor,
                    stream,
                    peer,
                    &ctx.name,
                    current,
                    header_timeout,
                    stop,
                ))
                .await
            }
        }
    }
}

/// TLS handshake (bounded by the header timeout; no plain-HTTP fallback), then HTTP.
async fn serve_tls(
    acceptor: tokio_rustls::TlsAcceptor,
    stream: WriteStall<TcpStream>,
    peer: SocketAddr,
    listener: &str,
    current: Arc<ArcSwap<ListenerCtx>>,
    header_timeout: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let handshake = tokio::select! {
        r = tokio::time::timeout(header_timeout, acceptor.accept(stream)) => r,
        _ = stopped(&mut stop) => return,
    };
    let tls = match handshake {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::info!(listener, %peer, "TLS handshake failed: {e}");
            return;
        }
        Err(_) => {
            tracing::info!(listener, %peer, "TLS handshake not completed within the header timeout");
            return;
        }
    };
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
    serve_connection(
        tls,
        peer,
        current,
        header_timeout,
        h2.then_some(Protocol::Http2),
        true,
        stop,
    )
    .await;
}

/// Serves HTTP on an accepted stream: the protocol is known (ALPN) or detected from the
/// first bytes under the header timeout. `tls`: the stream is a TLS session. An `async`
/// block, not an `async fn`, for the size of its future (see `serve`).
#[allow(clippy::manual_async_fn)]
fn serve_connection<S>(
    mut stream: S,
    peer: SocketAddr,
    current: Arc<ArcSwap<ListenerCtx>>,
    header_timeout: Duration,
    known: Option<Protocol>,
    tls: bool,
    mut stop: watch::Receiver<bool>,
) -> impl std::future::Future<Output = ()> + Send
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    async move {
        let detected = match known {
            Some(p) => Ok(Ok(Some((p, Vec::new())))),
            None => tokio::select! {
                r = tokio::time::timeout(header_timeout, detect(&mut stream)) => r,
                _ = stopped(&mut stop) => return,
            },
        };
        let (protocol, prefix) = match detected {
            Ok(Ok(Some(x))) => x,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                tracing::debug!(%peer, "read failed before the first request: {e}");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, "no request within the header timeout; closing");
                return;
            }
        };
        let io = TokioIo::new(Prefixed::new(prefix, stream));
        // Set on the first request: an h2 client that never sends one is closed like a
        // silent HTTP/1 client.
        let seen_request = Arc::new(AtomicBool::new(false));
        let seen = seen_request.clone();
        let client = forward::Peer::new(peer);
        let service = service_fn(move |req| {
            seen.store(true, Ordering::Relaxed);
            let ctx = current.load_full();
            // Boxed: hyper keeps room for a service future for the connection's lifetime;
            // unboxed, every open connection (and every long stream) would carry the ~3 KB of
            // a request handler that has long finished.
            // (Boxed as a whole: HTTP/1 polling without shutdown needs an `Unpin` future.)
            let client = client.clone();
            Box::pin(async move { Ok::<_, Infallible>(forward::handle(ctx, client, req).await) })
        });
        let result = match protocol {
            Protocol::Http1 => {
                let mut conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(header_timeout)
                    .max_buf_size(MAX_BUF_SIZE)
                    .keep_alive(true)
                    .serve_connection(io, service);
                // Served without hyper's own shutdown of the socket, so the close can linger.
                let mut draining = stop.clone();
                let out = tokio::select! {
                    out = poll_fn(|cx| conn.poll_without_shutdown(cx)) => out,
                    _ = stopped(&mut draining) => {
                        std::pin::Pin::new(&mut conn).graceful_shutdown();
                        poll_fn(|cx| conn.poll_without_shutdown(cx)).await
                    }
                };
                if out.is_ok() {
                    let io = conn.into_parts().io.into_inner();
                    // A client that closed first (hyper read its end) has nothing left unread:
                    // closing now cannot reset anything, and a lingering close would only add a
                    // `shutdown` and a read. A TLS session still says goodbye (close_notify).
                    // Boxed: inline, its state (~800 bytes) would be reserved in every
                    // connection's task for all of its life, for the few moments of a close.
                    if tls || !io.peer_closed() {
                        Box::pin(linger(io, stop)).await;
                    }
                }
                out
            }
            Protocol::Http2 => {
                let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .max_concurrent_streams(H2_MAX_STREAMS)
                    .keep_alive_interval(Duration::from_secs(30))
                    .serve_connection(io, service);
                // Boxed: HTTP/1 connections (the many) must not reserve room for HTTP/2 state.
                let mut conn = Box::pin(conn);
                tokio::select! {
                    out = conn.as_mut() => out,
                    _ = stopped(&mut stop) => {
                        conn.as_mut().graceful_shutdown();
                        conn.await
                    }
                    _ = tokio::time::sleep(header_timeout) => {
                        if !seen_request.load(Ordering::Relaxed) {
                            // Dropped, not drained: a graceful GOAWAY would wait for a client
                            // that has shown no intention of talking.
                            tracing::debug!(%peer, "h2 client sent no request within the header timeout; closing");
                            return;
                        }
                        until_drained(conn.as_mut(), stop).await
                    }
                }
            }
        };
        if let Err(e) = result {
            tracing::debug!(%peer, "connection ended with error: {e}");
        }
    }
}

/// How long, and for how many bytes, a closing HTTP/1 connection keeps reading what the
/// client still sends (nginx's lingering close: `lingering_time`).
const LINGER_TIME: Duration = Duration::from_secs(5);
const LINGER_BYTES: usize = 64 << 20;

/// Closes an HTTP/1 connection the way nginx does: our side first (FIN after the last
/// response), then reading and discarding until the client closes too, for at most
/// `LINGER_TIME` and `LINGER_BYTES`. A request refused before its body was read (413, 401,
/// 403, 404, ...) leaves the client still sending: closing with those bytes unread would
/// answer them with a reset, and a reset can destroy the response before the client has
/// read it. Not for a plain connection whose client closed first (nothing to wait for);
/// on TLS such a client costs one read that returns 0. Not while the server shuts down.
async fn linger<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut io: S,
    mut stop: watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if *stop.borrow() {
        return;
    }
    let discard = async {
        io.shutdown().await?;
        // Most clients have closed already: that read needs no buffer worth allocating.
        let mut probe = [0u8; 256];
        let mut read = match io.read(&mut probe).await? {
            0 => return Ok(()),
            n => n,
        };
        let mut buf = vec![0u8; 16 * 1024];
        while read < LINGER_BYTES {
            match io.read(&mut buf).await? {
                0 => break,
                n => read += n,
            }
        }
        Ok::<_, std::io::Error>(())
    };
    tokio::select! {
        _ = tokio::time::timeout(LINGER_TIME, discard) => {}
        _ = stopped(&mut stop) => {}
    }
}

/// Runs a connection; on shutdown asks it to finish in-flight requests and close (idle h1
/// connections close at once, h2 sends GOAWAY), then waits for that.
async fn until_drained<C>(
    mut conn: std::pin::Pin<&mut C>,
    mut stop: watch::Receiver<bool>,
) -> C::Output
where
    C: GracefulConnection,
{
    tokio::select! {
        out = conn.as_mut() => out,
        _ = stopped(&mut stop) => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    }
}

/// Resolves once shutdown has been signalled (or the signal's sender is gone).
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn future_size<A, B, C, D, Fut, F: Fn(A, B, C, D) -> Fut>(_: F) -> usize {
        std::mem::size_of::<Fut>()
    }

    /// A connection's task lives as long as the connection (every open stream has one).
    /// With the TLS, HTTP/2 and lingering-close states boxed and the arguments kept once,
    /// a plain HTTP/1 connection's task fits jemalloc's 1,792-byte class (it took 2.5 KiB
    /// before the lingering close was boxed, 2 KiB before `serve` was an `async` block).
    /// The task is 256 bytes more than this future (the listener's block with the
    /// connection's guards, tokio's header, scheduler, id and trailer), rounded up to 128:
    /// 1,520 in the release build holds it at 1,792. The dev build lays the same future
    /// out some 30 bytes larger, so its bound is that much higher.
    #[test]
    fn a_plain_connection_reserves_no_room_for_rare_states() {
        let bound = if cfg!(debug_assertions) { 1568 } else { 1536 };
        let size = future_size(serve);
        assert!(size <= bound, "{size} > {bound}");
    }
}
