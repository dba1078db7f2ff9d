//! Cancellation end to end: when the client goes away (TCP close
//! or HTTP/2 RST) the upstream request is dropped at once — during prefill before the first
//! byte, mid-stream, and for non-streaming requests — so vLLM aborts the generation; the
//! proxy's in-flight counters are released with it.
//!
//! The simulator counts a generation as cancelled when its peer (podproxy) goes away before
//! it ended. Every wait is event-driven and bounded by `WAIT`.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, StatusCode, Version};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use support::*;
use testkit::client::{full, http_client, TkBody};
use testkit::sse::read_events;
use testkit::vllm::{VllmConfig, VllmSim};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

const CHAT: &str = "/v1/chat/completions";

fn chat_body(stream: bool) -> String {
    format!(
        r#"{{"model":"Qwen/Qwen3-32B-FP8","stream":{stream},"messages":[{{"role":"user","content":"hi"}}]}}"#
    )
}

async fn setup() -> (VllmSim, Proxy) {
    let vllm = VllmSim::start(VllmConfig::default()).await.unwrap();
    let proxy = Proxy::simple(&vllm.url(), "").await;
    (vllm, proxy)
}

/// Opens a raw TCP connection to `addr` and writes one HTTP/1.1 chat request by hand, so
/// the test decides exactly when the client's socket goes away.
async fn raw_chat(addr: SocketAddr, headers: &[(&str, &str)], stream: bool) -> TcpStream {
    let body = chat_body(stream);
    let mut req = format!(
        "POST {CHAT} HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(&body);
    let mut s = tokio::time::timeout(WAIT, TcpStream::connect(addr))
        .await
        .expect("connect timed out")
        .expect("connect failed");
    s.set_nodelay(true).unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    s
}

/// Reads until `needle` was seen `times` times (bounded); returns what was read.
async fn read_until(s: &mut TcpStream, needle: &str, times: usize) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(WAIT, async {
        loop {
            let n = s.read(&mut buf).await.expect("read failed");
            assert!(
                n > 0,
                "EOF before {needle:?}; got {:?}",
                String::from_utf8_lossy(&got)
            );
            got.extend_from_slice(&buf[..n]);
            if String::from_utf8_lossy(&got).matches(needle).count() >= times {
                break;
            }
        }
    })
    .await
    .expect("read_until timed out");
    String::from_utf8_lossy(&got).into_owned()
}

/// After a cancellation: the simulator counted exactly `cancelled` abandoned generations,
/// nothing runs there any more, and podproxy released every in-flight slot.
async fn assert_all_released(vllm: &VllmSim, proxy: &Proxy, cancelled: u64) {
    assert!(
        vllm.stats().wait_cancelled(cancelled, WAIT).await,
        "the upstream generation was not cancelled (cancelled = {}, running = {})",
        vllm.stats().cancelled(),
        vllm.stats().in_flight()
    );
    assert!(
        vllm.stats().wait_idle(WAIT).await,
        "generations still running upstream"
    );
    assert_eq!(vllm.stats().cancelled(), cancelled);
    eventually("proxy in-flight back to 0", || proxy.in_flight() == 0).await;
}

/// The client leaves during prefill, before the response head: the upstream request is
/// dropped and the generation cancelled before it produced anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_gone_during_prefill_cancels_upstream() {
    let (vllm, proxy) = setup().await;
    let s = raw_chat(proxy.addr("main"), &[("x-sim-prefill-ms", "60000")], true).await;
    assert!(
        vllm.stats().wait_until(WAIT, |s| s.in_flight() == 1).await,
        "request never reached the simulator"
    );
    assert_eq!(proxy.in_flight(), 1);
    drop(s);
    assert_all_released(&vllm, &proxy, 1).await;
    assert_eq!(vllm.stats().streams_started(), 0);
    proxy.shutdown().await;
}

/// The client leaves mid-stream, after events arrived: the upstream stream is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_gone_mid_stream_cancels_upstream() {
    let (vllm, proxy) = setup().await;
    let mut s = raw_chat(
        proxy.addr("main"),
        &[("x-sim-tokens", "100000"), ("x-sim-interval-ms", "10")],
        true,
    )
    .await;
    let got = read_until(&mut s, "\"seq\":", 2).await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert_eq!(vllm.stats().streams_started(), 1);
    drop(s);
    assert_all_released(&vllm, &proxy, 1).await;
    assert_eq!(vllm.stats().streams_completed(), 0);
    proxy.shutdown().await;
}

