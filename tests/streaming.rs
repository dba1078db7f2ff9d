//! Streaming relay end to end: SSE events are relayed one per
//! write while the upstream is still producing them, over HTTP/1.1 and HTTP/2 (h2c prior
//! knowledge); an upstream dying mid-stream aborts the client's response instead of ending
//! it cleanly; very large bodies stream both ways, and the real binary's memory does not
//! grow with body size.
//!
//! Assertions are causal or relative (order, "arrived before the last one was sent"), never
//! wall-clock budgets: the tests must hold on a loaded 2-core machine.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use support::*;
use testkit::client::{full, http_client, TkBody};
use testkit::data::{PatternStream, StreamDigest};
use testkit::echo::{EchoServer, BYTES_SEED};
use testkit::sse::{read_events, SseReport};
use testkit::vllm::{VllmConfig, VllmSim};
use tokio::net::TcpListener;

const CHAT: &str = "/v1/chat/completions";
const MIB: u64 = 1024 * 1024;

fn chat_body(stream: bool) -> String {
    format!(
        r#"{{"model":"Qwen/Qwen3-32B-FP8","stream":{stream},"messages":[{{"role":"user","content":"hi"}}]}}"#
    )
}

fn chat_request(base: &str, headers: &[(&str, &str)], stream: bool) -> Request<TkBody> {
    let mut b = Request::post(format!("{base}{CHAT}")).header("content-type", "application/json");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(full(chat_body(stream))).unwrap()
}

async fn sim() -> VllmSim {
    VllmSim::start(VllmConfig::default()).await.unwrap()
}

async fn read_report(body: Incoming) -> SseReport {
    tokio::time::timeout(WAIT, read_events(body))
        .await
        .expect("SSE body timed out")
        .expect("not an SSE body")
}

/// The relay property itself: every event in its own read, in order, complete, and the
/// first one in the client's hands before the upstream even sent the last one.
fn assert_relayed_live(report: &SseReport, n: usize) {
    assert!(report.is_clean(n), "stream not clean: {report:?}");
    assert_eq!(
        report.multi_event_reads, 0,
        "events were batched into one read: {report:?}"
    );
    assert!(report.reads > n, "fewer reads than events: {report:?}");
    for e in &report.events {
        assert!(e.sent_us.unwrap() <= e.arrived_us, "clock order: {e:?}");
    }
    let first_arrived = report.events[0].arrived_us;
    let last_sent = report.events[n - 1].sent_us.unwrap();
    assert!(
        first_arrived < last_sent,
        "first event arrived at {first_arrived} µs, after the last one was sent at {last_sent} µs: the proxy buffered the stream"
    );
}

/// Events produced back to back (no interval) reach the proxy together; each must still
/// leave it as its own write (no re-chunking of frames that happen to be ready at once).
fn assert_burst_not_coalesced(report: &SseReport, n: usize) {
    assert!(report.is_clean(n), "burst stream not clean: {report:?}");
    assert_eq!(
        report.multi_event_reads, 0,
        "ready events were merged into one write: {} of {} reads carried several events",
        report.multi_event_reads, report.reads
    );
}

/// 1. SSE relay over HTTP/1.1: one event per read, in order, `[DONE]`, not aborted, and
///    delivered while the upstream is still generating; a burst of 200 events produced back
///    to back still arrives one event per read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_events_are_relayed_one_per_read_while_generated() {
    let vllm = sim().await;
    let proxy = Proxy::simple(&vllm.url(), "").await;
    let req = chat_request(
        &proxy.url("main"),
        &[("x-sim-tokens", "32"), ("x-sim-interval-ms", "20")],
        true,
    );
    let resp = tokio::time::timeout(WAIT, http_client().request(req))
        .await
        .expect("head timed out")
        .expect("request failed");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    assert!(
        resp.headers().get("content-length").is_none(),
        "an SSE stream must not get a length"
    );
    let report = read_report(resp.into_body()).await;
    assert_relayed_live(&report, 32);

    let req = chat_request(
        &proxy.url("main"),
        &[("x-sim-tokens", "200"), ("x-sim-interval-ms", "0")],
        true,
    );
    let resp = tokio::time::timeout(WAIT, http_client().request(req))
        .await
        .expect("head timed out")
        .expect("request failed");
    assert_burst_not_coalesced(&read_report(resp.into_body()).await, 200);
    assert!(
        vllm.stats()
            .wait_until(WAIT, |s| s.streams_completed() == 2 && s.in_flight() == 0)
            .await
    );
    assert_eq!(vllm.stats().cancelled(), 0);
    eventually("proxy in-flight back to 0", || proxy.in_flight() == 0).await;
    proxy.shutdown().await;
}

