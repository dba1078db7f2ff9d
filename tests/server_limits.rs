//! Listener limits: the client header timeout (slowloris guard,
//! also before HTTP/1-vs-2 detection), the per-listener connection cap, and HTTP/1.1 and
//! h2c prior knowledge on one port.

mod support;

use http::Request;
use std::time::Duration;
use support::*;
use testkit::client::{empty, http_client};
use testkit::echo::EchoServer;
use tokio::io::AsyncWriteExt;

fn listener_toml(listener_extra: &str, upstream_url: &str) -> String {
    format!(
        "[listeners.main]\nbind = \"127.0.0.1:0\"\n{listener_extra}\n\
         routes = [{{ prefix = \"/\", upstream = \"u\" }}]\n\
         [upstreams.u]\nurls = \"{upstream_url}\"\n"
    )
}

/// How long a slow client may survive with `header_timeout = "500ms"`: far above the
/// timeout (a loaded machine), far below the 10 s default (so the setting is what acts).
const CLOSE_BOUND: Duration = Duration::from_secs(5);

/// Waits for the proxy to close `conn`; panics if it stays open beyond `CLOSE_BOUND`.
/// Returns whatever the proxy wrote before closing.
async fn closed_by_proxy(what: &str, conn: &mut RawConn) -> String {
    let got = tokio::time::timeout(CLOSE_BOUND, conn.until_closed())
        .await
        .unwrap_or_else(|_| panic!("{what}: still open after {CLOSE_BOUND:?}"));
    let text = String::from_utf8_lossy(&got).into_owned();
    assert!(
        !text.contains(" 200 "),
        "{what}: a stalled request was served: {text}"
    );
    text
}