/// The client leaves while a non-streaming generation runs (no byte of the response yet).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_gone_during_non_streaming_generation_cancels_upstream() {
    let (vllm, proxy) = setup().await;
    let s = raw_chat(
        proxy.addr("main"),
        &[("x-sim-tokens", "100000"), ("x-sim-interval-ms", "10")],
        false,
    )
    .await;
    assert!(
        vllm.stats().wait_until(WAIT, |s| s.in_flight() == 1).await,
        "request never reached the simulator"
    );
    drop(s);
    assert_all_released(&vllm, &proxy, 1).await;
    assert_eq!(vllm.stats().completions(), 0);
    proxy.shutdown().await;
}

fn h2_chat(proxy: &Proxy, headers: &[(&str, &str)]) -> Request<TkBody> {
    let mut b = Request::post(format!("{}{CHAT}", proxy.url("main")))
        .header("content-type", "application/json");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(full(chat_body(true))).unwrap()
}

/// Over HTTP/2 the client cancels one stream (RST_STREAM) and keeps the connection:
/// mid-stream (dropping the response body) and during prefill (dropping the pending
/// response). Each cancels its upstream generation; the connection keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_stream_reset_cancels_upstream() {
    let (vllm, proxy) = setup().await;
    let tcp = TcpStream::connect(proxy.addr("main")).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let (mut send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .handshake::<_, TkBody>(TokioIo::new(tcp))
        .await
        .expect("h2 handshake");
    let conn = tokio::spawn(conn);

    // Mid-stream: read an event, then drop the body (hyper sends RST_STREAM(CANCEL)).
    let req = h2_chat(
        &proxy,
        &[("x-sim-tokens", "100000"), ("x-sim-interval-ms", "10")],
    );
    let resp = tokio::time::timeout(WAIT, send.send_request(req))
        .await
        .expect("head timed out")
        .expect("h2 request failed");
    assert_eq!(resp.version(), Version::HTTP_2);
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let frame = tokio::time::timeout(WAIT, body.frame())
        .await
        .expect("first event timed out")
        .expect("body ended early")
        .expect("frame failed");
    assert!(frame.data_ref().is_some_and(|d| d.starts_with(b"data: ")));
    drop(body);
    assert_all_released(&vllm, &proxy, 1).await;

    // During prefill: drop the pending response future once the simulator has the request.
    let req = h2_chat(&proxy, &[("x-sim-prefill-ms", "60000")]);
    let pending = tokio::spawn(send.send_request(req));
    assert!(
        vllm.stats().wait_until(WAIT, |s| s.in_flight() == 1).await,
        "request never reached the simulator"
    );
    pending.abort();
    assert_all_released(&vllm, &proxy, 2).await;

    // The same connection still serves a complete stream.
    let req = h2_chat(&proxy, &[("x-sim-tokens", "4")]);
    let resp = tokio::time::timeout(WAIT, send.send_request(req))
        .await
        .expect("head timed out")
        .expect("h2 request after resets failed");
    let report = tokio::time::timeout(WAIT, read_events(resp.into_body()))
        .await
        .unwrap()
        .unwrap();
    assert!(report.is_clean(4), "{report:?}");
    assert!(!conn.is_finished(), "h2 connection closed by the resets");
    eventually("proxy in-flight back to 0", || proxy.in_flight() == 0).await;
    drop(send);
    proxy.shutdown().await;
}

/// Small deterministic RNG (splitmix64), so a failing mixed run can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One request of the mixed run.
#[derive(Debug, Clone, Copy)]
enum Plan {
    /// Completes: a stream of `tokens` events, or a non-streaming answer.
    Complete { stream: bool, tokens: u64 },
    /// Cancelled right after writing the request (may or may not reach the simulator).
    CancelAtOnce { stream: bool },
    /// Cancelled during a long prefill, after `ms` milliseconds.
    CancelInPrefill { ms: u64 },
    /// Cancelled mid-stream after `events` events arrived.
    CancelMidStream { events: usize },
    /// Cancelled during a long non-streaming generation, after `ms` milliseconds.
    CancelNonStreaming { ms: u64 },
}

