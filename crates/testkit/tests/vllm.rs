mod common;

use std::time::Duration;

use common::*;
use http::Request;
use http_body_util::BodyExt;
use testkit::client::full;
use testkit::sse::read_events;
use testkit::vllm::{VllmConfig, VllmSim};

const CHAT: &str = "/v1/chat/completions";

fn stream_body() -> String {
    r#"{"model":"Qwen/Qwen3-32B-FP8","stream":true,"messages":[{"role":"user","content":"hi"}]}"#
        .to_owned()
}

async fn sim() -> VllmSim {
    VllmSim::start(VllmConfig::default()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_one_event_per_frame_then_done() {
    let sim = sim().await;
    let c = client();
    let req = Request::post(format!("{}{CHAT}", sim.url()))
        .header("x-sim-tokens", "20")
        .header("x-sim-interval-ms", "2")
        .body(full(stream_body()))
        .unwrap();
    let resp = tokio::time::timeout(T, c.request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let report = tokio::time::timeout(T, read_events(resp.into_body()))
        .await
        .unwrap()
        .unwrap();
    assert!(report.is_clean(20), "{report:?}");
    assert_eq!(report.multi_event_reads, 0);
    assert!(report.reads >= 21);
    for e in &report.events {
        let v: serde_json::Value = serde_json::from_str(&e.data).unwrap();
        assert_eq!(v["object"], "chat.completion.chunk");
        assert!(e.sent_us.unwrap() <= e.arrived_us);
    }
    let first: serde_json::Value = serde_json::from_str(&report.events[0].data).unwrap();
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    let last: serde_json::Value = serde_json::from_str(&report.events[19].data).unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    assert!(
        sim.stats()
            .wait_until(T, |s| s.streams_completed() == 1 && s.in_flight() == 0)
            .await
    );
    assert_eq!(sim.stats().cancelled(), 0);
    assert_eq!(sim.stats().streams_started(), 1);
}

#[tokio::test]
async fn completions_stream_uses_text_completion_and_max_tokens() {
    let sim = sim().await;
    let req = Request::post(format!("{}/v1/completions", sim.url()))
        .body(full(r#"{"prompt":"a b","stream":true,"max_tokens":3}"#))
        .unwrap();
    let resp = tokio::time::timeout(T, client().request(req))
        .await
        .unwrap()
        .unwrap();
    let report = tokio::time::timeout(T, read_events(resp.into_body()))
        .await
        .unwrap()
        .unwrap();
    assert!(report.is_clean(3), "{report:?}");
    let v: serde_json::Value = serde_json::from_str(&report.events[0].data).unwrap();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], "tok0 ");
}

#[tokio::test]
async fn non_streaming_and_other_endpoints() {
    let sim = sim().await;
    let c = client();
    let (st, _, b) = post_json(
        &c,
        &format!("{}{CHAT}", sim.url()),
        &[("x-sim-interval-ms", "1")],
        r#"{"max_tokens":3,"messages":[]}"#,
    )
    .await;
    assert_eq!(st, 200);
    let v = json(&b);
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["content"], "tok0 tok1 tok2 ");
    assert_eq!(v["usage"]["completion_tokens"], 3);
    assert_eq!(sim.stats().completions(), 1);

    let (st, _, b) = get(&c, &format!("{}/health", sim.url())).await;
    assert_eq!((st.as_u16(), b.len()), (200, 0));
    let (st, _, b) = get(&c, &format!("{}/v1/models", sim.url())).await;
    assert_eq!(st, 200);
    assert_eq!(json(&b)["data"][0]["id"], "Qwen/Qwen3-32B-FP8");
    let (st, _, b) = post_json(
        &c,
        &format!("{}/tokenize", sim.url()),
        &[],
        r#"{"prompt":"one two three"}"#,
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(json(&b)["count"], 3);
    assert_eq!(json(&b)["tokens"].as_array().unwrap().len(), 3);
    let (st, _, b) = get(&c, &format!("{}/nope", sim.url())).await;
    assert_eq!(st, 404);
    assert_eq!(json(&b)["detail"], "Not Found");
    let (st, _, _) = post_json(&c, &format!("{}{CHAT}", sim.url()), &[], "not json").await;
    assert_eq!(st, 400);
    assert_eq!(sim.recorder().count(), 6);
    assert_eq!(sim.stats().requests(), 6);
    assert_eq!(sim.recorder().last().unwrap().body_str(), "not json");
}

/// The peer leaves during prefill, before any response byte: hyper must drop the pending
/// handler future (it keeps reading the socket and sees EOF), and the guard counts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_during_prefill_is_counted() {
    let sim = sim().await;
    let s = raw_request(
        sim.addr(),
        "POST",
        CHAT,
        &[("x-sim-prefill-ms", "600000")],
        &stream_body(),
    )
    .await;
    assert!(sim.stats().wait_until(T, |s| s.in_flight() == 1).await);
    drop(s);
    assert!(
        sim.stats().wait_cancelled(1, T).await,
        "prefill cancellation not detected"
    );
    assert!(sim.stats().wait_idle(T).await);
    assert_eq!(sim.stats().streams_started(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_mid_stream_is_counted() {
    let sim = sim().await;
    let mut s = raw_request(
        sim.addr(),
        "POST",
        CHAT,
        &[("x-sim-tokens", "100000"), ("x-sim-interval-ms", "10")],
        &stream_body(),
    )
    .await;
    let got = read_until(&mut s, "\"seq\":1").await;
    assert!(got.starts_with("HTTP/1.1 200"));
    drop(s);
    assert!(
        sim.stats().wait_cancelled(1, T).await,
        "mid-stream cancellation not detected"
    );
    assert!(sim.stats().wait_idle(T).await);
    assert_eq!(sim.stats().streams_started(), 1);
    assert_eq!(sim.stats().streams_completed(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_non_streaming_generation_is_counted() {
    let sim = sim().await;
    let s = raw_request(
        sim.addr(),
        "POST",
        CHAT,
        &[("x-sim-tokens", "100000"), ("x-sim-interval-ms", "10")],
        r#"{"messages":[]}"#,
    )
    .await;
    assert!(sim.stats().wait_until(T, |s| s.in_flight() == 1).await);
    drop(s);
    assert!(
        sim.stats().wait_cancelled(1, T).await,
        "non-streaming cancellation not detected"
    );
    assert!(sim.stats().wait_idle(T).await);
    assert_eq!(sim.stats().completions(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_after_aborts_the_body() {
    let sim = sim().await;
    let req = Request::post(format!("{}{CHAT}", sim.url()))
        .header("x-sim-tokens", "10")
        .header("x-sim-interval-ms", "1")
        .header("x-sim-fail-after", "3")
        .body(full(stream_body()))
        .unwrap();
    let resp = tokio::time::timeout(T, client().request(req))
        .await
        .unwrap()
        .unwrap();
    let report = tokio::time::timeout(T, read_events(resp.into_body()))
        .await
        .unwrap()
        .unwrap();
    assert!(report.aborted, "{report:?}");
    assert!(!report.done);
    assert_eq!(report.seqs(), vec![Some(0), Some(1), Some(2)]);
    assert!(
        sim.stats()
            .wait_until(T, |s| s.failed() == 1 && s.in_flight() == 0)
            .await
    );
    assert_eq!(sim.stats().cancelled(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_aborts_in_flight_stream() {
    let sim = sim().await;
    let req = Request::post(format!("{}{CHAT}", sim.url()))
        .header("x-sim-tokens", "100000")
        .header("x-sim-interval-ms", "5")
        .body(full(stream_body()))
        .unwrap();
    let resp = tokio::time::timeout(T, client().request(req))
        .await
        .unwrap()
        .unwrap();
    let mut body = resp.into_body();
    let first = tokio::time::timeout(T, body.frame())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(first.data_ref().is_some());
    sim.kill();
    let report = tokio::time::timeout(T, read_events(body))
        .await
        .unwrap()
        .unwrap();
    assert!(report.aborted, "{report:?}");
    assert!(!report.done);
    assert!(sim.stats().wait_cancelled(1, T).await);
    // The listener is gone too.
    let refused = tokio::time::timeout(T, async {
        loop {
            if tokio::net::TcpStream::connect(sim.addr()).await.is_err() {
                break;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(refused.is_ok());
}

#[tokio::test]
async fn prefill_delays_the_head() {
    let sim = VllmSim::start(VllmConfig {
        prefill: Duration::from_millis(50),
        ..VllmConfig::default()
    })
    .await
    .unwrap();
    let started = std::time::Instant::now();
    let (st, _, _) = post_json(
        &client(),
        &format!("{}{CHAT}", sim.url()),
        &[("x-sim-tokens", "1")],
        "{}",
    )
    .await;
    assert_eq!(st, 200);
    assert!(started.elapsed() >= Duration::from_millis(50));
}

/// Dropping a response body mid-stream in hyper's pooled client closes that connection, so
/// the backend sees the cancellation too (what a proxy does when its client leaves).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_client_body_cancels() {
    let sim = sim().await;
    let c = client();
    let req = Request::post(format!("{}{CHAT}", sim.url()))
        .header("x-sim-tokens", "100000")
        .header("x-sim-interval-ms", "5")
        .body(full(stream_body()))
        .unwrap();
    let resp = tokio::time::timeout(T, c.request(req))
        .await
        .unwrap()
        .unwrap();
    let mut body = resp.into_body();
    tokio::time::timeout(T, body.frame())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    drop(body);
    assert!(sim.stats().wait_cancelled(1, T).await);
    assert!(sim.stats().wait_idle(T).await);
}
