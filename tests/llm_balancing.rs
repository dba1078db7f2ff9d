//! LLM-aware balancing (docs/balancing.md), end to end over the testkit's GPU-like vLLM
//! simulator: engine signals scraped from `/metrics` steer requests away from a replica
//! with a queue; prefix affinity keeps a conversation on its replica until the load guard
//! moves it; with the feature off (or the signals unavailable) the choice is exactly
//! today's least outstanding requests. No timing is asserted: only where requests went.

mod support;

use http::{Method, Request, StatusCode};
use serde_json::{json, Value};
use std::time::Duration;
use support::*;
use testkit::client::{full, http_client, HttpClient};
use testkit::gpu::GpuConfig;
use testkit::vllm::{VllmConfig, VllmSim};

fn gpu_sim_config(slots: usize) -> VllmConfig {
    VllmConfig {
        token_interval: Duration::from_millis(5),
        gpu: Some(GpuConfig {
            decode_slots: slots,
            prefill_per_token: Duration::from_micros(10),
            ..GpuConfig::default()
        }),
        ..VllmConfig::default()
    }
}

fn config(urls: &[String], upstream_extra: &str, admin: bool) -> String {
    let admin = if admin {
        "[admin]\nbind = \"127.0.0.1:0\"\n"
    } else {
        ""
    };
    format!(
        "[listeners.main]\nbind = \"127.0.0.1:0\"\nroutes = [{{ prefix = \"/\", upstream = \"u\" }}]\n\n\
         [upstreams.u]\nurls = \"{}\"\n{upstream_extra}\n{admin}",
        urls.join(",")
    )
}

fn chat_body(system: &str, user: &str, max_tokens: u64) -> String {
    json!({
        "model": "Qwen/Qwen3-32B-FP8",
        "max_tokens": max_tokens,
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": user},
        ],
    })
    .to_string()
}

fn post(url: &str, body: String) -> Request<testkit::TkBody> {
    Request::builder()
        .method(Method::POST)
        .uri(format!("{url}/v1/chat/completions"))
        .header("content-type", "application/json")
        .header("x-via", "proxy")
        .body(full(body))
        .unwrap()
}

/// Requests a simulator received through the proxy (marked `x-via: proxy`).
fn via_proxy(sim: &VllmSim) -> usize {
    sim.recorder()
        .all()
        .iter()
        .filter(|r| r.header("x-via").as_deref() == Some("proxy"))
        .count()
}

/// Ports of the simulators that received the proxied requests, in arrival order.
fn arrival_order(sims: &[&VllmSim]) -> Vec<usize> {
    let mut all: Vec<(std::time::Instant, usize)> = Vec::new();
    for (i, s) in sims.iter().enumerate() {
        for r in s.recorder().all() {
            if r.header("x-via").as_deref() == Some("proxy") {
                all.push((r.at, i));
            }
        }
    }
    all.sort();
    all.into_iter().map(|(_, i)| i).collect()
}

async fn one_request(client: &HttpClient, url: &str, body: String) {
    let (parts, _) = send(client, post(url, body)).await;
    assert_eq!(parts.status, StatusCode::OK);
}

/// Occupies a GPU simulator directly (not through the proxy): one long generation in its
/// only slot and `queued` more waiting behind it. Dropping the handles cancels them.
async fn occupy(sim: &VllmSim, queued: usize) -> Vec<tokio::task::JoinHandle<()>> {
    let mut held = Vec::new();
    for _ in 0..=queued {
        let url = sim.url();
        held.push(tokio::spawn(async move {
            let req = Request::builder()
                .method(Method::POST)
                .uri(format!("{url}/v1/chat/completions"))
                .header("content-type", "application/json")
                .body(full(chat_body("direct", "long job", 100_000)))
                .unwrap();
            let _ = http_client().request(req).await;
        }));
    }
    // The engine's queue is not a counter `wait_until` wakes on: poll it (bounded).
    eventually("the simulator's queue to form", || {
        sim.gpu_stats()
            .is_some_and(|g| g.running == 1 && g.waiting == queued)
    })
    .await;
    held
}

