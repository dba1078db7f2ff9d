//! The mlnode simulator's inference start API and the 524 hop.

mod common;

use std::time::Duration;

use common::*;
use testkit::cfhop::HeadTimeoutHop;
use testkit::mlnode::{MlnodeConfig, MlnodeSim, StartStatus};
use testkit::vllm::{VllmConfig, VllmSim};

const BODY: &str = r#"{"model":"Qwen/Qwen3-32B-FP8","dtype":"auto","additional_args":[]}"#;

async fn status(c: &testkit::client::HttpClient, u: &str) -> serde_json::Value {
    let (st, _, b) = get(c, &format!("{u}/api/v1/inference/up/status")).await;
    assert_eq!(st, 200);
    json(&b)
}

/// Waits (bounded) until the simulator reports `want`; it changes with the clock only.
async fn wait_status(sim: &MlnodeSim, want: StartStatus) {
    let deadline = tokio::time::Instant::now() + T;
    while sim.start_status() != want {
        assert!(
            tokio::time::Instant::now() < deadline,
            "status stayed {:?}, wanted {want:?}",
            sim.start_status()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn an_async_start_runs_in_progress_to_completed_and_competing_starts_get_409() {
    let sim = MlnodeSim::start(MlnodeConfig {
        inference_up_delay: Duration::from_millis(400),
        ..Default::default()
    })
    .await
    .unwrap();
    let c = client();
    let u = sim.url();
    assert_eq!(status(&c, &u).await["status"], "not_started");
    let (st, _, b) = post_json(&c, &format!("{u}/api/v1/inference/up/async"), &[], BODY).await;
    assert_eq!(st, 200);
    assert_eq!(json(&b)["status"], "starting");
    let s = status(&c, &u).await;
    assert_eq!(s["status"], "in_progress");
    assert_eq!(s["is_starting"], true);
    let (st, _, b) = post_json(&c, &format!("{u}/api/v1/inference/up"), &[], BODY).await;
    assert_eq!(st, 409);
    assert!(json(&b)["detail"]
        .as_str()
        .unwrap()
        .contains("already in progress"));
    wait_status(&sim, StartStatus::Completed).await;
    let s = status(&c, &u).await;
    assert_eq!(
        (s["is_running"].as_bool(), s["error"].is_null()),
        (Some(true), true)
    );
    let (st, _, b) = post_json(&c, &format!("{u}/api/v1/inference/up/async"), &[], BODY).await;
    assert_eq!(st, 409);
    assert!(json(&b)["detail"]
        .as_str()
        .unwrap()
        .contains("already running"));
    let (st, _, _) = post_json(&c, &format!("{u}/api/v1/inference/down"), &[], "").await;
    assert_eq!(st, 200);
    assert_eq!(status(&c, &u).await["status"], "not_started");
}

#[tokio::test]
async fn a_failing_start_answers_500_shows_failed_and_the_process_comes_back_fresh() {
    let sim = MlnodeSim::start(MlnodeConfig {
        inference_up_delay: Duration::from_millis(100),
        start_error: Some("CUDA out of memory".into()),
        exit_after_failure: Some(Duration::from_millis(300)),
        ..Default::default()
    })
    .await
    .unwrap();
    let c = client();
    let u = sim.url();
    let (st, _, b) = post_json(&c, &format!("{u}/api/v1/inference/up"), &[], BODY).await;
    assert_eq!(st, 500);
    assert_eq!(json(&b)["detail"], "CUDA out of memory");
    let s = status(&c, &u).await;
    // Seen only briefly (the process exits), but right after the answer it is there.
    assert_eq!(s["status"], "failed", "{s}");
    assert_eq!(s["error"], "CUDA out of memory");
    wait_status(&sim, StartStatus::NotStarted).await;
}

#[tokio::test]
async fn a_restart_mid_start_drops_connections_and_forgets_the_start() {
    let mut sim = MlnodeSim::start(MlnodeConfig {
        inference_up_delay: Duration::from_secs(30),
        ..Default::default()
    })
    .await
    .unwrap();
    let c = client();
    let u = sim.url();
    let (st, _, _) = post_json(&c, &format!("{u}/api/v1/inference/up/async"), &[], BODY).await;
    assert_eq!(st, 200);
    assert_eq!(sim.start_status(), StartStatus::InProgress);
    sim.restart().await.unwrap();
    assert_eq!(sim.url(), u, "same address after the restart");
    assert_eq!(status(&c, &u).await["status"], "not_started");
}

#[tokio::test]
async fn an_older_mlnode_has_no_async_start_but_the_synchronous_one() {
    let sim = MlnodeSim::start(MlnodeConfig {
        no_async: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let c = client();
    let u = sim.url();
    let (st, _, _) = post_json(&c, &format!("{u}/api/v1/inference/up/async"), &[], BODY).await;
    assert_eq!(st, 404);
    let (st, _, _) = get(&c, &format!("{u}/api/v1/inference/up/status")).await;
    assert_eq!(st, 404);
    let (st, _, b) = post_json(&c, &format!("{u}/api/v1/inference/up"), &[], BODY).await;
    assert_eq!(
        (st.as_u16(), json(&b)["status"].as_str()),
        (200, Some("OK"))
    );
}

#[tokio::test]
async fn the_hop_answers_524_when_no_head_comes_in_time_and_closes_the_upstream_request() {
    let vllm = VllmSim::start(VllmConfig {
        prefill: Duration::from_secs(30),
        ..Default::default()
    })
    .await
    .unwrap();
    let hop = HeadTimeoutHop::start(vllm.addr(), Duration::from_millis(300))
        .await
        .unwrap();
    let c = client();
    let (st, h, b) = post_json(
        &c,
        &format!("{}/v1/chat/completions", hop.url()),
        &[],
        r#"{"model":"m","stream":true}"#,
    )
    .await;
    assert_eq!(st.as_u16(), 524);
    assert_eq!(h["server"], "cloudflare");
    assert_eq!(&b[..], b"error code: 524");
    assert_eq!(hop.cut(), 1);
    assert!(
        vllm.stats().wait_cancelled(1, T).await,
        "the upstream request was not closed"
    );

    // A head in time is relayed, body streamed.
    let (st, h, b) = send(
        &c,
        "POST",
        &format!("{}/v1/chat/completions", hop.url()),
        &[("x-sim-prefill-ms", "0"), ("x-sim-tokens", "3")],
        testkit::client::full(r#"{"model":"m","stream":true}"#),
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(h["content-type"], "text/event-stream");
    let text = String::from_utf8_lossy(&b);
    assert_eq!(text.matches("data: ").count(), 4, "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert_eq!(hop.relayed(), 1);
}
