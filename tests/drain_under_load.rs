//! Graceful paths under load: shutdown while 200 SSE streams are in
//! flight lets every one of them finish cleanly within the grace period.

mod support;
use http_body_util::BodyExt;
use std::time::Duration;
use support::*;
use testkit::vllm::{VllmConfig, VllmSim};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_with_200_streams_in_flight_finishes_them_all() {
    const STREAMS: usize = 200;
    const TOKENS: usize = 40;
    let vllm = VllmSim::start(VllmConfig {
        token_interval: Duration::from_millis(25),
        tokens: TOKENS,
        ..VllmConfig::default()
    })
    .await
    .expect("vllm sim");
    let proxy = Proxy::start(&format!(
        "[server]\nshutdown_grace = \"60s\"\n\n[listeners.main]\nbind = \"127.0.0.1:0\"\nroutes = [{{ prefix = \"/\", upstream = \"vllm\" }}]\n\n[upstreams.vllm]\nurls = \"{}\"\n",
        vllm.url()
    ))
    .await;
    let url = format!("{}/v1/chat/completions", proxy.url("main"));
    let client = testkit::client::http_client();
    let mut streams = tokio::task::JoinSet::new();
    for _ in 0..STREAMS {
        let (client, url) = (client.clone(), url.clone());
        streams.spawn(async move {
            let req = http::Request::post(url)
                .body(testkit::client::full(
                    r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
                ))
                .expect("request");
            let resp = client.request(req).await.map_err(|e| e.to_string())?;
            if resp.status() != 200 {
                let body = resp
                    .into_body()
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                return Err(format!("status with body {body:?}"));
            }
            testkit::sse::read_events(resp.into_body()).await
        });
    }
    // Shut down only once every stream is running upstream: all 200 are "in flight".
    assert!(
        vllm.stats()
            .wait_until(WAIT, |s| s.streams_started() == STREAMS as u64)
            .await,
        "not all streams started: {}",
        vllm.stats().streams_started()
    );
    assert_eq!(
        vllm.stats().streams_completed(),
        0,
        "streams ended before the shutdown began"
    );
    tokio::time::timeout(WAIT * 3, proxy.shutdown())
        .await
        .expect("drain finished within the grace period");
    let mut clean = 0;
    while let Some(joined) = streams.join_next().await {
        let report = joined.expect("stream task").expect("stream");
        assert!(
            report.is_clean(TOKENS),
            "a stream was cut by the shutdown: done={} aborted={} events={}",
            report.done,
            report.aborted,
            report.events.len()
        );
        clean += 1;
    }
    assert_eq!(clean, STREAMS);
    assert_eq!(vllm.stats().streams_completed(), STREAMS as u64);
    assert_eq!(vllm.stats().cancelled(), 0);
}
