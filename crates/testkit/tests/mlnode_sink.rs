mod common;

use std::time::Duration;

use common::*;
use testkit::mlnode::{MlnodeConfig, MlnodeSim};
use testkit::sink::CallbackSink;

#[tokio::test]
async fn mlnode_endpoints() {
    let sim = MlnodeSim::start(MlnodeConfig::default()).await.unwrap();
    let c = client();
    let u = sim.url();
    let (st, _, b) = get(&c, &format!("{u}/api/v1/state")).await;
    assert_eq!(
        (st.as_u16(), json(&b)["state"].as_str()),
        (200, Some("STOPPED"))
    );
    let (st, _, b) = send(
        &c,
        "POST",
        &format!("{u}/api/v1/stop"),
        &[],
        testkit::client::empty(),
    )
    .await;
    assert_eq!(
        (st.as_u16(), json(&b)["status"].as_str()),
        (200, Some("OK"))
    );
    let (st, _, _) = get(&c, &format!("{u}/api/v1/pow/status")).await;
    assert_eq!(st, 200);
    let poc = r#"{"url":"http://api:9100/v1/poc-batches","block_hash":"x"}"#;
    for p in [
        "/api/v1/pow/init/generate",
        "/api/v1/pow/init/validate",
        "/api/v1/pow/validate",
        "/api/v1/inference/pow/init/generate",
        "/api/v1/inference/pow/generate",
        "/api/v1/inference/pow/stop",
    ] {
        let (st, _, b) = post_json(&c, &format!("{u}{p}"), &[], poc).await;
        assert_eq!(
            (st.as_u16(), json(&b)["status"].as_str()),
            (200, Some("OK")),
            "{p}"
        );
        let rec = sim.recorder().last().unwrap();
        assert_eq!(rec.target, p);
        assert_eq!(&rec.body[..], poc.as_bytes());
        assert_eq!(rec.header("content-type"), None);
    }
    let (st, _, _) = get(&c, &format!("{u}/api/v1/inference/pow/status")).await;
    assert_eq!(st, 200);
    let (st, _, _) = send(
        &c,
        "DELETE",
        &format!("{u}/api/v1/models"),
        &[],
        testkit::client::full(r#"{"hf_repo":"m"}"#),
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(
        sim.recorder().last().unwrap().body_json().unwrap()["hf_repo"],
        "m"
    );
    for p in ["/health", "/livez", "/readyz"] {
        assert_eq!(get(&c, &format!("{u}{p}")).await.0, 200);
    }
    let (st, _, b) = get(&c, &format!("{u}/api/v1/unknown")).await;
    assert_eq!(st, 404);
    assert_eq!(json(&b)["detail"], "Not Found");
    assert_eq!(sim.recorder().count(), 15);
}

#[tokio::test]
async fn inference_up_waits_for_the_delay() {
    let sim = MlnodeSim::start(MlnodeConfig {
        inference_up_delay: Duration::from_millis(80),
        ..Default::default()
    })
    .await
    .unwrap();
    let started = std::time::Instant::now();
    let (st, _, _) = send(
        &client(),
        "POST",
        &format!("{}/api/v1/inference/up", sim.url()),
        &[],
        testkit::client::full("{}"),
    )
    .await;
    assert_eq!(st, 200);
    assert!(started.elapsed() >= Duration::from_millis(80));
}

#[tokio::test]
async fn sink_records_and_answers_configured_status() {
    let sink = CallbackSink::start().await.unwrap();
    let c = client();
    let target = "/v2/poc-batches/Qwen%252FQwen3-32B-FP8/generated";
    let body = testkit::data::pattern(3, 1_000_000);
    let (st, _, b) = send(
        &c,
        "POST",
        &format!("{}{target}", sink.url()),
        &[],
        testkit::client::full(body.clone()),
    )
    .await;
    assert_eq!((st.as_u16(), &b[..]), (200, &b"{}"[..]));
    sink.set_status(503);
    let (st, _, _) = send(
        &c,
        "PUT",
        &format!("{}/x", sink.url()),
        &[],
        testkit::client::empty(),
    )
    .await;
    assert_eq!(st, 503);
    let all = sink.recorder().all();
    assert_eq!(all.len(), 2);
    assert_eq!(all[0].target, target);
    assert_eq!(&all[0].body[..], &body[..]);
    assert_eq!(all[0].body_sha256(), testkit::data::sha256_hex(&body));
    assert_eq!(all[1].method, "PUT");
}

#[tokio::test]
async fn strict_mode_answers_422_without_a_json_content_type_as_fastapi_does() {
    let sim = MlnodeSim::start(MlnodeConfig {
        strict_content_type: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let url = format!("{}/api/v1/inference/up", sim.url());
    let body = r#"{"model":"Qwen/Qwen3-32B-FP8","dtype":"auto","additional_args":[]}"#;
    let (st, _, text) = send(&client(), "POST", &url, &[], testkit::client::full(body)).await;
    assert_eq!(st.as_u16(), 422, "{text:?}");
    let (st, _, _) = send(
        &client(),
        "POST",
        &url,
        &[("content-type", "application/json")],
        testkit::client::full(body),
    )
    .await;
    assert_eq!(st.as_u16(), 200);
    // GETs have no pydantic body.
    let (st, _, _) = send(
        &client(),
        "GET",
        &format!("{}/api/v1/state", sim.url()),
        &[],
        testkit::client::empty(),
    )
    .await;
    assert_eq!(st.as_u16(), 200);
}
