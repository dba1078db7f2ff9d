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
    pub reloader: proxy::reload::Reloader,
}

impl Proxy {
    /// Starts podproxy from TOML text (listeners should bind `127.0.0.1:0`).
    pub async fn start(toml: &str) -> Proxy {
        let config = proxy::Config::from_toml(toml)
            .unwrap_or_else(|e| panic!("bad test config: {e}\n{toml}"));
        // Quiet unless RUST_LOG asks: failures are reported by the assertions.
        proxy::logging::init(
            proxy::config::LogFormat::Text,
            &proxy::logging::effective_level(None, "off"),
        );
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

/// podproxy as its own process (the real binary), for figures that must be podproxy's
/// alone (RSS) rather than the test process's. Killed and reaped on drop.
pub struct RealProxy {
    child: std::process::Child,
    pub addr: SocketAddr,
    config: std::path::PathBuf,
}

impl RealProxy {
    /// Starts the binary with the config `toml(addr)` gives for a listener bound to `addr`
    /// (a free loopback port), at log level warn; returns once it accepts connections.
    pub async fn start(toml: impl FnOnce(SocketAddr) -> String) -> RealProxy {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        // A free port: bind :0, note it, release it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let config = std::env::temp_dir().join(format!(
            "podproxy-real-{}-{}.toml",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(
            &config,
            format!("[server]\nlog_level = \"warn\"\n\n{}", toml(addr)),
        )
        .expect("write config");
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_podproxy"))
            .arg("--config")
            .arg(&config)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("spawn podproxy");
        let mut proxy = RealProxy {
            child,
            addr,
            config,
        };
        let up = tokio::time::timeout(WAIT, async {
            loop {
                if let Some(status) = proxy.child.try_wait().expect("try_wait") {
                    panic!("podproxy exited at start: {status}");
                }
                if tokio::net::TcpStream::connect(addr).await.is_ok() {
                    break;
                }
                // Polling a port that offers no event to await.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(up.is_ok(), "podproxy did not listen on {addr}");
        proxy
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A field of /proc/<pid>/status in KiB (VmRSS, VmHWM).
    pub fn status_kib(&self, field: &str) -> u64 {
        let pid = self.child.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().strip_suffix("kB")?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
    }
}

impl Drop for RealProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.config);
    }
}
