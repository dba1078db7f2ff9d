//! Errors podproxy generates itself:
//! small JSON bodies with the right status, aborted streams, and no error where a
//! legitimate Gonka call merely takes long or meets a closing keepalive connection.

mod support;

use http::Request;
use http_body_util::BodyExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::*;
use testkit::client::{empty, http_client};
use testkit::echo::EchoServer;
use testkit::mlnode::{MlnodeConfig, MlnodeSim};
use tokio::io::AsyncWriteExt;

/// Asserts a podproxy-generated error: status, JSON `{"error":{"type":..,"message":..}}`,
/// and an `x-request-id` header.
fn assert_proxy_error(parts: &http::response::Parts, body: &[u8], status: u16, kind: &str) {
    assert_eq!(
        parts.status.as_u16(),
        status,
        "{}",
        String::from_utf8_lossy(body)
    );
    assert_eq!(parts.headers["content-type"], "application/json");
    let v: serde_json::Value = serde_json::from_slice(body).expect("JSON error body");
    assert_eq!(v["error"]["type"], kind, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{v}"
    );
    let id = parts.headers.get("x-request-id").expect("x-request-id");
    assert!(!id.is_empty());
}

#[tokio::test]
async fn connect_failure_is_502_upstream_connect() {
    // A loopback port nobody listens on: connect is refused at once. Without health
    // checks, whose first failed probe would take the backend out first (503).
    let port = free_port();
    let proxy = Proxy::simple(
        &format!("http://127.0.0.1:{port}"),
        "health = { enabled = false }",
    )
    .await;
    let (parts, body) = send(
        &http_client(),
        Request::get(format!("{}/api/v1/state", proxy.url("main")))
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_proxy_error(&parts, &body, 502, "upstream_connect");
    proxy.shutdown().await;
}

#[tokio::test]
async fn response_header_timeout_is_504() {
    let echo = EchoServer::start().await.unwrap();
    let proxy = Proxy::simple(&echo.url(), "response_timeout = \"300ms\"").await;
    let started = Instant::now();
    let (parts, body) = send(
        &http_client(),
        Request::get(format!("{}/hang", proxy.url("main")))
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_proxy_error(&parts, &body, 504, "upstream_timeout");
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "answered before the timeout"
    );
    proxy.shutdown().await;
}

/// A raw backend streaming SSE: one event at once, then silence far longer than the
/// proxy's idle timeout, then the rest.
async fn stalling_sse_backend() -> RawBackend {
    RawBackend::start(|mut s| async move {
        let mut buf = Vec::new();
        while let Some(req) = read_request(&mut s, &mut buf).await {
            if req.head.starts_with("GET /health ") {
                let ok = "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
                if s.write_all(ok.as_bytes()).await.is_err() {
                    return;
                }
                continue;
            }
            let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\
                        Transfer-Encoding: chunked\r\n\r\n";
            let event = |seq: usize| {
                let ev = format!("data: {{\"seq\":{seq}}}\n\n");
                format!("{:x}\r\n{ev}\r\n", ev.len())
            };
            if s.write_all(head.as_bytes()).await.is_err()
                || s.write_all(event(0).as_bytes()).await.is_err()
            {
                return;
            }
            // Simulated stall (a hung engine): the proxy must not wait for it.
            tokio::time::sleep(Duration::from_secs(10)).await;
            let _ = s.write_all(event(1).as_bytes()).await;
            let _ = s.write_all(b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n").await;
            return;
        }
    })
    .await
}

#[tokio::test]
async fn idle_timeout_between_body_frames_aborts_the_stream() {
    let backend = stalling_sse_backend().await;
    let proxy = Proxy::simple(&backend.url(), "idle_timeout = \"500ms\"").await;
    let resp = bounded(
        "response head",
        http_client().request(
            Request::get(format!("{}/v1/chat/completions", proxy.url("main")))
                .body(empty())
                .unwrap(),
        ),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 200);
    let report = bounded("stream end", testkit::sse::read_events(resp.into_body()))
        .await
        .unwrap();
    assert_eq!(report.seqs(), [Some(0)], "{report:?}");
    assert!(
        report.aborted && !report.done,
        "an idle upstream must abort the client's body, not end it cleanly: {report:?}"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn idle_timeout_is_per_gap_not_a_total_cap() {
    let echo = EchoServer::start().await.unwrap();
    let proxy = Proxy::simple(&echo.url(), "idle_timeout = \"500ms\"").await;
    // 16 events 60 ms apart: about 1 s in total, every gap well below 500 ms.
    let resp = bounded(
        "response head",
        http_client().request(
            Request::get(format!("{}/sse?n=16&interval_ms=60", proxy.url("main")))
                .body(empty())
                .unwrap(),
        ),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 200);
    let report = bounded("stream end", testkit::sse::read_events(resp.into_body()))
        .await
        .unwrap();
    assert!(report.is_clean(16), "{report:?}");
    proxy.shutdown().await;
}

#[tokio::test]
async fn no_route_is_404_no_route() {
    let echo = EchoServer::start().await.unwrap();
    let proxy = Proxy::start(&format!(
        "[listeners.main]\nbind = \"127.0.0.1:0\"\nroutes = [{{ prefix = \"/api/\", upstream = \"u\" }}]\n\
         [upstreams.u]\nurls = \"{}\"\n",
        echo.url()
    ))
    .await;
    let client = http_client();
    for path in ["/health", "/ap", "/v1/models"] {
        let (parts, body) = send(
            &client,
            Request::get(format!("{}{path}", proxy.url("main")))
                .body(empty())
                .unwrap(),
        )
        .await;
        assert_proxy_error(&parts, &body, 404, "no_route");
    }
    assert!(proxied(&echo.recorder()).is_empty());
    // The route itself works.
    let (parts, _) = send(
        &client,
        Request::get(format!("{}/api/v1/state", proxy.url("main")))
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(parts.status, 200);
    proxy.shutdown().await;
}

/// A raw backend that, like uvicorn/vLLM (5 s), closes a keepalive connection once it has
/// been idle for `keepalive`; every request arriving before then is served. Counts the
/// connections it accepted.
async fn keepalive_closing_backend(keepalive: Duration) -> (RawBackend, Arc<AtomicUsize>) {
    let conns = Arc::new(AtomicUsize::new(0));
    let counter = conns.clone();
    let backend = RawBackend::start(move |mut s| {
        counter.fetch_add(1, Ordering::SeqCst);
        async move {
            let mut buf = Vec::new();
            loop {
                match tokio::time::timeout(keepalive, read_request(&mut s, &mut buf)).await {
                    Ok(Some(_)) => {
                        let resp = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\
                                    Connection: keep-alive\r\nKeep-Alive: timeout=5\r\n\r\nok";
                        if s.write_all(resp.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                    // Peer closed, or idle for `keepalive`: close (drop the socket).
                    Ok(None) | Err(_) => return,
                }
            }
        }
    })
    .await;
    (backend, conns)
}

/// Sends `gaps.len()` sequential GETs, pausing `gaps[i]` after request `i` (simulated client
/// pacing, not synchronisation); every one must succeed.
async fn sequential_requests_all_succeed(proxy: &Proxy, gaps: &[u64]) {
    let client = http_client();
    let url = format!("{}/v1/models", proxy.url("main"));
    for (i, gap) in gaps.iter().enumerate() {
        let (parts, body) = send(&client, Request::get(&url).body(empty()).unwrap()).await;
        assert_eq!(
            parts.status,
            200,
            "request {i} (after a {} ms pause): {}",
            if i == 0 { 0 } else { gaps[i - 1] },
            String::from_utf8_lossy(&body)
        );
        assert_eq!(&body[..], b"ok");
        tokio::time::sleep(Duration::from_millis(*gap)).await;
    }
}

/// Default config; the backend closes idle keepalive connections after 300 ms (uvicorn:
/// 5 s). Requests follow each other either well within that (the pooled connection is
/// reused) or well after it (the pooled connection is stale: podproxy must notice the
/// close, or retry a request that lost the race before any byte was sent, not fail it).
#[tokio::test]
async fn stale_keepalive_connections_never_fail_a_request() {
    let (backend, conns) = keepalive_closing_backend(Duration::from_millis(300)).await;
    let proxy = Proxy::simple(&backend.url(), "").await;
    // Mostly 0..20 ms (reuse), every fifth 350..370 ms (stale); 50 requests, about 4 s.
    let gaps: Vec<u64> = (0..50u64)
        .map(|i| if i % 5 == 4 { 350 + i % 20 } else { i % 20 })
        .collect();
    sequential_requests_all_succeed(&proxy, &gaps).await;
    // 1 + 9 stale transitions, fewer when a health check happened to keep a pooled
    // connection busy through a long pause.
    let n = conns.load(Ordering::SeqCst);
    assert!(
        n >= 5,
        "the backend saw only {n} connections: stale keepalives were not exercised"
    );
    proxy.shutdown().await;
}

/// The race right at the upstream's keepalive close (a request written as the backend
/// closes) cannot be retried safely; podproxy avoids it by never reusing a connection idle
/// longer than `pool_idle_timeout`, which must sit below the upstream's keepalive (4 s vs
/// uvicorn's 5 s by default; 50 ms vs 200 ms here). Most pauses land right on the
/// backend's close; with `pool_idle_timeout` at or above 200 ms some of them fail.
#[tokio::test]
async fn pool_idle_timeout_below_upstream_keepalive_avoids_the_close_race() {
    let (backend, conns) = keepalive_closing_backend(Duration::from_millis(200)).await;
    let proxy = Proxy::simple(&backend.url(), "pool_idle_timeout = \"50ms\"").await;
    // Pauses sweeping 195..=200 ms (around the close, shifted by the proxy's own latency),
    // every third one short enough to reuse the connection; about 4 s.
    let gaps: Vec<u64> = (0..30u64)
        .map(|i| if i % 3 == 2 { i % 30 } else { 195 + i % 6 })
        .collect();
    sequential_requests_all_succeed(&proxy, &gaps).await;
    assert!(conns.load(Ordering::SeqCst) >= 15);
    proxy.shutdown().await;
}

/// How the backend drops the connection carrying the unlucky request.
#[derive(Clone, Copy, Debug)]
enum LostRace {
    /// Reads the request, then closes (FIN): the proxy sees the connection end.
    ReadThenClose,
    /// Closes with the request still unread in its socket buffer (RST), as uvicorn does
    /// when its keepalive timer fires just after the request landed.
    CloseUnread,
}

/// A request that meets a keepalive close after it was written may get a 502 (it may have
/// reached the backend, so it is not retried). That is one failed request, not a dead
/// backend: the next request opens a fresh connection and succeeds. The backend below
/// answers every client request but the second, whose connection it drops unanswered.
async fn lost_keepalive_race_case(how: LostRace) {
    let client_requests = Arc::new(AtomicUsize::new(0));
    let counter = client_requests.clone();
    let backend = RawBackend::start(move |mut s| {
        let counter = counter.clone();
        async move {
            let mut buf = Vec::new();
            loop {
                if let LostRace::CloseUnread = how {
                    // Peek: is this connection's next request the unlucky one?
                    let mut probe = [0u8; 1];
                    if s.peek(&mut probe).await.unwrap_or(0) == 0 {
                        return;
                    }
                    if counter.load(Ordering::SeqCst) == 1 {
                        counter.fetch_add(1, Ordering::SeqCst);
                        return; // dropped with the request unread: RST
                    }
                }
                let Some(_) = read_request(&mut s, &mut buf).await else {
                    return;
                };
                if counter.fetch_add(1, Ordering::SeqCst) == 1 {
                    return; // read, unanswered: FIN
                }
                let resp = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                if s.write_all(resp.as_bytes()).await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    // No health checks: nothing but client requests reaches the backend, and nothing can
    // bring an ejected backend back within the test.
    let proxy = Proxy::simple(&backend.url(), "[upstreams.u.health]\nenabled = false").await;
    let client = http_client();
    let url = format!("{}/v1/models", proxy.url("main"));
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let (parts, body) = send(&client, Request::get(&url).body(empty()).unwrap()).await;
        statuses.push((
            parts.status.as_u16(),
            String::from_utf8_lossy(&body).into_owned(),
        ));
    }
    assert_eq!(statuses[0].0, 200, "{how:?}: {statuses:?}");
    assert!(
        matches!(statuses[1].0, 200 | 502),
        "{how:?}: the unlucky request: {statuses:?}"
    );
    assert!(
        statuses[2..].iter().all(|(code, _)| *code == 200),
        "{how:?}: one lost race took the backend out: {statuses:?}"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_lost_keepalive_race_does_not_eject_the_backend() {
    lost_keepalive_race_case(LostRace::ReadThenClose).await;
}

#[tokio::test]
async fn a_lost_keepalive_race_with_reset_does_not_eject_the_backend() {
    lost_keepalive_race_case(LostRace::CloseUnread).await;
}

/// `POST /api/v1/inference/up` blocks until vLLM has started: up to ~20 minutes.
#[tokio::test]
async fn default_timeouts_never_cut_a_long_gonka_call() {
    // The shipped defaults, as `podproxy check` reports them.
    let out = check(None);
    assert!(out.success(), "{out:?}");
    let text = &out.stdout;
    let setting = |name: &str| -> Vec<String> {
        text.lines()
            .filter_map(|l| l.trim().strip_prefix(&format!("{name} = ")))
            .map(|v| v.trim_matches('"').to_string())
            .collect()
    };
    assert_eq!(setting("response_timeout"), ["30m", "30m"], "{text}");
    for idle in setting("idle_timeout") {
        let d = humantime_secs(&idle);
        assert!(d >= 120, "idle_timeout {idle} could cut a slow prefill");
    }
    for c in setting("connect_timeout") {
        assert!(humantime_secs(&c) >= 1, "connect_timeout {c}");
    }
    assert!(
        setting("first_byte_timeout").is_empty(),
        "a first-byte deadline is on by default: {text}"
    );

    // And a slow call through the default layout succeeds.
    let mlnode = MlnodeSim::start(MlnodeConfig {
        inference_up_delay: Duration::from_secs(3),
        ..Default::default()
    })
    .await
    .unwrap();
    let proxy = Proxy::start(&embedded_default_on_loopback(
        &mlnode.url(),
        "http://127.0.0.1:1",
    ))
    .await;
    let started = Instant::now();
    let resp = bounded(
        "inference/up",
        http_client().request(
            Request::post(format!("{}/v3.0.8/api/v1/inference/up", proxy.url("poc")))
                .body(testkit::client::full(r#"{"model":"Qwen/Qwen3-32B-FP8"}"#))
                .unwrap(),
        ),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], br#"{"status":"OK"}"#);
    assert!(started.elapsed() >= Duration::from_secs(3));
    proxy.shutdown().await;
}

/// Seconds in a humantime value as `podproxy check` prints it ("30m", "1h 30m", "5s").
fn humantime_secs(text: &str) -> u64 {
    text.split_whitespace()
        .map(|part| {
            let digits: String = part.chars().take_while(char::is_ascii_digit).collect();
            let n: u64 = digits.parse().unwrap_or_else(|_| panic!("{text:?}"));
            match &part[digits.len()..] {
                "ms" => 0,
                "s" => n,
                "m" => n * 60,
                "h" => n * 3600,
                "d" => n * 86_400,
                unit => panic!("unit {unit:?} in {text:?}"),
            }
        })
        .sum()
}
