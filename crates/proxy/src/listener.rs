//! A bound listener: its socket, the connection caps (per listener and per source
//! address) and the accept loop that hands each connection to `conn` on a connection
//! worker (`workers`). The server keeps one `BoundListener` per configured listener and
//! carries it across reloads that keep its address.

use crate::config::{Config, ListenerConfig};
use crate::runtime::ListenerCtx;
use crate::workers::Workers;
use arc_swap::ArcSwap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::task::TaskTracker;

/// An address that could not be bound (at start, or for a listener a reload adds).
#[derive(Debug, thiserror::Error)]
#[error("listener {name}: cannot bind {addr}: {source}")]
pub struct BindError {
    pub name: String,
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

/// The listen addresses of `config` (listeners and admin) that cannot be bound now, each
/// as `key: address: reason`. For `podproxy check`: a port another process holds would
/// otherwise only show at start.
pub fn busy_addresses(config: &Config) -> Vec<String> {
    let binds = config
        .listeners
        .iter()
        .map(|l| (format!("listeners.{}.bind", l.name), l.bind))
        .chain(
            config
                .admin
                .iter()
                .map(|a| ("admin.bind".to_string(), a.bind)),
        );
    binds
        .filter(|(_, addr)| addr.port() != 0)
        .filter_map(|(key, addr)| {
            std::net::TcpListener::bind(addr)
                .err()
                .map(|e| format!("{key}: {addr}: {e}"))
        })
        .collect()
}

/// One bound listener. The socket stays open across reloads that keep its address; its
/// context (routes, gate, TLS, upstreams) is swapped for new connections.
pub(crate) struct BoundListener {
    /// The config's table key; a reload may rename a listener that keeps its address.
    pub(crate) name: String,
    /// The configured address (port 0 kept as written), which a reload compares.
    pub(crate) bind: SocketAddr,
    /// The address actually bound (port 0 resolved).
    pub(crate) addr: SocketAddr,
    /// Routes, gate, TLS and upstreams for new connections; swapped by a reload.
    ctx: Arc<ArcSwap<ListenerCtx>>,
    /// `max_connections`: one permit per open connection; the accept loop waits for one.
    limit: Arc<Semaphore>,
    /// The permit count `limit` was sized for, so a reload can add or forget the difference.
    max: usize,
    /// `max_connections_per_source`.
    per_source: Arc<PerSource>,
    /// `true` stops the accept loop and tells its connections to finish (drain).
    pub(crate) stop: watch::Sender<bool>,
    /// The socket until `start` hands it to the accept loop.
    tcp: Option<TcpListener>,
    /// The accept loop, once started.
    task: Option<JoinHandle<()>>,
}

impl BoundListener {
    pub(crate) fn bind(
        l: &ListenerConfig,
        ctx: Arc<ListenerCtx>,
    ) -> Result<BoundListener, BindError> {
        let tcp = bind_tcp(l.bind).map_err(|source| BindError {
            name: l.name.clone(),
            addr: l.bind,
            source,
        })?;
        let addr = tcp.local_addr().unwrap_or(l.bind);
        Ok(BoundListener {
            name: l.name.clone(),
            bind: l.bind,
            addr,
            ctx: Arc::new(ArcSwap::new(ctx)),
            limit: Arc::new(Semaphore::new(l.max_connections)),
            max: l.max_connections,
            per_source: Arc::new(PerSource::new(l.max_connections_per_source)),
            stop: watch::channel(false).0,
            tcp: Some(tcp),
            task: None,
        })
    }

    pub(crate) fn start(&mut self, connections: &Connections) {
        if let Some(tcp) = self.tcp.take() {
            tracing::info!(listener = %self.name, addr = %self.addr, "listening");
            self.task = Some(tokio::spawn(accept_loop(
                self.name.clone(),
                tcp,
                self.ctx.clone(),
                self.limit.clone(),
                self.per_source.clone(),
                self.stop.subscribe(),
                connections.clone(),
            )));
        }
    }

    /// New context for new connections; the connection cap follows the new setting
    /// (lowering it takes effect as connections close).
    pub(crate) fn update(&mut self, l: &ListenerConfig, ctx: Arc<ListenerCtx>) {
        self.name = l.name.clone();
        self.ctx.store(ctx);
        if l.max_connections > self.max {
            self.limit.add_permits(l.max_connections - self.max);
        } else {
            self.limit.forget_permits(self.max - l.max_connections);
        }
        self.max = l.max_connections;
        self.per_source.set_limit(l.max_connections_per_source);
    }