fn h2_client() -> Client<HttpConnector, TkBody> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .timer(TokioTimer::new())
        .build(connector)
}

/// 2. The same over HTTP/2 prior knowledge (h2c): events in separate DATA frames, live,
///    bursts not coalesced.
///    An upstream failing mid-stream resets only that stream: the next stream on the same
///    h2 connection works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_over_h2c_prior_knowledge() {
    let vllm = sim().await;
    let proxy = Proxy::simple(&vllm.url(), "").await;
    let client = h2_client();
    let base = proxy.url("main");
    let stream_headers = [("x-sim-tokens", "32"), ("x-sim-interval-ms", "20")];

    let resp = tokio::time::timeout(
        WAIT,
        client.request(chat_request(&base, &stream_headers, true)),
    )
    .await
    .expect("head timed out")
    .expect("h2 request failed");
    assert_eq!(resp.version(), Version::HTTP_2);
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    assert_relayed_live(&read_report(resp.into_body()).await, 32);

    let burst = [("x-sim-tokens", "200"), ("x-sim-interval-ms", "0")];
    let resp = tokio::time::timeout(WAIT, client.request(chat_request(&base, &burst, true)))
        .await
        .expect("head timed out")
        .expect("h2 request failed");
    assert_burst_not_coalesced(&read_report(resp.into_body()).await, 200);

    // Upstream breaks after 3 events: the h2 stream is reset, never ended cleanly.
    let resp = tokio::time::timeout(
        WAIT,
        client.request(chat_request(
            &base,
            &[
                ("x-sim-tokens", "32"),
                ("x-sim-interval-ms", "5"),
                ("x-sim-fail-after", "3"),
            ],
            true,
        )),
    )
    .await
    .expect("head timed out")
    .expect("h2 request failed");
    assert_eq!(resp.status(), StatusCode::OK);
    let report = read_report(resp.into_body()).await;
    assert!(report.aborted, "h2 stream ended as if complete: {report:?}");
    assert!(!report.done);
    assert_eq!(report.seqs(), vec![Some(0), Some(1), Some(2)]);

    // The connection survived the reset of one stream.
    let resp = tokio::time::timeout(
        WAIT,
        client.request(chat_request(&base, &stream_headers, true)),
    )
    .await
    .expect("head timed out")
    .expect("h2 request after a reset stream failed");
    assert_eq!(resp.version(), Version::HTTP_2);
    assert!(read_report(resp.into_body()).await.is_clean(32));

    eventually("proxy in-flight back to 0", || proxy.in_flight() == 0).await;
    assert!(vllm.stats().wait_idle(WAIT).await);
    assert_eq!(vllm.stats().streams_completed(), 3);
    assert_eq!(vllm.stats().failed(), 1);
    proxy.shutdown().await;
}