#[tokio::test]
async fn header_timeout_closes_slow_clients_and_serves_others() {
    let echo = EchoServer::start().await.unwrap();
    let proxy = Proxy::start(&listener_toml("header_timeout = \"500ms\"", &echo.url())).await;
    let addr = proxy.addr("main");

    // Connects and sends nothing (before protocol detection).
    let mut silent = RawConn::connect(addr).await;
    // Half a request line, then nothing.
    let mut half_line = RawConn::connect(addr).await;
    half_line.send(b"GET /hea").await;
    // A request line and part of the headers, then nothing.
    let mut half_headers = RawConn::connect(addr).await;
    half_headers
        .send(b"GET /headers HTTP/1.1\r\nHost: x\r\nX-A: ")
        .await;
    // Half the HTTP/2 preface, then nothing (stalls protocol detection itself).
    let mut half_preface = RawConn::connect(addr).await;
    half_preface.send(b"PRI * HTTP/2.0\r\n").await;
    // Trickles one header byte every 100 ms: never idle, never done.
    let mut trickle = RawConn::connect(addr).await;
    trickle
        .send(b"GET /headers HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await;
    let (mut trickle_rd, mut trickle_wr) = trickle.stream.into_split();
    let trickler = tokio::spawn(async move {
        while trickle_wr.write_all(b"a").await.is_ok() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });

    // Meanwhile a normal client is served on its own connection.
    let (parts, _) = send(
        &http_client(),
        Request::get(format!("{}/headers", proxy.url("main")))
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(parts.status, 200);

    closed_by_proxy("silent", &mut silent).await;
    closed_by_proxy("half request line", &mut half_line).await;
    closed_by_proxy("half headers", &mut half_headers).await;
    closed_by_proxy("half h2 preface", &mut half_preface).await;
    tokio::time::timeout(CLOSE_BOUND, async {
        let mut buf = [0u8; 1024];
        loop {
            match tokio::io::AsyncReadExt::read(&mut trickle_rd, &mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("trickling client: still open");
    bounded("trickler stops once closed", trickler)
        .await
        .unwrap();

    // Only the normal request reached the backend.
    assert_eq!(proxied(&echo.recorder()).len(), 1);
    proxy.shutdown().await;
}

/// The HTTP/2 side of the slowloris guard: a client that completes the preface (and its
/// SETTINGS) but never sends a request holds a connection slot just like a silent HTTP/1
/// client, so the header timeout must close it too.
#[tokio::test]
async fn header_timeout_closes_h2c_connections_that_send_no_request() {
    let echo = EchoServer::start().await.unwrap();
    let proxy = Proxy::start(&listener_toml("header_timeout = \"500ms\"", &echo.url())).await;
    let mut conn = RawConn::connect(proxy.addr("main")).await;
    conn.send(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
    // An empty SETTINGS frame: length 0, type 4, flags 0, stream 0.
    conn.send(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await;
    tokio::time::timeout(CLOSE_BOUND, conn.until_closed())
        .await
        .expect("h2c connection without a request: still open");
    proxy.shutdown().await;
}

#[tokio::test]
async fn connection_cap_holds_new_connections_until_one_closes() {
    let echo = EchoServer::start().await.unwrap();
    let proxy = Proxy::start(&listener_toml(
        "max_connections = 2\nheader_timeout = \"60s\"",
        &echo.url(),
    ))
    .await;
    let addr = proxy.addr("main");
    let rec = echo.recorder();
    let request = |n: usize| format!("GET /n{n} HTTP/1.1\r\nHost: x\r\n\r\n");

    // Slot 1: connected, silent. Slot 2: served once, now an idle keep-alive connection.
    // (The kernel accepts in connect order, so these two hold the slots.)
    let silent = RawConn::connect(addr).await;
    let mut keepalive = RawConn::connect(addr).await;
    keepalive.send(request(2).as_bytes()).await;
    assert_eq!(keepalive.response().await.status, 200);

    // A third connection's request waits: not answered, never reaches the backend.
    let mut third = RawConn::connect(addr).await;
    third.send(request(3).as_bytes()).await;
    let third_resp = tokio::spawn(async move {
        let resp = third.response().await;
        (resp, third)
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(!third_resp.is_finished(), "served beyond max_connections");
    assert_eq!(proxied(&rec).len(), 1);

    // Closing the keep-alive connection frees its slot: the third is served.
    drop(keepalive);
    let (resp, third) = bounded("third served", third_resp).await.unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(last_proxied(&rec).unwrap().target, "/n3");

    // Now `silent` and `third` hold both slots; a fourth waits for the silent one.
    let mut fourth = RawConn::connect(addr).await;
    fourth.send(request(4).as_bytes()).await;
    let fourth_resp = tokio::spawn(async move { fourth.response().await });
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(!fourth_resp.is_finished(), "served beyond max_connections");
    assert_eq!(proxied(&rec).len(), 2);
    drop(silent);
    let resp = bounded("fourth served", fourth_resp).await.unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(last_proxied(&rec).unwrap().target, "/n4");
    drop(third);
    proxy.shutdown().await;
}

#[tokio::test]
async fn http1_and_h2c_share_a_port() {
    let echo = EchoServer::start().await.unwrap();
    let proxy = Proxy::simple(&echo.url(), "").await;
    let rec = echo.recorder();

    let (parts, body) = send(
        &http_client(),
        Request::get(format!("{}/headers?via=h1", proxy.url("main")))
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(parts.status, 200);
    assert_eq!(parts.version, http::Version::HTTP_11);
    assert!(String::from_utf8_lossy(&body).contains("via=h1"));

    let mut h2 = h2c_connect(proxy.addr("main")).await;
    // Several streams on the one h2c connection, concurrently.
    let mut streams = Vec::new();
    for i in 0..4 {
        let mut h2 = h2.clone();
        streams.push(tokio::spawn(async move {
            let req = Request::get(format!("http://podproxy.test/headers?via=h2&i={i}"))
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap();
            h2c_send(&mut h2, req).await
        }));
    }
    for s in streams {
        let (parts, body) = bounded("h2 stream", s).await.unwrap();
        assert_eq!(parts.status, 200);
        assert_eq!(parts.version, http::Version::HTTP_2);
        assert!(String::from_utf8_lossy(&body).contains("via=h2"));
    }
    let (parts, _) = h2c_send(
        &mut h2,
        Request::get("http://podproxy.test/status/404")
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(parts.status, 404);

    let got = proxied(&rec);
    assert_eq!(got.len(), 6);
    assert!(got.iter().all(|r| r.version == http::Version::HTTP_11));
    assert_eq!(
        got.iter().filter(|r| r.target.contains("via=h2")).count(),
        4
    );
    proxy.shutdown().await;
}
