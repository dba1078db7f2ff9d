//! Operating podproxy, end to end through the admin API:
//! exact Prometheus counts after a known set of requests (bounded labels, no raw paths or
//! request ids), readiness that follows backend health, `/backends`, the redacted `/config`,
//! the admin token; config reloads (`POST /reload`, SIGHUP to the real binary) under
//! continuous load with bad files rejected, streams finishing on the config they started
//! with, listeners added and removed; and `config/grafana-dashboard.json` querying only
//! metrics that a real scrape contains.
//!
//! Metrics are recorded when an exchange ends (its response body is over), which can be a
//! moment after the client saw the end: counts are awaited (bounded), never assumed.

mod support;

use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::metrics::{scrape, scrape_until, scrape_with, Scrape};
use support::*;
use testkit::client::{empty, full, http_client, TkBody};
use testkit::echo::EchoServer;
use testkit::mlnode::{MlnodeConfig, MlnodeSim};
use testkit::vllm::{VllmConfig, VllmSim};

// ---------------------------------------------------------------------------------------
// Request helpers (admin API and `/metrics` scrapes: `support::admin`, `support::metrics`)
// ---------------------------------------------------------------------------------------

fn get(url: String) -> Request<TkBody> {
    Request::get(url).body(empty()).unwrap()
}

/// A complete, clean vLLM stream: token events with seq 0..tokens in order, then `[DONE]`.
fn assert_complete_stream(text: &str, tokens: usize) {
    let events: Vec<&str> = text
        .split_terminator("\n\n")
        .map(|e| e.strip_prefix("data: ").unwrap_or(e))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{text}");
    let seqs: Vec<u64> = events[..events.len() - 1]
        .iter()
        .map(|e| {
            let v: Value = serde_json::from_str(e).unwrap_or_else(|_| panic!("bad event {e:?}"));
            v["seq"].as_u64().expect("seq")
        })
        .collect();
    assert_eq!(seqs, (0..tokens as u64).collect::<Vec<_>>(), "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
}

/// Whether `server` received a request for exactly `target`.
fn received(rec: &testkit::Recorder, target: &str) -> bool {
    rec.all().iter().any(|r| r.target == target)
}

fn received_prefix(rec: &testkit::Recorder, prefix: &str) -> bool {
    rec.all().iter().any(|r| r.target.starts_with(prefix))
}

/// A request for `path` on a fresh connection; returns which of `(a, b)` served it.
async fn served_by(base: &str, path: &str, a: &EchoServer, b: &EchoServer) -> char {
    let (parts, body) = send(&http_client(), get(format!("{base}{path}"))).await;
    assert_eq!(parts.status, StatusCode::OK, "{path}: {body:?}");
    match (received(&a.recorder(), path), received(&b.recorder(), path)) {
        (true, false) => 'a',
        (false, true) => 'b',
        other => panic!("{path} reached {other:?}"),
    }
}

/// podproxy in process from `toml` written to `<name>.toml` in the test's scratch folder:
/// `POST /reload` and the reloader (what SIGHUP uses) read that file again.
async fn start_reloadable(name: &str, toml: &str) -> Proxy {
    let proxy = Proxy::start_file(&scratch_file(&format!("{name}.toml"), toml)).await;
    assert!(proxy.admin.is_some(), "the test config has [admin]");
    proxy
}

/// Writes `toml` over the config file and reloads through `POST /reload`.
async fn reload(proxy: &Proxy, toml: &str) -> (StatusCode, Value) {
    proxy.write_config(toml);
    let (status, _, body) = admin(proxy.admin.unwrap(), Method::POST, "/reload", None).await;
    let v = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("/reload answer is not JSON ({e}): {body}"));
    (status, v)
}

/// Writes `toml` and reloads through the `Reloader` (the path SIGHUP takes).
async fn reload_direct(proxy: &Proxy, toml: &str) -> Result<(), String> {
    proxy.write_config(toml);
    bounded("reload", proxy.reloader.reload()).await
}

// ---------------------------------------------------------------------------------------
// 1. Metrics: exact counts after a known set of requests
// ---------------------------------------------------------------------------------------

/// Token events of the metered stream; with `[DONE]` the stream has `STREAM_TOKENS + 1`
/// events and `STREAM_TOKENS` gaps between them.
const STREAM_TOKENS: usize = 8;

