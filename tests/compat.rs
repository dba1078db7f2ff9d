//! Gonka as it runs today: FastAPI's strict Content-Type, side-by-side mlnode versions,
//! PoC v2 callbacks, the DAPI's base-URL mode with a token, and trace headers.

mod support;

use http::Request;
use support::*;
use testkit::client::{empty, full, http_client};
use testkit::echo::EchoServer;
use testkit::mlnode::{MlnodeConfig, MlnodeSim};
use testkit::vllm::{VllmConfig, VllmSim};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const UP_BODY: &str =
    r#"{"model":"Qwen/Qwen3-32B-FP8","dtype":"auto","additional_args":["--tp","1"]}"#;

fn strict_vllm() -> VllmConfig {
    VllmConfig {
        strict_content_type: true,
        ..VllmConfig::default()
    }
}

fn strict_mlnode() -> MlnodeConfig {
    MlnodeConfig {
        strict_content_type: true,
        ..MlnodeConfig::default()
    }
}

/// A POST without Content-Type, as the DAPI sends it.
fn dapi_post(path: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: node\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Sends `body` as the DAPI does (no `Content-Type`) to `path` on `addr`, expects 200, and
/// returns the request as the backend behind `rec` got it, after checking that it arrived
/// as `application/json`.
async fn dapi_post_arrives_as_json(
    addr: std::net::SocketAddr,
    path: &str,
    body: &str,
    rec: &testkit::Recorder,
) -> testkit::Recorded {
    let resp = raw_exchange(addr, &dapi_post(path, body)).await;
    assert_eq!(resp.status, 200, "{}", resp.body_str());
    let got = last_proxied(rec).unwrap();
    assert_eq!(
        got.header("content-type").as_deref(),
        Some("application/json")
    );
    got
}

#[tokio::test]
async fn a_dapi_post_without_content_type_reaches_a_strict_fastapi_backend() {
    let mlnode = MlnodeSim::start(strict_mlnode()).await.unwrap();
    let vllm = VllmSim::start(strict_vllm()).await.unwrap();
    let proxy = Proxy::start(&embedded_default_on_loopback(&mlnode.url(), &vllm.url())).await;

    let got = dapi_post_arrives_as_json(
        proxy.addr("poc"),
        "/v3.0.8/api/v1/inference/up",
        UP_BODY,
        &mlnode.recorder(),
    )
    .await;
    assert_eq!(
        got.body_str(),
        UP_BODY,
        "the body is forwarded byte for byte"
    );

    // The inference port, a body with leading blanks, a JSON array.
    let chat = "\n  {\"model\":\"Qwen/Qwen3-32B-FP8\",\"max_tokens\":2,\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}";
    let got = dapi_post_arrives_as_json(
        proxy.addr("inference"),
        "/v1/chat/completions",
        chat,
        &vllm.recorder(),
    )
    .await;
    assert_eq!(got.body_str(), chat);
    proxy.shutdown().await;
}

#[tokio::test]
async fn without_the_setting_a_strict_backend_answers_422() {
    let vllm = VllmSim::start(strict_vllm()).await.unwrap();
    let proxy = Proxy::simple(&vllm.url(), "").await;
    let resp = raw_exchange(
        proxy.addr("main"),
        &dapi_post("/v1/completions", r#"{"model":"m","prompt":"x"}"#),
    )
    .await;
    assert_eq!(resp.status, 422, "{}", resp.body_str());
    proxy.shutdown().await;
}

fn json_route_config(url: &str) -> String {
    format!(
        "[admin]\nbind = \"127.0.0.1:0\"\n\n[listeners.main]\nbind = \"127.0.0.1:0\"\n\
         routes = [{{ prefix = \"/\", upstream = \"u\", json_content_type = true }}]\n\n\
         [upstreams.u]\nurls = \"{url}\"\nhealth = {{ enabled = false }}\n"
    )
}

#[tokio::test]
async fn only_header_less_json_bodies_get_the_header_and_each_is_counted() {
    let echo = EchoServer::start().await.unwrap();
    let proxy = Proxy::start(&json_route_config(&echo.url())).await;
    let rec = echo.recorder();
    let addr = proxy.addr("main");

    // Any Content-Type the client sent is kept as it is, JSON-looking body or not.
    let req =
        "POST /a HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\n{}";
    assert_eq!(raw_exchange(addr, req.as_bytes()).await.status, 200);
    assert_eq!(
        last_proxied(&rec)
            .unwrap()
            .header("content-type")
            .as_deref(),
        Some("text/plain")
    );
    // Not JSON: nothing added.
    assert_eq!(
        raw_exchange(addr, &dapi_post("/b", "hello")).await.status,
        200
    );
    assert_eq!(last_proxied(&rec).unwrap().header("content-type"), None);
    // No body: nothing to look at.
    let get = "GET /c HTTP/1.1\r\nHost: x\r\n\r\n";
    assert_eq!(raw_exchange(addr, get.as_bytes()).await.status, 200);
    assert_eq!(last_proxied(&rec).unwrap().header("content-type"), None);
    // JSON without a type: added, twice.
    for body in ["{\"a\":1}", "[1,2]"] {
        assert_eq!(raw_exchange(addr, &dapi_post("/d", body)).await.status, 200);
        let got = last_proxied(&rec).unwrap();
        assert_eq!(
            got.header("content-type").as_deref(),
            Some("application/json")
        );
        assert_eq!(got.body_str(), body);
    }

    let s = metrics::scrape(proxy.admin.unwrap()).await;
    assert_eq!(
        s.get("podproxy_content_type_added_total", &[("listener", "main")]),
        Some(2.0),
        "{}",
        s.text
    );
    proxy.shutdown().await;
}

/// Reads a chunked body off `stream` (after the head), returning the data.
async fn read_chunked(stream: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> Vec<u8> {
    let mut data = Vec::new();
    loop {
        let line_end = loop {
            if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                break i;
            }
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await.expect("read chunk size");
            assert!(n > 0, "EOF inside a chunked body");
            buf.extend_from_slice(&chunk[..n]);
        };
        let size = usize::from_str_radix(std::str::from_utf8(&buf[..line_end]).unwrap().trim(), 16)
            .expect("chunk size");
        buf.drain(..line_end + 2);
        while buf.len() < size + 2 {
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await.expect("read chunk");
            assert!(n > 0, "EOF inside a chunk");
            buf.extend_from_slice(&chunk[..n]);
        }
        data.extend_from_slice(&buf[..size]);
        buf.drain(..size + 2);
        if size == 0 {
            return data;
        }
    }
}

#[tokio::test]
async fn a_streamed_header_less_body_is_relayed_as_it_comes_not_buffered() {
    // The backend reports the request head as soon as it has it, then the whole body.
    let (head_tx, mut head_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let (body_tx, mut body_rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let backend = RawBackend::start(move |mut s| {
        let (head_tx, body_tx) = (head_tx.clone(), body_tx.clone());
        async move {
            let mut buf = Vec::new();
            let end = loop {
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
                let mut chunk = [0u8; 4096];
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            };
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            buf.drain(..end);
            let _ = head_tx.send(head);
            let body = read_chunked(&mut s, &mut buf).await;
            let _ = body_tx.send(body);
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .await;
        }
    })
    .await;
    let proxy = Proxy::start(&json_route_config(&backend.url())).await;

    let mut conn = RawConn::connect(proxy.addr("main")).await;
    conn.send(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
    )
    .await;
    // Blanks first: podproxy needs the first non-blank byte to decide.
    conn.send(b"3\r\n \r\n\r\n").await;
    conn.send(b"d\r\n{\"model\":\"m\",\r\n").await;
    // The head reaches the backend with the header while the client still holds back the
    // rest of its body: the body is streamed, not collected first.
    let head = bounded("request head at the backend", head_rx.recv())
        .await
        .unwrap();
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/json\r\n"),
        "{head}"
    );
    conn.send(b"f\r\n\"stream\":false}\r\n0\r\n\r\n").await;
    let body = bounded("body at the backend", body_rx.recv())
        .await
        .unwrap();
    assert_eq!(body, b" \r\n{\"model\":\"m\",\"stream\":false}");
    let resp = conn.response().await;
    assert_eq!(resp.status, 200);
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_poc_body_without_content_type_is_rewritten_and_typed() {
    let mlnode = MlnodeSim::start(strict_mlnode()).await.unwrap();
    let vllm = VllmSim::start(strict_vllm()).await.unwrap();
    let text = embedded_default_on_loopback(&mlnode.url(), &vllm.url()).replace(
        "callback_origin = \"\"",
        "callback_origin = \"http://203.0.113.7:9100\"",
    );
    let proxy = Proxy::start(&text).await;
    let body = r#"{"url":"http://api:9100/v2/poc-batches/Qwen%252FQwen3-32B-FP8","block_height":7,"r_target":1.4013564660458173}"#;
    let got = dapi_post_arrives_as_json(
        proxy.addr("poc"),
        "/v3.0.8/api/v1/inference/pow/init/generate",
        body,
        &mlnode.recorder(),
    )
    .await;
    assert_eq!(
        got.body_str(),
        body.replace("http://api:9100", "http://203.0.113.7:9100")
    );
    // Received bytes are what the client sent, not the rewritten body (the exchange is
    // recorded when its response body ends, just after the client has it).
    let received = body.len() as f64;
    metrics::scrape_until(proxy.admin.unwrap(), "the received bytes counted", |s| {
        s.get("podproxy_received_bytes_total", &[("listener", "poc")]) == Some(received)
    })
    .await;
    proxy.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Side-by-side mlnode versions (an upgrade)
// ---------------------------------------------------------------------------------------

pub fn side_by_side(old: &str, new: &str, vllm: &str) -> String {
    format!(
        r#"
[listeners.poc]
bind = "127.0.0.1:0"
strip_version_prefix = true
routes = [
  {{ prefix = "/v3.0.13/", upstream = "mlnode313", strip_prefix = true, poc = true }},
  {{ prefix = "/v1/", upstream = "vllm" }},
  {{ prefix = "/", upstream = "mlnode308", poc = true }},
]

[upstreams.mlnode308]
urls = "{old}"

[upstreams.mlnode313]
urls = "{new}"

[upstreams.vllm]
urls = "{vllm}"

[poc]
callback_origin = "http://203.0.113.7:9100"
"#
    )
}

#[tokio::test]
async fn the_version_prefix_chooses_between_side_by_side_mlnodes() {
    let old = MlnodeSim::start(MlnodeConfig::default()).await.unwrap();
    let new = MlnodeSim::start(MlnodeConfig::default()).await.unwrap();
    let vllm = VllmSim::start(VllmConfig::default()).await.unwrap();
    let proxy = Proxy::start(&side_by_side(&old.url(), &new.url(), &vllm.url())).await;
    let client = http_client();
    let base = proxy.url("poc");

    for (path, to_new) in [
        ("/v3.0.13/api/v1/state", true),
        ("/v3.0.8/api/v1/state", false),
        ("/api/v1/state", false),
    ] {
        let (parts, _) = send(
            &client,
            Request::get(format!("{base}{path}")).body(empty()).unwrap(),
        )
        .await;
        assert_eq!(parts.status, 200, "{path}");
        let (hit, miss) = if to_new { (&new, &old) } else { (&old, &new) };
        assert_eq!(
            last_proxied(&hit.recorder()).map(|r| r.target),
            Some("/api/v1/state".to_string()),
            "{path}"
        );
        hit.recorder().clear();
        assert!(proxied(&miss.recorder()).is_empty(), "{path}");
    }

    // PoC bodies are guarded on both routes.
    let body = r#"{"url":"http://api:9100/v2/poc-batches/m","block_height":1}"#;
    for (prefix, sim) in [("/v3.0.13", &new), ("/v3.0.8", &old)] {
        let (parts, _) = send(
            &client,
            Request::post(format!("{base}{prefix}/api/v1/inference/pow/init/generate"))
                .body(full(body))
                .unwrap(),
        )
        .await;
        assert_eq!(parts.status, 200, "{prefix}");
        let got = last_proxied(&sim.recorder()).unwrap();
        assert_eq!(got.target, "/api/v1/inference/pow/init/generate");
        assert!(
            got.body_str()
                .contains("\"url\":\"http://203.0.113.7:9100/v2/poc-batches/m\""),
            "{prefix}: {}",
            got.body_str()
        );
    }
    proxy.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Trace headers
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn trace_headers_pass_through_both_ways_unchanged() {
    // The backend echoes the trace headers it got.
    let backend = RawBackend::start(|mut s| async move {
        let mut buf = Vec::new();
        while let Some(req) = read_request(&mut s, &mut buf).await {
            let pick = |name: &str| req.header(name).unwrap_or_default();
            let resp = format!(
                "HTTP/1.1 200 OK\r\ntraceparent: {}\r\ntracestate: {}\r\nx-request-id: {}\r\nContent-Length: 0\r\n\r\n",
                pick("traceparent"),
                pick("tracestate"),
                pick("x-request-id")
            );
            if s.write_all(resp.as_bytes()).await.is_err() {
                return;
            }
        }
    })
    .await;
    let proxy = Proxy::simple(&backend.url(), "health = { enabled = false }").await;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let tracestate = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7";
    let req = format!(
        "GET /x HTTP/1.1\r\nHost: x\r\ntraceparent: {traceparent}\r\ntracestate: {tracestate}\r\nX-Request-Id: dapi-req-42\r\n\r\n"
    );
    let resp = raw_exchange(proxy.addr("main"), req.as_bytes()).await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("traceparent"), Some(traceparent));
    assert_eq!(resp.header("tracestate"), Some(tracestate));
    assert_eq!(resp.header_all("x-request-id"), ["dapi-req-42"]);
    proxy.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// The DAPI's base-URL mode: one base URL for PoC and inference, a bearer token
// ---------------------------------------------------------------------------------------

const TOKEN: &str = "base-url-mode-token-0123456789";

#[tokio::test]
async fn base_url_mode_reaches_every_path_with_the_token_checked_and_stripped() {
    let mlnode = MlnodeSim::start(strict_mlnode()).await.unwrap();
    let vllm = VllmSim::start(strict_vllm()).await.unwrap();
    let text = embedded_default_with_env(&mlnode.url(), &vllm.url(), &[("PODPROXY_TOKEN", TOKEN)]);
    let proxy = Proxy::start(&text).await;
    let client = http_client();
    // The DAPI's base URL for this node, version appended.
    let base = format!("{}/v3.0.8", proxy.url("poc"));
    let chat = r#"{"model":"Qwen/Qwen3-32B-FP8","max_tokens":2,"messages":[{"role":"user","content":"hi"}]}"#;
    // (method, path, body, upstream that must get it, status it answers)
    let calls: [(&str, &str, &str, &str, u16); 11] = [
        ("GET", "/readyz", "", "mlnode", 200),
        ("POST", "/api/v1/stop", "", "mlnode", 200),
        ("GET", "/api/v1/state", "", "mlnode", 200),
        ("GET", "/api/v1/pow/status", "", "mlnode", 200),
        ("POST", "/api/v1/inference/up", UP_BODY, "mlnode", 200),
        ("GET", "/api/v1/gpu/devices", "", "mlnode", 404),
        (
            "DELETE",
            "/api/v1/models",
            r#"{"hf_repo":"Qwen/Qwen3-32B-FP8"}"#,
            "mlnode",
            200,
        ),
        (
            "POST",
            "/api/v1/inference/pow/init/generate",
            r#"{"url":"http://api:9100/v2/poc-batches/m"}"#,
            "mlnode",
            200,
        ),
        ("GET", "/api/v1/inference/pow/status", "", "mlnode", 200),
        ("GET", "/v1/models", "", "vllm", 200),
        ("POST", "/v1/chat/completions", chat, "vllm", 200),
    ];
    for (method, path, body, to, status) in calls {
        // Without the token: refused before anything reaches a backend.
        let before = proxied(&mlnode.recorder()).len() + proxied(&vllm.recorder()).len();
        let (parts, _) = send(
            &client,
            Request::builder()
                .method(method)
                .uri(format!("{base}{path}"))
                .body(full(body.to_string()))
                .unwrap(),
        )
        .await;
        assert_eq!(parts.status, 401, "{method} {path} without a token");
        assert_eq!(
            proxied(&mlnode.recorder()).len() + proxied(&vllm.recorder()).len(),
            before
        );
        // With it: through, without the token, with the DAPI's missing Content-Type fixed.
        let (parts, answer) = send(
            &client,
            Request::builder()
                .method(method)
                .uri(format!("{base}{path}"))
                .header("authorization", format!("Bearer {TOKEN}"))
                .body(full(body.to_string()))
                .unwrap(),
        )
        .await;
        assert_eq!(
            parts.status.as_u16(),
            status,
            "{method} {path}: {}",
            String::from_utf8_lossy(&answer)
        );
        let rec = if to == "mlnode" {
            mlnode.recorder()
        } else {
            vllm.recorder()
        };
        let got = last_proxied(&rec).unwrap_or_else(|| panic!("{path} not proxied"));
        assert_eq!(got.target, path, "{method} {path}");
        assert_eq!(got.header("authorization"), None, "{path}: token forwarded");
    }
    // The inference port takes the same token.
    let (parts, _) = send(
        &client,
        Request::get(format!("{}/v1/models", proxy.url("inference")))
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(parts.status, 401);
    proxy.shutdown().await;
}