#[tokio::test]
async fn a_replica_with_a_queue_is_avoided_when_signals_are_on() {
    let busy = VllmSim::start(gpu_sim_config(1)).await.unwrap();
    let idle = VllmSim::start(gpu_sim_config(1)).await.unwrap();
    let held = occupy(&busy, 2).await;
    // A long interval: a loaded test machine must not let the signals go stale (2
    // intervals) between the wait below and the requests. The first scrape runs at start.
    let proxy = Proxy::start(&config(
        &[busy.url(), idle.url()],
        "balance = { signals = true, scrape_interval = \"5s\" }",
        false,
    ))
    .await;
    let backends = proxy.upstreams[0].backends().to_vec();
    eventually("signals showing the queue on the busy replica", || {
        let b = backends[0].signals();
        let i = backends[1].signals();
        b.is_some_and(|s| s.waiting >= 2.0) && i.is_some()
    })
    .await;
    let client = http_client();
    for n in 0..6 {
        one_request(
            &client,
            &proxy.url("main"),
            chat_body("s", &format!("q{n}"), 1),
        )
        .await;
    }
    assert_eq!(via_proxy(&busy), 0, "nothing joined the queue");
    assert_eq!(via_proxy(&idle), 6);
    for h in held {
        h.abort();
    }
}

#[tokio::test]
async fn without_balance_requests_rotate_exactly_as_before() {
    for extra in [
        "",
        "balance = { signals = false, affinity = false }",
        // Signals on, but the backends have no /metrics (404): no fresh signals, so the
        // choice falls back to least outstanding.
        "balance = { signals = true, scrape_interval = \"50ms\" }",
    ] {
        let a = VllmSim::start(VllmConfig::default()).await.unwrap();
        let b = VllmSim::start(VllmConfig::default()).await.unwrap();
        let proxy = Proxy::start(&config(&[a.url(), b.url()], extra, false)).await;
        let client = http_client();
        for n in 0..6 {
            one_request(
                &client,
                &proxy.url("main"),
                chat_body("s", "same question", n),
            )
            .await;
        }
        assert_eq!(
            arrival_order(&[&a, &b]),
            [0, 1, 0, 1, 0, 1],
            "with {extra:?}"
        );
        if extra.contains("signals = true") {
            let backend = proxy.upstreams[0].backends()[0].clone();
            eventually("a scrape error counted", || {
                backend.scrape_errors(proxy::upstream::signals::ScrapeError::Status) > 0
            })
            .await;
            assert!(backend.signals().is_none());
        }
    }
}

