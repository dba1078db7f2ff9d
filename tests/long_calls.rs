//! Long calls across a hop that cuts responses whose head has not started in time (RunPod's
//! HTTP proxy is Cloudflare: 524 after 100 s). The hop here is `testkit::cfhop` with its
//! limit `HOP` scaled down; the mlnode's start and vLLM's prefill last several times it.
//!
//! - `inference_up = "async"` on the network-node bridge: the DAPI's synchronous
//!   `inference/up` carried out as `up/async` + `up/status` polls, every outcome.
//! - `sse_keepalive` on the pod front: a streaming chat whose first token outlasts the hop.

mod support;

use bytes::Bytes;
use http::Request;
use http_body_util::BodyExt;
use std::time::Duration;
use support::*;
use testkit::cfhop::HeadTimeoutHop;
use testkit::client::{full, http_client};
use testkit::mlnode::{MlnodeConfig, MlnodeSim, StartStatus};
use testkit::vllm::{VllmConfig, VllmSim};
use tokio::io::AsyncWriteExt;

/// The hop's head limit (Cloudflare's 100 s, scaled down).
const HOP: Duration = Duration::from_millis(400);
/// What the DAPI sends (no Content-Type, as the DAPI does).
const UP_BODY: &str = r#"{"model":"Qwen/Qwen3-32B-FP8","dtype":"auto","additional_args":["--tensor-parallel-size","1"]}"#;

/// The runpod-bridge layout: the DAPI's PoC port → the pod's mlnode through the hop.
fn bridge(pod: &str, route_extra: &str) -> String {
    format!(
        "[admin]\nbind = \"127.0.0.1:0\"\n\n\
         [listeners.poc]\nbind = \"127.0.0.1:0\"\nstrip_version_prefix = true\n\
         routes = [{{ prefix = \"/\", upstream = \"pod\"{route_extra} }}]\n\n\
         [upstreams.pod]\nurls = \"{pod}\"\nrewrite_host = true\nhealth = {{ enabled = false }}\n"
    )
}

/// Long-call mode with test-sized timings.
fn long_call(budget: &str) -> String {
    format!(
        ", inference_up = \"async\", inference_up_async = {{ poll_interval = \"50ms\", budget = \"{budget}\", unreachable_grace = \"1s\" }}"
    )
}

async fn dapi_up(proxy_url: &str) -> (u16, Bytes) {
    let resp = bounded(
        "inference/up",
        http_client().request(
            Request::post(format!("{proxy_url}/v3.0.8/api/v1/inference/up"))
                .body(full(UP_BODY))
                .unwrap(),
        ),
    )
    .await
    .expect("inference/up");
    let status = resp.status().as_u16();
    let body = bounded("body", resp.into_body().collect())
        .await
        .expect("body")
        .to_bytes();
    (status, body)
}

fn targets(sim: &MlnodeSim) -> Vec<String> {
    sim.recorder().all().into_iter().map(|r| r.target).collect()
}

async fn scrape(proxy: &Proxy) -> metrics::Scrape {
    metrics::scrape(proxy.admin.expect("admin listener")).await
}

/// `podproxy_long_call_outcomes_total` of upstream `pod` for `outcome`.
fn outcomes(m: &metrics::Scrape, outcome: &str) -> Option<f64> {
    m.get(
        "podproxy_long_call_outcomes_total",
        &[("upstream", "pod"), ("outcome", outcome)],
    )
}

fn json(b: &[u8]) -> serde_json::Value {
    serde_json::from_slice(b)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(b)))
}

