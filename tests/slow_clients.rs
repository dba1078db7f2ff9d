//! Slow and idle clients (issue item "slow and idle clients"): a request body trickled in
//! small pieces is relayed whole and as it arrives while other clients are served; a body
//! that stalls is ended by the upstream `idle_timeout`; a client that stops reading a big
//! download gets backpressure, not buffering (the real binary's RSS stays flat); hundreds of
//! idle keep-alive connections do not delay fresh clients, and the listener's
//! `header_timeout` closes them.
//!
//! The header-timeout slowloris cases (silent, half request line, trickled headers, h2c
//! without a request) and the connection cap live in `server_limits.rs`.
//!
//! Every wait is bounded; the only sleeps are the pace of a deliberately slow client.
//! Limits exercised (docs/configuration.md "Timeouts", docs/hardening.md "Limits"):
//! - listener `header_timeout` (default 10 s): a request head must arrive within it, and an
//!   idle HTTP/1 keep-alive connection is closed after it;
//! - upstream `idle_timeout` (default 10 m): the longest gap between request body frames; a
//!   stalled request body ends with `400 bad_request` and the connection closed. A client
//!   that is slow to *read* is not an idle upstream: it is never cut by this timeout;
//! - listener `send_timeout` (default 60 s): a client that accepts no bytes for that long
//!   while podproxy has some for it is cut (aborted response, backend slot freed);
//! - there is no rate or total-time limit on a request body that keeps moving, nor on a
//!   client that keeps reading slowly: it holds its connection, its upstream connection and
//!   its in-flight slot. Memory stays bounded per connection by hyper's buffers, capped at
//!   64 KiB each (the write queue towards the client and the upstream read buffer), never by
//!   the body size, because the relay reads the upstream only when the client has room.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::*;
use testkit::data::{fill, pattern, sha256_hex};
use testkit::echo::{EchoServer, BYTES_SEED};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const NO_HEALTH: &str = "[upstreams.u.health]\nenabled = false\n";

/// One listener `main` (with `listener_extra`) routing `/` to upstream `u` (with
/// `upstream_extra`), health checks off so the backend records only client requests.
fn config(listener_extra: &str, upstream_url: &str, upstream_extra: &str) -> String {
    format!(
        "[listeners.main]\nbind = \"127.0.0.1:0\"\n{listener_extra}\n\
         routes = [{{ prefix = \"/\", upstream = \"u\" }}]\n\n\
         [upstreams.u]\nurls = \"{upstream_url}\"\n{upstream_extra}\n{NO_HEALTH}"
    )
}

/// How long a client stalled past a sub-second timeout may stay open: far above the
/// timeout (a loaded machine), far below the defaults (so the setting is what acts).
const CLOSE_BOUND: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------
// A minimal wire reader: the response head, then exact byte counts of the body.
// ---------------------------------------------------------------------------------------