#[tokio::test]
async fn backends_and_metrics_show_the_signals_their_age_and_scrape_errors() {
    let gpu = VllmSim::start(gpu_sim_config(1)).await.unwrap();
    let plain = VllmSim::start(VllmConfig::default()).await.unwrap();
    let held = occupy(&gpu, 1).await;
    let proxy = Proxy::start(&config(
        &[gpu.url(), plain.url()],
        "balance = { signals = true, affinity = true, scrape_interval = \"50ms\" }",
        true,
    ))
    .await;
    let admin = proxy.admin.expect("admin listener");
    let backends = proxy.upstreams[0].backends().to_vec();
    eventually("a scrape of each backend", || {
        backends[0].signals().is_some_and(|s| s.waiting >= 1.0)
            && backends[1].last_scrape_error().is_some()
    })
    .await;
    let v: Value = serde_json::from_str(&admin_get(admin, "/backends").await).unwrap();
    let up = &v["upstreams"][0];
    let last = &up["backends"][0]["signals"]["last"];
    assert_eq!(last["running"], 1.0, "{v}");
    assert!(last["waiting"].as_f64() >= Some(1.0), "{v}");
    assert!(last["kv_usage"].as_f64().is_some_and(|k| k > 0.0), "{v}");
    assert!(last["age_ms"].as_u64().is_some(), "{v}");
    assert!(last["fresh"].is_boolean(), "{v}");
    assert_eq!(up["backends"][1]["signals"]["last"], Value::Null, "{v}");
    assert_eq!(
        up["backends"][1]["signals"]["last_scrape_error"], "status",
        "{v}"
    );
    assert_eq!(up["affinity"]["hits"], 0, "{v}");

    let s = metrics::scrape(admin).await;
    let (gpu_url, plain_url) = (gpu.url(), plain.url());
    let of = |backend: &str, name: &str| s.get(name, &[("upstream", "u"), ("backend", backend)]);
    assert_eq!(
        of(&gpu_url, "podproxy_backend_engine_running"),
        Some(1.0),
        "{}",
        s.text
    );
    for name in [
        "podproxy_backend_engine_waiting",
        "podproxy_backend_engine_kv_usage",
        "podproxy_backend_signals_age_seconds",
    ] {
        assert!(of(&gpu_url, name).is_some(), "{name}: {}", s.text);
    }
    assert!(
        s.get(
            "podproxy_backend_scrape_errors_total",
            &[
                ("upstream", "u"),
                ("backend", &plain_url),
                ("kind", "status")
            ]
        )
        .is_some_and(|v| v != 0.0),
        "{}",
        s.text
    );
    assert_eq!(
        s.get(
            "podproxy_affinity_decisions_total",
            &[("upstream", "u"), ("outcome", "hit")]
        ),
        Some(0.0),
        "{}",
        s.text
    );
    for h in held {
        h.abort();
    }
}

/// Index of the simulator that received the last proxied request.
fn last_target(sims: &[VllmSim]) -> usize {
    let mut best: Option<(std::time::Instant, usize)> = None;
    for (i, s) in sims.iter().enumerate() {
        for r in s.recorder().all() {
            if r.header("x-via").as_deref() == Some("proxy") && best.is_none_or(|(t, _)| r.at > t) {
                best = Some((r.at, i));
            }
        }
    }
    best.map(|(_, i)| i).expect("a proxied request")
}

/// One conversation of a tenant: the same system prompt and first question, a growing
/// history.
fn tenant_turn(tenant: &str, turn: usize, max_tokens: u64) -> String {
    let mut messages = vec![
        json!({"role": "system", "content": format!("You are {tenant}'s assistant. Be brief.")}),
        json!({"role": "user", "content": "first question"}),
    ];
    for t in 0..turn {
        messages.push(json!({"role": "assistant", "content": format!("answer {t}")}));
        messages.push(json!({"role": "user", "content": format!("follow-up {t}")}));
    }
    json!({"model": "m", "max_tokens": max_tokens, "messages": messages}).to_string()
}

