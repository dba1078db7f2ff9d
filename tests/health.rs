//! What podproxy says about its backends from the first moment: the first health round
//! decides, and readiness waits for it.

mod support;

use serde_json::Value;
use std::sync::Arc;
use support::*;
use testkit::vllm::{VllmConfig, VllmSim};
use tokio::io::AsyncWriteExt;
use tokio::sync::Notify;

fn config(urls: &str, health: &str) -> String {
    format!(
        "[admin]\nbind = \"127.0.0.1:0\"\n\n[listeners.main]\nbind = \"127.0.0.1:0\"\n\
         routes = [{{ prefix = \"/\", upstream = \"vllm\" }}]\n\n\
         [upstreams.vllm]\nurls = \"{urls}\"\nhealth = {{ {health} }}\n"
    )
}

#[tokio::test]
async fn a_backend_whose_first_probe_fails_is_down_from_the_start() {
    let vllm = VllmSim::start(VllmConfig::default()).await.unwrap();
    let dead: Vec<String> = (0..3)
        .map(|_| format!("http://127.0.0.1:{}", free_port()))
        .collect();
    let urls = format!("{}, {}", vllm.url(), dead.join(", "));
    // One round a minute: three failed rounds would take three minutes.
    let proxy = Proxy::start(&config(&urls, "interval = \"60s\", failures = 3")).await;
    let admin = proxy.admin.unwrap();
    let healthy_of = |b: &Value| -> Vec<bool> {
        b["upstreams"][0]["backends"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["healthy"].as_bool().unwrap())
            .collect()
    };
    let b = admin_until(admin, "/backends", None, "the first round", |_, b| {
        healthy_of(b).iter().filter(|h| **h).count() == 1
    })
    .await;
    let healthy = healthy_of(&b);
    assert_eq!(healthy, [true, false, false, false]);
    let (status, r) = admin_json(admin, "/readyz", None).await;
    assert_eq!(status, 200, "{r}");
    proxy.shutdown().await;
}

#[tokio::test]
async fn readiness_waits_for_the_first_health_round() {
    // A backend whose health answer is held back until the test lets it go.
    let release = Arc::new(Notify::new());
    let gate = release.clone();
    let backend = RawBackend::start(move |mut s| {
        let gate = gate.clone();
        async move {
            let mut buf = Vec::new();
            while let Some(_req) = read_request(&mut s, &mut buf).await {
                gate.notified().await;
                gate.notify_one(); // and every later answer too
                let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
                if s.write_all(ok).await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    let proxy = Proxy::start(&config(
        &backend.url(),
        "interval = \"60s\", timeout = \"20s\"",
    ))
    .await;
    let admin = proxy.admin.unwrap();
    let (status, r) = admin_json(admin, "/readyz", None).await;
    assert_eq!(status, 503, "ready before any health check answered: {r}");
    assert_eq!(r["not_ready"], serde_json::json!(["vllm"]));
    release.notify_one();
    admin_until(admin, "/readyz", None, "ready", |status, _| status == 200).await;
    proxy.shutdown().await;
}