/// 3a. The upstream aborts its response after 3 events (`x-sim-fail-after`): the client's
///     body ends with an error, never a clean end; the proxy keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_failing_mid_stream_aborts_the_client_response() {
    let vllm = sim().await;
    let proxy = Proxy::simple(&vllm.url(), "").await;
    let client = http_client();
    let base = proxy.url("main");

    let req = chat_request(
        &base,
        &[
            ("x-sim-tokens", "32"),
            ("x-sim-interval-ms", "5"),
            ("x-sim-fail-after", "3"),
        ],
        true,
    );
    let resp = tokio::time::timeout(WAIT, client.request(req))
        .await
        .expect("head timed out")
        .expect("request failed");
    assert_eq!(resp.status(), StatusCode::OK);
    let report = read_report(resp.into_body()).await;
    assert!(report.aborted, "stream ended as if complete: {report:?}");
    assert!(!report.done, "{report:?}");
    assert_eq!(report.seqs(), vec![Some(0), Some(1), Some(2)]);
    assert!(
        vllm.stats()
            .wait_until(WAIT, |s| s.failed() == 1 && s.in_flight() == 0)
            .await
    );
    eventually("proxy in-flight back to 0", || proxy.in_flight() == 0).await;

    // A following request (same client, same proxy) works.
    let resp = tokio::time::timeout(
        WAIT,
        client.request(chat_request(&base, &[("x-sim-tokens", "8")], true)),
    )
    .await
    .expect("head timed out")
    .expect("request after the failure failed");
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(read_report(resp.into_body()).await.is_clean(8));
    eventually("proxy in-flight back to 0", || proxy.in_flight() == 0).await;
    proxy.shutdown().await;
}