#[tokio::test]
async fn a_tenant_stays_on_its_replica_until_it_is_overloaded() {
    let sims = [
        VllmSim::start(gpu_sim_config(1)).await.unwrap(),
        VllmSim::start(gpu_sim_config(1)).await.unwrap(),
        VllmSim::start(gpu_sim_config(1)).await.unwrap(),
        VllmSim::start(gpu_sim_config(1)).await.unwrap(),
    ];
    let urls: Vec<String> = sims.iter().map(|s| s.url()).collect();
    let proxy = Proxy::start(&config(
        &urls,
        // A long interval, so signals stay fresh (10 s) on a loaded machine.
        "max_concurrent = 2\nbalance = { signals = true, affinity = true, scrape_interval = \"5s\" }",
        false,
    ))
    .await;
    let up = proxy.upstreams[0].clone();
    let url = proxy.url("main");
    let client = http_client();

    // Every turn of the conversation goes to one replica, whatever the others' load.
    one_request(&client, &url, tenant_turn("acme", 0, 1)).await;
    let home = last_target(&sims);
    for turn in 1..6 {
        one_request(&client, &url, tenant_turn("acme", turn, 1)).await;
        assert_eq!(last_target(&sims), home, "turn {turn} left its replica");
    }
    let counts = up.affinity_counts();
    assert_eq!(counts.hits.load(std::sync::atomic::Ordering::Relaxed), 6);

    // Overloaded, 1: its replica is at max_concurrent (two long streams of the tenant).
    let mut held = Vec::new();
    for _ in 0..2 {
        let (client, url) = (client.clone(), url.clone());
        held.push(tokio::spawn(async move {
            let _ = client
                .request(post(&url, tenant_turn("acme", 0, 100_000)))
                .await;
        }));
    }
    let home_backend = up.backends()[home].clone();
    eventually("the tenant's replica at its cap", || {
        home_backend.in_flight() == 2
    })
    .await;
    one_request(&client, &url, tenant_turn("acme", 6, 1)).await;
    assert_ne!(
        last_target(&sims),
        home,
        "the load guard moves a full replica's tenant"
    );
    assert_eq!(
        counts
            .overrides_full
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    for h in held.drain(..) {
        h.abort();
    }
    eventually("the long streams released", || {
        home_backend.in_flight() == 0
    })
    .await;
    one_request(&client, &url, tenant_turn("acme", 7, 1)).await;
    assert_eq!(last_target(&sims), home, "back home once it has room");

    // Overloaded, 2: the engine behind it has a queue (other clients), so its score is far
    // above the others' (more than the margin).
    let direct = occupy(&sims[home], 2).await;
    let backends = up.backends().to_vec();
    eventually("fresh signals showing the queue", || {
        let now = std::time::Instant::now();
        backends.iter().enumerate().all(|(i, b)| {
            b.signals().is_some_and(|s| {
                proxy::upstream::score::is_fresh(&s, now, Duration::from_secs(5))
                    && (i != home || s.waiting >= 2.0)
            })
        })
    })
    .await;
    one_request(&client, &url, tenant_turn("acme", 8, 1)).await;
    assert_ne!(
        last_target(&sims),
        home,
        "the load guard leaves a queued engine"
    );
    assert_eq!(
        counts
            .overrides_margin
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    for h in direct {
        h.abort();
    }
}

#[tokio::test]
async fn bodies_without_a_prompt_take_the_plain_policy_and_every_body_arrives_whole() {
    let a = VllmSim::start(VllmConfig::default()).await.unwrap();
    let b = VllmSim::start(VllmConfig::default()).await.unwrap();
    let proxy = Proxy::start(&config(
        &[a.url(), b.url()],
        "balance = { affinity = true, affinity_prefix_bytes = 1024 }",
        false,
    ))
    .await;
    let client = http_client();
    let url = proxy.url("main");
    // Same key four times: one backend.
    for _ in 0..4 {
        one_request(&client, &url, tenant_turn("acme", 0, 1)).await;
    }
    let sims = [a, b];
    let home = last_target(&sims);
    assert_eq!(via_proxy(&sims[home]), 4);
    // No prompt (a JSON object without messages/prompt): rotation as before.
    let before: Vec<usize> = sims.iter().map(via_proxy).collect();
    for n in 0..4 {
        let req = Request::builder()
            .method(Method::POST)
            .uri(format!("{url}/v1/completions"))
            .header("x-via", "proxy")
            .body(full(format!("{{\"max_tokens\": {n}}}")))
            .unwrap();
        let (parts, _) = send(&client, req).await;
        assert_eq!(parts.status, StatusCode::OK);
    }
    let after: Vec<usize> = sims.iter().map(via_proxy).collect();
    assert_eq!([after[0] - before[0], after[1] - before[1]], [2, 2]);
    // A body far beyond the prefix that is read: relayed byte for byte.
    let long = "word ".repeat(40_000);
    let body = json!({"model": "m", "max_tokens": 1, "messages": [
        {"role": "system", "content": long}, {"role": "user", "content": "q"}]})
    .to_string();
    let sent = body.clone();
    one_request(&client, &url, body).await;
    let got = sims
        .iter()
        .filter_map(|s| s.recorder().last())
        .find(|r| r.body_len == sent.len() as u64)
        .expect("the long body arrived");
    assert_eq!(got.body, sent.as_bytes());
}