#[tokio::test]
async fn a_synchronous_inference_up_whose_start_outlasts_the_hop_returns_ok_through_async_polls() {
    let sim = MlnodeSim::start(MlnodeConfig {
        inference_up_delay: HOP * 5,
        strict_content_type: false,
        ..Default::default()
    })
    .await
    .unwrap();
    let hop = HeadTimeoutHop::start(sim.addr(), HOP).await.unwrap();
    let proxy = Proxy::start(&bridge(&hop.url(), &long_call("20s"))).await;

    let (status, body) = dapi_up(&proxy.url("poc")).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(&body[..], br#"{"status":"OK"}"#);
    assert_eq!(sim.start_status(), StartStatus::Completed);
    assert_eq!(hop.cut(), 0, "no call was long enough to be cut");

    let t = targets(&sim);
    assert_eq!(t[0], "/api/v1/inference/up/async", "{t:?}");
    assert!(
        t.iter().all(|p| p != "/api/v1/inference/up"),
        "the blocking call was sent: {t:?}"
    );
    let polls = t
        .iter()
        .filter(|p| *p == "/api/v1/inference/up/status")
        .count();
    assert!(polls >= 2, "{t:?}");
    // The start got the DAPI's body byte for byte, and the hop's name as Host.
    let first = sim.recorder().all().remove(0);
    assert_eq!(first.body_str(), UP_BODY);
    assert_eq!(
        first.header("host").as_deref(),
        Some(hop.addr().to_string().as_str())
    );

    let m = scrape(&proxy).await;
    let upstream = &[("upstream", "pod")];
    assert_eq!(
        m.get("podproxy_long_calls_started_total", upstream),
        Some(1.0),
        "{}",
        m.text
    );
    assert_eq!(outcomes(&m, "completed"), Some(1.0), "{}", m.text);
    assert_eq!(
        m.get("podproxy_long_call_polls_total", upstream),
        Some(polls as f64),
        "{}",
        m.text
    );
}

#[tokio::test]
async fn an_up_async_answer_cut_by_the_hop_is_resolved_by_the_status_and_followed() {
    let sim = MlnodeSim::start(MlnodeConfig {
        inference_up_delay: HOP * 4,
        async_answer_delay: HOP * 2,
        ..Default::default()
    })
    .await
    .unwrap();
    let hop = HeadTimeoutHop::start(sim.addr(), HOP).await.unwrap();
    let proxy = Proxy::start(&bridge(&hop.url(), &long_call("20s"))).await;
    let (status, body) = dapi_up(&proxy.url("poc")).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(&body[..], br#"{"status":"OK"}"#);
    assert_eq!(hop.cut(), 1, "the up/async answer was cut");
    let t = targets(&sim);
    assert_eq!(
        t.iter()
            .filter(|p| *p == "/api/v1/inference/up/async")
            .count(),
        1,
        "the start was not sent twice: {t:?}"
    );
}

#[tokio::test]
async fn without_long_call_mode_the_hop_cuts_the_same_inference_up_with_524() {
    let sim = MlnodeSim::start(MlnodeConfig {
        inference_up_delay: HOP * 5,
        ..Default::default()
    })
    .await
    .unwrap();
    let hop = HeadTimeoutHop::start(sim.addr(), HOP).await.unwrap();
    let proxy = Proxy::start(&bridge(&hop.url(), "")).await;
    let (status, body) = dapi_up(&proxy.url("poc")).await;
    assert_eq!(status, 524, "{}", String::from_utf8_lossy(&body));
    assert_eq!(hop.cut(), 1);
}

#[tokio::test]
async fn a_failing_start_returns_500_with_the_mlnodes_detail() {
    let sim = MlnodeSim::start(MlnodeConfig {
        inference_up_delay: HOP * 3,
        start_error: Some("CUDA out of memory. Tried to allocate 2.00 GiB".into()),
        // The process exits shortly after the failure, as the real one does.
        exit_after_failure: Some(Duration::from_secs(3)),
        ..Default::default()
    })
    .await
    .unwrap();
    let hop = HeadTimeoutHop::start(sim.addr(), HOP).await.unwrap();
    let proxy = Proxy::start(&bridge(&hop.url(), &long_call("20s"))).await;
    let (status, body) = dapi_up(&proxy.url("poc")).await;
    assert_eq!(status, 500, "{}", String::from_utf8_lossy(&body));
    assert_eq!(
        json(&body),
        serde_json::json!({"detail": "CUDA out of memory. Tried to allocate 2.00 GiB"})
    );
}

#[tokio::test]
async fn a_concurrent_start_returns_the_mlnodes_409_and_its_body() {
    let sim = MlnodeSim::start(MlnodeConfig {
        inference_up_delay: Duration::from_secs(30),
        ..Default::default()
    })
    .await
    .unwrap();
    // Someone else started vLLM already; what would the synchronous call answer now?
    let c = http_client();
    let direct = |path: &str| {
        Request::post(format!("{}{path}", sim.url()))
            .body(full(UP_BODY))
            .unwrap()
    };
    let started = bounded("up/async", c.request(direct("/api/v1/inference/up/async")))
        .await
        .unwrap();
    assert_eq!(started.status(), 200);
    let sync = bounded("up", c.request(direct("/api/v1/inference/up")))
        .await
        .unwrap();
    assert_eq!(sync.status(), 409);
    let sync_body = sync.into_body().collect().await.unwrap().to_bytes();

    let hop = HeadTimeoutHop::start(sim.addr(), HOP).await.unwrap();
    let proxy = Proxy::start(&bridge(&hop.url(), &long_call("20s"))).await;
    let (status, body) = dapi_up(&proxy.url("poc")).await;
    assert_eq!(status, 409);
    assert_eq!(body, sync_body);
    assert!(json(&body)["detail"]
        .as_str()
        .unwrap()
        .contains("already in progress"));
    let m = scrape(&proxy).await;
    assert_eq!(outcomes(&m, "conflict"), Some(1.0), "{}", m.text);
}

/// Waits until the mlnode has answered `n` status polls.
async fn wait_polls(sim: &MlnodeSim, n: usize) {
    bounded("status polls", async {
        loop {
            let seen = targets(sim)
                .iter()
                .filter(|p| *p == "/api/v1/inference/up/status")
                .count();
            if seen >= n {
                return;
            }
            sim.recorder()
                .wait_for(sim.recorder().count() + 1, WAIT)
                .await;
        }
    })
    .await
}

#[tokio::test]
async fn a_restart_mid_start_returns_502_saying_the_node_restarted() {
    let mut sim = MlnodeSim::start(MlnodeConfig {
        inference_up_delay: Duration::from_secs(60),
        ..Default::default()
    })
    .await
    .unwrap();
    let hop = HeadTimeoutHop::start(sim.addr(), HOP).await.unwrap();
    let proxy = Proxy::start(&bridge(&hop.url(), &long_call("20s"))).await;
    let url = proxy.url("poc");
    let call = tokio::spawn(async move { dapi_up(&url).await });
    // The bridge has seen the start in progress; then the process restarts.
    wait_polls(&sim, 2).await;
    sim.restart().await.unwrap();
    let (status, body) = bounded("answer", call).await.unwrap();
    assert_eq!(status, 502, "{}", String::from_utf8_lossy(&body));
    let v = json(&body);
    assert_eq!(v["error"]["type"], "inference_start_interrupted");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("restarted"), "{msg}");
}

#[tokio::test]
async fn a_node_unreachable_longer_than_the_grace_returns_502_saying_so() {
    let sim = MlnodeSim::start(MlnodeConfig {
        inference_up_delay: Duration::from_secs(60),
        ..Default::default()
    })
    .await
    .unwrap();
    let hop = HeadTimeoutHop::start(sim.addr(), HOP).await.unwrap();
    let proxy = Proxy::start(&bridge(&hop.url(), &long_call("20s"))).await;
    let url = proxy.url("poc");
    let call = tokio::spawn(async move { dapi_up(&url).await });
    wait_polls(&sim, 2).await;
    // The pod goes away; the hop answers 502 to every poll from now on.
    sim.kill();
    let (status, body) = bounded("answer", call).await.unwrap();
    assert_eq!(status, 502, "{}", String::from_utf8_lossy(&body));
    let v = json(&body);
    assert_eq!(v["error"]["type"], "inference_start_interrupted");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("did not answer a status poll"), "{msg}");
    assert!(!msg.contains("127.0.0.1"), "no backend address: {msg}");
}

