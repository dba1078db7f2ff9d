//! Upstream pools end to end: several vLLM backends
//! behind one upstream — least outstanding requests, active health checks, passive ejection
//! with retry on another backend, the stuck-engine guard, admission (`max_concurrent` +
//! bounded queue), port ranges with gaps, and in-flight counters that never leak.
//!
//! Every request carries an `x-test-id` header so a test can tell which simulated backend
//! received it (health checks are skipped). Waits are event-driven and bounded by `WAIT`;
//! assertions are causal (who got which request, which state a backend is in), never
//! durations.

mod support;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming};
use proxy::upstream::backend::Backend;
use proxy::upstream::Upstream;
use support::*;
use testkit::client::{full, http_client, BoxError, HttpClient, TkBody};
use testkit::sse::read_events;
use testkit::vllm::{VllmConfig, VllmSim};
use tokio::net::TcpSocket;

const CHAT: &str = "/v1/chat/completions";
const COMPLETIONS: &str = "/v1/completions";

/// Fast active health checks: a killed backend is noticed on the next round (refused
/// connections fail at once); the generous timeout keeps a loaded machine from flapping a
/// live one.
const FAST_HEALTH: &str = r#"health = { interval = "100ms", timeout = "2s", failures = 1 }"#;
/// No active checks: only passive ejection (or the stuck-engine guard) changes state.
const NO_HEALTH: &str = "health = { enabled = false }";

/// Headers of a short request: one token, no delay, answered at once.
const SHORT: &[(&str, &str)] = &[("x-sim-tokens", "1"), ("x-sim-interval-ms", "0")];
/// Headers of a stream that lasts far longer than any test (it is always dropped).
const ENDLESS: &[(&str, &str)] = &[("x-sim-tokens", "100000"), ("x-sim-interval-ms", "1000")];

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// One listener `main` with `/` → upstream `u` over `urls`, plus `extra` lines in the
/// upstream section.
fn config(urls: &[String], extra: &str) -> String {
    let list: Vec<String> = urls.iter().map(|u| format!("\"{u}\"")).collect();
    format!(
        "[listeners.main]\nbind = \"127.0.0.1:0\"\nroutes = [{{ prefix = \"/\", upstream = \"u\" }}]\n\n\
         [upstreams.u]\nurls = [{}]\n{extra}\n",
        list.join(", ")
    )
}

async fn sims(n: usize) -> Vec<VllmSim> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(VllmSim::start(VllmConfig::default()).await.unwrap());
    }
    v
}

fn urls(sims: &[VllmSim]) -> Vec<String> {
    sims.iter().map(VllmSim::url).collect()
}

fn upstream(proxy: &Proxy) -> &Arc<Upstream> {
    &proxy.upstreams[0]
}

/// The proxy's backend for origin `url` (`http://127.0.0.1:PORT`).
fn backend(proxy: &Proxy, url: &str) -> Arc<Backend> {
    upstream(proxy)
        .backends()
        .iter()
        .find(|b| &*b.label == url)
        .unwrap_or_else(|| panic!("no backend {url}"))
        .clone()
}

/// A chat request tagged `x-test-id: id`.
fn chat(proxy: &Proxy, id: &str, stream: bool, headers: &[(&str, &str)]) -> Request<TkBody> {
    let mut b = Request::post(format!("{}{CHAT}", proxy.url("main")))
        .header("content-type", "application/json")
        .header("x-test-id", id);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let body = format!(
        r#"{{"model":"Qwen/Qwen3-32B-FP8","stream":{stream},"messages":[{{"role":"user","content":"hi"}}]}}"#
    );
    b.body(full(body)).unwrap()
}

/// Sends `req` and waits (bounded) for the response head.
async fn head(client: &HttpClient, req: Request<TkBody>) -> http::Response<Incoming> {
    tokio::time::timeout(WAIT, client.request(req))
        .await
        .expect("response head timed out")
        .expect("request failed")
}

/// Sends `req` and reads the whole response (bounded).
async fn exchange(client: &HttpClient, req: Request<TkBody>) -> (http::response::Parts, Bytes) {
    let (parts, body) = head(client, req).await.into_parts();
    let body = tokio::time::timeout(WAIT, body.collect())
        .await
        .expect("response body timed out")
        .expect("response body failed")
        .to_bytes();
    (parts, body)
}

/// A short non-streaming request that must succeed.
async fn short_ok(client: &HttpClient, proxy: &Proxy, id: &str) {
    let (parts, body) = exchange(client, chat(proxy, id, false, SHORT)).await;
    assert_eq!(
        parts.status,
        StatusCode::OK,
        "request {id}: {}",
        String::from_utf8_lossy(&body)
    );
}

/// Which simulator received the request tagged `id` (health checks never carry a tag).
fn holder(sims: &[VllmSim], id: &str) -> Option<usize> {
    let found: Vec<usize> = sims
        .iter()
        .enumerate()
        .filter(|(_, s)| {
            proxied(&s.recorder())
                .iter()
                .any(|r| r.header("x-test-id").as_deref() == Some(id))
        })
        .map(|(i, _)| i)
        .collect();
    assert!(
        found.len() <= 1,
        "request {id} reached several backends: {found:?}"
    );
    found.first().copied()
}

