//! Shared harness for the end-to-end tests: podproxy in-process on loopback ports.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Generous bound for anything a test awaits; only hit when something is broken.
pub const WAIT: Duration = Duration::from_secs(20);

/// A running podproxy. Dropping it aborts the server; `shutdown` drains it first.
pub struct Proxy {
    addrs: Vec<(String, SocketAddr)>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    pub upstreams: Vec<std::sync::Arc<proxy::upstream::Upstream>>,
    /// The admin listener, when the config has `[admin]`.
    pub admin: Option<SocketAddr>,
    pub reloader: proxy::server::Reloader,
}

impl Proxy {
    /// Starts podproxy from TOML text (listeners should bind `127.0.0.1:0`).
    pub async fn start(toml: &str) -> Proxy {
        let config = proxy::Config::from_toml(toml)
            .unwrap_or_else(|e| panic!("bad test config: {e}\n{toml}"));
        // Quiet unless RUST_LOG asks: failures are reported by the assertions.
        proxy::logging::init(proxy::config::LogFormat::Text, "off");
        let server = proxy::Server::bind(&config).await.expect("bind");
        let addrs = config
            .listeners
            .iter()
            .map(|l| (l.name.clone(), server.local_addr(&l.name).expect("addr")))
            .collect();
        let upstreams = server.upstreams();
        let admin = server.admin_addr();
        let reloader = server.reloader();
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(server.run(async {
            let _ = rx.await;
        }));
        Proxy {
            addrs,
            stop: Some(tx),
            task: Some(task),
            upstreams,
            admin,
            reloader,
        }
    }

    /// One listener named `main` with `/` → upstream `u` at `upstream_url`, plus `extra`
    /// TOML lines inside the upstream section.
    pub async fn simple(upstream_url: &str, upstream_extra: &str) -> Proxy {
        Proxy::start(&format!(
            "[listeners.main]\nbind = \"127.0.0.1:0\"\nroutes = [{{ prefix = \"/\", upstream = \"u\" }}]\n\n[upstreams.u]\nurls = \"{upstream_url}\"\n{upstream_extra}\n"
        ))
        .await
    }

    pub fn addr(&self, listener: &str) -> SocketAddr {
        self.addrs
            .iter()
            .find(|(n, _)| n == listener)
            .map(|(_, a)| *a)
            .unwrap_or_else(|| panic!("no listener {listener}"))
    }

    pub fn url(&self, listener: &str) -> String {
        format!("http://{}", self.addr(listener))
    }

    /// Total in-flight requests over every backend of every upstream.
    pub fn in_flight(&self) -> usize {
        self.upstreams
            .iter()
            .flat_map(|u| u.backends().iter().map(|b| b.in_flight()))
            .sum()
    }

    /// Signals shutdown and waits (bounded) for the drain to finish.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(WAIT, task)
                .await
                .expect("drain bounded")
                .expect("server task");
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Waits until `cond` holds, checking on a short interval; bounded by `WAIT`. For counters
/// that change inside another task and offer no event to await (e.g. drop guards).
pub async fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Health checks run by default (`GET /health`, user-agent `podproxy-health`, first one at
/// start, then every 2 s) and show up in backend recorders. These helpers skip them.
pub fn is_health_check(r: &testkit::Recorded) -> bool {
    r.header("user-agent").as_deref() == Some("podproxy-health")
}

/// Requests the backend received from clients through the proxy (health checks skipped).
pub fn proxied(rec: &testkit::Recorder) -> Vec<testkit::Recorded> {
    rec.all()
        .into_iter()
        .filter(|r| !is_health_check(r))
        .collect()
}

/// The last client request the backend received (health checks skipped).
pub fn last_proxied(rec: &testkit::Recorder) -> Option<testkit::Recorded> {
    proxied(rec).pop()
}