#[tokio::test]
async fn a_start_still_running_when_the_budget_ends_returns_504() {
    let sim = MlnodeSim::start(MlnodeConfig {
        inference_up_delay: Duration::from_secs(60),
        ..Default::default()
    })
    .await
    .unwrap();
    let hop = HeadTimeoutHop::start(sim.addr(), HOP).await.unwrap();
    let proxy = Proxy::start(&bridge(&hop.url(), &long_call("1s"))).await;
    let (status, body) = dapi_up(&proxy.url("poc")).await;
    assert_eq!(status, 504, "{}", String::from_utf8_lossy(&body));
    let v = json(&body);
    assert_eq!(v["error"]["type"], "inference_start_timeout");
    assert_eq!(sim.start_status(), StartStatus::InProgress);
}

#[tokio::test]
async fn when_the_dapi_goes_away_the_start_is_followed_to_its_end() {
    let sim = MlnodeSim::start(MlnodeConfig {
        inference_up_delay: HOP * 4,
        ..Default::default()
    })
    .await
    .unwrap();
    let hop = HeadTimeoutHop::start(sim.addr(), HOP).await.unwrap();
    let proxy = Proxy::start(&bridge(&hop.url(), &long_call("20s"))).await;
    let mut conn = RawConn::connect(proxy.addr("poc")).await;
    conn.send(
        format!(
            "POST /v3.0.8/api/v1/inference/up HTTP/1.1\r\nHost: node\r\nContent-Length: {}\r\n\r\n{UP_BODY}",
            UP_BODY.len()
        )
        .as_bytes(),
    )
    .await;
    wait_polls(&sim, 1).await;
    conn.stream.shutdown().await.unwrap();
    drop(conn);
    // The polls go on until the mlnode says completed, and the outcome is counted. The
    // count lands just after the last poll's answer, with no request after it to wait for:
    // between scrapes, wait for the next poll or a short while, whichever comes first.
    bounded("outcome", async {
        loop {
            if outcomes(&scrape(&proxy).await, "completed") == Some(1.0) {
                return;
            }
            sim.recorder()
                .wait_for(sim.recorder().count() + 1, Duration::from_millis(100))
                .await;
        }
    })
    .await;
    assert_eq!(sim.start_status(), StartStatus::Completed);
}