/// Client requests a simulator received (health checks skipped).
fn served(sim: &VllmSim) -> usize {
    proxied(&sim.recorder()).len()
}

/// Waits until no request is in flight anywhere in the proxy, so the next pick sees only
/// the load the test set up.
async fn quiesce(proxy: &Proxy, expected: usize) {
    eventually(&format!("proxy in-flight back to {expected}"), || {
        proxy.in_flight() == expected
    })
    .await;
}

/// The `{"error":{"type":..}}` of a podproxy-generated error body.
fn error_type(body: &Bytes) -> String {
    let v: serde_json::Value = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("error body is not JSON ({e}): {body:?}"));
    v["error"]["type"].as_str().unwrap_or_default().to_string()
}

/// A loopback address that refuses connections for as long as the socket lives: bound but
/// never listening, so the kernel answers SYNs with RST and no other test can take the port.
fn refusing_port() -> (TcpSocket, SocketAddr) {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
    let addr = s.local_addr().unwrap();
    (s, addr)
}

/// `n` consecutive loopback ports, each held by a bound, non-listening socket.
fn consecutive_ports(n: u16) -> Vec<(TcpSocket, SocketAddr)> {
    for _ in 0..200 {
        let (first, a0) = refusing_port();
        let mut held = vec![(first, a0)];
        for k in 1..n {
            let Some(port) = a0.port().checked_add(k) else {
                break;
            };
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let s = TcpSocket::new_v4().unwrap();
            if s.bind(addr).is_err() {
                break;
            }
            held.push((s, addr));
        }
        if held.len() == usize::from(n) {
            return held;
        }
    }
    panic!("no {n} consecutive free loopback ports");
}

/// Starts a simulator on `addr`, retrying while the previous owner of the port (a killed
/// simulator whose accept task is still being torn down) has not released it yet.
async fn start_on(addr: SocketAddr, cfg: VllmConfig) -> VllmSim {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match VllmSim::start_on(addr, cfg.clone()).await {
            Ok(s) => return s,
            Err(e) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "cannot restart simulator on {addr}: {e}"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// A spawned server task and its address; dropping it stops the server.
struct AbortOnDrop(tokio::task::JoinHandle<()>, SocketAddr);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A request body fed chunk by chunk from the test (chunked transfer encoding).
struct ChannelBody(tokio::sync::mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|b| Ok(Frame::data(b))))
    }
}

// ---------------------------------------------------------------------------------------
// Least outstanding requests
// ---------------------------------------------------------------------------------------

/// A slow stream holds its backend's slot, so new requests go to the other two; open
/// streams spread one per backend; and the moment a stream ends, its backend (now the least
/// loaded) gets the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_outstanding_steers_around_slow_streams() {
    let sims = sims(3).await;
    let proxy = Proxy::start(&config(&urls(&sims), FAST_HEALTH)).await;
    let client = http_client();

    let slow0 = head(&client, chat(&proxy, "slow0", true, ENDLESS)).await;
    assert_eq!(slow0.status(), StatusCode::OK);
    let busy = holder(&sims, "slow0").expect("slow stream reached no backend");
    assert_eq!(backend(&proxy, &sims[busy].url()).in_flight(), 1);

    // Short requests, one at a time: the busy backend (1 in flight) never gets one, and
    // the two idle ones share them.
    let mut got = [0usize; 3];
    for i in 0..12 {
        quiesce(&proxy, 1).await;
        let id = format!("short{i}");
        short_ok(&client, &proxy, &id).await;
        got[holder(&sims, &id).expect("short request reached no backend")] += 1;
    }
    assert_eq!(got[busy], 0, "the busy backend got short requests: {got:?}");
    for (i, n) in got.iter().enumerate() {
        if i != busy {
            assert!(*n > 0, "idle backend {i} got no request: {got:?}");
        }
    }

    // Two more slow streams land on the two idle backends: one stream per backend.
    quiesce(&proxy, 1).await;
    let slow1 = head(&client, chat(&proxy, "slow1", true, ENDLESS)).await;
    let slow2 = head(&client, chat(&proxy, "slow2", true, ENDLESS)).await;
    let mut owners = [
        busy,
        holder(&sims, "slow1").unwrap(),
        holder(&sims, "slow2").unwrap(),
    ];
    owners.sort_unstable();
    assert_eq!(owners, [0, 1, 2], "streams were not spread one per backend");
    for b in upstream(&proxy).backends() {
        assert_eq!(b.in_flight(), 1, "{}", b.label);
    }

    // The first stream ends (client leaves): its backend is the only idle one now and
    // takes the next request.
    drop(slow0);
    eventually("slow stream's slot released", || {
        backend(&proxy, &sims[busy].url()).in_flight() == 0
    })
    .await;
    short_ok(&client, &proxy, "after").await;
    assert_eq!(holder(&sims, "after"), Some(busy));

    drop((slow1, slow2));
    quiesce(&proxy, 0).await;
    proxy.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Active health checks