/// 3b. The upstream process dies mid-stream (every connection dropped): the client's body
///     ends with an error; after the backend comes back on the same address the proxy
///     serves again (no stale pooled connection, no leaked in-flight slot).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_killed_mid_stream_aborts_the_client_response() {
    let vllm = sim().await;
    let addr = vllm.addr();
    let proxy = Proxy::simple(&vllm.url(), "").await;
    let client = http_client();
    let base = proxy.url("main");

    // Warm the proxy's upstream pool so a pooled connection exists when the backend dies.
    let resp = tokio::time::timeout(
        WAIT,
        client.request(chat_request(&base, &[("x-sim-tokens", "2")], true)),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(read_report(resp.into_body()).await.is_clean(2));

    let req = chat_request(
        &base,
        &[("x-sim-tokens", "100000"), ("x-sim-interval-ms", "10")],
        true,
    );
    let resp = tokio::time::timeout(WAIT, client.request(req))
        .await
        .expect("head timed out")
        .expect("request failed");
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let first = tokio::time::timeout(WAIT, body.frame())
        .await
        .expect("first event timed out")
        .expect("body ended before the first event")
        .expect("first frame failed");
    assert!(first.data_ref().is_some_and(|d| d.starts_with(b"data: ")));
    vllm.kill();
    let report = read_report(body).await;
    assert!(report.aborted, "stream ended as if complete: {report:?}");
    assert!(!report.done);
    assert!(vllm.stats().wait_cancelled(1, WAIT).await);
    eventually("proxy in-flight back to 0", || proxy.in_flight() == 0).await;

    // The backend comes back on the same address (the old accept task may take a moment
    // to drop its listener: bounded retry).
    let revived = tokio::time::timeout(WAIT, async {
        loop {
            match VllmSim::start_on(addr, VllmConfig::default()).await {
                Ok(s) => break s,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
    .await
    .expect("could not restart the simulator on its address");
    let resp = tokio::time::timeout(
        WAIT,
        client.request(chat_request(&base, &[("x-sim-tokens", "8")], true)),
    )
    .await
    .expect("head timed out")
    .expect("request after the kill failed");
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(read_report(resp.into_body()).await.is_clean(8));
    assert!(
        revived
            .stats()
            .wait_until(WAIT, |s| s.streams_completed() == 1)
            .await
    );
    eventually("proxy in-flight back to 0", || proxy.in_flight() == 0).await;
    proxy.shutdown().await;
}

/// Hashes a response body frame by frame (constant memory).
async fn digest_body(mut body: Incoming) -> StreamDigest {
    let mut d = StreamDigest::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.expect("response body failed");
        if let Some(data) = frame.data_ref() {
            d.update(data);
        }
    }
    d
}

/// SHA-256 of `pattern(seed, len)` plus that of its prefix of `prefix_len` bytes, in one
/// pass (hashing is the slow part of these tests in a debug build).
fn pattern_hashes(seed: u64, len: u64, prefix_len: u64) -> (String, String) {
    let mut d = StreamDigest::new();
    let mut prefix = None;
    for chunk in PatternStream::new(seed, len) {
        d.update(&chunk);
        if d.len() == prefix_len {
            prefix = Some(d.hex());
        }
    }
    (d.hex(), prefix.expect("prefix_len on a chunk boundary"))
}

/// 4a. 128 MiB up, 128 MiB down and a 64 MiB full-duplex echo through the in-process
///     proxy, streamed and verified in constant client memory, framing preserved
///     (Content-Length stays Content-Length).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_stream_both_ways() {
    const BIG: u64 = 128 * MIB;
    const ECHO: u64 = 64 * MIB;
    let echo = EchoServer::start().await.unwrap();
    let proxy = Proxy::simple(&echo.url(), "").await;
    let base = proxy.url("main");
    // The expected hashes: /bytes serves pattern(BYTES_SEED, n); uploads use the same seed.
    let expected = tokio::task::spawn_blocking(|| pattern_hashes(BYTES_SEED, BIG, ECHO));

    let upload = {
        let base = base.clone();
        async move {
            let req = Request::post(format!("{base}/sink"))
                .body(
                    PatternStream::new(BYTES_SEED, BIG)
                        .map_err(|n| match n {})
                        .boxed_unsync(),
                )
                .unwrap();
            let resp = http_client().request(req).await.expect("upload failed");
            assert_eq!(resp.status(), StatusCode::OK);
            let answer = resp.into_body().collect().await.unwrap().to_bytes();
            serde_json::from_slice::<serde_json::Value>(&answer).unwrap()
        }
    };
    let download = {
        let base = base.clone();
        async move {
            let req = Request::get(format!("{base}/bytes/{BIG}"))
                .body(testkit::client::empty())
                .unwrap();
            let resp = http_client().request(req).await.expect("download failed");
            assert_eq!(resp.status(), StatusCode::OK);
            assert_eq!(
                resp.headers()["content-length"],
                BIG.to_string().as_str(),
                "Content-Length framing not preserved"
            );
            digest_body(resp.into_body()).await
        }
    };
    let (sink, down) = tokio::time::timeout(Duration::from_secs(120), async {
        tokio::join!(upload, download)
    })
    .await
    .expect("large transfers timed out");

    // Full duplex: the echo streams the upload back while it is still being sent.
    let req = Request::post(format!("{base}/echo"))
        .body(
            PatternStream::new(BYTES_SEED, ECHO)
                .map_err(|n| match n {})
                .boxed_unsync(),
        )
        .unwrap();
    let echoed = tokio::time::timeout(Duration::from_secs(120), async {
        let resp = http_client().request(req).await.expect("echo failed");
        assert_eq!(resp.status(), StatusCode::OK);
        digest_body(resp.into_body()).await
    })
    .await
    .expect("echo round trip timed out");

    let (big_sha, echo_sha) = expected.await.unwrap();
    assert_eq!(sink["len"], BIG);
    assert_eq!(sink["sha256"], big_sha.as_str(), "upload corrupted");
    assert_eq!(down.len(), BIG);
    assert_eq!(down.hex(), big_sha, "download corrupted");
    assert_eq!(echoed.len(), ECHO);
    assert_eq!(echoed.hex(), echo_sha, "echo corrupted");

    // What the backend saw: the upload kept its Content-Length.
    let sunk = echo
        .recorder()
        .all()
        .into_iter()
        .find(|r| r.target == "/sink")
        .expect("upload recorded");
    assert_eq!(sunk.header("content-length"), Some(BIG.to_string()));
    assert!(sunk.header("transfer-encoding").is_none());
    eventually("proxy in-flight back to 0", || proxy.in_flight() == 0).await;
    proxy.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Memory of the real binary. The backend here is a cheap one (zeros out, bytes counted in)
// so that a debug build spends its time in the proxy and not in hashing.

static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

/// `len` zero bytes in 64 KiB frames, with an exact size hint; allocates nothing.
struct Zeros {
    left: u64,
}

impl Body for Zeros {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let n = self.left.min(ZEROS.len() as u64);
        self.left -= n;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(
            &ZEROS[..n as usize],
        )))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.left)
    }
}