    pub(crate) async fn stop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

/// Where accepted connections go: the worker threads that serve them, and the tracker the
/// drain waits on.
#[derive(Clone)]
pub(crate) struct Connections {
    pub(crate) tracker: TaskTracker,
    pub(crate) workers: Arc<Workers>,
}

pub(crate) fn bind_tcp(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

async fn accept_loop(
    name: String,
    tcp: TcpListener,
    ctx: Arc<ArcSwap<ListenerCtx>>,
    limit: Arc<Semaphore>,
    per_source: Arc<PerSource>,
    mut stop: watch::Receiver<bool>,
    connections: Connections,
) {
    let mut warned_full = false;
    loop {
        // Backpressure: at the connection cap, stop accepting until one closes.
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = crate::conn::stopped(&mut stop) => return,
        };
        if limit.available_permits() == 0 && !warned_full {
            warned_full = true;
            tracing::warn!(listener = %name, "connection cap reached; new connections wait");
        }
        let (stream, peer) = tokio::select! {
            r = tcp.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(listener = %name, "accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = crate::conn::stopped(&mut stop) => return,
        };
        // One address may not hold more than its share: the connection is closed at once
        // (it never counts against the listener's cap).
        let Some(source) = per_source.enter(peer.ip()) else {
            if per_source.warn_once() {
                tracing::warn!(listener = %name, source = %peer.ip(), "per-source connection cap reached; closing new connections from this address");
            }
            drop(stream);
            continue;
        };
        // Linux hands the listener's TCP_NODELAY (set in `bind_tcp`) to accepted sockets.
        #[cfg(not(target_os = "linux"))]
        let _ = stream.set_nodelay(true);
        let ctx = ctx.clone();
        let stop = stop.clone();
        // The socket moves to the worker's epoll: out of this runtime's, into the worker's
        // when its task starts.
        let stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(listener = %name, %peer, "cannot hand the connection to a worker: {e}");
                continue;
            }
        };
        connections.tracker.spawn_on(
            async move {
                if let Ok(stream) = tokio::net::TcpStream::from_std(stream) {
                    crate::conn::serve(stream, peer, ctx, stop).await;
                }
                drop(source);
                drop(permit);
            },
            connections.workers.pick(),
        );
    }
}

/// Connections per source address of one listener, under `max_connections_per_source`.
struct PerSource {
    /// 0 = no cap (nothing is counted then).
    limit: std::sync::atomic::AtomicUsize,
    open: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
    warned: std::sync::atomic::AtomicBool,
}

impl PerSource {
    fn new(limit: Option<usize>) -> Self {
        PerSource {
            limit: limit.unwrap_or(0).into(),
            open: Default::default(),
            warned: false.into(),
        }
    }

    fn set_limit(&self, limit: Option<usize>) {
        self.limit
            .store(limit.unwrap_or(0), std::sync::atomic::Ordering::Relaxed);
    }

    /// Counts a new connection from `ip`; `None` when that address is at the cap.
    fn enter(self: &Arc<Self>, ip: std::net::IpAddr) -> Option<SourceGuard> {
        let limit = self.limit.load(std::sync::atomic::Ordering::Relaxed);
        if limit == 0 {
            return Some(SourceGuard(None));
        }
        let ip = ip.to_canonical();
        let mut open = self.open.lock().ok()?;
        let n = open.entry(ip).or_insert(0);
        if *n >= limit {
            return None;
        }
        *n += 1;
        Some(SourceGuard(Some((self.clone(), ip))))
    }

    /// True the first time the cap is hit (one WARN line, not one per refused connection).
    fn warn_once(&self) -> bool {
        !self.warned.swap(true, std::sync::atomic::Ordering::Relaxed)
    }
}

/// Releases a connection's place in its source's count when the connection ends.
struct SourceGuard(Option<(Arc<PerSource>, std::net::IpAddr)>);

impl Drop for SourceGuard {
    fn drop(&mut self) {
        if let Some((ps, ip)) = self.0.take() {
            if let Ok(mut open) = ps.open.lock() {
                if let Some(n) = open.get_mut(&ip) {
                    *n -= 1;
                    if *n == 0 {
                        open.remove(&ip);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn accepted_sockets_have_nodelay() {
        // The accept loop relies on this (tokens must not wait for Nagle's algorithm).
        let listener = super::bind_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert!(accepted.nodelay().unwrap());
    }
}