// ---------------------------------------------------------------------------------------

/// A killed backend is taken out by the next health round (no client request involved),
/// receives nothing while down, and is back in rotation once restarted on the same port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_backend_leaves_rotation_and_returns_after_restart() {
    let mut sims = sims(3).await;
    let proxy = Proxy::start(&config(&urls(&sims), FAST_HEALTH)).await;
    let client = http_client();

    // All three serve traffic (idle backends share it).
    for i in 0..30 {
        quiesce(&proxy, 0).await;
        short_ok(&client, &proxy, &format!("before{i}")).await;
        if sims.iter().all(|s| served(s) > 0) {
            break;
        }
    }
    assert!(
        sims.iter().all(|s| served(s) > 0),
        "a backend got no traffic"
    );

    let victim = 1;
    let addr = sims[victim].addr();
    let url = sims[victim].url();
    let b = backend(&proxy, &url);
    sims[victim].kill();
    eventually("health check marks the killed backend down", || {
        !b.is_healthy()
    })
    .await;
    let why = b.last_error().unwrap_or_default();
    assert!(why.contains("health check"), "ejected for {why:?}");
    assert!(upstream(&proxy).is_ready());

    // While down it gets nothing, and clients notice nothing.
    for i in 0..12 {
        quiesce(&proxy, 0).await;
        let id = format!("down{i}");
        short_ok(&client, &proxy, &id).await;
        let at = holder(&sims, &id).expect("request reached no live backend");
        assert_ne!(at, victim);
    }
    assert!(!b.is_healthy());

    // Restart on the same port: the next health rounds bring it back and it gets traffic.
    sims[victim] = start_on(addr, VllmConfig::default()).await;
    eventually("health check brings the restarted backend back", || {
        b.is_healthy()
    })
    .await;
    for i in 0..30 {
        quiesce(&proxy, 0).await;
        short_ok(&client, &proxy, &format!("back{i}")).await;
        if served(&sims[victim]) > 0 {
            break;
        }
    }
    assert!(
        served(&sims[victim]) > 0,
        "the restarted backend got no traffic"
    );
    proxy.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Passive ejection and retry
// ---------------------------------------------------------------------------------------

/// A backend that refuses connections costs clients nothing: the attempt that meets the
/// refusal ejects the backend at once (no health checks run here) and the request is
/// served by another backend; afterwards the refusing backend gets no attempts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusing_backend_is_ejected_at_once_and_request_retried() {
    let sims = sims(2).await;
    let (_hold, refusing) = refusing_port();
    let refusing_url = format!("http://{refusing}");
    let mut all = urls(&sims);
    all.insert(1, refusing_url.clone());
    let proxy = Proxy::start(&config(&all, NO_HEALTH)).await;
    let dead = backend(&proxy, &refusing_url);
    let client = http_client();

    // Idle backends share the load, so one of the first requests tries the refusing one.
    let mut sent = 0;
    while dead.is_healthy() {
        assert!(sent < 30, "no request ever tried the refusing backend");
        quiesce(&proxy, 0).await;
        let id = format!("r{sent}");
        short_ok(&client, &proxy, &id).await;
        assert!(holder(&sims, &id).is_some(), "{id} was not served");
        sent += 1;
    }
    // Ejected by the very first attempt that met the refusal.
    assert_eq!(dead.requests(), 1);
    let why = dead.last_error().unwrap_or_default();
    assert!(why.contains("connect failed"), "ejected for {why:?}");
    assert_eq!(served(&sims[0]) + served(&sims[1]), sent);

    let before = dead.requests();
    for i in 0..10 {
        quiesce(&proxy, 0).await;
        short_ok(&client, &proxy, &format!("after{i}")).await;
    }
    assert_eq!(
        dead.requests(),
        before,
        "an ejected backend was tried again"
    );
    assert!(!dead.is_healthy());
    proxy.shutdown().await;
}

