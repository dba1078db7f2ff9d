//! Listeners and the process lifecycle: bind, accept under a per-listener connection cap,
//! hand each connection to `conn`, apply reloads (SIGHUP or the admin API), and drain on
//! shutdown.

use crate::config::{Config, ListenerConfig};
use crate::forward::ListenerCtx;
use crate::metrics::{Metrics, ResultLabel};
use crate::runtime::Runtime;
use crate::upstream::Upstream;
use arc_swap::ArcSwap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::task::TaskTracker;

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

/// Where a reload reads the config from.
#[derive(Debug, Clone)]
pub enum ConfigSource {
    /// Not reloadable (tests, `demo`).
    Fixed,
    /// The embedded default, expanded again with the current environment.
    Embedded,
    File(PathBuf),
}

impl std::fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigSource::Fixed => f.write_str("given by the caller (not reloadable)"),
            ConfigSource::Embedded => f.write_str("embedded default"),
            ConfigSource::File(p) => write!(f, "{}", p.display()),
        }
    }
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

type ReloadReply = oneshot::Sender<Result<(), String>>;

/// Asks the running server to reload its config; cheap to clone.
#[derive(Clone)]
pub struct Reloader(mpsc::Sender<ReloadReply>);

impl Reloader {
    /// Reloads and waits for the verdict. `Err` carries why the new config was rejected
    /// (the old one keeps serving).
    pub async fn reload(&self) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        self.0
            .send(tx)
            .await
            .map_err(|_| "server is not running".to_string())?;
        rx.await
            .map_err(|_| "server stopped during the reload".to_string())?
    }
}

/// State shared with the admin API.
pub struct Shared {
    pub runtime: ArcSwap<Runtime>,
    pub metrics: Arc<Metrics>,
    pub reloader: Reloader,
}

/// One bound listener. The socket stays open across reloads that keep its address; its
/// context (routes, gate, TLS, upstreams) is swapped for new connections.
struct Slot {
    name: String,
    bind: SocketAddr,
    addr: SocketAddr,
    ctx: Arc<ArcSwap<ListenerCtx>>,
    limit: Arc<Semaphore>,
    max: usize,
    per_source: Arc<PerSource>,
    stop: watch::Sender<bool>,
    tcp: Option<TcpListener>,
    task: Option<JoinHandle<()>>,
}

/// Bound listeners, ready to serve. Binding is separate from running so callers (tests,
/// `demo`) learn the real ports before traffic starts.
pub struct Server {
    shared: Arc<Shared>,
    slots: Vec<Slot>,
    admin: Option<(TcpListener, Option<String>)>,
    source: ConfigSource,
    reload_rx: mpsc::Receiver<ReloadReply>,
}

impl Server {
    pub async fn bind(config: &Config) -> Result<Server, StartError> {
        let metrics = Arc::new(Metrics::new());
        let runtime = Runtime::build(config.clone(), &metrics, None).map_err(StartError::Setup)?;
        let mut slots = Vec::new();
        for (l, ctx) in config.listeners.iter().zip(&runtime.listeners) {
            slots.push(Slot::bind(l, ctx.clone())?);
        }
        let admin = match &config.admin {
            Some(a) => {
                let tcp = bind_tcp(a.bind).map_err(|source| StartError::Bind {
                    name: "admin".into(),
                    addr: a.bind,
                    source,
                })?;
                Some((tcp, a.token.clone()))
            }
            None => None,
        };
        let (tx, reload_rx) = mpsc::channel(8);
        Ok(Server {
            shared: Arc::new(Shared {
                runtime: ArcSwap::from_pointee(runtime),
                metrics,
                reloader: Reloader(tx),
            }),
            slots,
            admin,
            source: ConfigSource::Fixed,
            reload_rx,
        })
    }

    /// Where SIGHUP and `POST /reload` read the new config from.
    pub fn with_source(mut self, source: ConfigSource) -> Self {
        self.source = source;
        self
    }

