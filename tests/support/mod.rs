//! The one harness of the end-to-end tests. Every test file that needs it declares
//! `mod support;` and `use support::*;`. Everything runs on loopback; every wait is bounded
//! by `WAIT`.
//!
//! | module | what |
//! |---|---|
//! | this file | `WAIT`, `bounded`, `eventually`, `refused`, free ports, scratch files, what backends received |
//! | `launch` | podproxy in process (`Proxy`, from TOML text or a file) and as its own process (`Podproxy` → `Process`, `Ran`) |
//! | `check` | `podproxy check --skip-bind`: status, stdout, stderr |
//! | `raw` | a raw HTTP/1.1 client and a raw TCP backend, for what must be seen or sent byte for byte |
//! | `client` | the testkit client, h2c, streaming chats |
//! | `admin` | admin API requests |
//! | `metrics` | `/metrics` scrapes, parsed (`metrics::value`, `Scrape`) |
//! | `embedded` | the embedded default config moved onto loopback |
//! | `tls` | certificates (openssl and rcgen), TLS clients and a TLS backend |
//!
//! `metrics` and `tls` are used by name (`metrics::value(..)`, `use support::tls::*`); the
//! others are re-exported here.
#![allow(dead_code)]

pub mod admin;
pub mod check;
pub mod client;
pub mod embedded;
pub mod launch;
pub mod metrics;
pub mod raw;
pub mod tls;

// Not every test file uses every part (as with `dead_code` above).
#[allow(unused_imports)]
pub use {admin::*, check::*, client::*, embedded::*, launch::*, raw::*};

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Generous bound for anything a test awaits; only hit when something is broken.
pub const WAIT: Duration = Duration::from_secs(20);

/// Runs `fut` under `WAIT`, panicking with `what` when it does not finish.
pub async fn bounded<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
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

/// Whether connecting to `addr` is refused (its listener closed) within `WAIT`: a retry
/// loop, as a closing listener offers no event to await.
pub async fn refused(addr: SocketAddr) -> bool {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::net::TcpStream::connect(addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return true,
            _ => {}
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A loopback port that was free a moment ago (bind `127.0.0.1:0`, read, drop).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The scratch folder of the running test, `<target>/tmp/<test file>-<test name>`: the
/// same on every run (files are overwritten), its own for every test. Call it from the
/// test's own thread (the test body), whose name is the test's.
pub fn scratch_dir() -> PathBuf {
    let test = std::thread::current()
        .name()
        .unwrap_or("t")
        .replace("::", "-");
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("{}-{test}", env!("CARGO_CRATE_NAME")));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    dir
}

/// Writes `content` to `name` in the test's scratch folder; returns its path.
pub fn scratch_file(name: &str, content: &str) -> PathBuf {
    let path = scratch_dir().join(name);
    std::fs::write(&path, content).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    path
}

/// True when `s` looks like a lowercase hyphenated UUID (8-4-4-4-12 hex digits).
pub fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

// ---------------------------------------------------------------------------------------
// What the testkit backends received
// ---------------------------------------------------------------------------------------

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