/// A chunked POST body still being streamed by the client is retried after a connect
/// failure and arrives byte for byte at the second backend: half of it is sent only after
/// the second backend started handling the request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_post_body_retried_after_connect_failure_arrives_intact() {
    let sim = VllmSim::start(VllmConfig::default()).await.unwrap();
    let (_hold, refusing) = refusing_port();
    let refusing_url = format!("http://{refusing}");
    let proxy = Proxy::start(&config(&[refusing_url.clone(), sim.url()], NO_HEALTH)).await;
    let dead = backend(&proxy, &refusing_url);
    let client = http_client();

    let mut attempt = 0;
    while dead.is_healthy() {
        assert!(attempt < 10, "no request ever tried the refusing backend");
        attempt += 1;
        // A JSON body of ~512 KiB, deterministic and different on every attempt.
        let filler: String = testkit::data::pattern(attempt, 512 * 1024)
            .iter()
            .map(|b| char::from(b'a' + b % 26))
            .collect();
        let body = format!(r#"{{"prompt":"{filler}","max_tokens":1,"attempt":{attempt}}}"#);
        let body = Bytes::from(body);
        let (first, second) = body.split_at(body.len() / 2);
        let (first, second) = (body.slice_ref(first), body.slice_ref(second));

        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
        let req = Request::post(format!("{}{COMPLETIONS}", proxy.url("main")))
            .header("content-type", "application/json")
            .header("x-sim-interval-ms", "0")
            .body(ChannelBody(rx).boxed_unsync())
            .unwrap();
        let requests_before = sim.stats().requests();
        let feeder = {
            let stats_wait = async {
                // Gate the second half on the backend having started this request.
                assert!(
                    sim.stats()
                        .wait_until(WAIT, |s| s.requests() > requests_before)
                        .await,
                    "the live backend never saw the request"
                );
            };
            async move {
                for chunk in first.chunks(64 * 1024) {
                    tx.send(first.slice_ref(chunk)).await.unwrap();
                }
                stats_wait.await;
                for chunk in second.chunks(64 * 1024) {
                    tx.send(second.slice_ref(chunk)).await.unwrap();
                }
            }
        };
        let ((parts, resp_body), ()) = tokio::join!(
            async {
                let (parts, body) = head(&client, req).await.into_parts();
                let body = tokio::time::timeout(WAIT, body.collect())
                    .await
                    .expect("body timed out")
                    .expect("body failed")
                    .to_bytes();
                (parts, body)
            },
            feeder
        );
        assert_eq!(
            parts.status,
            StatusCode::OK,
            "{}",
            String::from_utf8_lossy(&resp_body)
        );
        let got = last_proxied(&sim.recorder()).expect("nothing recorded");
        assert_eq!(got.body_len, body.len() as u64, "body length changed");
        assert!(got.body == body, "body bytes changed on the way");
        assert_eq!(got.header("transfer-encoding").as_deref(), Some("chunked"));
    }
    assert_eq!(dead.requests(), 1);
    let why = dead.last_error().unwrap_or_default();
    assert!(why.contains("connect failed"), "ejected for {why:?}");
    assert_eq!(served(&sim), attempt as usize);
    proxy.shutdown().await;
}

/// A backend that accepts a request and closes the connection without answering is
/// ejected after `health.failures` (default 3) such failures in a row — one alone may be a
/// lost keepalive race, see errors.rs — and the request is never retried: the upstream may
/// have started work, so the client gets 502 and no other backend sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_after_request_was_sent_ejects_but_is_not_retried() {
    let sims = sims(2).await;
    let (hangup, hangups) = hangup_backend().await;
    let hangup_url = format!("http://{}", hangup.1);
    let mut all = urls(&sims);
    all.insert(1, hangup_url.clone());
    let proxy = Proxy::start(&config(&all, NO_HEALTH)).await;
    let dead = backend(&proxy, &hangup_url);
    let client = http_client();

    let mut i = 0;
    while dead.is_healthy() {
        assert!(i < 30, "no request ever reached the hang-up backend");
        quiesce(&proxy, 0).await;
        let id = format!("h{i}");
        i += 1;
        let seen = hangups.load(Ordering::SeqCst);
        let (parts, body) = exchange(&client, chat(&proxy, &id, false, SHORT)).await;
        if hangups.load(Ordering::SeqCst) > seen {
            assert_eq!(parts.status, StatusCode::BAD_GATEWAY);
            assert_eq!(error_type(&body), "upstream_broken");
            assert_eq!(holder(&sims, &id), None, "{id} was retried elsewhere");
        } else {
            assert_eq!(parts.status, StatusCode::OK);
            assert!(holder(&sims, &id).is_some());
        }
    }
    assert_eq!(hangups.load(Ordering::SeqCst), 3);
    let why = dead.last_error().unwrap_or_default();
    assert!(why.contains("before responding"), "ejected for {why:?}");
    for i in 0..6 {
        quiesce(&proxy, 0).await;
        short_ok(&client, &proxy, &format!("after{i}")).await;
    }
    assert_eq!(hangups.load(Ordering::SeqCst), 3);
    drop(hangup);
    proxy.shutdown().await;
}

/// A loopback server that reads one whole request (head + Content-Length body) per
/// connection, counts it, and closes the connection without a response byte.
async fn hangup_backend() -> (AbortOnDrop, Arc<AtomicUsize>) {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let counter = count.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    let len = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    if buf.len() >= end + 4 + len {
                        counter.fetch_add(1, Ordering::SeqCst);
                        return; // dropped: FIN without a response
                    }
                }
            });
        }
    });
    (AbortOnDrop(task, addr), count)
}