#[tokio::test]
async fn an_mlnode_without_up_async_gets_the_plain_synchronous_call() {
    let sim = MlnodeSim::start(MlnodeConfig {
        no_async: true,
        inference_up_delay: Duration::from_millis(100),
        ..Default::default()
    })
    .await
    .unwrap();
    let proxy = Proxy::start(&bridge(&sim.url(), &long_call("20s"))).await;
    let (status, body) = dapi_up(&proxy.url("poc")).await;
    assert_eq!((status, &body[..]), (200, &br#"{"status":"OK"}"#[..]));
    assert_eq!(
        targets(&sim),
        ["/api/v1/inference/up/async", "/api/v1/inference/up"]
    );
    assert_eq!(sim.recorder().last().unwrap().body_str(), UP_BODY);
}

#[tokio::test]
async fn other_calls_on_a_long_call_route_pass_as_usual() {
    let sim = MlnodeSim::start(MlnodeConfig::default()).await.unwrap();
    let proxy = Proxy::start(&bridge(&sim.url(), &long_call("20s"))).await;
    let resp = raw_exchange(
        proxy.addr("poc"),
        b"GET /v3.0.8/api/v1/state HTTP/1.1\r\nHost: n\r\n\r\n",
    )
    .await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.json()["state"], "STOPPED");
    assert_eq!(targets(&sim), ["/api/v1/state"]);
}

// ---------------------------------------------------------------------------------------
// SSE keep-alive on the pod front
// ---------------------------------------------------------------------------------------

/// A pod front's inference listener in front of `vllm`.
fn pod_front(vllm: &str, route_extra: &str, upstream_extra: &str) -> String {
    format!(
        "[admin]\nbind = \"127.0.0.1:0\"\n\n\
         [listeners.inference]\nbind = \"127.0.0.1:0\"\n\
         routes = [{{ prefix = \"/\", upstream = \"vllm\"{route_extra} }}]\n\n\
         [upstreams.vllm]\nurls = \"{vllm}\"\nhealth = {{ enabled = false }}\n{upstream_extra}\n"
    )
}

const KEEPALIVE: &str = ", sse_keepalive = \"100ms\"";

fn chat(stream: bool) -> String {
    format!(
        r#"{{"model":"Qwen/Qwen3-32B-FP8","messages":[{{"role":"user","content":"hi"}}],"stream":{stream},"max_tokens":5}}"#
    )
}

/// A chat request on a raw connection (the test sees the framing and the close).
async fn raw_chat(addr: std::net::SocketAddr, body: &str, headers: &str) -> RawConn {
    let mut conn = RawConn::connect(addr).await;
    conn.send(
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: pod\r\nContent-Length: {}\r\n{headers}\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await;
    conn
}

#[tokio::test]
async fn a_streaming_chat_whose_first_token_outlasts_the_hop_arrives_whole_with_keepalive_on() {
    let vllm = VllmSim::start(VllmConfig {
        prefill: HOP * 4,
        ..Default::default()
    })
    .await
    .unwrap();
    let pod = Proxy::start(&pod_front(&vllm.url(), KEEPALIVE, "")).await;
    let hop = HeadTimeoutHop::start(pod.addr("inference"), HOP)
        .await
        .unwrap();
    let bridge = Proxy::start(&format!(
        "[listeners.inference]\nbind = \"127.0.0.1:0\"\nroutes = [{{ prefix = \"/\", upstream = \"pod\" }}]\n\n\
         [upstreams.pod]\nurls = \"{}\"\nrewrite_host = true\nhealth = {{ enabled = false }}\n",
        hop.url()
    ))
    .await;

    let mut conn = raw_chat(bridge.addr("inference"), &chat(true), "").await;
    let resp = conn.response().await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("content-type"), Some("text/event-stream"));
    assert!(resp.chunked);
    let text = resp.body_str();
    let first_data = text.find("data: ").expect("events");
    let keepalives = text[..first_data].matches(": keep-alive\n\n").count();
    assert!(keepalives >= 2, "{text}");
    assert!(!text[first_data..].contains(": keep-alive"), "{text}");
    let data: Vec<&str> = text.matches("data: ").collect();
    assert_eq!(data.len(), 6, "5 tokens and [DONE]: {text}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert_eq!(hop.cut(), 0);
    assert_eq!(vllm.stats().streams_completed(), 1);
    let m = scrape(&pod).await;
    let upstream = &[("upstream", "vllm")];
    assert_eq!(
        m.get("podproxy_sse_keepalives_total", upstream),
        Some(keepalives as f64),
        "{}",
        m.text
    );
    assert_eq!(
        m.get("podproxy_sse_keepalive_streams_total", upstream),
        Some(1.0),
        "{}",
        m.text
    );
    // vLLM's head, observed by the keep-alive body; not podproxy's own head as well.
    assert_eq!(
        m.get("podproxy_upstream_ttfb_seconds_count", upstream),
        Some(1.0),
        "{}",
        m.text
    );
}

#[tokio::test]
async fn with_keepalive_off_the_same_streaming_chat_gets_524() {
    let vllm = VllmSim::start(VllmConfig {
        prefill: HOP * 4,
        ..Default::default()
    })
    .await
    .unwrap();
    let pod = Proxy::start(&pod_front(&vllm.url(), "", "")).await;
    let hop = HeadTimeoutHop::start(pod.addr("inference"), HOP)
        .await
        .unwrap();
    let mut conn = raw_chat(hop.addr(), &chat(true), "").await;
    let resp = conn.response().await;
    assert_eq!(resp.status, 524, "{}", resp.body_str());
    assert_eq!(hop.cut(), 1);
    // The hop gave up on the pod front, which dropped the generation.
    assert!(vllm.stats().wait_cancelled(1, WAIT).await);
}

#[tokio::test]
async fn a_head_within_the_interval_and_non_streaming_requests_pass_untouched() {
    let vllm = VllmSim::start(VllmConfig {
        prefill: Duration::from_millis(600),
        ..Default::default()
    })
    .await
    .unwrap();
    let pod = Proxy::start(&pod_front(&vllm.url(), ", sse_keepalive = \"5s\"", "")).await;
    // Quick head: vLLM's own head and events, no comment.
    let mut conn = raw_chat(
        pod.addr("inference"),
        &chat(true),
        "x-sim-prefill-ms: 0\r\n",
    )
    .await;
    let resp = conn.response().await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("cache-control"), Some("no-cache"));
    assert!(
        !resp.body_str().contains("keep-alive"),
        "{}",
        resp.body_str()
    );

    // Not a stream: no keep-alive however long the wait.
    let pod = Proxy::start(&pod_front(&vllm.url(), ", sse_keepalive = \"100ms\"", "")).await;
    let mut conn = raw_chat(pod.addr("inference"), &chat(false), "").await;
    let resp = conn.response().await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("content-type"), Some("application/json"));
    assert_eq!(resp.json()["object"], "chat.completion");
    // The body reached vLLM byte for byte.
    assert_eq!(vllm.recorder().last().unwrap().body_str(), chat(false));
}

