//! Listeners: bind, accept under a per-listener connection cap, detect the protocol under
//! the header timeout, serve with hyper, and drain gracefully on shutdown.

use crate::config::{Config, ListenerConfig};
use crate::detect::{detect, Prefixed, Protocol};
use crate::forward::{self, ListenerCtx};
use crate::gate::Gate;
use crate::poc::Poc;
use crate::route::RouteTable;
use crate::upstream::Upstream;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulConnection;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;

/// HTTP/2 streams per client connection; a DAPI multiplexing one connection must not be
/// capped below what a node registers (`max_concurrent: 500`).
const H2_MAX_STREAMS: u32 = 1024;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Setup(String),
    #[error("listener {name}: cannot bind {addr}: {source}")]
    Bind {
        name: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Bound listeners, ready to serve. Binding is separate from running so callers (tests,
/// `demo`) can learn the real ports before traffic starts.
pub struct Server {
    listeners: Vec<Bound>,
    grace: Duration,
    upstreams: Vec<Arc<Upstream>>,
}

struct Bound {
    cfg: ListenerConfig,
    tcp: TcpListener,
    ctx: Arc<ListenerCtx>,
    tls: Option<TlsAcceptor>,
}

impl Server {
    pub async fn bind(config: &Config) -> Result<Server, StartError> {
        let upstreams: Vec<Arc<Upstream>> = config
            .upstreams
            .iter()
            .cloned()
            .map(|u| Upstream::new(u).map(Arc::new))
            .collect::<Result<_, _>>()
            .map_err(StartError::Setup)?;
        let poc = Arc::new(Poc::new(config.poc.clone()));
        let mut listeners = Vec::new();
        for l in &config.listeners {
            let tcp = bind_tcp(l.bind).map_err(|source| StartError::Bind {
                name: l.name.clone(),
                addr: l.bind,
                source,
            })?;
            let setup = |e: String| StartError::Setup(format!("listener {}: {e}", l.name));
            let tls = match &l.tls {
                Some(t) => Some(TlsAcceptor::from(
                    crate::tls::server_config(t).map_err(setup)?,
                )),
                None => None,
            };
            let ctx = Arc::new(ListenerCtx {
                name: l.name.as_str().into(),
                routes: RouteTable::new(l, |n| config.upstream_index(n)),
                upstreams: upstreams.clone(),
                proto: if tls.is_some() { "https" } else { "http" },
                poc: poc.clone(),
                gate: Gate::new(&l.gate).map_err(setup)?,
            });
            listeners.push(Bound {
                cfg: l.clone(),
                tcp,
                ctx,
                tls,
            });
        }
        Ok(Server {
            listeners,
            grace: config.server.shutdown_grace,
            upstreams,
        })
    }

    /// The address a listener actually bound (port 0 resolved).
    pub fn local_addr(&self, listener: &str) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|l| l.cfg.name == listener)
            .and_then(|l| l.tcp.local_addr().ok())
    }

    pub fn upstreams(&self) -> &[Arc<Upstream>] {
        &self.upstreams
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets in-flight requests and
    /// streams finish for up to the grace period, and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let (stop_tx, stop_rx) = watch::channel(false);
        let connections = TaskTracker::new();
        // Health checks live as long as this call; dropping the set aborts them.
        let mut health_checks = JoinSet::new();
        for u in &self.upstreams {
            if u.cfg.health.enabled {
                health_checks.spawn(crate::upstream::health::run(u.clone()));
            }
        }
        let mut accept_loops = JoinSet::new();
        for l in self.listeners {
            tracing::info!(
                listener = %l.cfg.name,
                addr = %l.tcp.local_addr().map_or(l.cfg.bind, |a| a),
                "listening"
            );
            accept_loops.spawn(accept_loop(l, stop_rx.clone(), connections.clone()));
        }
        shutdown.await;
        tracing::info!(grace = %humantime::format_duration(self.grace), "shutting down: no new connections, draining");
        let _ = stop_tx.send(true);
        while accept_loops.join_next().await.is_some() {}
        connections.close();
        match tokio::time::timeout(self.grace, connections.wait()).await {
            Ok(()) => tracing::info!("drained, all connections closed"),
            Err(_) => tracing::warn!("grace period over, closing remaining connections"),
        }
    }
}

fn bind_tcp(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

async fn accept_loop(l: Bound, mut stop: watch::Receiver<bool>, connections: TaskTracker) {
    let limit = Arc::new(Semaphore::new(l.cfg.max_connections));
    let mut warned_full = false;
    loop {
        // Backpressure: at the connection cap, stop accepting until one closes.
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = stopped(&mut stop) => return,
        };
        if limit.available_permits() == 0 && !warned_full {
            warned_full = true;
            tracing::warn!(listener = %l.cfg.name, max = l.cfg.max_connections, "connection cap reached; new connections wait");
        }
        let (stream, peer) = tokio::select! {
            r = l.tcp.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(listener = %l.cfg.name, "accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut stop) => return,
        };
        let _ = stream.set_nodelay(true);
        let ctx = l.ctx.clone();
        let stop = stop.clone();
        let header_timeout = l.cfg.header_timeout;
        let tls = l.tls.clone();
        connections.spawn(async move {
            match tls {
                None => serve_connection(stream, peer, ctx, header_timeout, None, stop).await,
                Some(acceptor) => {
                    serve_tls(acceptor, stream, peer, ctx, header_timeout, stop).await
                }
            }
            drop(permit);
        });
    }
}

/// TLS handshake (bounded by the header timeout; no plain-HTTP fallback), then HTTP.
async fn serve_tls(
    acceptor: TlsAcceptor,
    stream: TcpStream,
    peer: SocketAddr,
    ctx: Arc<ListenerCtx>,
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
            tracing::info!(listener = &*ctx.name, %peer, "TLS handshake failed: {e}");
            return;
        }
        Err(_) => {
            tracing::info!(listener = &*ctx.name, %peer, "TLS handshake not completed within the header timeout");
            return;
        }
    };
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
    serve_connection(
        tls,
        peer,
        ctx,
        header_timeout,
        h2.then_some(Protocol::Http2),
        stop,
    )
    .await;
}

/// Serves HTTP on an accepted stream: the protocol is known (ALPN) or detected from the
/// first bytes under the header timeout.
async fn serve_connection<S>(
    mut stream: S,
    peer: SocketAddr,
    ctx: Arc<ListenerCtx>,
    header_timeout: Duration,
    known: Option<Protocol>,
    mut stop: watch::Receiver<bool>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
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
    let service = service_fn(move |req| {
        seen.store(true, Ordering::Relaxed);
        let ctx = ctx.clone();
        async move { Ok::<_, Infallible>(forward::handle(ctx, peer, req).await) }
    });
    let result = match protocol {
        Protocol::Http1 => {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .keep_alive(true)
                .serve_connection(io, service);
            until_drained(std::pin::pin!(conn), stop).await
        }
        Protocol::Http2 => {
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_concurrent_streams(H2_MAX_STREAMS)
                .keep_alive_interval(Duration::from_secs(30))
                .serve_connection(io, service);
            let mut conn = std::pin::pin!(conn);
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
                    until_drained(conn, stop).await
                }
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, "connection ended with error: {e}");
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
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