async fn run_plan(addr: SocketAddr, plan: Plan, h1: testkit::client::HttpClient) {
    // Cancelled requests ask for generations far longer than the test: they can only end
    // by cancellation.
    const ENDLESS: [(&str, &str); 2] = [("x-sim-tokens", "100000"), ("x-sim-interval-ms", "10")];
    match plan {
        Plan::Complete { stream, tokens } => {
            let tokens = tokens.to_string();
            let req = Request::post(format!("http://{addr}{CHAT}"))
                .header("x-sim-tokens", tokens.as_str())
                .header("x-sim-interval-ms", "2")
                .body(full(chat_body(stream)))
                .unwrap();
            let resp = tokio::time::timeout(WAIT, h1.request(req))
                .await
                .expect("head timed out")
                .expect("request failed");
            assert_eq!(resp.status(), StatusCode::OK);
            if stream {
                let report = tokio::time::timeout(WAIT, read_events(resp.into_body()))
                    .await
                    .expect("stream timed out")
                    .unwrap();
                assert!(report.is_clean(tokens.parse().unwrap()), "{report:?}");
            } else {
                let body = tokio::time::timeout(WAIT, resp.into_body().collect())
                    .await
                    .expect("body timed out")
                    .expect("body failed")
                    .to_bytes();
                let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                assert_eq!(
                    v["usage"]["completion_tokens"],
                    tokens.parse::<u64>().unwrap()
                );
            }
        }
        Plan::CancelAtOnce { stream } => {
            drop(raw_chat(addr, &ENDLESS, stream).await);
        }
        Plan::CancelInPrefill { ms } => {
            let s = raw_chat(addr, &[("x-sim-prefill-ms", "60000")], true).await;
            tokio::time::sleep(Duration::from_millis(ms)).await;
            drop(s);
        }
        Plan::CancelMidStream { events } => {
            let mut s = raw_chat(addr, &ENDLESS, true).await;
            read_until(&mut s, "\"seq\":", events).await;
            drop(s);
        }
        Plan::CancelNonStreaming { ms } => {
            let s = raw_chat(addr, &ENDLESS, false).await;
            tokio::time::sleep(Duration::from_millis(ms)).await;
            drop(s);
        }
    }
}

/// 200 requests, 20 at a time, about half cancelled at random points (before the
/// simulator saw them, in prefill, mid-stream, during non-streaming generation), the rest
/// completed and checked. Afterwards nothing runs upstream, no slot is held in podproxy,
/// and every generation is accounted for: completed ones by the survivors, cancelled ones
/// by the rest (cancelled requests ask for endless generations, so they cannot complete).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_run_with_random_cancellations_leaks_nothing() {
    const TOTAL: usize = 200;
    const CONCURRENCY: usize = 20;
    let (vllm, proxy) = setup().await;
    let addr = proxy.addr("main");
    let h1 = http_client();
    let mut rng = Rng(0x5EED_CAFE);
    let completed = Arc::new(AtomicUsize::new(0));
    let mut plans = Vec::with_capacity(TOTAL);
    for _ in 0..TOTAL {
        let stream = rng.below(2) == 0;
        plans.push(match rng.below(10) {
            0..=4 => Plan::Complete {
                stream,
                tokens: 1 + rng.below(20),
            },
            5 => Plan::CancelAtOnce { stream },
            6 => Plan::CancelInPrefill { ms: rng.below(30) },
            7 | 8 => Plan::CancelMidStream {
                events: 1 + rng.below(5) as usize,
            },
            _ => Plan::CancelNonStreaming { ms: rng.below(30) },
        });
    }
    let mid_stream = plans
        .iter()
        .filter(|p| matches!(p, Plan::CancelMidStream { .. }))
        .count();
    let survivors = plans
        .iter()
        .filter(|p| matches!(p, Plan::Complete { .. }))
        .count();

    let mut tasks = JoinSet::new();
    let run = async {
        for plan in plans {
            while tasks.len() >= CONCURRENCY {
                tasks.join_next().await.unwrap().expect("request task");
            }
            let (h1, completed) = (h1.clone(), completed.clone());
            tasks.spawn(async move {
                run_plan(addr, plan, h1).await;
                if matches!(plan, Plan::Complete { .. }) {
                    completed.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.expect("request task");
        }
    };
    tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("mixed run timed out");
    assert_eq!(completed.load(Ordering::Relaxed), survivors);

    assert!(
        vllm.stats().wait_idle(WAIT).await,
        "{} generations still running upstream after every client left",
        vllm.stats().in_flight()
    );
    eventually("proxy in-flight back to 0", || proxy.in_flight() == 0).await;
    let st = vllm.stats();
    let finished = st.streams_completed() + st.completions();
    assert_eq!(finished, survivors as u64, "completed generations");
    assert_eq!(st.failed(), 0);
    // Every generation that reached the simulator ended, as completed or cancelled; at
    // least every stream the client saw events of was cancelled (a request dropped before
    // its body reached the simulator creates no generation, hence no exact equality).
    assert!(st.requests() >= finished + st.cancelled());
    assert!(
        st.cancelled() >= mid_stream as u64,
        "{} cancellations counted upstream, but {mid_stream} clients left mid-stream",
        st.cancelled()
    );
    println!(
        "mixed run: {TOTAL} requests, {survivors} completed, {} cancelled upstream",
        st.cancelled()
    );
    proxy.shutdown().await;
}
