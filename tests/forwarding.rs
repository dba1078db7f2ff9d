//! What reaches the upstream, and what comes back: raw paths, version prefixes, header
//! rules, bodies and statuses.

mod support;

use http::Request;
use std::time::Duration;
use support::*;
use testkit::client::{empty, full, http_client};
use testkit::echo::EchoServer;
use testkit::mlnode::{MlnodeConfig, MlnodeSim};
use testkit::vllm::{VllmConfig, VllmSim};
use tokio::io::AsyncWriteExt;

/// The v2 PoC callback path: the model id escaped twice, an empty segment, escaped `/` and
/// `..` in the query. nginx would decode `%25` and merge `//`; the DAPI needs it byte for byte.
const RAW_TARGET: &str = "/v2/poc-batches/Qwen%252FQwen3-32B-FP8//generated?a=%2F&b=..%2f";

#[tokio::test]
async fn raw_path_reaches_backend_byte_for_byte() {
    let echo = EchoServer::start().await.unwrap();
    let proxy = Proxy::simple(&echo.url(), "").await;
    let rec = echo.recorder();

    let body = br#"{"public_key":"k","nonces":[1,2],"dist":[1.4013564660458173]}"#;
    let req = format!(
        "POST {RAW_TARGET} HTTP/1.1\r\nHost: api:9100\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mut conn = RawConn::connect(proxy.addr("main")).await;
    conn.send(req.as_bytes()).await;
    conn.send(body).await;
    let resp = conn.response().await;
    assert_eq!(resp.status, 200, "{}", resp.body_str());

    let got = last_proxied(&rec).unwrap();
    assert_eq!(got.target, RAW_TARGET);
    assert_eq!(&got.body[..], &body[..]);

    // Same through a version-stripping listener: only the version segment goes.
    let echo2 = EchoServer::start().await.unwrap();
    let proxy2 = Proxy::start(&format!(
        "[listeners.main]\nbind = \"127.0.0.1:0\"\nstrip_version_prefix = true\n\
         routes = [{{ prefix = \"/\", upstream = \"u\" }}]\n[upstreams.u]\nurls = \"{}\"\n",
        echo2.url()
    ))
    .await;
    let resp = raw_exchange(
        proxy2.addr("main"),
        format!("GET /v3.0.8{RAW_TARGET} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(resp.status, 200);
    assert_eq!(last_proxied(&echo2.recorder()).unwrap().target, RAW_TARGET);
    proxy.shutdown().await;
    proxy2.shutdown().await;
}

#[tokio::test]
async fn version_prefix_is_stripped_in_the_default_layout() {
    let vllm = VllmSim::start(VllmConfig::default()).await.unwrap();
    let mlnode = MlnodeSim::start(MlnodeConfig::default()).await.unwrap();
    let proxy = Proxy::start(&embedded_default_on_loopback(&mlnode.url(), &vllm.url())).await;
    let client = http_client();
    let (vrec, mrec) = (vllm.recorder(), mlnode.recorder());

    // PoC port, version-prefixed management call → mlnode, prefix gone.
    let (parts, body) = send(
        &client,
        Request::get(format!("{}/v3.0.8/api/v1/state", proxy.url("poc")))
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(parts.status, 200);
    assert_eq!(&body[..], br#"{"state":"STOPPED"}"#);
    assert_eq!(last_proxied(&mrec).unwrap().target, "/api/v1/state");
    assert_eq!(proxied(&vrec).len(), 0);

    // PoC port, version-prefixed /v1/ → vLLM, any version shape.
    let (parts, body) = send(
        &client,
        Request::get(format!("{}/v3.0.12/v1/models?x=1", proxy.url("poc")))
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(parts.status, 200);
    assert!(String::from_utf8_lossy(&body).contains("Qwen/Qwen3-32B-FP8"));
    assert_eq!(last_proxied(&vrec).unwrap().target, "/v1/models?x=1");
    assert_eq!(proxied(&mrec).len(), 1);

    // Unprefixed /v1/ on both ports → vLLM unchanged.
    for listener in ["poc", "inference"] {
        let (parts, _) = send(
            &client,
            Request::get(format!("{}/v1/models", proxy.url(listener)))
                .body(empty())
                .unwrap(),
        )
        .await;
        assert_eq!(parts.status, 200, "{listener}");
        assert_eq!(
            last_proxied(&vrec).unwrap().target,
            "/v1/models",
            "{listener}"
        );
    }
    assert_eq!(proxied(&vrec).len(), 3);
    assert_eq!(proxied(&mrec).len(), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn strip_prefix_route_has_nginx_proxy_pass_semantics() {
    let a = EchoServer::start().await.unwrap();
    let b = EchoServer::start().await.unwrap();
    // `location /v3.0.8/ { proxy_pass http://b/; }` plus a catch-all without strip.
    let proxy = Proxy::start(&format!(
        "[listeners.main]\nbind = \"127.0.0.1:0\"\nroutes = [\n\
         {{ prefix = \"/v3.0.8/\", upstream = \"b\", strip_prefix = true }},\n\
         {{ prefix = \"/\", upstream = \"a\" }},\n]\n\
         [upstreams.a]\nurls = \"{}\"\n[upstreams.b]\nurls = \"{}\"\n",
        a.url(),
        b.url()
    ))
    .await;
    let addr = proxy.addr("main");
    let get = |target: &str| format!("GET {target} HTTP/1.1\r\nHost: x\r\n\r\n");

    let cases = [
        ("/v3.0.8/api/v1/state", "/api/v1/state"),
        (
            "/v3.0.8/api/v1/pow/status?x=%2F",
            "/api/v1/pow/status?x=%2F",
        ),
        ("/v3.0.8/", "/"),
    ];
    for (i, (sent, want)) in cases.iter().enumerate() {
        let resp = raw_exchange(addr, get(sent).as_bytes()).await;
        assert_eq!(resp.status, 200, "{sent}");
        assert_eq!(proxied(&b.recorder()).len(), i + 1, "{sent} went to b");
        assert_eq!(last_proxied(&b.recorder()).unwrap().target, *want, "{sent}");
    }
    // No stripping without the route (and no version stripping on this listener).
    let resp = raw_exchange(addr, get("/v3.0.9/api/v1/state").as_bytes()).await;
    assert_eq!(resp.status, 200);
    assert_eq!(
        last_proxied(&a.recorder()).unwrap().target,
        "/v3.0.9/api/v1/state"
    );
    assert_eq!(proxied(&b.recorder()).len(), cases.len());
    proxy.shutdown().await;
}

/// nginx's `location /v3.0.8/ { proxy_pass http://b/; }` replaces the matched prefix with
/// `/`, so whatever follows it (an empty segment included) is kept: `/v3.0.8//x` → `//x`.
/// (The version-segment strip keeps it too.)
#[tokio::test]
async fn strip_prefix_keeps_an_empty_segment_after_the_prefix() {
    let b = EchoServer::start().await.unwrap();
    let proxy = Proxy::start(&format!(
        "[listeners.main]\nbind = \"127.0.0.1:0\"\nroutes = [\n\
         {{ prefix = \"/v3.0.8/\", upstream = \"b\", strip_prefix = true }},\n]\n\
         [upstreams.b]\nurls = \"{}\"\n",
        b.url()
    ))
    .await;
    let resp = raw_exchange(
        proxy.addr("main"),
        b"GET /v3.0.8//double/x?q=%2F HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert_eq!(resp.status, 200);
    assert_eq!(
        last_proxied(&b.recorder()).unwrap().target,
        "//double/x?q=%2F"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn hop_by_hop_request_headers_are_removed_others_pass() {
    let echo = EchoServer::start().await.unwrap();
    let proxy = Proxy::simple(&echo.url(), "").await;
    let req = "POST /echo HTTP/1.1\r\n\
        Host: mlnode.example:8080\r\n\
        Connection: keep-alive, X-Conn-Named, x-other-named\r\n\
        X-Conn-Named: secret1\r\n\
        X-Other-Named: secret2\r\n\
        Keep-Alive: timeout=5\r\n\
        TE: trailers\r\n\
        Proxy-Authorization: Basic dXNlcjpwYXNz\r\n\
        Proxy-Connection: keep-alive\r\n\
        X-Keep: a\r\n\
        X-Keep: b\r\n\
        Authorization: Bearer the-backends-token\r\n\
        X-Mixed: Some Value; q=1, \"quoted\"\r\n\
        Accept: text/event-stream\r\n\
        Transfer-Encoding: chunked\r\n\
        \r\n\
        5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
    let resp = raw_exchange(proxy.addr("main"), req.as_bytes()).await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body, b"hello world");

    let got = last_proxied(&echo.recorder()).unwrap();
    for gone in [
        "connection",
        "x-conn-named",
        "x-other-named",
        "keep-alive",
        "te",
        "proxy-authorization",
        "proxy-connection",
    ] {
        assert!(
            got.header(gone).is_none(),
            "{gone} reached the upstream: {:?}",
            got.headers
        );
    }
    // Re-framed, not duplicated or passed through blindly.
    let te = got.header_all("transfer-encoding");
    assert!(te.is_empty() || te == ["chunked"], "{te:?}");
    assert_eq!(got.body_len, 11);
    assert_eq!(got.header_all("x-keep"), ["a", "b"]);
    assert_eq!(
        got.header("authorization").as_deref(),
        Some("Bearer the-backends-token")
    );
    assert_eq!(
        got.header("x-mixed").as_deref(),
        Some("Some Value; q=1, \"quoted\"")
    );
    assert_eq!(got.header("accept").as_deref(), Some("text/event-stream"));
    assert_eq!(got.header("host").as_deref(), Some("mlnode.example:8080"));
    proxy.shutdown().await;
}

#[tokio::test]
async fn upgrade_request_header_is_not_forwarded() {
    let echo = EchoServer::start().await.unwrap();
    let proxy = Proxy::simple(&echo.url(), "").await;
    let resp = raw_exchange(
        proxy.addr("main"),
        b"GET /headers HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nX-After: 1\r\n\r\n",
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.body_str());
    let got = last_proxied(&echo.recorder()).unwrap();
    assert!(got.header("upgrade").is_none(), "{:?}", got.headers);
    assert_eq!(got.header("x-after").as_deref(), Some("1"));
    proxy.shutdown().await;
}

/// A raw backend answering every request with hop-by-hop headers mixed into its own.
async fn hop_by_hop_backend() -> RawBackend {
    RawBackend::start(|mut s| async move {
        let mut buf = Vec::new();
        while read_request(&mut s, &mut buf).await.is_some() {
            let resp = "HTTP/1.1 200 OK\r\n\
                Content-Type: text/plain\r\n\
                Connection: keep-alive, X-Resp-Named\r\n\
                X-Resp-Named: secret\r\n\
                Keep-Alive: timeout=5, max=100\r\n\
                Proxy-Authenticate: Basic realm=\"x\"\r\n\
                Proxy-Connection: keep-alive\r\n\
                Trailer: X-Checksum\r\n\
                Upgrade: h2c\r\n\
                Set-Cookie: a=1\r\n\
                Set-Cookie: b=2\r\n\
                X-Keep: a\r\n\
                X-Keep: b\r\n\
                Cache-Control: no-cache\r\n\
                Transfer-Encoding: chunked\r\n\
                \r\n\
                6\r\nhello \r\n5\r\nworld\r\n0\r\n\r\n";
            if s.write_all(resp.as_bytes()).await.is_err() {
                return;
            }
        }
    })
    .await
}

#[tokio::test]
async fn hop_by_hop_response_headers_are_removed_others_pass() {
    let backend = hop_by_hop_backend().await;
    let proxy = Proxy::simple(&backend.url(), "").await;
    // Twice on one connection: the response framing stays sound for keep-alive.
    let mut conn = RawConn::connect(proxy.addr("main")).await;
    for _ in 0..2 {
        conn.send(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let resp = conn.response().await;
        assert_eq!(resp.status, 200);
        assert_eq!(resp.body, b"hello world");
        for gone in [
            "connection",
            "x-resp-named",
            "keep-alive",
            "proxy-authenticate",
            "proxy-connection",
            "trailer",
            "upgrade",
        ] {
            assert!(
                resp.header(gone).is_none(),
                "{gone} reached the client: {:?}",
                resp.headers
            );
        }
        let te = resp.header_all("transfer-encoding");
        assert!(te.is_empty() || te == ["chunked"], "{te:?}");
        assert_eq!(resp.header_all("set-cookie"), ["a=1", "b=2"]);
        assert_eq!(resp.header_all("x-keep"), ["a", "b"]);
        assert_eq!(resp.header("cache-control"), Some("no-cache"));
        assert_eq!(resp.header("content-type"), Some("text/plain"));
    }
    proxy.shutdown().await;
}

#[tokio::test]
async fn forwarding_headers_and_host() {
    let echo = EchoServer::start().await.unwrap();
    let proxy = Proxy::simple(&echo.url(), "").await;
    let req = "GET /headers HTTP/1.1\r\n\
        Host: 203.0.113.7:8080\r\n\
        X-Forwarded-For: 198.51.100.1, 198.51.100.2\r\n\
        X-Real-IP: 6.6.6.6\r\n\
        X-Forwarded-Proto: https\r\n\
        \r\n";
    let resp = raw_exchange(proxy.addr("main"), req.as_bytes()).await;
    assert_eq!(resp.status, 200);
    let got = last_proxied(&echo.recorder()).unwrap();
    assert_eq!(
        got.header_all("x-forwarded-for"),
        ["198.51.100.1, 198.51.100.2, 127.0.0.1"]
    );
    assert_eq!(got.header_all("x-real-ip"), ["127.0.0.1"]);
    assert_eq!(got.header_all("x-forwarded-proto"), ["http"]);
    assert_eq!(got.header_all("host"), ["203.0.113.7:8080"]);

    // Without an incoming X-Forwarded-For, it is just the client.
    raw_exchange(
        proxy.addr("main"),
        b"GET /headers HTTP/1.1\r\nHost: a\r\n\r\n",
    )
    .await;
    let got = last_proxied(&echo.recorder()).unwrap();
    assert_eq!(got.header_all("x-forwarded-for"), ["127.0.0.1"]);
    proxy.shutdown().await;
}

#[tokio::test]
async fn rewrite_host_sends_the_backend_authority() {
    let echo = EchoServer::start().await.unwrap();
    let proxy = Proxy::simple(&echo.url(), "rewrite_host = true").await;
    let resp = raw_exchange(
        proxy.addr("main"),
        b"GET /headers HTTP/1.1\r\nHost: pod-8080.proxy.example\r\n\r\n",
    )
    .await;
    assert_eq!(resp.status, 200);
    let got = last_proxied(&echo.recorder()).unwrap();
    assert_eq!(got.header_all("host"), [echo.addr().to_string()]);
    proxy.shutdown().await;
}

#[tokio::test]
async fn h2c_authority_becomes_host() {
    let echo = EchoServer::start().await.unwrap();
    let proxy = Proxy::simple(&echo.url(), "").await;
    let mut h2 = h2c_connect(proxy.addr("main")).await;
    let req = Request::get("http://dapi.example:5000/headers?h2=1")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    assert!(req.headers().get("host").is_none());
    let (parts, _) = h2c_send(&mut h2, req).await;
    assert_eq!(parts.status, 200);
    let got = last_proxied(&echo.recorder()).unwrap();
    assert_eq!(got.header_all("host"), ["dapi.example:5000"]);
    assert_eq!(got.target, "/headers?h2=1");
    assert_eq!(got.version, http::Version::HTTP_11);
    proxy.shutdown().await;
}

#[tokio::test]
async fn request_id_is_kept_or_generated_and_returned() {
    let echo = EchoServer::start().await.unwrap();
    let proxy = Proxy::simple(&echo.url(), "").await;
    let client = http_client();
    let url = format!("{}/headers", proxy.url("main"));

    let (parts, _) = send(
        &client,
        Request::get(&url)
            .header("x-request-id", "dapi-7f3a-0001")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(parts.headers.get_all("x-request-id").iter().count(), 1);
    assert_eq!(parts.headers["x-request-id"], "dapi-7f3a-0001");
    let got = last_proxied(&echo.recorder()).unwrap();
    assert_eq!(got.header_all("x-request-id"), ["dapi-7f3a-0001"]);

    let mut ids = Vec::new();
    for _ in 0..2 {
        let (parts, _) = send(&client, Request::get(&url).body(empty()).unwrap()).await;
        let id = parts.headers["x-request-id"].to_str().unwrap().to_string();
        assert!(is_uuid(&id), "{id:?}");
        let got = last_proxied(&echo.recorder()).unwrap();
        assert_eq!(got.header_all("x-request-id"), [id.as_str()]);
        ids.push(id);
    }
    assert_ne!(ids[0], ids[1], "each request gets its own id");
    proxy.shutdown().await;
}

#[tokio::test]
async fn json_post_without_content_type_is_forwarded_exactly() {
    let mlnode = MlnodeSim::start(MlnodeConfig::default()).await.unwrap();
    let proxy = Proxy::simple(&mlnode.url(), "").await;
    // As the DAPI sends it: JSON, no Content-Type; odd spacing and a float that a JSON
    // round trip would re-print.
    let body = br#"{ "block_hash":"0xabc", "dist" : [1.4013564660458173, 1e-7],"url":"http://api:9100/v1/poc-batches"}"#;
    let head = format!(
        "POST /api/v1/pow/validate HTTP/1.1\r\nHost: ml:8080\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mut conn = RawConn::connect(proxy.addr("main")).await;
    conn.send(head.as_bytes()).await;
    conn.send(body).await;
    let resp = conn.response().await;
    assert_eq!(resp.status, 200);
    let got = last_proxied(&mlnode.recorder()).unwrap();
    assert_eq!(got.method, "POST");
    assert!(got.header("content-type").is_none(), "{:?}", got.headers);
    assert_eq!(got.header_all("content-length"), [body.len().to_string()]);
    assert_eq!(&got.body[..], &body[..]);
    proxy.shutdown().await;
}

#[tokio::test]
async fn delete_with_json_body_reaches_backend() {
    let mlnode = MlnodeSim::start(MlnodeConfig::default()).await.unwrap();
    let proxy = Proxy::simple(&mlnode.url(), "").await;
    let body = r#"{"hf_repo":"Qwen/Qwen3-32B-FP8","hf_commit":null}"#;
    let (parts, resp_body) = send(
        &http_client(),
        Request::delete(format!("{}/api/v1/models", proxy.url("main")))
            .header("content-type", "application/json")
            .body(full(body))
            .unwrap(),
    )
    .await;
    assert_eq!(parts.status, 200, "{resp_body:?}");
    let got = last_proxied(&mlnode.recorder()).unwrap();
    assert_eq!(got.method, "DELETE");
    assert_eq!(got.target, "/api/v1/models");
    assert_eq!(got.body_str(), body);
    proxy.shutdown().await;
}

#[tokio::test]
async fn chunked_request_body_arrives_whole() {
    let echo = EchoServer::start().await.unwrap();
    let proxy = Proxy::simple(&echo.url(), "").await;
    let data = testkit::data::pattern(7, 300_000);
    let mut conn = RawConn::connect(proxy.addr("main")).await;
    conn.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await;
    // Uneven chunks, written separately, with a short pause so they cross as several reads.
    for (i, piece) in data.chunks(70_001).enumerate() {
        conn.send(format!("{:x}\r\n", piece.len()).as_bytes()).await;
        conn.send(piece).await;
        conn.send(b"\r\n").await;
        if i == 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    conn.send(b"0\r\n\r\n").await;
    let resp = conn.response().await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body.len(), data.len());
    assert!(resp.body == data, "echoed body differs");
    let got = last_proxied(&echo.recorder()).unwrap();
    assert_eq!(got.body_len, data.len() as u64);
    assert_eq!(got.body_sha256(), testkit::data::sha256_hex(&data));
    assert!(got.header("content-length").is_none());
    proxy.shutdown().await;
}

#[tokio::test]
async fn upstream_statuses_and_bodies_pass_untouched() {
    let mlnode = MlnodeSim::start(MlnodeConfig::default()).await.unwrap();
    let echo = EchoServer::start().await.unwrap();
    let proxy = Proxy::start(&format!(
        "[listeners.main]\nbind = \"127.0.0.1:0\"\nroutes = [\n\
         {{ prefix = \"/status/\", upstream = \"echo\" }},\n\
         {{ prefix = \"/\", upstream = \"mlnode\" }},\n]\n\
         [upstreams.mlnode]\nurls = \"{}\"\n[upstreams.echo]\nurls = \"{}\"\n",
        mlnode.url(),
        echo.url()
    ))
    .await;
    let client = http_client();

    // FastAPI's own 404: the DAPI reads it as "feature not supported by this node".
    let (parts, body) = send(
        &client,
        Request::post(format!(
            "{}/api/v1/inference/pow/init/unknown",
            proxy.url("main")
        ))
        .body(full("{}"))
        .unwrap(),
    )
    .await;
    assert_eq!(parts.status, 404);
    assert_eq!(&body[..], br#"{"detail":"Not Found"}"#);
    assert_eq!(parts.headers["content-type"], "application/json");
    assert_eq!(
        proxied(&mlnode.recorder()).len(),
        1,
        "the 404 came from the mlnode"
    );

    for code in [500u16, 503, 400, 429] {
        let (parts, body) = send(
            &client,
            Request::get(format!("{}/status/{code}", proxy.url("main")))
                .body(empty())
                .unwrap(),
        )
        .await;
        assert_eq!(parts.status.as_u16(), code);
        assert_eq!(body, format!(r#"{{"status":{code}}}"#));
        assert!(parts.headers.get("retry-after").is_none());
    }
    assert_eq!(proxied(&echo.recorder()).len(), 4);
    proxy.shutdown().await;
}