    /// The address a listener actually bound (port 0 resolved).
    pub fn local_addr(&self, listener: &str) -> Option<SocketAddr> {
        self.slots
            .iter()
            .find(|s| s.name == listener)
            .map(|s| s.addr)
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|(t, _)| t.local_addr().ok())
    }

    /// The current upstreams (changes with reloads).
    pub fn upstreams(&self) -> Vec<Arc<Upstream>> {
        self.shared.runtime.load().upstreams.clone()
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.shared.metrics
    }

    pub fn reloader(&self) -> Reloader {
        self.shared.reloader.clone()
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets in-flight requests and
    /// streams finish for up to the grace period, and returns.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        {
            let runtime = self.shared.runtime.load();
            tracing::info!(
                version = env!("CARGO_PKG_VERSION"),
                config = %self.source,
                "starting: {}",
                runtime.config.summary()
            );
            for w in &runtime.config.warnings {
                tracing::warn!("{w}");
            }
        }
        let connections = TaskTracker::new();
        let mut health = HealthTasks::default();
        health.sync(&self.shared.runtime.load().upstreams);
        for slot in &mut self.slots {
            slot.start(&connections);
        }
        let admin = self
            .admin
            .take()
            .map(|(tcp, token)| tokio::spawn(crate::admin::serve(tcp, token, self.shared.clone())));
        let hangups = tokio::spawn(crate::signals::reload_on_hangup(
            self.shared.reloader.clone(),
        ));

        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                Some(reply) = self.reload_rx.recv() => {
                    let result = self.reload(&connections, &mut health);
                    let label = ResultLabel {
                        kind: if result.is_ok() { "ok" } else { "rejected" }.into(),
                    };
                    self.shared.metrics.reloads.get_or_create(&label).inc();
                    match &result {
                        Ok(()) => {
                            let runtime = self.shared.runtime.load();
                            tracing::info!(config = %self.source, "config reloaded: {}", runtime.config.summary());
                            for w in &runtime.config.warnings {
                                tracing::warn!("{w}");
                            }
                        }
                        Err(e) => tracing::error!("reload rejected, the running config stays: {e}"),
                    }
                    let _ = reply.send(result);
                }
            }
        }
        hangups.abort();
        let grace = self.shared.runtime.load().config.server.shutdown_grace;
        tracing::info!(grace = %humantime::format_duration(grace), "shutting down: no new connections, draining");
        for slot in &mut self.slots {
            slot.stop().await;
        }
        connections.close();
        match tokio::time::timeout(grace, connections.wait()).await {
            Ok(()) => tracing::info!("drained, all connections closed"),
            Err(_) => tracing::warn!("grace period over, closing remaining connections"),
        }
        if let Some(a) = admin {
            a.abort();
        }
        drop(health);
    }

    /// Loads the config again, builds everything it needs, and only then swaps it in:
    /// kept listeners get the new context for new connections, removed ones stop
    /// accepting (their requests finish), new ones start.
    fn reload(
        &mut self,
        connections: &TaskTracker,
        health: &mut HealthTasks,
    ) -> Result<(), String> {
        let config = match &self.source {
            ConfigSource::Fixed => return Err("this process has no config file to reload".into()),
            ConfigSource::Embedded => Config::load(None),
            ConfigSource::File(p) => Config::load(Some(p)),
        }
        .map_err(|e| e.to_string())?;
        if config.admin.as_ref().map(|a| a.bind)
            != self
                .shared
                .runtime
                .load()
                .config
                .admin
                .as_ref()
                .map(|a| a.bind)
        {
            tracing::warn!("admin.bind changed: the admin listener moves only on restart");
        }
        let old = self.shared.runtime.load_full();
        let runtime = Runtime::build(config, &self.shared.metrics, Some(&old))?;

        // Bind what is new before touching anything, so a failure leaves all as it was.
        let mut plan: Vec<(usize, Option<usize>)> = Vec::new(); // (new listener, kept slot)
        let mut fresh: Vec<Slot> = Vec::new();
        for (i, l) in runtime.config.listeners.iter().enumerate() {
            let kept = self
                .slots
                .iter()
                .position(|s| s.bind == l.bind && (s.name == l.name || l.bind.port() != 0));
            if kept.is_none() {
                fresh.push(Slot::bind(l, runtime.listeners[i].clone()).map_err(|e| e.to_string())?);
            }
            plan.push((i, kept));
        }

        let runtime = Arc::new(runtime);
        let mut next: Vec<Slot> = Vec::new();
        let mut old_slots: Vec<Option<Slot>> = std::mem::take(&mut self.slots)
            .into_iter()
            .map(Some)
            .collect();
        let mut fresh = fresh.into_iter();
        for (i, kept) in plan {
            let l = &runtime.config.listeners[i];
            let ctx = runtime.listeners[i].clone();
            match kept.and_then(|k| old_slots[k].take()) {
                Some(mut slot) => {
                    slot.update(l, ctx);
                    next.push(slot);
                }
                None => {
                    if let Some(mut slot) = fresh.next() {
                        slot.start(connections);
                        next.push(slot);
                    }
                }
            }
        }
        for slot in old_slots.into_iter().flatten() {
            tracing::info!(listener = %slot.name, "listener removed: no new connections, in-flight requests finish");
            let _ = slot.stop.send(true);
        }
        self.slots = next;
        health.sync(&runtime.upstreams);
        self.shared.runtime.store(runtime);
        Ok(())
    }
}

impl Slot {
    fn bind(l: &ListenerConfig, ctx: Arc<ListenerCtx>) -> Result<Slot, StartError> {
        let tcp = bind_tcp(l.bind).map_err(|source| StartError::Bind {
            name: l.name.clone(),
            addr: l.bind,
            source,
        })?;
        let addr = tcp.local_addr().unwrap_or(l.bind);
        Ok(Slot {
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

    fn start(&mut self, connections: &TaskTracker) {
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
    fn update(&mut self, l: &ListenerConfig, ctx: Arc<ListenerCtx>) {
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

    async fn stop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
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

async fn accept_loop(
    name: String,
    tcp: TcpListener,
    ctx: Arc<ArcSwap<ListenerCtx>>,
    limit: Arc<Semaphore>,
    per_source: Arc<PerSource>,
    mut stop: watch::Receiver<bool>,
    connections: TaskTracker,
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
        let _ = stream.set_nodelay(true);
        let ctx = ctx.clone();
        let stop = stop.clone();
        connections.spawn(async move {
            crate::conn::serve(stream, peer, ctx, stop).await;
            drop(source);
            drop(permit);
        });
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

/// One background task (health checks, engine-signal scrapes) per upstream object; kept in
/// step with the current upstreams.
#[derive(Default)]
struct HealthTasks {
    running: Vec<(Arc<Upstream>, tokio::task::AbortHandle)>,
    set: JoinSet<()>,
}

impl HealthTasks {
    fn sync(&mut self, upstreams: &[Arc<Upstream>]) {
        self.running.retain(|(u, handle)| {
            let keep = upstreams.iter().any(|n| Arc::ptr_eq(n, u));
            if !keep {
                handle.abort();
            }
            keep
        });
        for u in upstreams {
            let wanted = u.cfg.health.enabled || u.cfg.balance.signals;
            if wanted && !self.running.iter().any(|(r, _)| Arc::ptr_eq(r, u)) {
                let handle = self.set.spawn(crate::upstream::background(u.clone()));
                self.running.push((u.clone(), handle));
            }
        }
    }
}