fn metrics_toml(vllm: &str, echo: &str, dead: &str) -> String {
    format!(
        r#"
[admin]
bind = "127.0.0.1:0"

[listeners.main]
bind = "127.0.0.1:0"
routes = [
  {{ prefix = "/v1/", upstream = "vllm" }},
  {{ prefix = "/dead/", upstream = "dead" }},
  {{ prefix = "/", upstream = "echo" }},
]

[upstreams.vllm]
urls = "{vllm}"

[upstreams.echo]
urls = "{echo}"

[upstreams.dead]
urls = "{dead}"
health = {{ enabled = false }}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_exactly_the_requests_that_went_through() {
    let vllm = VllmSim::start(VllmConfig::default()).await.unwrap();
    let echo = EchoServer::start().await.unwrap();
    // A closed port: connecting is refused at once.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let proxy = Proxy::start(&metrics_toml(&vllm.url(), &echo.url(), &dead)).await;
    let admin_addr = proxy.admin.expect("admin listener");
    let base = proxy.url("main");
    let client = http_client();

    // Everything the client was sent as response bodies, and every request id it got back.
    let mut delivered = 0u64;
    let mut request_ids = Vec::new();
    let mut note = |parts: &http::response::Parts, body_len: usize| {
        delivered += body_len as u64;
        let id = parts.headers["x-request-id"].to_str().unwrap().to_string();
        assert!(id.len() >= 8, "{id}");
        request_ids.push(id);
    };

    // 3 × 2xx and one 4xx answered by the backend (route "/").
    for i in 0..3 {
        let (parts, body) = send(&client, get(format!("{base}/plain/{i}?token=hunter2"))).await;
        assert_eq!(parts.status, StatusCode::OK);
        note(&parts, body.len());
    }
    let (parts, body) = send(&client, get(format!("{base}/status/404"))).await;
    assert_eq!(parts.status, StatusCode::NOT_FOUND);
    note(&parts, body.len());

    // One 502: the upstream cannot be reached (route "/dead/").
    let (parts, body) = send(&client, get(format!("{base}/dead/x"))).await;
    assert_eq!(parts.status, StatusCode::BAD_GATEWAY);
    let err: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(err["error"]["type"], "upstream_connect", "{err}");
    note(&parts, body.len());

    // One SSE stream with a secret in the query and a client-chosen request id (route "/v1/").
    let secret = "qsecret-5f0c2e9a";
    let rid = "rid-operate-7d41b08c";
    let payload = chat_json(STREAM_TOKENS);
    let req = Request::post(format!("{base}/v1/chat/completions?x={secret}"))
        .header("content-type", "application/json")
        .header("x-request-id", rid)
        // 8 × 100 ms: long enough to look at it in flight.
        .header("x-sim-interval-ms", "100")
        .body(full(payload.clone()))
        .unwrap();
    let (parts, body, seen) = open_stream(&client, req).await;
    assert_eq!(parts.headers["x-request-id"], rid);

    // While it runs: one stream and one request in flight, and the exchange not yet counted.
    let mid = scrape(admin_addr).await;
    assert_eq!(
        mid.value("podproxy_streams_in_flight", &[("listener", "main")]),
        1.0
    );
    assert_eq!(
        mid.value("podproxy_backend_in_flight", &[("upstream", "vllm")]),
        1.0
    );
    assert_eq!(
        mid.get("podproxy_requests_total", &[("route", "/v1/")]),
        None
    );

    let text = read_rest(body, seen).await.expect("clean stream");
    assert_complete_stream(&text, STREAM_TOKENS);
    delivered += text.len() as u64;
    request_ids.push(rid.to_string());

    let s = scrape_until(admin_addr, "all six exchanges recorded", |s| {
        // The backend slot is released just after the exchange is counted.
        s.get("podproxy_requests_total", &[]) == Some(6.0)
            && s.get("podproxy_streams_in_flight", &[]) == Some(0.0)
            && s.get("podproxy_backend_in_flight", &[]) == Some(0.0)
    })
    .await;

    // Requests by route and status class.
    let req = |route: &str, status: &str| {
        s.value(
            "podproxy_requests_total",
            &[("listener", "main"), ("route", route), ("status", status)],
        )
    };
    assert_eq!(req("/", "2xx"), 3.0);
    assert_eq!(req("/", "4xx"), 1.0);
    assert_eq!(req("/dead/", "5xx"), 1.0);
    assert_eq!(req("/v1/", "2xx"), 1.0);
    assert_eq!(
        s.value(
            "podproxy_request_duration_seconds_count",
            &[("listener", "main")]
        ),
        6.0
    );

    // Time to the upstream's response head: every exchange that got one, per upstream.
    assert_eq!(
        s.value(
            "podproxy_upstream_ttfb_seconds_count",
            &[("upstream", "echo")]
        ),
        4.0
    );
    assert_eq!(
        s.value(
            "podproxy_upstream_ttfb_seconds_count",
            &[("upstream", "vllm")]
        ),
        1.0
    );
    assert_eq!(
        s.get(
            "podproxy_upstream_ttfb_seconds_count",
            &[("upstream", "dead")]
        ),
        None
    );

    // The stream: N token events + [DONE], and N gaps between them.
    let vl = [("upstream", "vllm")];
    assert_eq!(s.value("podproxy_sse_events_per_stream_count", &vl), 1.0);
    assert_eq!(
        s.value("podproxy_sse_events_per_stream_sum", &vl),
        (STREAM_TOKENS + 1) as f64
    );
    assert_eq!(
        s.value("podproxy_sse_event_gap_seconds_count", &vl),
        STREAM_TOKENS as f64
    );
    assert_eq!(
        s.value(
            "podproxy_sse_event_gap_seconds_bucket",
            &[("upstream", "vllm"), ("le", "+Inf")]
        ),
        STREAM_TOKENS as f64
    );
    let gap_sum = s.value("podproxy_sse_event_gap_seconds_sum", &vl);
    assert!(gap_sum > 0.0, "gap sum {gap_sum}");
    assert_eq!(
        s.get(
            "podproxy_sse_events_per_stream_count",
            &[("upstream", "echo")]
        ),
        None,
        "a JSON response is not a stream"
    );

    // Upstream errors: exactly the refused connect.
    assert_eq!(
        s.value(
            "podproxy_upstream_errors_total",
            &[("upstream", "dead"), ("kind", "upstream_connect")]
        ),
        1.0
    );
    assert_eq!(s.value("podproxy_upstream_errors_total", &[]), 1.0);

    // Bytes: the stream's request body in, every response body byte out.
    assert_eq!(
        s.value("podproxy_received_bytes_total", &[("listener", "main")]),
        payload.len() as f64
    );
    assert_eq!(
        s.value("podproxy_sent_bytes_total", &[("listener", "main")]),
        delivered as f64
    );

    // Backends: nothing in flight, the live ones healthy, requests per backend.
    for (up, url) in [("vllm", vllm.url()), ("echo", echo.url())] {
        let l = [("upstream", up), ("backend", url.as_str())];
        assert_eq!(s.value("podproxy_backend_in_flight", &l), 0.0, "{up}");
        assert_eq!(s.value("podproxy_backend_healthy", &l), 1.0, "{up}");
    }
    assert_eq!(s.value("podproxy_backend_in_flight", &[]), 0.0);
    let reqs = |up: &str| s.value("podproxy_backend_requests", &[("upstream", up)]);
    assert_eq!((reqs("echo"), reqs("vllm"), reqs("dead")), (4.0, 1.0, 1.0));

    // No PoC traffic, no reload: counters at zero / absent.
    assert_eq!(s.value("podproxy_poc_callback_rewritten_total", &[]), 0.0);
    assert_eq!(s.value("podproxy_poc_callback_refused_total", &[]), 0.0);
    assert_eq!(s.get("podproxy_config_reloads_total", &[]), None);

    // Bounded labels: no raw path, query, or request id anywhere in the exposition.
    for needle in [
        secret,
        "hunter2",
        "/plain",
        "chat/completions",
        "/status/404",
        "/dead/x",
    ]
    .into_iter()
    .chain(request_ids.iter().map(String::as_str))
    {
        assert!(
            !s.text.contains(needle),
            "{needle:?} leaked into /metrics:\n{}",
            s.text
        );
    }
    let backends = [vllm.url(), echo.url(), dead.clone()];
    for sample in &s.samples {
        for (k, v) in &sample.labels {
            let ok = match k.as_str() {
                "listener" => v == "main",
                "route" => ["/v1/", "/dead/", "/", "-"].contains(&v.as_str()),
                "status" => v.len() == 3 && v.ends_with("xx"),
                "upstream" => ["vllm", "echo", "dead", ""].contains(&v.as_str()),
                "backend" => backends.contains(v),
                "kind" => v.starts_with("upstream_") || v == "stream_aborted",
                "le" => v == "+Inf" || v.parse::<f64>().is_ok(),
                _ => false,
            };
            assert!(ok, "unexpected label {k}={v:?} on {}", sample.name);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poc_rewrites_refusals_and_relayed_callbacks_are_counted() {
    let mlnode = MlnodeSim::start(MlnodeConfig::default()).await.unwrap();
    let proxy = Proxy::start(&format!(
        r#"
[admin]
bind = "127.0.0.1:0"

[listeners.poc]
bind = "127.0.0.1:0"
strip_version_prefix = true
routes = [{{ prefix = "/", upstream = "mlnode", poc = true }}]

[upstreams.mlnode]
urls = "{}"

[poc]
callback_origin = "http://203.0.113.7:9100"
"#,
        mlnode.url()
    ))
    .await;
    let admin_addr = proxy.admin.unwrap();
    let base = proxy.url("poc");
    let client = http_client();
    let post = |path: &str, body: &str| {
        Request::post(format!("{base}{path}"))
            .body(full(body.to_string()))
            .unwrap()
    };

    // Two foreign callbacks pointed at the Network Node.
    for path in [
        "/v3.0.8/api/v1/pow/init/generate",
        "/api/v1/inference/pow/init/generate",
    ] {
        let (parts, _) = send(
            &client,
            post(path, r#"{"node_id":1,"url":"http://api:9100/v1/poc"}"#),
        )
        .await;
        assert_eq!(parts.status, StatusCode::OK, "{path}");
        let got = last_proxied(&mlnode.recorder()).unwrap().body_str();
        assert!(
            got.contains(r#""url":"http://203.0.113.7:9100/v1/poc""#),
            "{got}"
        );
    }
    // A callback url that is not a string: refused, never forwarded.
    let (parts, _) = send(&client, post("/api/v1/pow/init/generate", r#"{"url":5}"#)).await;
    assert_eq!(parts.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        proxied(&mlnode.recorder()).len(),
        2,
        "a refused body was forwarded"
    );
    // A PoC result callback through the listener.
    let (parts, _) = send(
        &client,
        post("/v2/poc-batches/Qwen%252FQwen3-32B-FP8", "{}"),
    )
    .await;
    assert_eq!(
        parts.status,
        StatusCode::NOT_FOUND,
        "the sim has no such endpoint"
    );

    let s = scrape_until(admin_addr, "four PoC exchanges recorded", |s| {
        s.get("podproxy_requests_total", &[]) == Some(4.0)
    })
    .await;
    assert_eq!(s.value("podproxy_poc_callback_rewritten_total", &[]), 2.0);
    assert_eq!(s.value("podproxy_poc_callback_refused_total", &[]), 1.0);
    assert_eq!(
        s.value("podproxy_callbacks_relayed_total", &[("listener", "poc")]),
        1.0
    );
    let req = |status: &str| {
        s.value(
            "podproxy_requests_total",
            &[("listener", "poc"), ("route", "/"), ("status", status)],
        )
    };
    assert_eq!((req("2xx"), req("4xx")), (2.0, 2.0));
    // Listed from the start at 0; a refused PoC body does not count.
    for kind in [
        "upstream_connect",
        "upstream_broken",
        "upstream_timeout",
        "stream_aborted",
    ] {
        assert_eq!(
            s.get("podproxy_upstream_errors_total", &[("kind", kind)]),
            Some(0.0),
            "a refused PoC body is not an upstream error ({kind})"
        );
    }
    let series = s.series();
    for needle in ["poc-batches", "Qwen", "api:9100", "203.0.113.7", "pow/init"] {
        assert!(
            !series.contains(needle),
            "{needle:?} leaked into /metrics:\n{series}"
        );
    }
}

/// Events that reach podproxy several to one upstream frame are events all the same: the
/// gap histogram must count one gap per event after the first (those gaps are ~0), or
/// inter-token latency looks worse than it is exactly when tokens arrive in bursts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_gap_histogram_counts_every_event_of_a_batched_frame() {
    // A backend that sends 3 events in one chunk, then 2 more (the last is [DONE]) in another.
    let backend = RawBackend::start(|mut s| async move {
        use tokio::io::AsyncWriteExt;
        let mut buf = Vec::new();
        if read_request(&mut s, &mut buf).await.is_none() {
            return;
        }
        let chunk = |text: &str| format!("{:x}\r\n{text}\r\n", text.len());
        let mut out = String::from(
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n",
        );
        // hyper hands each chunk to podproxy as one frame, however the bytes arrive.
        out.push_str(&chunk("data: {\"seq\":0}\n\ndata: {\"seq\":1}\n\ndata: {\"seq\":2}\n\n"));
        out.push_str(&chunk("data: {\"seq\":3}\n\ndata: [DONE]\n\n"));
        out.push_str("0\r\n\r\n");
        let _ = s.write_all(out.as_bytes()).await;
        let _ = s.flush().await;
    })
    .await;
    let proxy = Proxy::start(&format!(
        "[admin]\nbind = \"127.0.0.1:0\"\n\n[listeners.main]\nbind = \"127.0.0.1:0\"\nroutes = [{{ prefix = \"/\", upstream = \"raw\" }}]\n\n[upstreams.raw]\nurls = \"{}\"\nhealth = {{ enabled = false }}\n",
        backend.url()
    ))
    .await;
    let (parts, body) = send(&http_client(), get(format!("{}/sse", proxy.url("main")))).await;
    assert_eq!(parts.status, StatusCode::OK);
    assert_eq!(String::from_utf8_lossy(&body).matches("\n\n").count(), 5);
    let s = scrape_until(proxy.admin.unwrap(), "the stream recorded", |s| {
        s.get("podproxy_sse_events_per_stream_count", &[]) == Some(1.0)
    })
    .await;
    assert_eq!(s.value("podproxy_sse_events_per_stream_sum", &[]), 5.0);
    assert_eq!(
        s.value("podproxy_sse_event_gap_seconds_count", &[]),
        4.0,
        "5 events have 4 gaps"
    );
}

// ---------------------------------------------------------------------------------------
// 2. Readiness, /backends, /config, admin token
// ---------------------------------------------------------------------------------------

const ADMIN_TOKEN: &str = "admin-token-9c1f0e7b55d24a83";
const CLIENT_TOKEN: &str = "client-token-3e8d2a61f0b47c19";

fn guarded_toml(vllm: &str) -> String {
    format!(
        r#"
[admin]
bind = "127.0.0.1:0"
token = "{ADMIN_TOKEN}"

[listeners.inference]
bind = "127.0.0.1:0"
tokens = ["{CLIENT_TOKEN}"]
routes = [{{ prefix = "/", upstream = "vllm" }}]

[upstreams.vllm]
urls = "{vllm}"
health = {{ interval = "100ms", timeout = "200ms", failures = 1 }}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_token_guards_every_endpoint() {
    let vllm = VllmSim::start(VllmConfig::default()).await.unwrap();
    let proxy = Proxy::start(&guarded_toml(&vllm.url())).await;
    let addr = proxy.admin.unwrap();
    let endpoints = [
        (Method::GET, "/healthz"),
        (Method::GET, "/readyz"),
        (Method::GET, "/metrics"),
        (Method::GET, "/backends"),
        (Method::GET, "/config"),
        (Method::POST, "/reload"),
    ];
    for (method, path) in &endpoints {
        for token in [
            None,
            Some("wrong-token-0000000000000000"),
            Some(CLIENT_TOKEN),
        ] {
            let (status, _, body) = admin(addr, method.clone(), path, token).await;
            assert_eq!(
                status,
                StatusCode::UNAUTHORIZED,
                "{method} {path} with {token:?}: {body}"
            );
            assert!(!body.contains(ADMIN_TOKEN), "{body}");
        }
    }
    for (method, path) in &endpoints[..5] {
        let (status, _, body) = admin(addr, method.clone(), path, Some(ADMIN_TOKEN)).await;
        assert_eq!(status, StatusCode::OK, "{method} {path}: {body}");
    }
    // The token is right, so /reload is answered, and refuses: this process has no file.
    let (status, _, body) = admin(addr, Method::POST, "/reload", Some(ADMIN_TOKEN)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    // The proxied listener's gate is its own: the admin token opens nothing there.
    let req = Request::get(format!("{}/v1/models", proxy.url("inference")))
        .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
        .body(empty())
        .unwrap();
    let (parts, _) = send(&http_client(), req).await;
    assert_eq!(parts.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_backends_and_config_follow_the_backend() {
    let cfg = VllmConfig {
        token_interval: Duration::from_millis(20),
        ..Default::default()
    };
    let vllm = VllmSim::start(cfg.clone()).await.unwrap();
    let vllm_addr = vllm.addr();
    let vllm_url = vllm.url();
    let proxy = Proxy::start(&guarded_toml(&vllm_url)).await;
    let addr = proxy.admin.unwrap();
    let tok = Some(ADMIN_TOKEN);
    let base = proxy.url("inference");
    let client = http_client();
    let authed = |req: Request<TkBody>| {
        let (mut parts, body) = req.into_parts();
        parts.headers.insert(
            "authorization",
            format!("Bearer {CLIENT_TOKEN}").parse().unwrap(),
        );
        Request::from_parts(parts, body)
    };
    let healthz = || async move {
        let (status, v) = admin_json(addr, "/healthz", tok).await;
        assert_eq!((status, v), (StatusCode::OK, json!({"status": "ok"})));
    };

    // Up: ready once the first health round has answered, one healthy backend with
    // nothing in flight.
    healthz().await;
    let ready = admin_until(
        addr,
        "/readyz",
        tok,
        "ready after the first health round",
        |s, _| s == StatusCode::OK,
    )
    .await;
    assert_eq!(ready, json!({"ready": true, "not_ready": []}));
    let (status, mut b) = admin_json(addr, "/backends", tok).await;
    assert_eq!(status, StatusCode::OK);
    // 0, or 1 once the first health check's connection is parked.
    let idle = b["upstreams"][0]["backends"][0]
        .as_object_mut()
        .and_then(|o| o.remove("idle_connections"));
    assert!(
        matches!(idle.as_ref().and_then(|v| v.as_u64()), Some(0 | 1)),
        "{idle:?}"
    );
    assert_eq!(
        b,
        json!({"upstreams": [{"name": "vllm", "ready": true, "queued": 0, "backends": [
            {"url": vllm_url, "healthy": true, "in_flight": 0, "requests": 0, "last_error": null}
        ]}]})
    );

    // A stream in flight shows on its backend, and is released when it ends.
    let (_, body, seen) = open_stream(
        &client,
        authed(streaming_chat(
            format!("{base}/v1/chat/completions"),
            10,
            60,
        )),
    )
    .await;
    let (_, b) = admin_json(addr, "/backends", tok).await;
    let backend = &b["upstreams"][0]["backends"][0];
    assert_eq!(
        (&backend["in_flight"], &backend["requests"]),
        (&json!(1), &json!(1)),
        "{b}"
    );
    assert_complete_stream(&read_rest(body, seen).await.unwrap(), 10);
    admin_until(
        addr,
        "/backends",
        tok,
        "the stream's slot released and its connection parked",
        |_, b| {
            let backend = &b["upstreams"][0]["backends"][0];
            backend["in_flight"] == 0 && backend["idle_connections"].as_u64() >= Some(1)
        },
    )
    .await;

    // The effective config: every default filled in, secrets redacted.
    let (status, headers, text) = admin(addr, Method::GET, "/config", tok).await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    assert!(
        !text.contains(CLIENT_TOKEN),
        "listener token printed:\n{text}"
    );
    assert!(!text.contains(ADMIN_TOKEN), "admin token printed:\n{text}");
    assert!(text.contains("<redacted>"), "{text}");
    assert!(text.contains(&vllm_url), "{text}");
    // Saved as it is, the printed config refuses to load, naming the placeholder's key
    // (a placeholder must never become a working token); with the secrets put back, it
    // loads again with every other setting intact.
    let e = proxy::Config::from_toml(&text).unwrap_err().to_string();
    assert!(e.contains("listeners.inference.tokens[0]"), "{e}");
    assert!(e.contains("admin.token"), "{e}");
    let restored = text
        .replacen("\"<redacted>\"", &format!("\"{CLIENT_TOKEN}\""), 1)
        .replacen("\"<redacted>\"", &format!("\"{ADMIN_TOKEN}\""), 1);
    let reparsed = proxy::Config::from_toml(&restored)
        .unwrap_or_else(|e| panic!("/config does not load again: {e}\n{restored}"));
    assert_eq!(reparsed.listeners[0].gate.tokens, [CLIENT_TOKEN]);
    assert_eq!(
        reparsed.upstreams[0].health.interval,
        Duration::from_millis(100)
    );

    // The only backend dies: not ready, naming the upstream; alive all the same.
    vllm.kill();
    let ready = admin_until(addr, "/readyz", tok, "not ready", |s, _| {
        s == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    assert_eq!(ready, json!({"ready": false, "not_ready": ["vllm"]}));
    healthz().await;
    let (_, b) = admin_json(addr, "/backends", tok).await;
    let up = &b["upstreams"][0];
    assert_eq!(
        (&up["ready"], &up["backends"][0]["healthy"]),
        (&json!(false), &json!(false)),
        "{b}"
    );
    let last_error = up["backends"][0]["last_error"].as_str().unwrap_or_default();
    assert!(!last_error.is_empty(), "no last_error: {b}");
    let s = scrape_with(addr, tok).await;
    assert_eq!(
        s.value("podproxy_backend_healthy", &[("upstream", "vllm")]),
        0.0
    );
    let (parts, _) = send(&client, authed(get(format!("{base}/v1/models")))).await;
    assert_eq!(parts.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(parts.headers.contains_key("retry-after"));

    // It comes back on the same port: ready again.
    let deadline = Instant::now() + WAIT;
    let _revived = loop {
        // The killed listener closes asynchronously; the port is free a moment later.
        match VllmSim::start_on(vllm_addr, cfg.clone()).await {
            Ok(v) => break v,
            Err(e) => {
                assert!(Instant::now() < deadline, "cannot rebind {vllm_addr}: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let ready = admin_until(addr, "/readyz", tok, "ready again", |s, _| {
        s == StatusCode::OK
    })
    .await;
    assert_eq!(ready, json!({"ready": true, "not_ready": []}));
    healthz().await;
    let (_, b) = admin_json(addr, "/backends", tok).await;
    assert_eq!(b["upstreams"][0]["backends"][0]["healthy"], true, "{b}");
    let (parts, _) = send(&client, authed(get(format!("{base}/v1/models")))).await;
    assert_eq!(parts.status, StatusCode::OK);
}

// ---------------------------------------------------------------------------------------
// 3. Reloads
// ---------------------------------------------------------------------------------------

fn one_route_toml(backend: &str) -> String {
    format!(
        r#"
[admin]
bind = "127.0.0.1:0"

[listeners.main]
bind = "127.0.0.1:0"
routes = [{{ prefix = "/", upstream = "u" }}]

[upstreams.u]
urls = "{backend}"
"#
    )
}

/// Rejected reloads: a file that is not TOML, and one naming an upstream that does not exist.
fn bad_toml(which: usize, backend: &str) -> (String, &'static [&'static str]) {
    if which == 0 {
        ("[listeners.main\nbind = ".to_string(), &["(toml)"])
    } else {
        (
            one_route_toml(backend).replace("upstream = \"u\"", "upstream = \"nope\""),
            &["listeners.main.routes[0].upstream", "\"nope\""],
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_reloads_under_load_lose_no_request() {
    const WORKERS: u64 = 4;
    const RELOADS: usize = 20;
    let a = EchoServer::start().await.unwrap();
    let b = EchoServer::start().await.unwrap();
    let live = start_reloadable("load", &one_route_toml(&a.url())).await;
    let base = live.url("main");

    // Clients until the reloads are over: even workers keep one pooled connection, odd
    // ones open a new connection per request. Every answer must be the echo of its path.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let (stop, ok, failures, base) = (stop.clone(), ok.clone(), failures.clone(), base.clone());
        workers.push(tokio::spawn(async move {
            let pooled = http_client();
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let client = if w % 2 == 0 {
                    pooled.clone()
                } else {
                    http_client()
                };
                let path = format!("/load/{w}/{n}");
                n += 1;
                let exchange = async {
                    let resp = client
                        .request(get(format!("{base}{path}")))
                        .await
                        .map_err(|e| format!("request: {e:?}"))?;
                    let status = resp.status();
                    let body = resp
                        .into_body()
                        .collect()
                        .await
                        .map_err(|e| format!("body: {e}"))?
                        .to_bytes();
                    Ok::<_, String>((status, body))
                };
                let outcome = match tokio::time::timeout(WAIT, exchange).await {
                    Ok(Ok((status, body))) => {
                        let target = serde_json::from_slice::<Value>(&body)
                            .ok()
                            .and_then(|v| v["target"].as_str().map(str::to_string));
                        if status == StatusCode::OK && target.as_deref() == Some(path.as_str()) {
                            Ok(())
                        } else {
                            Err(format!("{status} {}", String::from_utf8_lossy(&body)))
                        }
                    }
                    Ok(Err(e)) => Err(e),
                    Err(_) => Err(format!("no answer within {WAIT:?}")),
                };
                match outcome {
                    Ok(()) => {
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => failures.lock().unwrap().push(format!("{path}: {e}")),
                }
            }
        }));
    }
    let count = ok.clone();
    eventually("the load is running", move || {
        count.load(Ordering::SeqCst) >= 8
    })
    .await;

    let mut current = 'a';
    let mut rejected = 0;
    for k in 0..RELOADS {
        if k == 7 || k == 14 {
            // A bad file in the middle: 422 with the reason, and the old config serves on.
            let (text, reasons) = bad_toml(rejected, &b.url());
            let (status, v) = reload(&live, &text).await;
            assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
            assert_eq!(v["reloaded"], false, "{v}");
            let error = v["error"].as_str().unwrap_or_default();
            for reason in reasons {
                assert!(error.contains(reason), "reason {reason:?} missing: {v}");
            }
            rejected += 1;
            assert_eq!(
                served_by(&base, &format!("/after-bad/{k}"), &a, &b).await,
                current,
                "a rejected reload changed the routing"
            );
        }
        let (next, url) = if k % 2 == 0 {
            ('b', b.url())
        } else {
            ('a', a.url())
        };
        let (status, v) = reload(&live, &one_route_toml(&url)).await;
        assert_eq!((status, &v), (StatusCode::OK, &json!({"reloaded": true})));
        current = next;
        // New connections get the new upstream at once.
        assert_eq!(
            served_by(&base, &format!("/probe/{k}"), &a, &b).await,
            current
        );
        // Some load on every config before the next reload.
        let seen = ok.load(Ordering::SeqCst);
        let count = ok.clone();
        eventually("load continues after the reload", move || {
            count.load(Ordering::SeqCst) >= seen + WORKERS
        })
        .await;
    }
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        bounded("worker stops", w).await.unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} of {} requests failed: {failures:#?}",
        failures.len(),
        failures.len() as u64 + ok.load(Ordering::SeqCst)
    );
    assert!(ok.load(Ordering::SeqCst) >= 2 * RELOADS as u64);
    for (name, server) in [("a", &a), ("b", &b)] {
        assert!(
            received_prefix(&server.recorder(), "/load/"),
            "no load request reached {name}"
        );
    }

    // Nothing left in flight once the last exchange is over.
    let s = scrape_until(live.admin.unwrap(), "every slot released", |s| {
        s.get("podproxy_backend_in_flight", &[]) == Some(0.0)
    })
    .await;
    assert_eq!(
        s.value("podproxy_config_reloads_total", &[("kind", "ok")]),
        RELOADS as f64
    );
    assert_eq!(
        s.value("podproxy_config_reloads_total", &[("kind", "rejected")]),
        2.0
    );
}

/// The upgrade recipe: a second mlnode version is added next to the running one by a
/// reload under load; no request fails, and the new version prefix reaches the new node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_adds_a_side_by_side_mlnode_version_under_load() {
    let old = MlnodeSim::start(MlnodeConfig::default()).await.unwrap();
    let new = MlnodeSim::start(MlnodeConfig::default()).await.unwrap();
    let one = |routes: &str, upstreams: &str| {
        format!(
            "[admin]\nbind = \"127.0.0.1:0\"\n\n[listeners.poc]\nbind = \"127.0.0.1:0\"\n\
             strip_version_prefix = true\nroutes = [{routes}\n  {{ prefix = \"/\", upstream = \"mlnode308\", poc = true }},\n]\n\n\
             [upstreams.mlnode308]\nurls = \"{}\"\n{upstreams}\n[poc]\ncallback_origin = \"http://203.0.113.7:9100\"\n",
            old.url()
        )
    };
    let before = one("", "");
    let after = one(
        "\n  { prefix = \"/v3.0.13/\", upstream = \"mlnode313\", strip_prefix = true, poc = true },",
        &format!("\n[upstreams.mlnode313]\nurls = \"{}\"\n", new.url()),
    );
    let live = start_reloadable("side-by-side", &before).await;
    let base = live.url("poc");

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut workers = Vec::new();
    for w in 0..2u64 {
        let (stop, ok, failures, base) = (stop.clone(), ok.clone(), failures.clone(), base.clone());
        workers.push(tokio::spawn(async move {
            let client = http_client();
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let version = if (w + n).is_multiple_of(2) {
                    "v3.0.8"
                } else {
                    "v3.0.13"
                };
                n += 1;
                let url = format!("{base}/{version}/api/v1/state");
                let outcome = tokio::time::timeout(WAIT, async {
                    let resp = client
                        .request(get(url.clone()))
                        .await
                        .map_err(|e| format!("{e:?}"))?;
                    let status = resp.status();
                    resp.into_body()
                        .collect()
                        .await
                        .map_err(|e| e.to_string())?;
                    Ok::<_, String>(status)
                })
                .await;
                match outcome {
                    Ok(Ok(StatusCode::OK)) => {
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                    other => failures.lock().unwrap().push(format!("{url}: {other:?}")),
                }
            }
        }));
    }
    let count = ok.clone();
    eventually("the load is running", move || {
        count.load(Ordering::SeqCst) >= 8
    })
    .await;
    let (status, v) = reload(&live, &after).await;
    assert_eq!((status, &v), (StatusCode::OK, &json!({"reloaded": true})));
    new.recorder().clear();
    let seen = ok.load(Ordering::SeqCst);
    let count = ok.clone();
    eventually("load continues on the new config", move || {
        count.load(Ordering::SeqCst) >= seen + 8
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        bounded("worker stops", w).await.unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    assert!(failures.is_empty(), "{failures:#?}");
    // After the reload the new version's requests reach the new node, prefix stripped.
    let got = proxied(&new.recorder());
    assert!(!got.is_empty(), "nothing reached the new mlnode");
    assert!(got.iter().all(|r| r.target == "/api/v1/state"), "{got:?}");
    assert!(old
        .recorder()
        .all()
        .iter()
        .all(|r| r.target == "/api/v1/state" || r.target == "/health"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_started_before_a_reload_finishes_on_its_config() {
    let old = VllmSim::start(VllmConfig::default()).await.unwrap();
    let new = VllmSim::start(VllmConfig::default()).await.unwrap();
    let live = start_reloadable("stream", &one_route_toml(&old.url())).await;
    let base = live.url("main");
    let client = http_client();

    // 30 tokens × 30 ms, still running when the reload lands.
    let (_, body, seen) = open_stream(
        &client,
        streaming_chat(format!("{base}/v1/chat/completions"), 30, 30),
    )
    .await;
    let (status, v) = reload(&live, &one_route_toml(&new.url())).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(
        old.stats().streams_completed(),
        0,
        "the stream ended before the reload; nothing was tested"
    );

    // New requests go to the new upstream, streams included, while the old stream runs.
    let (parts, _) = send(&http_client(), get(format!("{base}/v1/models"))).await;
    assert_eq!(parts.status, StatusCode::OK);
    let (_, body2, seen2) = open_stream(
        &http_client(),
        streaming_chat(format!("{base}/v1/chat/completions"), 5, 5),
    )
    .await;
    assert_complete_stream(&read_rest(body2, seen2).await.unwrap(), 5);
    let targets = |sim: &VllmSim| -> Vec<String> {
        proxied(&sim.recorder())
            .into_iter()
            .map(|r| r.target)
            .collect()
    };
    assert_eq!(
        targets(&new),
        ["/v1/models", "/v1/chat/completions"],
        "new requests did not go to the new upstream"
    );

    // The old stream completes cleanly, with every event, on the upstream it started on.
    let text = read_rest(body, seen)
        .await
        .expect("stream aborted by the reload");
    assert_complete_stream(&text, 30);
    assert_eq!(targets(&old), ["/v1/chat/completions"]);
    assert_eq!(old.stats().streams_completed(), 1);
    assert_eq!(old.stats().cancelled(), 0);
}

/// A keep-alive connection opened before a reload must not keep the old routing forever:
/// clients (the DAPI's Go HTTP client, a Network Node relay) hold connections as long as
/// traffic flows. nginx closes the old workers' keep-alive connections after their
/// in-flight request; either that or routing the next request by the new config will do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_reaches_requests_on_open_keepalive_connections() {
    let a = EchoServer::start().await.unwrap();
    let b = EchoServer::start().await.unwrap();
    let live = start_reloadable("keepalive", &one_route_toml(&a.url())).await;
    let base = live.url("main");
    let addr: SocketAddr = base.trim_start_matches("http://").parse().unwrap();

    let mut conn = RawConn::connect(addr).await;
    conn.send(b"GET /before HTTP/1.1\r\nhost: t\r\n\r\n").await;
    assert_eq!(conn.response().await.status, 200);
    assert!(received(&a.recorder(), "/before"));

    let (status, v) = reload(&live, &one_route_toml(&b.url())).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(served_by(&base, "/fresh", &a, &b).await, 'b');

    // The next request on the old connection: served by the new config, or the connection
    // is closed so the client reconnects — never the old upstream.
    conn.send(b"GET /after HTTP/1.1\r\nhost: t\r\n\r\n").await;
    let answered = bounded("answer or close", conn.try_response()).await;
    assert!(
        !received(&a.recorder(), "/after"),
        "a request after the reload went to the removed upstream ({:?})",
        answered.map(|r| r.status)
    );
}

/// Rotating a listener token by reload must revoke the old one, also for clients that
/// hold a connection open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_revokes_tokens_on_open_connections() {
    const OLD: &str = "old-token-5a7c0e1d9b3f2468";
    const NEW: &str = "new-token-8e2b4d6f0a1c3579";
    let echo = EchoServer::start().await.unwrap();
    let toml = |token: &str| {
        one_route_toml(&echo.url())
            .replace("routes = [", &format!("tokens = [\"{token}\"]\nroutes = ["))
    };
    let live = start_reloadable("revoke", &toml(OLD)).await;
    let addr: SocketAddr = live
        .url("main")
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    let request = format!("GET /x HTTP/1.1\r\nhost: t\r\nauthorization: Bearer {OLD}\r\n\r\n");

    let mut conn = RawConn::connect(addr).await;
    conn.send(request.as_bytes()).await;
    assert_eq!(conn.response().await.status, 200);

    let (status, v) = reload(&live, &toml(NEW)).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(raw_exchange(addr, request.as_bytes()).await.status, 401);

    conn.send(request.as_bytes()).await;
    let status = bounded("answer or close", conn.try_response())
        .await
        .map(|r| r.status);
    assert!(
        !matches!(status, Ok(200)),
        "the revoked token still works on the open connection"
    );
}

// ---------------------------------------------------------------------------------------
// 4. Listeners added and removed by reload
// ---------------------------------------------------------------------------------------

fn listeners_toml(vllm: &str, extra_port: Option<u16>) -> String {
    let mut t = format!(
        r#"
[admin]
bind = "127.0.0.1:0"

[upstreams.vllm]
urls = "{vllm}"

[listeners.main]
bind = "127.0.0.1:0"
routes = [{{ prefix = "/", upstream = "vllm" }}]
"#
    );
    if let Some(port) = extra_port {
        t.push_str(&format!(
            "\n[listeners.extra]\nbind = \"127.0.0.1:{port}\"\nroutes = [{{ prefix = \"/\", upstream = \"vllm\" }}]\n"
        ));
    }
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_adds_and_removes_listeners() {
    let vllm = VllmSim::start(VllmConfig::default()).await.unwrap();
    let port = free_port();
    let extra = SocketAddr::from(([127, 0, 0, 1], port));
    let one = listeners_toml(&vllm.url(), None);
    let two = listeners_toml(&vllm.url(), Some(port));
    let live = start_reloadable("listeners", &one).await;
    let main = live.url("main");
    let client = http_client();

    // Added: accepts once the reload has returned.
    reload_direct(&live, &two)
        .await
        .expect("reload adding a listener");
    let (parts, _) = send(&http_client(), get(format!("http://{extra}/v1/models"))).await;
    assert_eq!(parts.status, StatusCode::OK);

    // An in-flight stream and an idle keep-alive connection on it.
    let (_, body, seen) = open_stream(
        &client,
        streaming_chat(format!("http://{extra}/v1/chat/completions"), 30, 30),
    )
    .await;
    let mut idle = RawConn::connect(extra).await;
    idle.send(b"GET /v1/models HTTP/1.1\r\nhost: t\r\n\r\n")
        .await;
    assert_eq!(idle.response().await.status, 200);

    // Removed: new connections are refused, the idle one is closed, the stream finishes.
    reload_direct(&live, &one)
        .await
        .expect("reload removing a listener");
    assert!(refused(extra).await, "{extra} still accepts connections");
    assert!(idle.until_closed().await.is_empty());
    let text = read_rest(body, seen)
        .await
        .expect("stream cut by the listener's removal");
    assert_complete_stream(&text, 30);
    assert_eq!(vllm.stats().cancelled(), 0);

    // The kept listener serves throughout.
    let (parts, _) = send(&http_client(), get(format!("{main}/v1/models"))).await;
    assert_eq!(parts.status, StatusCode::OK);

    // Its port was released: adding it back binds it again.
    reload_direct(&live, &two)
        .await
        .expect("reload adding it back");
    let (parts, _) = send(&http_client(), get(format!("http://{extra}/v1/models"))).await;
    assert_eq!(parts.status, StatusCode::OK);

    let s = scrape(live.admin.unwrap()).await;
    assert_eq!(
        s.value("podproxy_config_reloads_total", &[("kind", "ok")]),
        3.0
    );
}

// ---------------------------------------------------------------------------------------
// SIGHUP to the real binary
// ---------------------------------------------------------------------------------------

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_real_binary() {
    let a = EchoServer::start().await.unwrap();
    let b = EchoServer::start().await.unwrap();
    let (port, admin_port) = (free_port(), free_port());
    let v1 = format!(
        "[admin]\nbind = \"127.0.0.1:{admin_port}\"\n\n\
         [listeners.main]\nbind = \"127.0.0.1:{port}\"\nroutes = [{{ prefix = \"/\", upstream = \"a\" }}]\n\n\
         [upstreams.a]\nurls = \"{}\"\n",
        a.url()
    );
    let v2 = v1.replace(
        "routes = [",
        "routes = [{ prefix = \"/new/\", upstream = \"b\" }, ",
    ) + &format!("\n[upstreams.b]\nurls = \"{}\"\n", b.url());
    // `sighup` waits for podproxy's handler first: before it, SIGHUP would end the process.
    let mut podproxy = Podproxy::new()
        .config_text("podproxy.toml", &v1)
        .env("RUST_LOG", "info")
        .listening_on(admin_port)
        .listening_on(port)
        .start()
        .await;
    let path = podproxy.config_file().to_path_buf();
    let base = format!("http://127.0.0.1:{port}");
    let admin_addr = SocketAddr::from(([127, 0, 0, 1], admin_port));

    assert_eq!(served_by(&base, "/new/one", &a, &b).await, 'a');

    let reloads = |kind: &'static str, n: f64| {
        move |s: &Scrape| s.get("podproxy_config_reloads_total", &[("kind", kind)]) == Some(n)
    };

    // SIGHUP with a new route: it serves once the reload is counted.
    std::fs::write(&path, &v2).unwrap();
    podproxy.sighup().await;
    scrape_until(admin_addr, "the SIGHUP reload", reloads("ok", 1.0)).await;
    assert_eq!(served_by(&base, "/new/two", &a, &b).await, 'b');

    // SIGHUP with a broken file: rejected, logged, and the running config stays.
    std::fs::write(&path, "[listeners.main\nbind = ").unwrap();
    podproxy.sighup().await;
    scrape_until(
        admin_addr,
        "the rejected SIGHUP reload",
        reloads("rejected", 1.0),
    )
    .await;
    assert_eq!(
        served_by(&base, "/new/three", &a, &b).await,
        'b',
        "the old config is not serving"
    );
    assert!(podproxy.exited().is_none(), "SIGHUP ended the process");
    // The log line is written by podproxy's log thread: it lands shortly after the reload.
    podproxy.wait_for_line("reload rejected").await;

    podproxy.sigterm().await;
    let status = podproxy.wait_exit(WAIT).await;
    assert!(status.success(), "{status}:\n{}", podproxy.stderr());
}

// ---------------------------------------------------------------------------------------
// The Grafana dashboard only queries metrics podproxy exports
// ---------------------------------------------------------------------------------------

fn dashboard_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config/grafana-dashboard.json")
}

/// Every PromQL string of the dashboard: panel targets and templating queries.
fn promql(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("expr" | "query" | "definition", Value::String(s)) => out.push(s.clone()),
                    _ => promql(x, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| promql(x, out)),
        _ => {}
    }
}

/// Identifiers starting with `podproxy_` in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|t| t.starts_with("podproxy_"))
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grafana_dashboard_queries_only_exported_metrics() {
    // A scrape in which every family has samples: a stream, a 502, a PoC rewrite, a relayed
    // callback, a reload.
    let vllm = VllmSim::start(VllmConfig::default()).await.unwrap();
    let mlnode = MlnodeSim::start(MlnodeConfig::default()).await.unwrap();
    let dead = format!("http://127.0.0.1:{}", free_port());
    let toml = format!(
        r#"
[admin]
bind = "127.0.0.1:0"

[listeners.main]
bind = "127.0.0.1:0"
routes = [
  {{ prefix = "/v1/", upstream = "vllm" }},
  {{ prefix = "/dead/", upstream = "dead" }},
  {{ prefix = "/", upstream = "mlnode", poc = true }},
]

[upstreams.vllm]
urls = "{}"

[upstreams.mlnode]
urls = "{}"

[upstreams.dead]
urls = "{dead}"
health = {{ enabled = false }}

[poc]
callback_origin = "http://203.0.113.7:9100"
"#,
        vllm.url(),
        mlnode.url()
    );
    let live = start_reloadable("dashboard", &toml).await;
    let base = live.url("main");
    let client = http_client();
    let (_, body, seen) = open_stream(
        &client,
        streaming_chat(format!("{base}/v1/chat/completions"), 3, 5),
    )
    .await;
    assert_complete_stream(&read_rest(body, seen).await.unwrap(), 3);
    let (parts, _) = send(&client, get(format!("{base}/dead/x"))).await;
    assert_eq!(parts.status, StatusCode::BAD_GATEWAY);
    let poc = Request::post(format!("{base}/api/v1/pow/init/generate"))
        .body(full(r#"{"url":"http://api:9100"}"#))
        .unwrap();
    assert_eq!(send(&client, poc).await.0.status, StatusCode::OK);
    let cb = Request::post(format!("{base}/v1/poc-batches/x"))
        .body(full("{}"))
        .unwrap();
    send(&client, cb).await;
    let (status, v) = reload(&live, &toml).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let s = scrape_until(live.admin.unwrap(), "every exchange recorded", |s| {
        s.get("podproxy_requests_total", &[]) == Some(4.0)
    })
    .await;
    let exported = s.names();
    for family in [
        "podproxy_requests_total",
        "podproxy_request_duration_seconds_bucket",
        "podproxy_upstream_ttfb_seconds_bucket",
        "podproxy_sse_events_per_stream_sum",
        "podproxy_sse_event_gap_seconds_bucket",
        "podproxy_streams_in_flight",
        "podproxy_received_bytes_total",
        "podproxy_sent_bytes_total",
        "podproxy_upstream_errors_total",
        "podproxy_backend_in_flight",
        "podproxy_backend_healthy",
        "podproxy_backend_requests",
        "podproxy_backend_idle_connections",
        "podproxy_poc_callback_rewritten_total",
        "podproxy_poc_callback_refused_total",
        "podproxy_callbacks_relayed_total",
        "podproxy_config_reloads_total",
    ] {
        assert!(
            exported.contains(family),
            "scrape lacks {family}:\n{}",
            s.text
        );
    }

    let path = dashboard_path();
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let dash: Value = serde_json::from_str(&text).expect("dashboard is JSON");
    assert!(
        dash["schemaVersion"].as_u64().unwrap_or(0) >= 36,
        "schemaVersion"
    );
    assert_eq!(dash["__inputs"][0]["name"], "DS_PROMETHEUS");
    assert_eq!(dash["__inputs"][0]["pluginId"], "prometheus");

    let panels: Vec<&Value> = dash["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .filter(|p| p["type"] != "row")
        .collect();
    let mut ids = BTreeSet::new();
    for p in &panels {
        let title = p["title"].as_str().unwrap_or_default();
        assert!(
            ids.insert(p["id"].as_u64().expect("panel id")),
            "duplicate id: {title}"
        );
        assert_eq!(p["datasource"]["uid"], "${DS_PROMETHEUS}", "{title}");
        let targets = p["targets"]
            .as_array()
            .unwrap_or_else(|| panic!("{title}: no targets"));
        assert!(!targets.is_empty(), "{title}: no targets");
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${DS_PROMETHEUS}", "{title}");
        }
    }
    let titles: Vec<String> = panels
        .iter()
        .map(|p| p["title"].as_str().unwrap().to_lowercase())
        .collect();
    for wanted in [
        "requests/s by status",
        "error rate",
        "time to first token",
        "inter-token latency",
        "streams in flight",
        "in-flight requests per backend",
        "backend health",
        "poc",
    ] {
        assert!(
            titles.iter().any(|t| t.contains(wanted)),
            "no panel about {wanted:?}: {titles:?}"
        );
    }

    let mut exprs = Vec::new();
    promql(&dash, &mut exprs);
    let mut used = BTreeSet::new();
    for expr in &exprs {
        let names = metric_names(expr);
        assert!(
            !names.is_empty(),
            "expression queries no podproxy metric: {expr}"
        );
        for name in names {
            assert!(
                exported.contains(name.as_str()),
                "dashboard queries {name}, which /metrics does not export: {expr}"
            );
            used.insert(name);
        }
        if expr.contains("histogram_quantile") {
            assert!(
                expr.contains("_bucket") && expr.contains("by (le"),
                "quantile over something other than buckets by le: {expr}"
            );
        }
    }
    for needed in [
        "podproxy_requests_total",
        "podproxy_upstream_errors_total",
        "podproxy_upstream_ttfb_seconds_bucket",
        "podproxy_sse_event_gap_seconds_bucket",
        "podproxy_streams_in_flight",
        "podproxy_backend_in_flight",
        "podproxy_backend_healthy",
        "podproxy_poc_callback_rewritten_total",
        "podproxy_poc_callback_refused_total",
    ] {
        assert!(
            used.contains(needed),
            "the dashboard does not show {needed}"
        );
    }
}
