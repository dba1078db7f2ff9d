//! The process lifecycle: bind every listener (`listener`), serve, apply reloads (SIGHUP or
//! the admin API, both through a `reload::Reloader`) by building the new runtime before
//! swapping it in, and drain on shutdown.

use crate::config::Config;
use crate::listener::{bind_tcp, BindError, BoundListener, Connections};
use crate::metrics::{Metrics, ResultLabel};
use crate::reload::{ConfigSource, ReloadReply, Reloader, Shared};
use crate::runtime::Runtime;
use crate::upstream::Upstream;
use crate::workers::Workers;
use arc_swap::ArcSwap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::task::TaskTracker;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Bind(#[from] BindError),
}

/// Bound listeners, ready to serve. Binding is separate from running so callers (tests,
/// `demo`) learn the real ports before traffic starts.
pub struct Server {
    shared: Arc<Shared>,
    listeners: Vec<BoundListener>,
    admin: Option<(TcpListener, Option<String>)>,
    source: ConfigSource,
    reload_rx: mpsc::Receiver<ReloadReply>,
    /// The threads that serve connections (`server.worker_threads`, fixed until restart).
    workers: Arc<Workers>,
}

impl Server {
    pub async fn bind(config: &Config) -> Result<Server, StartError> {
        let metrics = Arc::new(Metrics::new());
        let runtime = Runtime::build(config.clone(), &metrics, None).map_err(StartError::Setup)?;
        let mut listeners = Vec::new();
        for (l, ctx) in config.listeners.iter().zip(&runtime.listeners) {
            listeners.push(BoundListener::bind(l, ctx.clone())?);
        }
        let admin = match &config.admin {
            Some(a) => {
                let tcp = bind_tcp(a.bind).map_err(|source| BindError {
                    name: "admin".into(),
                    addr: a.bind,
                    source,
                })?;
                Some((tcp, a.token.clone()))
            }
            None => None,
        };
        let (reloader, reload_rx) = Reloader::channel();
        let workers = Workers::start(crate::workers::count(config.server.worker_threads))
            .map_err(|e| StartError::Setup(format!("cannot start the worker threads: {e}")))?;
        Ok(Server {
            shared: Arc::new(Shared {
                runtime: ArcSwap::from_pointee(runtime),
                metrics,
                reloader,
            }),
            listeners,
            admin,
            source: ConfigSource::Fixed,
            reload_rx,
            workers: Arc::new(workers),
        })
    }

    /// Where SIGHUP and `POST /reload` read the new config from.
    pub fn with_source(mut self, source: ConfigSource) -> Self {
        self.source = source;
        self
    }

    /// The address a listener actually bound (port 0 resolved).
    pub fn local_addr(&self, listener: &str) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|l| l.name == listener)
            .map(|l| l.addr)
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
        let connections = Connections {
            tracker: TaskTracker::new(),
            workers: self.workers.clone(),
        };
        let mut health = HealthTasks::default();
        health.sync(&self.shared.runtime.load().upstreams);
        for l in &mut self.listeners {
            l.start(&connections);
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
        for l in &mut self.listeners {
            l.stop().await;
        }
        connections.tracker.close();
        match tokio::time::timeout(grace, connections.tracker.wait()).await {
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
        connections: &Connections,
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
        // (new listener, index of the bound listener it keeps)
        let mut plan: Vec<(usize, Option<usize>)> = Vec::new();
        let mut fresh: Vec<BoundListener> = Vec::new();
        for (i, l) in runtime.config.listeners.iter().enumerate() {
            let kept = self
                .listeners
                .iter()
                .position(|b| b.bind == l.bind && (b.name == l.name || l.bind.port() != 0));
            if kept.is_none() {
                fresh.push(
                    BoundListener::bind(l, runtime.listeners[i].clone())
                        .map_err(|e| e.to_string())?,
                );
            }
            plan.push((i, kept));
        }

        let runtime = Arc::new(runtime);
        let mut next: Vec<BoundListener> = Vec::new();
        let mut old: Vec<Option<BoundListener>> = std::mem::take(&mut self.listeners)
            .into_iter()
            .map(Some)
            .collect();
        let mut fresh = fresh.into_iter();
        for (i, kept) in plan {
            let l = &runtime.config.listeners[i];
            let ctx = runtime.listeners[i].clone();
            match kept.and_then(|k| old[k].take()) {
                Some(mut bound) => {
                    bound.update(l, ctx);
                    next.push(bound);
                }
                None => {
                    if let Some(mut bound) = fresh.next() {
                        bound.start(connections);
                        next.push(bound);
                    }
                }
            }
        }
        for bound in old.into_iter().flatten() {
            tracing::info!(listener = %bound.name, "listener removed: no new connections, in-flight requests finish");
            let _ = bound.stop.send(true);
        }
        self.listeners = next;
        health.sync(&runtime.upstreams);
        self.shared.runtime.store(runtime);
        Ok(())
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