/// `GET /zeros/{n}` streams n zero bytes; `POST` anything counts the body and answers the
/// count as text.
async fn start_bulk_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let body: TkBody = if req.method() == http::Method::GET {
                        let n: u64 = req
                            .uri()
                            .path()
                            .strip_prefix("/zeros/")
                            .and_then(|n| n.parse().ok())
                            .unwrap_or(0);
                        Zeros { left: n }.map_err(|n| match n {}).boxed_unsync()
                    } else {
                        let mut body = req.into_body();
                        let mut len = 0u64;
                        while let Some(frame) = body.frame().await {
                            match frame {
                                Ok(f) => len += f.data_ref().map_or(0, |d| d.len() as u64),
                                Err(_) => break,
                            }
                        }
                        full(len.to_string())
                    };
                    Ok::<_, Infallible>(http::Response::new(body))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// Documented bound on the real binary's peak RSS after 256 MiB each way. Body frames are
/// relayed, never collected, so the peak is the baseline (a few MiB) plus per-connection
/// buffers; a proxy that buffered bodies would exceed it by hundreds of MiB.
const PEAK_RSS_BOUND_KIB: u64 = 64 * 1024;

/// 4b. The real binary relays 256 MiB each way (upload and download at the same time)
///     with its peak RSS (VmHWM) below `PEAK_RSS_BOUND_KIB`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_binary_memory_does_not_grow_with_body_size() {
    const SIZE: u64 = 256 * MIB;
    let backend = start_bulk_backend().await;
    let port = free_port();
    let proxy = Podproxy::new()
        .config_text(
            "podproxy.toml",
            &format!(
                "[server]\nlog_level = \"warn\"\n\n[listeners.main]\nbind = \"127.0.0.1:{port}\"\nroutes = [{{ prefix = \"/\", upstream = \"u\" }}]\n\n[upstreams.u]\nurls = \"http://{backend}\"\n"
            ),
        )
        .listening_on(port)
        .start()
        .await;
    let client = http_client();

    // Warm-up, then the baseline.
    let req = Request::get(format!("{}/zeros/1024", proxy.url()))
        .body(testkit::client::empty())
        .unwrap();
    let resp = tokio::time::timeout(WAIT, client.request(req))
        .await
        .unwrap()
        .unwrap();
    let warm = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(warm.len(), 1024);
    let baseline = proxy.status_kib("VmHWM");

    let started = Instant::now();
    let upload = async {
        let req = Request::post(format!("{}/drain", proxy.url()))
            .body(Zeros { left: SIZE }.map_err(|n| match n {}).boxed_unsync())
            .unwrap();
        let resp = client.request(req).await.expect("upload failed");
        assert_eq!(resp.status(), StatusCode::OK);
        let answer = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(
            answer,
            SIZE.to_string().as_bytes(),
            "backend got a different length"
        );
    };
    let download = async {
        let req = Request::get(format!("{}/zeros/{SIZE}", proxy.url()))
            .body(testkit::client::empty())
            .unwrap();
        let resp = client.request(req).await.expect("download failed");
        assert_eq!(resp.status(), StatusCode::OK);
        let mut body = resp.into_body();
        let mut len = 0u64;
        while let Some(frame) = body.frame().await {
            let frame = frame.expect("download body failed");
            if let Some(d) = frame.data_ref() {
                assert!(d.iter().all(|b| *b == 0), "download corrupted");
                len += d.len() as u64;
            }
        }
        assert_eq!(len, SIZE);
    };
    tokio::time::timeout(Duration::from_secs(120), async {
        tokio::join!(upload, download)
    })
    .await
    .expect("transfers timed out");
    let elapsed = started.elapsed();

    let peak = proxy.status_kib("VmHWM");
    let rss = proxy.status_kib("VmRSS");
    println!(
        "podproxy relayed {} MiB each way in {elapsed:?}; VmHWM {baseline} KiB before, {peak} KiB after (VmRSS {rss} KiB), bound {PEAK_RSS_BOUND_KIB} KiB",
        SIZE / MIB
    );
    assert!(
        peak < PEAK_RSS_BOUND_KIB,
        "podproxy peak RSS {peak} KiB after {} MiB each way exceeds {PEAK_RSS_BOUND_KIB} KiB (baseline {baseline} KiB)",
        SIZE / MIB
    );
    drop(proxy);
}