/// A backend that reads one request, waits `after`, then answers `answer` (or, when it is
/// empty, closes the connection without answering).
async fn slow_backend(after: Duration, answer: Vec<u8>) -> RawBackend {
    let answer = std::sync::Arc::new(answer);
    RawBackend::start(move |mut s| {
        let answer = answer.clone();
        async move {
            let mut buf = Vec::new();
            if read_request(&mut s, &mut buf).await.is_none() {
                return;
            }
            // The simulated engine's queue time, not synchronisation.
            tokio::time::sleep(after).await;
            if !answer.is_empty() {
                let _ = s.write_all(&answer).await;
                let _ = s.flush().await;
            }
        }
    })
    .await
}

/// The events of a stream whose chunked body never ended: what came before the abort.
fn aborted_stream(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw).into_owned();
    assert!(
        text.starts_with("HTTP/1.1 200"),
        "podproxy's early head: {text}"
    );
    assert!(
        !text.ends_with("0\r\n\r\n"),
        "the stream was ended as if complete: {text}"
    );
    text
}

fn error_event(text: &str) -> serde_json::Value {
    let line = text
        .lines()
        .find(|l| l.starts_with("data: {\"error\""))
        .unwrap_or_else(|| panic!("no error event: {text}"));
    serde_json::from_str(&line["data: ".len()..]).unwrap()
}

