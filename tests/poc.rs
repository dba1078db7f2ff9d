//! End-to-end tests of the PoC callback guard and the callback relay, through
//! a real podproxy on loopback: what the mlnode simulator *received* (exact bytes, headers)
//! is compared with what the DAPI sent.
mod support;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame};
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use support::*;
use testkit::client::{full, http_client, HttpClient, TkBody};
use testkit::data::sha256_hex;
use testkit::echo::EchoServer;
use testkit::mlnode::{MlnodeConfig, MlnodeSim};
use testkit::sink::CallbackSink;
use testkit::Recorded;

// ---------------------------------------------------------------------------------------
// Gonka-shaped bodies
// ---------------------------------------------------------------------------------------

/// The DAPI's default callback origin (a Docker-internal name).
const API: &str = "http://api:9100";

/// A v1 `InitDto` as the DAPI sends it (Go's encoding/json: compact, `1e-07`), with the
/// callback `url` as the only variable part.
fn v1_body(url: &str) -> String {
    format!(
        r#"{{"block_hash":"0x8f2c41aa","block_height":1284533,"public_key":"A1b2C3d4","batch_size":100,"r_target":1.4013564660458173,"fraud_threshold":1e-07,"params":{{"dim":1792,"n_layers":64,"n_heads":64,"n_kv_heads":64,"vocab_size":8196,"ffn_dim_multiplier":10.0,"multiple_of":8192,"norm_eps":1e-05,"rope_theta":10000.0,"use_scaled_rope":false,"seq_len":256}},"url":"{url}","node_id":3,"node_count":8}}"#
    )
}

/// The v2 callback path: the model id is escaped twice (`%252F`) and must survive as is.
const V2_PATH: &str = "/v2/poc-batches/Qwen%252FQwen3-32B-FP8";

/// A v2 body (pretty-printed, as a Python sender would) whose top-level `url` is `url`;
/// nested objects carry `url` keys of their own that must never be touched.
fn v2_body(url: &str) -> String {
    format!(
        "{{\n  \"block_hash\": \"0x77\",\n  \"block_height\": 99,\n  \"public_key\": \"pk\",\n  \"node_id\": 0,\n  \"node_count\": 1,\n  \"params\": {{\"model\": \"Qwen/Qwen3-32B-FP8\", \"seq_len\": 1024, \"r_target\": 0.5000000000000001, \"url\": \"http://api:9100/params\"}},\n  \"url\": \"{url}\",\n  \"validation\": {{\"artifacts\": [{{\"nonce\": 1, \"vector\": [1e-07, -0.0, 3.14159265358979], \"url\": \"http://api:9100/artifact\"}}, {{\"nonce\": 2, \"vector\": [1.4013564660458173, 2.5e-05, -1E+300]}}], \"url\": \"http://api:9100/v2/poc-batches/keep\"}}\n}}"
    )
}

/// A v2 body of at least `min_len` bytes: a big `validation.artifacts` array of floats.
/// Built from one repeated block so that a 30 MB body costs milliseconds, not seconds.
fn big_v2_body(url: &str, min_len: usize) -> Vec<u8> {
    let mut block = String::new();
    for nonce in 0..500u32 {
        block.push_str(&format!(
            "{{\"nonce\":{nonce},\"vector\":[1.4013564660458173,-0.0,1e-07,3.14159265358979,0.30000000000000004,-2.5e-05,{nonce}.{nonce}e-3]}},"
        ));
    }
    let head = format!(
        "{{\"block_hash\":\"0x77\",\"block_height\":99,\"public_key\":\"pk\",\"node_id\":0,\"node_count\":1,\"url\":\"{url}\",\"params\":{{\"model\":\"Qwen/Qwen3-32B-FP8\",\"seq_len\":1024}},\"validation\":{{\"url\":\"http://api:9100/nested\",\"artifacts\":["
    );
    let tail = "{\"nonce\":-1,\"vector\":[0.1]}]}}";
    let mut out = Vec::with_capacity(min_len + block.len() + head.len() + tail.len());
    out.extend_from_slice(head.as_bytes());
    while out.len() + tail.len() < min_len {
        out.extend_from_slice(block.as_bytes());
    }
    out.extend_from_slice(tail.as_bytes());
    out
}

/// A valid PoC body of exactly `len` bytes (padding in a string field).
fn sized_body(url: &str, len: usize) -> Vec<u8> {
    let head = format!("{{\"url\":\"{url}\",\"pad\":\"");
    let tail = "\"}";
    let pad = len - head.len() - tail.len();
    let mut out = head.into_bytes();
    out.resize(out.len() + pad, b'x');
    out.extend_from_slice(tail.as_bytes());
    assert_eq!(out.len(), len);
    out
}

// ---------------------------------------------------------------------------------------
// Config and client helpers
// ---------------------------------------------------------------------------------------