struct Wire {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Wire {
    /// A fresh connection (as `RawConn` makes them), read by hand.
    async fn connect(addr: SocketAddr) -> Wire {
        let RawConn { stream, .. } = RawConn::connect(addr).await;
        Wire {
            stream,
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    async fn fill(&mut self) -> bool {
        let mut chunk = vec![0u8; 64 * 1024];
        let n = self.stream.read(&mut chunk).await.unwrap_or(0);
        self.buf.extend_from_slice(&chunk[..n]);
        n > 0
    }

    /// Status and lowercased headers of the next response head.
    async fn head(&mut self) -> (u16, Vec<(String, String)>) {
        bounded("response head", async {
            let end = loop {
                if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
                assert!(self.fill().await, "closed before a response head");
            };
            let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
            self.buf.drain(..end);
            let mut lines = head.split("\r\n");
            let status = lines
                .next()
                .and_then(|l| l.split(' ').nth(1))
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("bad head {head:?}"));
            let headers = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                .collect();
            (status, headers)
        })
        .await
    }

    /// Exactly `n` body bytes.
    async fn exact(&mut self, n: usize) -> Vec<u8> {
        bounded("body bytes", async {
            while self.buf.len() < n {
                assert!(self.fill().await, "closed inside a body");
            }
            self.buf.drain(..n).collect()
        })
        .await
    }
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// A normal request on a keep-alive connection: `GET /bytes/100`, answered 200 with the
/// right bytes.
async fn normal_request(conn: &mut RawConn) {
    conn.send(b"GET /bytes/100 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let r = conn.response().await;
    assert_eq!(r.status, 200, "{}", r.body_str());
    assert_eq!(r.body, pattern(BYTES_SEED, 100));
}

// ---------------------------------------------------------------------------------------
// a. Slow request body
// ---------------------------------------------------------------------------------------

/// Two uploads trickled in 20 pieces 50 ms apart (POST /echo and POST /sink, both with
/// Content-Length): each piece is echoed back before the next is sent (relayed as it
/// arrives, not collected), a second client is answered between every two pieces, the
/// /sink upload is answered only after its last byte, and the backend received both bodies
/// whole (length + SHA-256).
#[tokio::test]
async fn trickled_request_body_is_relayed_whole_while_others_are_served() {
    const PIECES: usize = 20;
    const PIECE: usize = 4096;
    const LEN: usize = PIECES * PIECE;
    let echo = EchoServer::start().await.unwrap();
    let rec = echo.recorder();
    let proxy = Proxy::start(&config("", &echo.url(), "")).await;
    let addr = proxy.addr("main");
    let body = pattern(7, LEN);

    let mut echo_up = Wire::connect(addr).await;
    echo_up
        .send(format!("POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: {LEN}\r\n\r\n").as_bytes())
        .await;
    let mut sink_up = Wire::connect(addr).await;
    sink_up
        .send(format!("POST /sink HTTP/1.1\r\nHost: x\r\nContent-Length: {LEN}\r\n\r\n").as_bytes())
        .await;
    let mut other = RawConn::connect(addr).await;

    // The echo's response head comes back before any body byte was sent.
    let (status, headers) = echo_up.head().await;
    assert_eq!(status, 200);
    assert_eq!(
        header(&headers, "content-length"),
        Some(LEN.to_string().as_str())
    );

    for (i, piece) in body.chunks(PIECE).enumerate() {
        echo_up.send(piece).await;
        sink_up.send(piece).await;
        // Relayed now, not when the body is complete.
        assert_eq!(echo_up.exact(PIECE).await, piece, "piece {i} echoed wrong");
        // Another client is served mid-upload, on its keep-alive connection.
        normal_request(&mut other).await;
        if i + 1 < PIECES {
            // Nothing answered the unfinished /sink upload, and the backend has not seen
            // either body end.
            let mut probe = [0u8; 1];
            assert!(
                matches!(sink_up.stream.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
                "the /sink upload was answered before its body was complete (piece {i})"
            );
            assert!(
                proxied(&rec).iter().all(|r| r.method != "POST"),
                "an upload ended at the backend before its last piece (piece {i})"
            );
            // The slow client's pace.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    let sha = sha256_hex(&body);
    let (status, headers) = sink_up.head().await;
    assert_eq!(status, 200);
    let n: usize = header(&headers, "content-length")
        .and_then(|v| v.parse().ok())
        .expect("/sink answer has a Content-Length");
    let answer: serde_json::Value = serde_json::from_slice(&sink_up.exact(n).await).unwrap();
    assert_eq!(answer["len"], LEN as u64, "{answer}");
    assert_eq!(answer["sha256"], sha.as_str(), "{answer}");

    assert!(
        rec.wait_for(PIECES + 2, WAIT).await,
        "backend did not record both uploads"
    );
    for target in ["/echo", "/sink"] {
        let r = proxied(&rec)
            .into_iter()
            .find(|r| r.target == target)
            .unwrap_or_else(|| panic!("no {target} at the backend"));
        assert_eq!(r.body_len, LEN as u64, "{target}: length");
        assert_eq!(r.body_sha256_hex, sha, "{target}: content");
    }
    assert_eq!(
        proxied(&rec)
            .iter()
            .filter(|r| r.target == "/bytes/100")
            .count(),
        PIECES
    );
    eventually("in-flight back to 0", || proxy.in_flight() == 0).await;
    proxy.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// b. Stalled request body
// ---------------------------------------------------------------------------------------

/// Uploads that stop mid-body (half of a Content-Length body sent; or the head only) and
/// then neither send nor close: the upstream `idle_timeout` (300 ms here) ends the
/// exchange with `400 bad_request` and the connection closed, well before the 10 m
/// default; the backend sees the body cut off (exactly the bytes sent, never all of them);
/// in-flight returns to 0 and the proxy keeps serving.
#[tokio::test]
async fn stalled_request_body_is_ended_by_the_idle_timeout() {
    const LEN: usize = 64 * 1024;
    let echo = EchoServer::start().await.unwrap();
    let rec = echo.recorder();
    let proxy = Proxy::start(&config("", &echo.url(), "idle_timeout = \"300ms\"")).await;
    let addr = proxy.addr("main");
    let body = pattern(9, LEN);

    // Before either connection sends: a stall cannot start before its last byte was sent,
    // and on a loaded machine this task may send the second well after the first.
    let started = Instant::now();
    let mut half = RawConn::connect(addr).await;
    half.send(
        format!("POST /sink?half HTTP/1.1\r\nHost: x\r\nContent-Length: {LEN}\r\n\r\n").as_bytes(),
    )
    .await;
    half.send(&body[..LEN / 2]).await;
    let mut head_only = RawConn::connect(addr).await;
    head_only
        .send(
            format!("POST /sink?none HTTP/1.1\r\nHost: x\r\nContent-Length: {LEN}\r\n\r\n")
                .as_bytes(),
        )
        .await;

    for (what, conn) in [("half body", &mut half), ("head only", &mut head_only)] {
        let r = tokio::time::timeout(CLOSE_BOUND, conn.try_response())
            .await
            .unwrap_or_else(|_| panic!("{what}: no answer within {CLOSE_BOUND:?}"))
            .unwrap_or_else(|e| panic!("{what}: connection broke instead of an answer: {e}"));
        assert_eq!(r.status, 400, "{what}: {}", r.body_str());
        assert_eq!(r.json()["error"]["type"], "bad_request", "{what}");
        assert_eq!(r.header("connection"), Some("close"), "{what}");
        assert!(
            r.body_str().contains("idle timeout"),
            "{what}: {}",
            r.body_str()
        );
        tokio::time::timeout(CLOSE_BOUND, conn.until_closed())
            .await
            .unwrap_or_else(|_| panic!("{what}: connection left open after the 400"));
    }
    // Not answered before the stall had lasted about the idle timeout.
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "answered after {:?}, before a 300 ms stall",
        started.elapsed()
    );

    assert!(
        rec.wait_for(2, WAIT).await,
        "backend did not record both uploads"
    );
    for (target, sent) in [("/sink?half", LEN / 2), ("/sink?none", 0)] {
        let r = proxied(&rec)
            .into_iter()
            .find(|r| r.target == target)
            .unwrap_or_else(|| panic!("no {target} at the backend"));
        assert_eq!(
            r.body_len, sent as u64,
            "{target}: backend saw a different cut"
        );
        assert_eq!(r.body_sha256_hex, sha256_hex(&body[..sent]), "{target}");
    }
    eventually("in-flight back to 0", || proxy.in_flight() == 0).await;
    normal_request(&mut RawConn::connect(addr).await).await;
    proxy.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// c. Slow reader of a big response
// ---------------------------------------------------------------------------------------

/// Reads `n` body bytes starting at `offset` of the `/bytes` pattern, checking each byte.
async fn read_pattern(wire: &mut Wire, offset: u64, n: u64) {
    let mut expected = vec![0u8; 64 * 1024];
    let mut got = 0u64;
    // Whatever the head read already buffered first.
    while got < n {
        if wire.buf.is_empty() {
            assert!(wire.fill().await, "download closed at {}", offset + got);
        }
        let take = (wire.buf.len() as u64).min(n - got) as usize;
        let take = take.min(expected.len());
        fill(BYTES_SEED, offset + got, &mut expected[..take]);
        assert!(
            wire.buf[..take] == expected[..take],
            "download corrupted near offset {}",
            offset + got
        );
        wire.buf.drain(..take);
        got += take as u64;
    }
}

/// Growth of podproxy's RSS allowed while a 256 MiB download is stalled. One slow reader
/// costs about 1 MiB (hyper's write queue towards the client and its upstream read buffer,
/// filled with the echo's 64 KiB frames); a proxy that buffered the body would need the
/// whole 256 MiB.
const STALL_GROWTH_BOUND_KIB: u64 = 32 * 1024;

/// A client downloads 256 MiB (`GET /bytes/268435456`) through the real binary, reads the
/// head and 1 MiB, then stops reading for 1.5 s. podproxy stops pulling from the upstream
/// instead of buffering: its RSS, sampled during the stall, and its peak (VmHWM) over the
/// whole download stay within `STALL_GROWTH_BOUND_KIB` of the pre-download baseline. After
/// the pause every remaining byte arrives, in order and correct: the stall, three times the
/// upstream `idle_timeout` (500 ms here), is not mistaken for an idle upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_reader_of_a_big_download_gets_backpressure_not_buffering() {
    const SIZE: u64 = 256 * 1024 * 1024;
    const FIRST: u64 = 1024 * 1024;
    let echo = EchoServer::start().await.unwrap();
    // A short upstream idle timeout: a client that is slow to read is not an idle upstream,
    // so the 1.5 s stall must not trip it.
    let port = free_port();
    let toml = config("", &echo.url(), "idle_timeout = \"500ms\"")
        .replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
    let proxy = Podproxy::new()
        .config_text(
            "podproxy.toml",
            &format!("[server]\nlog_level = \"warn\"\n\n{toml}"),
        )
        .listening_on(port)
        .start()
        .await;

    // Warm-up (first connection, pools, allocator arenas), then the baseline.
    let mut warm = RawConn::connect(proxy.addr()).await;
    normal_request(&mut warm).await;
    drop(warm);
    let base_rss = proxy.status_kib("VmRSS");
    let base_hwm = proxy.status_kib("VmHWM");

    let started = Instant::now();
    let mut wire = Wire::connect(proxy.addr()).await;
    wire.send(format!("GET /bytes/{SIZE} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await;
    let (status, headers) = wire.head().await;
    assert_eq!(status, 200);
    assert_eq!(
        header(&headers, "content-length"),
        Some(SIZE.to_string().as_str())
    );
    bounded("first MiB", read_pattern(&mut wire, 0, FIRST)).await;

    // The stall: the slow client's pace is "nothing for 1.5 s". Sample podproxy meanwhile.
    let mut stalled_max = 0;
    for _ in 0..15 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        stalled_max = stalled_max.max(proxy.status_kib("VmRSS"));
    }
    let stalled_hwm = proxy.status_kib("VmHWM");

    // The rest arrives, complete and correct.
    tokio::time::timeout(
        Duration::from_secs(60),
        read_pattern(&mut wire, FIRST, SIZE - FIRST),
    )
    .await
    .expect("rest of the download");
    let elapsed = started.elapsed();
    let end_hwm = proxy.status_kib("VmHWM");
    println!(
        "podproxy VmRSS {base_rss} KiB before, max {stalled_max} KiB while the reader stalled; \
         VmHWM {base_hwm} KiB before, {stalled_hwm} KiB after the stall, {end_hwm} KiB after \
         all {} MiB ({elapsed:?})",
        SIZE >> 20
    );
    assert!(
        stalled_max < base_rss + STALL_GROWTH_BOUND_KIB,
        "podproxy grew from {base_rss} KiB to {stalled_max} KiB while its client stalled"
    );
    assert!(
        end_hwm < base_hwm.max(base_rss) + STALL_GROWTH_BOUND_KIB,
        "podproxy peaked at {end_hwm} KiB relaying {} MiB to a slow reader (baseline {base_rss} KiB)",
        SIZE >> 20
    );
    // The connection is still usable (keep-alive) after the whole body.
    wire.send(b"GET /bytes/100 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let (status, _) = wire.head().await;
    assert_eq!(status, 200);
    read_pattern(&mut wire, 0, 100).await;
}

// ---------------------------------------------------------------------------------------
// d. Many idle keep-alive connections
// ---------------------------------------------------------------------------------------

/// Idle connections per test: 400, or fewer when the open-files soft limit is low. This
/// process holds both ends of every connection (client and proxy), both idle-connection
/// tests may run at once, and the pooled upstream connections need room too.
/// A client that stops reading altogether is cut after the listener's `send_timeout`: the
/// upstream request is dropped (in-flight back to 0) while the client still reads nothing,
/// and what it can read afterwards is a body short of its Content-Length, then the end of
/// the connection — an aborted response, never a clean one.
#[tokio::test]
async fn a_client_that_stops_reading_is_cut_after_send_timeout() {
    const SIZE: u64 = 256 * 1024 * 1024;
    let echo = EchoServer::start().await.unwrap();
    let proxy = Proxy::start(&config("send_timeout = \"300ms\"", &echo.url(), "")).await;
    let mut wire = Wire::connect(proxy.addr("main")).await;
    // The send timeout cannot start before the request is sent; it can start before this
    // task (on a loaded machine) gets to read the response head.
    let started = Instant::now();
    wire.send(format!("GET /bytes/{SIZE} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await;
    let (status, headers) = wire.head().await;
    assert_eq!(status, 200);
    assert_eq!(
        header(&headers, "content-length"),
        Some(SIZE.to_string().as_str())
    );
    // The client reads nothing more; podproxy fills the socket buffers and its own bounded
    // ones, then the send timeout ends the exchange and frees the backend slot.
    eventually("the stalled exchange released its backend slot", || {
        proxy.in_flight() == 0
    })
    .await;
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "cut before the send timeout: {:?}",
        started.elapsed()
    );
    let mut received = wire.buf.len() as u64;
    let end = bounded("end of the cut connection", async {
        let mut chunk = vec![0u8; 256 * 1024];
        loop {
            match wire.stream.read(&mut chunk).await {
                Ok(0) => break "eof",
                Ok(n) => received += n as u64,
                Err(_) => break "reset",
            }
        }
    })
    .await;
    assert!(
        received < SIZE,
        "a cut response must not look complete ({received} of {SIZE} bytes, then {end})"
    );
    // The proxy keeps serving.
    let mut fresh = RawConn::connect(proxy.addr("main")).await;
    normal_request(&mut fresh).await;
}

fn idle_conns() -> usize {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(1024);
    (soft.saturating_sub(256) / 4).clamp(50, 400)
}

/// Opening connections (and their first request) this many at a time keeps the pool of
/// upstream connections, and so the file descriptors, small.
const OPEN_AT_ONCE: usize = 25;

/// Opens `n` connections, each doing one keep-alive request (`GET /bytes/16`), and hands
/// each connection, with the time its request was sent, to `then` once the response is in
/// (outside the opening limit).
async fn open_idle<T: Send + 'static, F, Fut>(addr: SocketAddr, n: usize, then: F) -> Vec<T>
where
    F: Fn(RawConn, Instant) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = T> + Send + 'static,
{
    let gate = Arc::new(tokio::sync::Semaphore::new(OPEN_AT_ONCE));
    let then = Arc::new(then);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let gate = gate.clone();
        let then = then.clone();
        tasks.spawn(async move {
            let permit = gate.acquire_owned().await.unwrap();
            let mut conn = RawConn::connect(addr).await;
            let sent = Instant::now();
            conn.send(b"GET /bytes/16 HTTP/1.1\r\nHost: x\r\n\r\n")
                .await;
            let r = conn.response().await;
            assert_eq!(r.status, 200, "idle connection {i}: {}", r.body_str());
            assert_eq!(r.body, pattern(BYTES_SEED, 16));
            assert_eq!(
                r.header("connection"),
                None,
                "idle connection {i} not kept alive"
            );
            drop(permit);
            then(conn, sent).await
        });
    }
    let mut out = Vec::with_capacity(n);
    while let Some(r) = bounded("idle connections", tasks.join_next()).await {
        out.push(r.expect("idle connection task"));
    }
    out
}

/// `n` idle keep-alive connections (each served once, then silent) stay open under a long
/// `header_timeout`; meanwhile 50 fresh clients (10 at a time, new connection each) are
/// all answered, none slower than 5 s, and afterwards every idle connection still serves
/// a second request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_idle_keepalive_connections_do_not_delay_fresh_clients() {
    let n = idle_conns();
    let echo = EchoServer::start().await.unwrap();
    let rec = echo.recorder();
    let proxy = Proxy::start(&config("header_timeout = \"60s\"", &echo.url(), "")).await;
    let addr = proxy.addr("main");
    let idle = open_idle(addr, n, |c, _| async move { c }).await;
    assert_eq!(idle.len(), n);

    let gate = Arc::new(tokio::sync::Semaphore::new(10));
    let mut fresh = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let gate = gate.clone();
        fresh.spawn(async move {
            let _permit = gate.acquire_owned().await.unwrap();
            let t = Instant::now();
            let mut conn = RawConn::connect(addr).await;
            normal_request(&mut conn).await;
            t.elapsed()
        });
    }
    let mut slowest = Duration::ZERO;
    while let Some(r) = bounded("fresh clients", fresh.join_next()).await {
        slowest = slowest.max(r.expect("fresh client"));
    }
    println!("{n} idle keep-alive connections open; slowest of 50 fresh requests {slowest:?}");
    assert!(
        slowest < Duration::from_secs(5),
        "a fresh request took {slowest:?} next to {n} idle connections"
    );

    // The idle connections were kept, not shed: each serves a second request.
    let gate = Arc::new(tokio::sync::Semaphore::new(OPEN_AT_ONCE));
    let mut again = tokio::task::JoinSet::new();
    for mut conn in idle {
        let gate = gate.clone();
        again.spawn(async move {
            let _permit = gate.acquire_owned().await.unwrap();
            normal_request(&mut conn).await;
        });
    }
    while let Some(r) = bounded("second requests", again.join_next()).await {
        r.expect("second request on an idle connection");
    }
    assert_eq!(proxied(&rec).len(), n + 50 + n);
    eventually("in-flight back to 0", || proxy.in_flight() == 0).await;
    proxy.shutdown().await;
}

/// With `header_timeout = "1s"`, `n` keep-alive connections that were served once and then
/// sit idle are each closed by the proxy: EOF with nothing written, not before the timeout
/// and within `CLOSE_BOUND` of their response. A fresh client is served after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keepalive_connections_are_closed_after_header_timeout() {
    let n = idle_conns();
    let echo = EchoServer::start().await.unwrap();
    let proxy = Proxy::start(&config("header_timeout = \"1s\"", &echo.url(), "")).await;
    let addr = proxy.addr("main");
    // Per connection: (request sent → closed, response read → closed).
    let closed = open_idle(addr, n, |mut conn, sent| async move {
        let served = Instant::now();
        let wrote = tokio::time::timeout(CLOSE_BOUND, conn.until_closed())
            .await
            .expect("idle connection still open");
        assert!(wrote.is_empty(), "wrote before closing: {wrote:?}");
        (sent.elapsed(), served.elapsed())
    })
    .await;
    let earliest = closed.iter().map(|c| c.0).min().unwrap();
    let latest = closed.iter().map(|c| c.1).max().unwrap();
    println!(
        "{n} idle connections closed: earliest {earliest:?} after its request was sent, \
         latest {latest:?} after its response was read"
    );
    // The proxy's timer cannot start before the request was sent, and tokio timers never
    // fire early: no close sooner than the timeout (1 ms of timer rounding allowed).
    assert!(
        earliest >= Duration::from_millis(999),
        "an idle connection was closed {earliest:?} after its request, before the 1 s timeout"
    );
    normal_request(&mut RawConn::connect(addr).await).await;
    eventually("in-flight back to 0", || proxy.in_flight() == 0).await;
    proxy.shutdown().await;
}