#[tokio::test]
async fn an_upstream_error_after_keepalives_ends_in_one_error_event_and_an_aborted_stream() {
    let err = r#"{"object":"error","message":"engine overloaded","type":"ServiceUnavailableError","param":null,"code":503}"#;
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{err}",
        err.len()
    );
    let backend = slow_backend(Duration::from_millis(500), answer.into_bytes()).await;
    let pod = Proxy::start(&pod_front(&backend.url(), KEEPALIVE, "")).await;
    let mut conn = raw_chat(pod.addr("inference"), &chat(true), "").await;
    let text = aborted_stream(&conn.until_closed().await);
    assert!(text.contains(": keep-alive"), "{text}");
    let ev = error_event(&text);
    assert_eq!(ev["error"]["message"], "engine overloaded");
    assert_eq!(ev["error"]["type"], "ServiceUnavailableError");
    assert_eq!(ev["error"]["code"], 503);
    assert_eq!(text.matches("data: ").count(), 1, "{text}");
    eventually("in-flight released", || pod.in_flight() == 0).await;

    // The upstream closing without any answer: the same, with podproxy's error type.
    let backend = slow_backend(Duration::from_millis(500), Vec::new()).await;
    let pod = Proxy::start(&pod_front(&backend.url(), KEEPALIVE, "")).await;
    let mut conn = raw_chat(pod.addr("inference"), &chat(true), "").await;
    let text = aborted_stream(&conn.until_closed().await);
    let ev = error_event(&text);
    assert_eq!(ev["error"]["type"], "upstream_broken");
    assert_eq!(ev["error"]["code"], 502);
    let msg = ev["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("vllm") && !msg.contains("127.0.0.1"),
        "names the upstream, never the backend address: {msg}"
    );
}