/// Listener `poc` (version prefix stripped): `/` → mlnode with `poc = true`, `/v1/` → `vllm`
/// (no poc flag), `/raw/` → mlnode without the poc flag and with its prefix stripped (so the
/// upstream path of `/raw/api/v1/pow/init/generate` is a PoC path on a non-PoC route).
fn poc_toml(mlnode: &str, other: &str, poc_section: &str) -> String {
    format!(
        r#"
[listeners.poc]
bind = "127.0.0.1:0"
strip_version_prefix = true
routes = [
  {{ prefix = "/v1/", upstream = "vllm" }},
  {{ prefix = "/raw/", upstream = "mlnode", strip_prefix = true }},
  {{ prefix = "/", upstream = "mlnode", poc = true }},
]

[upstreams.mlnode]
urls = "{mlnode}"

[upstreams.vllm]
urls = "{other}"

[poc]
{poc_section}
"#
    )
}

/// A started setup: the proxy plus both simulated backends.
struct Setup {
    proxy: Proxy,
    mlnode: MlnodeSim,
    other: EchoServer,
    client: HttpClient,
}

impl Setup {
    async fn start(poc_section: &str) -> Setup {
        let mlnode = MlnodeSim::start(MlnodeConfig::default()).await.unwrap();
        let other = EchoServer::start().await.unwrap();
        let proxy = Proxy::start(&poc_toml(&mlnode.url(), &other.url(), poc_section)).await;
        Setup {
            proxy,
            mlnode,
            other,
            client: http_client(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.proxy.url("poc"))
    }

    /// POSTs `body` with `Content-Length` and no `Content-Type` (as the DAPI does).
    async fn post(&self, path: &str, body: impl Into<Bytes>) -> Resp {
        send(&self.client, post(self.url(path), body)).await
    }

    /// POSTs `body` chunked (no `Content-Length`).
    async fn post_chunked(&self, path: &str, body: impl Into<Bytes>) -> Resp {
        send(&self.client, post_chunked(self.url(path), body)).await
    }

    /// The request the mlnode received last (it records before answering, so once the
    /// response is back the record is there); podproxy's own health checks are skipped.
    fn last(&self) -> Recorded {
        last_proxied(&self.mlnode.recorder()).expect("mlnode received nothing")
    }

    /// Client requests the mlnode received so far (health checks skipped).
    fn count(&self) -> usize {
        proxied(&self.mlnode.recorder()).len()
    }

    /// Proves that nothing but the marker reached the mlnode since `before` records: sends a
    /// marker request through the same proxy and checks it is the only new record.
    async fn assert_nothing_forwarded_since(&self, before: usize) {
        let r = send(
            &self.client,
            Request::get(self.url("/api/v1/state?marker"))
                .body(testkit::client::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(r.status, 200);
        let new: Vec<String> = proxied(&self.mlnode.recorder())[before..]
            .iter()
            .map(|r| format!("{} {}", r.method, r.target))
            .collect();
        assert_eq!(
            new,
            ["GET /api/v1/state?marker"],
            "refused requests must not reach the mlnode"
        );
    }
}

struct Resp {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Resp {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// Asserts a podproxy-generated error `{"error":{"type":kind,..}}` with `status`.
    fn assert_error(&self, status: u16, kind: &str) {
        assert_eq!(
            self.status,
            status,
            "body: {}",
            String::from_utf8_lossy(&self.body)
        );
        assert_eq!(
            self.headers
                .get(http::header::CONTENT_TYPE)
                .map(|v| v.as_bytes()),
            Some(&b"application/json"[..])
        );
        let v = self.json();
        assert_eq!(v["error"]["type"], kind, "{v}");
        assert!(v["error"]["message"].is_string(), "{v}");
    }
}

fn post(url: String, body: impl Into<Bytes>) -> Request<TkBody> {
    Request::post(url).body(full(body.into())).unwrap()
}

fn post_chunked(url: String, body: impl Into<Bytes>) -> Request<TkBody> {
    Request::post(url)
        .body(Chunked::new(body.into(), 64 * 1024).boxed())
        .unwrap()
}

async fn send(client: &HttpClient, req: Request<TkBody>) -> Resp {
    send_within(client, req, WAIT).await
}

/// Sends a request and reads the whole response, bounded by `bound`.
async fn send_within(client: &HttpClient, req: Request<TkBody>, bound: Duration) -> Resp {
    let exchange = async {
        let resp = client.request(req).await.expect("request");
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.expect("response body").to_bytes();
        Resp {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    };
    tokio::time::timeout(bound, exchange)
        .await
        .unwrap_or_else(|_| panic!("request not answered within {bound:?}"))
}

/// An in-memory body with no size hint, so hyper sends it with `Transfer-Encoding: chunked`.
struct Chunked {
    data: Bytes,
    chunk: usize,
}

impl Chunked {
    fn new(data: Bytes, chunk: usize) -> Self {
        Chunked { data, chunk }
    }

    fn boxed(self) -> TkBody {
        BodyExt::map_err(self, |never: Infallible| match never {}).boxed_unsync()
    }
}

impl Body for Chunked {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if this.data.is_empty() {
            return Poll::Ready(None);
        }
        let n = this.chunk.min(this.data.len());
        Poll::Ready(Some(Ok(Frame::data(this.data.split_to(n)))))
    }
}

/// Full comparison of a received body with the expected bytes (readable diff when short).
fn assert_body(rec: &Recorded, expected: &[u8]) {
    if expected.len() <= 64 * 1024 {
        assert_eq!(
            rec.body_str(),
            String::from_utf8_lossy(expected),
            "body received by the backend"
        );
    }
    assert_eq!(rec.body_len, expected.len() as u64, "body length");
    if rec.body[..] != *expected {
        let first = rec
            .body
            .iter()
            .zip(expected)
            .position(|(a, b)| a != b)
            .unwrap_or(rec.body.len().min(expected.len()));
        panic!("body differs from the expected bytes, first at offset {first}");
    }
}

/// The headers a forwarded PoC body must carry: a Content-Length matching the bytes, no
/// chunked framing, and no Content-Type invented on the way (routes without
/// `json_content_type`).
fn assert_framing(rec: &Recorded, len: usize) {
    assert_framing_typed(rec, len, None);
}

/// `assert_framing` for a route that may add `Content-Type: application/json`.
fn assert_framing_typed(rec: &Recorded, len: usize, content_type: Option<&str>) {
    assert_eq!(
        rec.header_all("content-length"),
        [len.to_string()],
        "Content-Length must match the forwarded bytes"
    );
    assert_eq!(rec.header("transfer-encoding"), None);
    assert_eq!(rec.header("content-type").as_deref(), content_type);
}

// ---------------------------------------------------------------------------------------
// 1. Rewrite, v1
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn v1_init_bodies_get_only_the_callback_origin_replaced() {
    let origin = "http://203.0.113.7:19100";
    let s = Setup::start(&format!("callback_origin = \"{origin}\"")).await;
    let sent = v1_body(&format!("{API}/v1/poc-batches"));
    let expected = v1_body(&format!("{origin}/v1/poc-batches"));
    assert_ne!(sent.len(), expected.len(), "the length must change");

    for (path, upstream_path) in [
        (
            "/v3.0.8/api/v1/pow/init/generate",
            "/api/v1/pow/init/generate",
        ),
        ("/api/v1/pow/init/validate", "/api/v1/pow/init/validate"),
        (
            "/v3.0.8/api/v1/pow/init/validate",
            "/api/v1/pow/init/validate",
        ),
        (
            "/api/v1/pow/init/generate?trace=1",
            "/api/v1/pow/init/generate?trace=1",
        ),
    ] {
        let r = s.post(path, sent.clone()).await;
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(r.json()["status"], "OK", "mlnode's answer passes back");
        let rec = s.last();
        assert_eq!(
            (rec.method.as_str(), rec.target.as_str()),
            ("POST", upstream_path)
        );
        assert_body(&rec, expected.as_bytes());
        assert_framing(&rec, expected.len());
    }
    assert_eq!(s.count(), 4);
}

/// The DAPI's `http://api:9100` may as well be pointed at an https origin on another port:
/// scheme, host and port are replaced together. A chunked PoC body arrives with a
/// Content-Length.
#[tokio::test]
async fn v1_rewrite_to_https_origin_from_a_chunked_body() {
    let s = Setup::start("callback_origin = \"https://node.example.com:443/\"").await;
    let sent = v1_body(&format!("{API}/v1/poc-batches"));
    let r = s
        .post_chunked("/v3.0.8/api/v1/pow/init/generate", sent.clone())
        .await;
    assert_eq!(r.status, 200);
    let expected = v1_body("https://node.example.com:443/v1/poc-batches");
    let rec = s.last();
    assert_body(&rec, expected.as_bytes());
    assert_framing(&rec, expected.len());
}

// ---------------------------------------------------------------------------------------
// 2. Rewrite, v2
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn v2_bodies_keep_escaped_model_id_and_nested_urls() {
    let origin = "http://198.51.100.20:9100";
    let s = Setup::start(&format!("callback_origin = \"{origin}\"")).await;
    let sent = v2_body(&format!("{API}{V2_PATH}"));
    let expected = v2_body(&format!("{origin}{V2_PATH}"));
    for path in [
        "/api/v1/inference/pow/init/generate",
        "/v3.0.8/api/v1/inference/pow/init/generate",
        "/api/v1/inference/pow/generate",
        "/v3.0.8/api/v1/inference/pow/generate",
    ] {
        let r = s.post(path, sent.clone()).await;
        assert_eq!(r.status, 200, "{path}");
        let rec = s.last();
        assert!(
            path.ends_with(rec.target.as_str()),
            "{path} → {}",
            rec.target
        );
        assert_body(&rec, expected.as_bytes());
        assert_framing(&rec, expected.len());
        let body = rec.body_str();
        assert!(body.contains("Qwen%252FQwen3-32B-FP8\""), "escaping kept");
        for nested in [
            "\"url\": \"http://api:9100/params\"",
            "\"url\": \"http://api:9100/artifact\"",
            "\"url\": \"http://api:9100/v2/poc-batches/keep\"",
        ] {
            assert!(body.contains(nested), "nested {nested} untouched");
        }
        let v = rec.body_json().unwrap();
        assert_eq!(v["url"], format!("{origin}{V2_PATH}"));
    }
}

// ---------------------------------------------------------------------------------------
// 3. Large and oversized bodies
// ---------------------------------------------------------------------------------------

const BIG: usize = 30 * 1024 * 1024;

/// Bound for one 30 MB exchange. In a debug build it costs about 2.5 s of CPU (SHA-256 in
/// the simulator, JSON validation in podproxy); on a saturated 2-core machine that can
/// approach `WAIT`, so these two exchanges get a larger (still finite) bound.
const BIG_WAIT: Duration = Duration::from_secs(3 * WAIT.as_secs());

/// A retried v2 batch can reach tens of MB. The expected bytes' SHA-256 is computed on a
/// blocking thread while both requests (Content-Length and chunked) run concurrently, which
/// keeps the test fast in debug builds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_megabyte_v2_body_is_rewritten_exactly() {
    let origin = "http://198.51.100.20:9100";
    let s = Setup::start(&format!("callback_origin = \"{origin}\"")).await;
    let sent = Bytes::from(big_v2_body(&format!("{API}{V2_PATH}"), BIG));
    assert!(sent.len() >= BIG);
    let expected = Bytes::from(big_v2_body(&format!("{origin}{V2_PATH}"), BIG));
    let expected_sha = tokio::task::spawn_blocking({
        let expected = expected.clone();
        move || sha256_hex(&expected)
    });

    let (with_length, chunked) = tokio::join!(
        send_within(
            &s.client,
            post(
                s.url("/v3.0.8/api/v1/inference/pow/init/generate"),
                sent.clone()
            ),
            BIG_WAIT
        ),
        send_within(
            &s.client,
            post_chunked(s.url("/api/v1/inference/pow/generate"), sent),
            BIG_WAIT
        ),
    );
    assert_eq!(with_length.status, 200);
    assert_eq!(chunked.status, 200);
    let expected_sha = expected_sha.await.unwrap();
    let got = proxied(&s.mlnode.recorder());
    assert_eq!(got.len(), 2);
    for target in [
        "/api/v1/inference/pow/init/generate",
        "/api/v1/inference/pow/generate",
    ] {
        let rec = got.iter().find(|r| r.target == target).expect(target);
        assert_eq!(rec.body_sha256_hex, expected_sha, "{target}");
        assert_body(rec, &expected);
        assert_framing(rec, expected.len());
    }
}

#[tokio::test]
async fn body_over_max_body_bytes_is_413_and_never_forwarded() {
    const LIMIT: usize = 1024 * 1024;
    let origin = "http://198.51.100.20:9100";
    let s = Setup::start(&format!(
        "callback_origin = \"{origin}\"\nmax_body_bytes = {LIMIT}"
    ))
    .await;
    let foreign = format!("{API}{V2_PATH}");

    // Exactly at the limit: accepted and rewritten.
    let at_limit = sized_body(&foreign, LIMIT);
    let r = s
        .post("/api/v1/inference/pow/init/generate", at_limit.clone())
        .await;
    assert_eq!(r.status, 200);
    let expected = String::from_utf8(at_limit.clone()).unwrap().replacen(
        &foreign,
        &format!("{origin}{V2_PATH}"),
        1,
    );
    assert_body(&s.last(), expected.as_bytes());

    let before = s.count();
    let one_over = sized_body(&foreign, LIMIT + 1);
    let twice = big_v2_body(&foreign, 2 * LIMIT);
    for (what, body) in [("limit + 1", one_over), ("2 × limit", twice)] {
        let r = s
            .post("/v3.0.8/api/v1/pow/init/generate", body.clone())
            .await;
        r.assert_error(413, "payload_too_large");
        let r = s.post_chunked("/api/v1/inference/pow/generate", body).await;
        assert_eq!(r.status, 413, "chunked {what}");
        r.assert_error(413, "payload_too_large");
    }
    s.assert_nothing_forwarded_since(before).await;
}

// ---------------------------------------------------------------------------------------
// 4. The guard
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn reject_mode_refuses_foreign_callbacks_and_passes_the_right_one() {
    let origin = "http://203.0.113.7:9100";
    let s = Setup::start(&format!(
        "callback_origin = \"{origin}\"\nmode = \"reject\""
    ))
    .await;
    let before = s.count();
    for (path, body) in [
        (
            "/v3.0.8/api/v1/pow/init/generate",
            v1_body(&format!("{API}/v1/poc-batches")),
        ),
        (
            "/api/v1/pow/init/validate",
            v1_body("http://203.0.113.7:9101/v1/poc-batches"),
        ),
        (
            "/api/v1/inference/pow/init/generate",
            v2_body(&format!("https://203.0.113.7:9100{V2_PATH}")),
        ),
        (
            "/api/v1/inference/pow/generate",
            v2_body(&format!("http://evil.example:9100{V2_PATH}")),
        ),
    ] {
        let r = s.post(path, body.clone()).await;
        r.assert_error(403, "forbidden");
        let r = s.post_chunked(path, body).await;
        r.assert_error(403, "forbidden");
    }
    s.assert_nothing_forwarded_since(before).await;

    // The configured origin (any case of scheme/host) passes unchanged, byte for byte.
    for (path, body) in [
        (
            "/v3.0.8/api/v1/pow/init/generate",
            v1_body(&format!("{origin}/v1/poc-batches")),
        ),
        (
            "/api/v1/inference/pow/generate",
            v2_body(&format!("HTTP://203.0.113.7:9100{V2_PATH}")),
        ),
    ] {
        let r = s.post(path, body.clone()).await;
        assert_eq!(r.status, 200, "{path}");
        let rec = s.last();
        assert_body(&rec, body.as_bytes());
        assert_framing(&rec, body.len());
    }
}

#[tokio::test]
async fn allowlist_without_origin_passes_allowed_hosts_and_refuses_others() {
    let s = Setup::start("allowed_hosts = [\"api\"]").await;
    let ok = v1_body(&format!("{API}/v1/poc-batches"));
    let r = s.post("/v3.0.8/api/v1/pow/init/generate", ok.clone()).await;
    assert_eq!(r.status, 200);
    assert_body(&s.last(), ok.as_bytes());
    let ok2 = v2_body(&format!("{API}{V2_PATH}"));
    let r = s
        .post_chunked("/api/v1/inference/pow/generate", ok2.clone())
        .await;
    assert_eq!(r.status, 200);
    assert_body(&s.last(), ok2.as_bytes());
    assert_framing(&s.last(), ok2.len());

    let before = s.count();
    for url in [
        "http://evil.example:9100/v1/poc-batches".to_string(),
        "http://api@evil.example:9100/v1/poc-batches".to_string(),
        format!("http://evil.example:9100{V2_PATH}"),
    ] {
        let r = s.post("/api/v1/pow/init/generate", v1_body(&url)).await;
        r.assert_error(403, "forbidden");
    }
    s.assert_nothing_forwarded_since(before).await;
}

#[tokio::test]
async fn malformed_poc_bodies_are_400_and_never_forwarded() {
    let s = Setup::start("callback_origin = \"http://203.0.113.7:9100\"").await;
    let before = s.count();
    let truncated = v1_body(&format!("{API}/v1/poc-batches"));
    let truncated = &truncated[..truncated.len() - 1];
    for body in [
        truncated,
        "not json",
        "",
        "{\"url\": 5}",
        "{\"url\": \"ftp://api:9100/v1/poc-batches\"}",
        "{\"url\": \"/v1/poc-batches\"}",
    ] {
        let r = s
            .post("/v3.0.8/api/v1/pow/init/generate", body.to_string())
            .await;
        r.assert_error(400, "bad_request");
        if !body.is_empty() {
            let r = s
                .post_chunked("/api/v1/inference/pow/generate", body.to_string())
                .await;
            r.assert_error(400, "bad_request");
        }
    }
    s.assert_nothing_forwarded_since(before).await;
}

#[tokio::test]
async fn poc_bodies_without_a_url_pass_byte_for_byte() {
    let s = Setup::start("callback_origin = \"http://203.0.113.7:9100\"").await;
    let no_url = v2_body("X").replace("\n  \"url\": \"X\",", "");
    assert!(!no_url.contains("\"url\": \"X\""));
    for body in [
        no_url.as_str(),
        "{\"url\": null, \"nonces\": [1, 2, 3], \"wait\": true}",
        "{}",
        "[1e-07, 1.4013564660458173]",
    ] {
        let r = s
            .post("/api/v1/inference/pow/generate", body.to_string())
            .await;
        assert_eq!(r.status, 200);
        let rec = s.last();
        assert_body(&rec, body.as_bytes());
        assert_framing(&rec, body.len());
    }
}

#[tokio::test]
async fn non_poc_paths_methods_and_routes_stream_untouched() {
    let s = Setup::start("callback_origin = \"http://203.0.113.7:9100\"\nmode = \"reject\"").await;
    let foreign = v1_body("http://evil.example:9100/v1/poc-batches");

    // POST on non-PoC mlnode paths: untouched, even malformed, framing kept.
    for path in [
        "/api/v1/pow/validate",
        "/v3.0.8/api/v1/pow/validate",
        "/api/v1/state",
        "/api/v1/inference/pow/stop",
        "/api/v1/pow/init/generate/extra",
    ] {
        for body in [foreign.as_str(), "{not json"] {
            let r = s.post(path, body.to_string()).await;
            assert!(r.status == 200 || r.status == 404, "{path}: {}", r.status);
            let rec = s.last();
            assert_body(&rec, body.as_bytes());
            assert_eq!(rec.header("content-length"), Some(body.len().to_string()));
        }
    }
    // Chunked framing of a non-PoC body is preserved (not turned into Content-Length).
    let r = s
        .post_chunked("/api/v1/pow/validate", foreign.clone())
        .await;
    assert_eq!(r.status, 200);
    let rec = s.last();
    assert_body(&rec, foreign.as_bytes());
    assert_eq!(rec.header("transfer-encoding").as_deref(), Some("chunked"));
    assert_eq!(rec.header("content-length"), None);

    // GET (and PUT) on a PoC path: never guarded; the mlnode's own 404/405-ish answer passes.
    for method in [http::Method::GET, http::Method::PUT] {
        let req = Request::builder()
            .method(method.clone())
            .uri(s.url("/v3.0.8/api/v1/pow/init/generate"))
            .body(full(foreign.clone()))
            .unwrap();
        let r = send(&s.client, req).await;
        assert_eq!(
            r.status, 404,
            "{method}: the mlnode's status passes untouched"
        );
        let rec = s.last();
        assert_eq!(rec.method, method.as_str());
        assert_body(&rec, foreign.as_bytes());
    }

    // The `/v1/` route has no poc flag: never rewritten nor refused.
    let other = s.other.recorder();
    for path in ["/v1/chat/completions", "/v1/api/v1/pow/init/generate"] {
        let r = s.post(path, foreign.clone()).await;
        assert_eq!(r.status, 200);
        let rec = last_proxied(&other).unwrap();
        assert_eq!(rec.target, path);
        assert_body(&rec, foreign.as_bytes());
    }
    // A non-PoC route whose upstream path *is* a PoC path: the route flag decides.
    let r = s
        .post("/raw/api/v1/pow/init/generate", foreign.clone())
        .await;
    assert_eq!(r.status, 200);
    let rec = s.last();
    assert_eq!(rec.target, "/api/v1/pow/init/generate");
    assert_body(&rec, foreign.as_bytes());
}

/// `POST /api/v1/pow/init` exists in Gonka's mlnode (`pow/service/routes.py`): it takes the
/// same `PowInitRequestUrl` (with `url`) and starts PoW with a `Sender(url=...)`;
/// `/api/v1/pow/phase/generate` then generates and POSTs batches to that url. It is
/// not among `poc::DEFAULT_PATHS`, so a foreign callback passes the guard.
#[tokio::test]
async fn v1_plain_init_endpoint_is_guarded_too() {
    let s = Setup::start("callback_origin = \"http://203.0.113.7:9100\"\nmode = \"reject\"").await;
    let before = s.count();
    let r = s
        .post(
            "/v3.0.8/api/v1/pow/init",
            v1_body("http://evil.example:9100/v1/poc-batches"),
        )
        .await;
    r.assert_error(403, "forbidden");
    s.assert_nothing_forwarded_since(before).await;
}

/// uvicorn percent-decodes the request path before Starlette routes it, so
/// `/api/v1/pow/init/%67enerate` reaches the `init/generate` handler of the real mlnode.
/// podproxy compares the raw path with `poc.paths`, so such a request skips the guard and
/// its foreign callback url reaches the mlnode as is.
#[tokio::test]
async fn percent_encoded_poc_paths_are_guarded_too() {
    let s = Setup::start("callback_origin = \"http://203.0.113.7:9100\"\nmode = \"reject\"").await;
    let before = s.count();
    for path in [
        "/api/v1/pow/init/%67enerate",
        "/api/v1/pow/init%2Fvalidate",
        "/api/v1/inference/pow/%67enerate",
        "/api/v1/%70ow/init/generate",
    ] {
        let r = s
            .post(path, v1_body("http://evil.example:9100/v1/poc-batches"))
            .await;
        assert!(
            matches!(r.status.as_u16(), 400 | 403),
            "{path} must be guarded (or refused) like its decoded form, got {}",
            r.status
        );
    }
    s.assert_nothing_forwarded_since(before).await;
}

// ---------------------------------------------------------------------------------------
// 5. The embedded default config
// ---------------------------------------------------------------------------------------

/// The embedded default, expanded with a fake environment. The binds come out as
/// `0.0.0.0:0`; they are moved to loopback for the test.
fn embedded_default(mlnode: &str, vllm: &str, callback: Option<&str>) -> String {
    let expanded = proxy::config::env::expand(proxy::config::EMBEDDED_DEFAULT, |name| match name {
        "MLNODE_URL" => Some(mlnode.to_string()),
        "VLLM_URLS" => Some(vllm.to_string()),
        "POC_PORT" | "INFERENCE_PORT" => Some("0".to_string()),
        "POC_CALLBACK_URL" => callback.map(str::to_string),
        "PODPROXY_ADMIN_BIND" => Some("127.0.0.1:0".to_string()),
        _ => None,
    })
    .expect("embedded default expands");
    assert_eq!(
        expanded.matches("bind = \"0.0.0.0:0\"").count(),
        2,
        "{expanded}"
    );
    expanded.replace("bind = \"0.0.0.0:0\"", "bind = \"127.0.0.1:0\"")
}

#[tokio::test]
async fn embedded_default_without_callback_url_passes_poc_bodies_untouched() {
    let mlnode = MlnodeSim::start(MlnodeConfig::default()).await.unwrap();
    let vllm = EchoServer::start().await.unwrap();
    let toml = embedded_default(&mlnode.url(), &vllm.url(), None);
    let cfg = proxy::Config::from_toml(&toml).unwrap();
    assert!(cfg.poc.callback_origin.is_none() && !cfg.poc.active());
    let proxy = Proxy::start(&toml).await;
    let client = http_client();
    let url = |p: &str| format!("{}{p}", proxy.url("poc"));

    for (path, body) in [
        (
            "/v3.0.8/api/v1/pow/init/generate",
            v1_body("http://evil.example:9100/v1/poc-batches"),
        ),
        (
            "/v3.0.8/api/v1/inference/pow/init/generate",
            v2_body(&format!("{API}{V2_PATH}")),
        ),
        ("/api/v1/inference/pow/generate", "{not json".to_string()),
    ] {
        let r = send(&client, post(url(path), body.clone())).await;
        assert_eq!(r.status, 200, "{path}");
        let rec = last_proxied(&mlnode.recorder()).unwrap();
        assert_body(&rec, body.as_bytes());
    }
    // A chunked body passes as it came (inactive guard = plain streaming).
    let body = v1_body(&format!("{API}/v1/poc-batches"));
    let r = send(
        &client,
        post_chunked(url("/api/v1/pow/init/validate"), body.clone()),
    )
    .await;
    assert_eq!(r.status, 200);
    let rec = last_proxied(&mlnode.recorder()).unwrap();
    assert_body(&rec, body.as_bytes());
    assert_eq!(rec.header("transfer-encoding").as_deref(), Some("chunked"));

    // `/v1/` on the PoC port goes to vLLM; the inference listener too.
    let r = send(&client, post(url("/v3.0.8/v1/chat/completions"), "{}")).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        last_proxied(&vllm.recorder()).unwrap().target,
        "/v1/chat/completions"
    );
    let r = send(
        &client,
        post(format!("{}/v1/completions", proxy.url("inference")), "{}"),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(proxied(&vllm.recorder()).len(), 2);
    proxy.shutdown().await;
}

#[tokio::test]
async fn embedded_default_with_callback_url_rewrites_toward_it() {
    let mlnode = MlnodeSim::start(MlnodeConfig::default()).await.unwrap();
    let vllm = EchoServer::start().await.unwrap();
    let origin = "http://203.0.113.7:9100";
    let proxy = Proxy::start(&embedded_default(
        &mlnode.url(),
        &vllm.url(),
        Some(&format!("{origin}/")),
    ))
    .await;
    let client = http_client();
    let url = |p: &str| format!("{}{p}", proxy.url("poc"));

    let r = send(
        &client,
        post(
            url("/v3.0.8/api/v1/pow/init/generate"),
            v1_body(&format!("{API}/v1/poc-batches")),
        ),
    )
    .await;
    assert_eq!(r.status, 200);
    let expected = v1_body(&format!("{origin}/v1/poc-batches"));
    let rec = last_proxied(&mlnode.recorder()).unwrap();
    assert_body(&rec, expected.as_bytes());
    // The embedded default's mlnode route has json_content_type: the DAPI sends no type.
    assert_framing_typed(&rec, expected.len(), Some("application/json"));

    let r = send(
        &client,
        post(
            url("/api/v1/inference/pow/init/generate"),
            v2_body(&format!("{API}{V2_PATH}")),
        ),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_body(
        &last_proxied(&mlnode.recorder()).unwrap(),
        v2_body(&format!("{origin}{V2_PATH}")).as_bytes(),
    );
    proxy.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// 6. The callback relay
// ---------------------------------------------------------------------------------------

fn relay_toml(sink: &str, relay_bind: &str, upstream_extra: &str) -> String {
    format!(
        r#"
[listeners.relay]
bind = "{relay_bind}"
routes = [{{ prefix = "/", upstream = "network_node" }}]

[upstreams.network_node]
urls = "{sink}"
{upstream_extra}
"#
    )
}

/// A ProofBatch-like callback body of about `len` bytes.
fn batch_body(len: usize) -> Bytes {
    let mut s = String::from(
        "{\"public_key\":\"pk\",\"block_hash\":\"0x77\",\"block_height\":99,\"nonces\":[",
    );
    let mut dist = String::new();
    let mut i = 0u64;
    while s.len() + dist.len() < len / 2 * 2 {
        s.push_str(&format!("{i},"));
        dist.push_str(&format!(
            "{}.{:016},",
            i % 3,
            i.wrapping_mul(0x9E37_79B9) % 10_000_000_000_000_000
        ));
        i += 1;
    }
    s.push_str("0],\"dist\":[");
    s.push_str(&dist);
    s.push_str("0.5],\"node_id\":0}");
    Bytes::from(s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_forwards_callbacks_byte_for_byte_and_passes_the_status_back() {
    let sink = CallbackSink::start().await.unwrap();
    // The sink answers its configured status on every path, `/health` included; with
    // health checks on, a few seconds of 5xx would take it down and turn answers into 503.
    let proxy = Proxy::start(&relay_toml(
        &sink.url(),
        "127.0.0.1:0",
        "health = { enabled = false }",
    ))
    .await;
    let client = http_client();
    let relay = proxy.url("relay");
    let big = batch_body(5 * 1024 * 1024);
    let small = batch_body(4096);
    let (big_sha, small_sha) = (sha256_hex(&big), sha256_hex(&small));
    let big = (&big, big_sha.as_str());
    let small = (&small, small_sha.as_str());

    let cases: [(&str, (&Bytes, &str), bool, u16); 4] = [
        (
            "/v2/poc-batches/Qwen%252FQwen3-32B-FP8/generated",
            big,
            false,
            200,
        ),
        ("/v1/poc-batches/validated", big, true, 200),
        (
            "/v2/poc-batches/Qwen%252FQwen3-32B-FP8/validated?x=%2F",
            small,
            false,
            500,
        ),
        ("/v1/poc-batches/generated", big, true, 503),
    ];
    for (i, (path, (body, sha), chunked, status)) in cases.into_iter().enumerate() {
        sink.set_status(status);
        let url = format!("{relay}{path}");
        let req = if chunked {
            post_chunked(url, body.clone())
        } else {
            post(url, body.clone())
        };
        let r = send(&client, req).await;
        assert_eq!(
            r.status, status,
            "{path}: the sink's status reaches the poster"
        );
        let got = proxied(&sink.recorder());
        assert_eq!(got.len(), i + 1, "one callback per POST");
        let rec = got.last().unwrap();
        assert_eq!(rec.method, "POST");
        assert_eq!(rec.target, path, "raw path forwarded byte for byte");
        assert_eq!(
            rec.body_sha256_hex, sha,
            "{path}: body forwarded byte for byte"
        );
        assert_eq!(rec.body_len, body.len() as u64);
        assert_eq!(rec.header("content-type"), None);
        if chunked {
            assert_eq!(rec.header("transfer-encoding").as_deref(), Some("chunked"));
        } else {
            assert_eq!(rec.header("content-length"), Some(body.len().to_string()));
        }
    }
    proxy.shutdown().await;
}

/// One podproxy with both listeners: PoC inits are rewritten toward its own relay listener,
/// and the mlnode's callback to the rewritten url travels through the relay to the Network
/// Node. The relay port must be known before the config is written, so a free port is
/// picked and the start retried should another socket grab it in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poc_init_rewritten_to_the_relay_then_callback_reaches_the_network_node() {
    let sink = CallbackSink::start().await.unwrap();
    let mlnode = MlnodeSim::start(MlnodeConfig::default()).await.unwrap();
    let other = EchoServer::start().await.unwrap();
    let mut started = None;
    for _ in 0..10 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let relay = format!("127.0.0.1:{port}");
        let toml = format!(
            "{}\n{}",
            poc_toml(
                &mlnode.url(),
                &other.url(),
                &format!("callback_origin = \"http://{relay}\""),
            ),
            relay_toml(&sink.url(), &relay, "")
        );
        match tokio::spawn(async move { Proxy::start(&toml).await }).await {
            Ok(p) => {
                started = Some((p, relay));
                break;
            }
            Err(e) if e.is_panic() => continue, // port taken in between: pick another
            Err(e) => panic!("{e}"),
        }
    }
    let (proxy, relay) = started.expect("could not start with a free relay port");
    assert_eq!(proxy.addr("relay").to_string(), relay);
    let client = http_client();

    for (init_path, body, callback_path) in [
        (
            "/v3.0.8/api/v1/inference/pow/init/generate",
            v2_body(&format!("{API}{V2_PATH}")),
            format!("{V2_PATH}/generated"),
        ),
        (
            "/v3.0.8/api/v1/pow/init/validate",
            v1_body(&format!("{API}/v1/poc-batches")),
            "/v1/poc-batches/validated".to_string(),
        ),
    ] {
        let r = send(
            &client,
            post(format!("{}{init_path}", proxy.url("poc")), body),
        )
        .await;
        assert_eq!(r.status, 200);
        let init = last_proxied(&mlnode.recorder()).unwrap();
        let callback = init.body_json().unwrap()["url"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(
            callback.starts_with(&format!("http://{relay}/")),
            "{callback}"
        );

        // The mlnode's sender: POST {url}/generated (or /validated).
        let suffix = callback_path.rsplit('/').next().unwrap();
        let batch = batch_body(256 * 1024);
        let r = send(&client, post(format!("{callback}/{suffix}"), batch.clone())).await;
        assert_eq!(r.status, 200);
        let rec = last_proxied(&sink.recorder()).unwrap();
        assert_eq!(rec.target, callback_path);
        assert_eq!(rec.body_sha256_hex, sha256_hex(&batch));
    }
    proxy.shutdown().await;
}

// 7. Counters (`proxy::poc::Poc::{rewritten, refused}`): the `Poc` instance lives inside
// `Server` (in each listener's private `ListenerCtx`) with no accessor and no admin/metrics
// endpoint yet, so these end-to-end tests cannot read it; the unit tests in
// `crates/proxy/src/poc/tests.rs` cover the counting.