/// Without active health checks nothing else can re-admit a passively ejected backend, so
/// the ejection must not be permanent: a single-backend upstream (e.g. the mlnode) whose
/// server restarted once must serve again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passive_ejection_without_health_checks_is_not_permanent() {
    let sim = VllmSim::start(VllmConfig::default()).await.unwrap();
    let addr = sim.addr();
    let proxy = Proxy::start(&config(&[sim.url()], NO_HEALTH)).await;
    let b = backend(&proxy, &sim.url());
    let client = http_client();
    short_ok(&client, &proxy, "before").await;

    sim.kill();
    let mut i = 0;
    while b.is_healthy() {
        assert!(i < 20, "the killed backend was never ejected");
        i += 1;
        // Until the kill has taken effect the old server may still answer.
        let _ = exchange(&client, chat(&proxy, &format!("k{i}"), false, SHORT)).await;
    }
    let _restarted = start_on(addr, VllmConfig::default()).await;

    // Bounded: some request within WAIT must be served again.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (parts, body) = exchange(&client, chat(&proxy, "again", false, SHORT)).await;
        if parts.status == StatusCode::OK {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still {} {} after the backend restarted",
            parts.status,
            String::from_utf8_lossy(&body)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    proxy.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Admission
// ---------------------------------------------------------------------------------------

/// Opens one endless stream per backend (cap 1 each), returning the responses in order of
/// the backend index they landed on.
async fn fill_every_backend(
    client: &HttpClient,
    proxy: &Proxy,
    sims: &[VllmSim],
) -> Vec<Option<http::Response<Incoming>>> {
    let mut held: Vec<Option<http::Response<Incoming>>> = (0..sims.len()).map(|_| None).collect();
    for i in 0..sims.len() {
        let id = format!("fill{i}");
        let resp = head(client, chat(proxy, &id, true, ENDLESS)).await;
        assert_eq!(resp.status(), StatusCode::OK);
        let at = holder(sims, &id).expect("stream reached no backend");
        assert!(held[at].is_none(), "two streams on backend {at} (cap is 1)");
        held[at] = Some(resp);
    }
    held
}

/// Every backend at `max_concurrent`: one request waits in the queue (size 1), the next
/// is refused at once with 503 "overloaded" + Retry-After, and the queued one proceeds on
/// the backend whose slot freed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_backends_queue_then_refuse_with_503_overloaded() {
    let sims = sims(3).await;
    let extra =
        format!("max_concurrent = 1\nqueue_size = 1\nqueue_timeout = \"60s\"\n{FAST_HEALTH}");
    let proxy = Proxy::start(&config(&urls(&sims), &extra)).await;
    let client = http_client();
    let mut held = fill_every_backend(&client, &proxy, &sims).await;
    assert_eq!(upstream(&proxy).queued(), 0);

    let queued = tokio::spawn({
        let client = client.clone();
        let req = chat(&proxy, "queued", false, SHORT);
        async move { exchange(&client, req).await }
    });
    eventually("request waits in the queue", || {
        upstream(&proxy).queued() == 1
    })
    .await;

    // The queue is full: refused at once, never forwarded.
    let (parts, body) = exchange(&client, chat(&proxy, "refused", false, SHORT)).await;
    assert_eq!(parts.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(error_type(&body), "overloaded");
    assert!(parts.headers.contains_key(http::header::RETRY_AFTER));
    assert_eq!(holder(&sims, "refused"), None);
    assert!(!queued.is_finished(), "the queued request did not wait");

    // A slot frees on backend 2: the queued request takes it.
    held[2] = None;
    let (parts, body) = tokio::time::timeout(WAIT, queued)
        .await
        .expect("queued request never proceeded")
        .unwrap();
    assert_eq!(parts.status, StatusCode::OK, "{body:?}");
    assert_eq!(holder(&sims, "queued"), Some(2));
    assert_eq!(upstream(&proxy).queued(), 0);
    for b in upstream(&proxy).backends() {
        assert!(b.in_flight() <= 1, "{} over its cap", b.label);
    }

    drop(held);
    quiesce(&proxy, 0).await;
    proxy.shutdown().await;
}

/// A queued request whose client leaves gives its place back at once (the queue counter
/// does not leak) and is never forwarded; the next request can queue and proceeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_request_whose_client_leaves_frees_its_place() {
    use tokio::io::AsyncWriteExt;
    let sims = sims(3).await;
    let extra =
        format!("max_concurrent = 1\nqueue_size = 1\nqueue_timeout = \"60s\"\n{FAST_HEALTH}");
    let proxy = Proxy::start(&config(&urls(&sims), &extra)).await;
    let client = http_client();
    let mut held = fill_every_backend(&client, &proxy, &sims).await;

    let body = r#"{"model":"m","stream":false,"messages":[]}"#;
    let raw = format!(
        "POST {CHAT} HTTP/1.1\r\nhost: t\r\nx-test-id: gone\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut s = tokio::net::TcpStream::connect(proxy.addr("main"))
        .await
        .unwrap();
    s.write_all(raw.as_bytes()).await.unwrap();
    eventually("raw request waits in the queue", || {
        upstream(&proxy).queued() == 1
    })
    .await;
    drop(s);
    eventually("the departed request left the queue", || {
        upstream(&proxy).queued() == 0
    })
    .await;

    let queued = tokio::spawn({
        let client = client.clone();
        let req = chat(&proxy, "next", false, SHORT);
        async move { exchange(&client, req).await }
    });
    eventually("the next request queues", || upstream(&proxy).queued() == 1).await;
    held[0] = None;
    let (parts, _) = tokio::time::timeout(WAIT, queued)
        .await
        .expect("queued request never proceeded")
        .unwrap();
    assert_eq!(parts.status, StatusCode::OK);
    assert_eq!(holder(&sims, "next"), Some(0));
    assert_eq!(
        holder(&sims, "gone"),
        None,
        "a departed request was forwarded"
    );

    drop(held);
    quiesce(&proxy, 0).await;
    proxy.shutdown().await;
}

/// A queued request that never gets a slot is answered 503 "overloaded" (with
/// Retry-After) when the queue timeout passes, and leaves the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_timeout_gives_503_overloaded() {
    let sims = sims(3).await;
    let extra =
        format!("max_concurrent = 1\nqueue_size = 8\nqueue_timeout = \"200ms\"\n{FAST_HEALTH}");
    let proxy = Proxy::start(&config(&urls(&sims), &extra)).await;
    let client = http_client();
    let held = fill_every_backend(&client, &proxy, &sims).await;

    let (parts, body) = exchange(&client, chat(&proxy, "late", false, SHORT)).await;
    assert_eq!(parts.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(error_type(&body), "overloaded");
    assert!(parts.headers.contains_key(http::header::RETRY_AFTER));
    assert_eq!(holder(&sims, "late"), None);
    assert_eq!(upstream(&proxy).queued(), 0);

    // Capacity back: served normally.
    drop(held);
    quiesce(&proxy, 0).await;
    short_ok(&client, &proxy, "again").await;
    proxy.shutdown().await;
}

/// No healthy backend: 503 "no_healthy_backend" with Retry-After at once — not after the
/// (here one-minute) queue timeout, which would exceed the test's bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_healthy_backend_is_503_at_once() {
    let ports: Vec<(TcpSocket, SocketAddr)> = (0..3).map(|_| refusing_port()).collect();
    let all: Vec<String> = ports.iter().map(|(_, a)| format!("http://{a}")).collect();
    let extra =
        format!("max_concurrent = 1\nqueue_size = 8\nqueue_timeout = \"60s\"\n{FAST_HEALTH}");
    let proxy = Proxy::start(&config(&all, &extra)).await;
    eventually("health checks take every backend down", || {
        upstream(&proxy).backends().iter().all(|b| !b.is_healthy())
    })
    .await;
    let client = http_client();
    let (parts, body) = exchange(&client, chat(&proxy, "x", false, SHORT)).await;
    assert_eq!(parts.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(error_type(&body), "no_healthy_backend");
    assert!(parts.headers.contains_key(http::header::RETRY_AFTER));
    assert_eq!(upstream(&proxy).queued(), 0);
    for b in upstream(&proxy).backends() {
        assert_eq!(b.requests(), 0, "{} was tried", b.label);
    }
    proxy.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Port ranges
// ---------------------------------------------------------------------------------------

/// `http://127.0.0.1:P-P+3` where only two ports have a vLLM server (a node that started 2
/// of 4 possible servers): every request succeeds from the start, the empty ports are
/// taken out, and both live servers get traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_range_with_gaps_serves_from_the_live_ports() {
    // Ports 1 and 3 of the range get simulators; 0 and 2 stay held, bound but not
    // listening (connections refused).
    let (mut held, sims) = 'reserve: {
        for _ in 0..20 {
            let mut held = consecutive_ports(4);
            let live = [held.remove(3), held.remove(1)];
            let mut sims = Vec::new();
            for (sock, addr) in live.into_iter().rev() {
                drop(sock);
                match VllmSim::start_on(addr, VllmConfig::default()).await {
                    Ok(s) => sims.push(s),
                    Err(_) => continue, // someone took the port in between; try again
                }
            }
            if sims.len() == 2 {
                break 'reserve (held, sims);
            }
        }
        panic!("could not start simulators inside a reserved port range");
    };
    let gaps: Vec<String> = held.iter().map(|(_, a)| format!("http://{a}")).collect();
    let lo = gaps[0].rsplit(':').next().unwrap().parse::<u16>().unwrap();
    let range = format!("http://127.0.0.1:{lo}-{}", lo + 3);
    assert_eq!(sims[0].addr().port(), lo + 1);
    assert_eq!(sims[1].addr().port(), lo + 3);

    let proxy = Proxy::start(&config(&[range], FAST_HEALTH)).await;
    let labels: Vec<String> = upstream(&proxy)
        .backends()
        .iter()
        .map(|b| b.label.to_string())
        .collect();
    assert_eq!(
        labels,
        (lo..=lo + 3)
            .map(|p| format!("http://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
    );
    let client = http_client();

    // From the first request on (gaps possibly not yet detected), nothing fails.
    for i in 0..8 {
        quiesce(&proxy, 0).await;
        let id = format!("early{i}");
        short_ok(&client, &proxy, &id).await;
        assert!(holder(&sims, &id).is_some());
    }
    eventually("the empty ports are down, the live ones up", || {
        let b: Vec<bool> = upstream(&proxy)
            .backends()
            .iter()
            .map(|b| b.is_healthy())
            .collect();
        b == [false, true, false, true]
    })
    .await;
    let before = [served(&sims[0]), served(&sims[1])];
    for i in 0..10 {
        quiesce(&proxy, 0).await;
        short_ok(&client, &proxy, &format!("late{i}")).await;
    }
    let after = [served(&sims[0]), served(&sims[1])];
    assert_eq!(after[0] + after[1], before[0] + before[1] + 10);
    assert!(
        after[0] > before[0] && after[1] > before[1],
        "live ports did not share the load: {before:?} → {after:?}"
    );
    held.clear();
    proxy.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Stuck-engine guard
// ---------------------------------------------------------------------------------------

/// A backend whose engine never produces a first byte (health checks off here: vLLM's
/// /health would say 200) misses `first_byte_timeout` once → still in rotation; twice
/// (`stuck_after = 2`) → ejected, and traffic goes to the other two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stuck_engine_is_ejected_after_consecutive_first_byte_timeouts() {
    let mut sims = sims(2).await;
    let stuck = VllmSim::start(VllmConfig {
        prefill: Duration::from_secs(3600),
        ..VllmConfig::default()
    })
    .await
    .unwrap();
    sims.insert(1, stuck);
    let extra = format!("first_byte_timeout = \"1s\"\nstuck_after = 2\n{NO_HEALTH}");
    let proxy = Proxy::start(&config(&urls(&sims), &extra)).await;
    let b = backend(&proxy, &sims[1].url());
    let client = http_client();

    let mut timeouts = 0;
    let mut i = 0;
    while b.is_healthy() {
        assert!(i < 30, "the stuck backend was never ejected");
        quiesce(&proxy, 0).await;
        let id = format!("s{i}");
        i += 1;
        let (parts, body) = exchange(&client, chat(&proxy, &id, false, SHORT)).await;
        let at = holder(&sims, &id).expect("request reached no backend");
        if at == 1 {
            assert_eq!(parts.status, StatusCode::GATEWAY_TIMEOUT);
            assert_eq!(error_type(&body), "upstream_timeout");
            timeouts += 1;
            assert_eq!(
                b.is_healthy(),
                timeouts < 2,
                "after {timeouts} first-byte timeouts"
            );
        } else {
            assert_eq!(parts.status, StatusCode::OK);
        }
    }
    assert_eq!(timeouts, 2);
    assert_eq!(served(&sims[1]), 2);
    let why = b.last_error().unwrap_or_default();
    assert!(why.contains("first-byte"), "ejected for {why:?}");
    // The abandoned generations were cancelled upstream.
    assert!(sims[1].stats().wait_idle(WAIT).await);
    assert_eq!(sims[1].stats().cancelled(), 2);

    for i in 0..10 {
        quiesce(&proxy, 0).await;
        let id = format!("after{i}");
        short_ok(&client, &proxy, &id).await;
        assert_ne!(holder(&sims, &id), Some(1));
    }
    assert_eq!(served(&sims[1]), 2);
    proxy.shutdown().await;
}

/// The stuck-engine guard exists because vLLM's /health says 200 while the engine hangs.
/// With health checks on, an engine ejected for first-byte timeouts must not be put back by
/// the next /health 200 alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stuck_engine_stays_out_while_health_says_200() {
    let mut sims = sims(2).await;
    let stuck = VllmSim::start(VllmConfig {
        prefill: Duration::from_secs(3600),
        ..VllmConfig::default()
    })
    .await
    .unwrap();
    sims.insert(1, stuck);
    let extra = format!("first_byte_timeout = \"1s\"\nstuck_after = 2\n{FAST_HEALTH}");
    let proxy = Proxy::start(&config(&urls(&sims), &extra)).await;
    let b = backend(&proxy, &sims[1].url());
    let client = http_client();

    let mut i = 0;
    while served(&sims[1]) < 2 {
        assert!(i < 30, "the stuck backend never got two requests");
        quiesce(&proxy, 0).await;
        let _ = exchange(&client, chat(&proxy, &format!("s{i}"), false, SHORT)).await;
        i += 1;
    }
    // Its second miss ejected it (the test above proves that without health checks).
    // Three more health rounds, all answered 200 by the hung engine's /health:
    let rec = sims[1].recorder();
    let seen = rec.count();
    assert!(rec.wait_for(seen + 3, WAIT).await, "no health rounds");
    assert!(
        !b.is_healthy(),
        "stuck backend re-admitted by /health 200 after {} first-byte timeouts",
        served(&sims[1])
    );
    proxy.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Counter leaks
// ---------------------------------------------------------------------------------------

/// 1,000 requests, 32 at a time, over three backends: short streams read to the end,
/// streams dropped after the first event, streams dropped right after the head,
/// non-streaming calls, and calls abandoned at an arbitrary point (during prefill, or
/// before they even reached a backend). Afterwards every in-flight count — podproxy's per
/// backend, its queue, and the simulators' running generations — is back to zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_in_flight_leak_after_1000_mixed_and_cancelled_requests() {
    const TOTAL: usize = 1000;
    const CONCURRENCY: usize = 32;
    let sims = sims(3).await;
    let proxy = Arc::new(Proxy::start(&config(&urls(&sims), FAST_HEALTH)).await);
    let client = http_client();
    let next = Arc::new(AtomicUsize::new(0));
    let mid_stream_cancels = Arc::new(AtomicUsize::new(0));

    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..CONCURRENCY {
        let (proxy, client, next) = (proxy.clone(), client.clone(), next.clone());
        let mid_stream_cancels = mid_stream_cancels.clone();
        workers.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= TOTAL {
                    return;
                }
                let id = format!("m{i}");
                match i % 5 {
                    // A short stream, read to the end.
                    0 => {
                        let h = [("x-sim-tokens", "4"), ("x-sim-interval-ms", "1")];
                        let resp = head(&client, chat(&proxy, &id, true, &h)).await;
                        assert_eq!(resp.status(), StatusCode::OK, "{id}");
                        let report = tokio::time::timeout(WAIT, read_events(resp.into_body()))
                            .await
                            .expect("stream timed out")
                            .expect("not SSE");
                        assert!(report.is_clean(4), "{id}: {report:?}");
                    }
                    // Cancelled mid-stream: the body is dropped after the first event.
                    1 => {
                        let h = [("x-sim-tokens", "1000"), ("x-sim-interval-ms", "5")];
                        let resp = head(&client, chat(&proxy, &id, true, &h)).await;
                        assert_eq!(resp.status(), StatusCode::OK, "{id}");
                        let mut body = resp.into_body();
                        let frame = tokio::time::timeout(WAIT, body.frame())
                            .await
                            .expect("first event timed out")
                            .expect("stream ended early")
                            .expect("stream failed");
                        assert!(frame.data_ref().is_some_and(|d| d.starts_with(b"data: ")));
                        drop(body);
                        mid_stream_cancels.fetch_add(1, Ordering::Relaxed);
                    }
                    // Cancelled right after the head, before any event.
                    2 => {
                        let h = [("x-sim-tokens", "1000"), ("x-sim-interval-ms", "5")];
                        let resp = head(&client, chat(&proxy, &id, true, &h)).await;
                        assert_eq!(resp.status(), StatusCode::OK, "{id}");
                        drop(resp);
                    }
                    // Non-streaming, read to the end.
                    3 => {
                        let h = [("x-sim-tokens", "2"), ("x-sim-interval-ms", "1")];
                        let (parts, _) = exchange(&client, chat(&proxy, &id, false, &h)).await;
                        assert_eq!(parts.status, StatusCode::OK, "{id}");
                    }
                    // Abandoned wherever it is after a moment (usually during prefill).
                    _ => {
                        let h = [("x-sim-prefill-ms", "2000"), ("x-sim-tokens", "1000")];
                        let req = chat(&proxy, &id, true, &h);
                        let _ =
                            tokio::time::timeout(Duration::from_millis(20), client.request(req))
                                .await;
                    }
                }
            }
        });
    }
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(r) = workers.join_next().await {
            r.expect("worker panicked");
        }
    })
    .await
    .expect("1,000 requests did not finish");

    eventually("every backend's in-flight count back to 0", || {
        upstream(&proxy)
            .backends()
            .iter()
            .all(|b| b.in_flight() == 0)
    })
    .await;
    assert_eq!(upstream(&proxy).queued(), 0);
    for (i, s) in sims.iter().enumerate() {
        assert!(
            s.stats().wait_idle(WAIT).await,
            "simulator {i} still runs {} generations",
            s.stats().in_flight()
        );
    }
    // The load really was spread and really was cancelled upstream.
    let served: Vec<usize> = sims.iter().map(served).collect();
    assert!(served.iter().all(|n| *n > 0), "{served:?}");
    assert!(served.iter().sum::<usize>() >= TOTAL * 4 / 5, "{served:?}");
    let cancelled: u64 = sims.iter().map(|s| s.stats().cancelled()).sum();
    assert!(
        cancelled >= mid_stream_cancels.load(Ordering::Relaxed) as u64,
        "only {cancelled} generations cancelled upstream"
    );
    let requests: u64 = upstream(&proxy)
        .backends()
        .iter()
        .map(|b| b.requests())
        .sum();
    assert!(requests >= (TOTAL * 4 / 5) as u64);
    assert!(upstream(&proxy).backends().iter().all(|b| b.is_healthy()));
}