#[tokio::test]
async fn the_stuck_engine_guard_still_measures_the_upstreams_head_under_keepalives() {
    let vllm = VllmSim::start(VllmConfig {
        prefill: Duration::from_secs(30),
        ..Default::default()
    })
    .await
    .unwrap();
    let pod = Proxy::start(&pod_front(
        &vllm.url(),
        KEEPALIVE,
        "first_byte_timeout = \"700ms\"\nstuck_after = 1",
    ))
    .await;
    let mut conn = raw_chat(pod.addr("inference"), &chat(true), "").await;
    let text = aborted_stream(&conn.until_closed().await);
    assert!(text.matches(": keep-alive").count() >= 2, "{text}");
    let ev = error_event(&text);
    assert_eq!(ev["error"]["type"], "upstream_timeout");
    assert_eq!(ev["error"]["code"], 504);
    assert!(vllm.stats().wait_cancelled(1, WAIT).await);
    // stuck_after = 1: that one miss ejected the backend.
    assert!(!pod.upstreams[0].backends()[0].is_healthy());
}

#[tokio::test]
async fn a_client_that_leaves_during_keepalives_cancels_the_generation() {
    let vllm = VllmSim::start(VllmConfig {
        prefill: Duration::from_secs(30),
        ..Default::default()
    })
    .await
    .unwrap();
    let pod = Proxy::start(&pod_front(&vllm.url(), KEEPALIVE, "")).await;
    let mut conn = raw_chat(pod.addr("inference"), &chat(true), "").await;
    // Two keep-alives seen: the head is out and the generation is in prefill.
    let mut seen = Vec::new();
    bounded("keep-alives", async {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 1024];
        while String::from_utf8_lossy(&seen)
            .matches(": keep-alive")
            .count()
            < 2
        {
            let n = conn.stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed early");
            seen.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    assert_eq!(vllm.stats().in_flight(), 1);
    drop(conn);
    assert!(
        vllm.stats().wait_cancelled(1, WAIT).await,
        "vLLM never saw the cancel"
    );
    eventually("in-flight released", || pod.in_flight() == 0).await;
}

#[tokio::test]
async fn an_h2_client_gets_the_error_event_and_then_a_reset_stream() {
    let backend = slow_backend(Duration::from_millis(500), Vec::new()).await;
    let pod = Proxy::start(&pod_front(&backend.url(), KEEPALIVE, "")).await;
    let mut h2 = h2c_connect(pod.addr("inference")).await;
    let body = chat(true);
    let req = Request::post(format!(
        "http://{}/v1/chat/completions",
        pod.addr("inference")
    ))
    .header("content-length", body.len())
    .body(http_body_util::Full::new(Bytes::from(body)))
    .unwrap();
    let resp = bounded("h2 head", h2.send_request(req)).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut text = String::new();
    let ended = bounded("h2 body", async {
        loop {
            match body.frame().await {
                Some(Ok(f)) => {
                    if let Ok(d) = f.into_data() {
                        text.push_str(&String::from_utf8_lossy(&d));
                    }
                }
                Some(Err(e)) => return Err(e),
                None => return Ok(()),
            }
        }
    })
    .await;
    assert!(ended.is_err(), "ended as if complete: {text}");
    assert!(text.contains(": keep-alive"), "{text}");
    assert_eq!(error_event(&text)["error"]["type"], "upstream_broken");
}

/// The shipped `config/examples/runpod-bridge.toml`, with only its addresses changed: the
/// listeners on loopback, the RunPod domains replaced by the simulated pod's hops.
fn runpod_bridge_example(poc_url: &str, inference_url: &str) -> String {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/examples/runpod-bridge.toml"
    ))
    .unwrap();
    for needle in [
        "\"0.0.0.0:8080\"",
        "\"0.0.0.0:5000\"",
        "https://${RUNPOD_ID}-8080.proxy.runpod.net",
        "https://${RUNPOD_ID}-5000.proxy.runpod.net",
    ] {
        assert!(text.contains(needle), "example changed shape: {needle}");
    }
    text.replace("\"0.0.0.0:8080\"", "\"127.0.0.1:0\"")
        .replace("\"0.0.0.0:5000\"", "\"127.0.0.1:0\"")
        .replace("https://${RUNPOD_ID}-8080.proxy.runpod.net", poc_url)
        .replace("https://${RUNPOD_ID}-5000.proxy.runpod.net", inference_url)
}

