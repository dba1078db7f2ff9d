//! Secure by default: the training API closed, error bodies without internal addresses,
//! a per-source connection cap.

mod support;

use support::*;
use testkit::mlnode::{MlnodeConfig, MlnodeSim};
use testkit::vllm::{VllmConfig, VllmSim};
use tokio::io::AsyncReadExt;

const TRAIN: &str = r#"{"train_env":{"LD_PRELOAD":"/tmp/x.so"}}"#;

fn post(path: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: node\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[tokio::test]
async fn the_embedded_default_closes_the_training_api_however_it_is_spelled() {
    let mlnode = MlnodeSim::start(MlnodeConfig::default()).await.unwrap();
    let vllm = VllmSim::start(VllmConfig::default()).await.unwrap();
    let proxy = Proxy::start(&embedded_default_on_loopback(&mlnode.url(), &vllm.url())).await;
    for path in [
        "/v3.0.8/api/v1/train/start",
        "/api/v1/%74rain/start",
        "/api/v1//train/start",
        "/api/v1/x/../train/start",
    ] {
        let resp = raw_exchange(proxy.addr("poc"), &post(path, TRAIN)).await;
        assert_eq!(resp.status, 403, "{path}: {}", resp.body_str());
        assert_eq!(resp.json()["error"]["type"], "forbidden");
    }
    assert!(
        proxied(&mlnode.recorder()).is_empty(),
        "nothing reached the mlnode"
    );
    // Everything else the DAPI calls still passes.
    let resp = raw_exchange(proxy.addr("poc"), &post("/v3.0.8/api/v1/stop", "")).await;
    assert_eq!(resp.status, 200);
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_host_that_trains_reopens_it_with_one_variable() {
    let mlnode = MlnodeSim::start(MlnodeConfig::default()).await.unwrap();
    let vllm = VllmSim::start(VllmConfig::default()).await.unwrap();
    let text = embedded_default_with_env(
        &mlnode.url(),
        &vllm.url(),
        &[("PODPROXY_ALLOW_TRAINING", "true")],
    );
    let proxy = Proxy::start(&text).await;
    let resp = raw_exchange(
        proxy.addr("poc"),
        &post("/v3.0.8/api/v1/train/start", TRAIN),
    )
    .await;
    // The simulator has no training API: its 404 proves the request reached it.
    assert_eq!(resp.status, 404, "{}", resp.body_str());
    assert_eq!(
        last_proxied(&mlnode.recorder()).unwrap().target,
        "/api/v1/train/start"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn the_embedded_default_takes_an_allowlist_from_the_environment() {
    let mlnode = MlnodeSim::start(MlnodeConfig::default()).await.unwrap();
    let vllm = VllmSim::start(VllmConfig::default()).await.unwrap();
    let text = embedded_default_with_env(
        &mlnode.url(),
        &vllm.url(),
        &[("PODPROXY_ALLOW_IPS", "203.0.113.7/32, 10.0.0.0/8")],
    );
    let proxy = Proxy::start(&text).await;
    for listener in ["poc", "inference"] {
        let resp = raw_exchange(
            proxy.addr(listener),
            b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n",
        )
        .await;
        assert_eq!(resp.status, 403, "{listener}: 127.0.0.1 is not on the list");
    }
    let text = embedded_default_with_env(
        &mlnode.url(),
        &vllm.url(),
        &[("PODPROXY_ALLOW_IPS", "127.0.0.1")],
    );
    let open = Proxy::start(&text).await;
    let resp = raw_exchange(
        open.addr("poc"),
        b"GET /api/v1/state HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert_eq!(resp.status, 200);
    proxy.shutdown().await;
    open.shutdown().await;
}

#[tokio::test]
async fn error_bodies_name_the_upstream_but_never_its_address() {
    let dead = format!("http://127.0.0.1:{}", free_port());
    let proxy = Proxy::simple(&dead, "health = { enabled = false }").await;
    let resp = raw_exchange(proxy.addr("main"), b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(resp.status, 502);
    let body = resp.body_str();
    assert!(body.contains("upstream u"), "{body}");
    assert!(
        !body.contains("127.0.0.1"),
        "internal address leaked: {body}"
    );
    assert!(!body.contains(&dead[7..]), "{body}");
    proxy.shutdown().await;
}

#[tokio::test]
async fn one_address_cannot_hold_more_than_its_share_of_connections() {
    let vllm = VllmSim::start(VllmConfig::default()).await.unwrap();
    let proxy = Proxy::start(&format!(
        "[listeners.main]\nbind = \"127.0.0.1:0\"\nmax_connections_per_source = 2\n\
         routes = [{{ prefix = \"/\", upstream = \"u\" }}]\n[upstreams.u]\nurls = \"{}\"\n",
        vllm.url()
    ))
    .await;
    let addr = proxy.addr("main");
    let get = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n";
    // Two kept-alive connections, each proven served.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = RawConn::connect(addr).await;
        c.send(get).await;
        assert_eq!(c.response().await.status, 200);
        held.push(c);
    }
    // A third from the same address is closed without an answer.
    let mut third = RawConn::connect(addr).await;
    let mut buf = [0u8; 64];
    let n = bounded("third connection closed", third.stream.read(&mut buf))
        .await
        .unwrap_or(0);
    assert_eq!(n, 0, "the third connection got bytes: {:?}", &buf[..n]);
    // Once one closes, a new one is served again.
    drop(held.pop());
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut c = RawConn::connect(addr).await;
        c.send(get).await;
        if let Ok(resp) = c.try_response().await {
            assert_eq!(resp.status, 200);
            break;
        }
        // The freed place is released when the server side of the closed connection ends.
        assert!(tokio::time::Instant::now() < deadline, "never served again");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_refused_upload_gets_its_answer_not_a_reset() {
    // The client sends all of a large body that podproxy refuses unread (the training API
    // is closed): the connection closes after the 403, but only once the client is done
    // sending, so it can read the answer instead of a connection reset.
    let mlnode = MlnodeSim::start(MlnodeConfig::default()).await.unwrap();
    let vllm = VllmSim::start(VllmConfig::default()).await.unwrap();
    let proxy = Proxy::start(&embedded_default_on_loopback(&mlnode.url(), &vllm.url())).await;
    let body = vec![b'x'; 4 << 20];
    let mut conn = RawConn::connect(proxy.addr("poc")).await;
    conn.send(
        format!(
            "POST /api/v1/train/start HTTP/1.1\r\nHost: node\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .await;
    conn.send(&body).await;
    let resp = conn.response().await;
    assert_eq!(resp.status, 403, "{}", resp.body_str());
    assert_eq!(resp.header("connection"), Some("close"));
    assert!(proxied(&mlnode.recorder()).is_empty());
    proxy.shutdown().await;
}