#[tokio::test]
async fn the_runpod_bridge_example_gets_a_dapi_inference_up_through_the_hop() {
    let sim = MlnodeSim::start(MlnodeConfig {
        // Several times the hop's limit, whatever the example's poll interval (5 s) is.
        inference_up_delay: HOP * 5,
        // A newer mlnode image: the DAPI's header-less body needs json_content_type.
        strict_content_type: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let hop = HeadTimeoutHop::start(sim.addr(), HOP).await.unwrap();
    let proxy = Proxy::start(&runpod_bridge_example(&hop.url(), "http://127.0.0.1:1")).await;
    let (status, body) = dapi_up(&proxy.url("poc")).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(&body[..], br#"{"status":"OK"}"#);
    assert_eq!(hop.cut(), 0);
    let calls = proxied(&sim.recorder());
    assert!(calls.iter().all(|r| r.target != "/api/v1/inference/up"));
    assert_eq!(calls[0].target, "/api/v1/inference/up/async");
    assert_eq!(
        calls[0].header("content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(calls[0].body_str(), UP_BODY);
}

#[tokio::test]
async fn a_keepalive_stream_logs_its_own_head_as_ttfb() {
    // podproxy's keep-alive head goes out after `sse_keepalive`, vLLM's after the prefill;
    // the access line's ttfb_ms is the first (it used to say -1). The upstream's
    // time-to-head histogram counts vLLM's head once (the keep-alive test above).
    let vllm = VllmSim::start(VllmConfig {
        prefill: Duration::from_millis(600),
        ..Default::default()
    })
    .await
    .unwrap();
    let port = free_port();
    let running = Podproxy::new()
        .config_text(
            "keepalive-log.toml",
            &format!(
                "[listeners.inference]\nbind = \"127.0.0.1:{port}\"\n\
                 routes = [{{ prefix = \"/\", upstream = \"vllm\", sse_keepalive = \"100ms\" }}]\n\n\
                 [upstreams.vllm]\nurls = \"{}\"\nhealth = {{ enabled = false }}\n",
                vllm.url()
            ),
        )
        .listening_on(port)
        .start()
        .await;
    let mut conn = raw_chat(running.addr(), &chat(true), "").await;
    let resp = conn.response().await;
    assert_eq!(resp.status, 200);
    assert!(
        resp.body_str().contains(": keep-alive"),
        "{}",
        resp.body_str()
    );
    assert!(
        resp.body_str().ends_with("data: [DONE]\n\n"),
        "{}",
        resp.body_str()
    );

    let line = running.wait_for_line("path=\"/v1/chat/completions\"").await;
    let field = |name: &str| -> f64 {
        let at = line
            .find(&format!(" {name}="))
            .unwrap_or_else(|| panic!("{name}: {line}"));
        let rest = &line[at + name.len() + 2..];
        rest.split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap_or_else(|e| panic!("{name}: {e}: {line}"))
    };
    let (ttfb, duration) = (field("ttfb_ms"), field("duration_ms"));
    assert!(ttfb >= 0.0 && ttfb <= duration, "{line}");
    assert!(duration >= 600.0, "{line}");
    drop(running);
}
