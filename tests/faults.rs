//! Backend faults: a backend killed mid-stream, one that never answers,
//! one that sends garbage, one that resets during the request body, one that restarts.
//! Every case ends in a defined status or an aborted response, never a hang, podproxy keeps
//! serving, and its in-flight counters return to zero.

mod support;

use std::time::Duration;
use support::*;
use testkit::echo::EchoServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const NO_HEALTH: &str = "[upstreams.u.health]\nenabled = false";

/// The JSON error type podproxy put in a generated error response.
fn error_type(r: &RawResponse) -> String {
    r.json()["error"]["type"].as_str().unwrap_or("").to_string()
}

/// A second, healthy route proves the process keeps serving while `u` is broken.
async fn proxy_with_spare(broken_url: &str, extra: &str) -> (Proxy, EchoServer) {
    let spare = EchoServer::start().await.unwrap();
    let proxy = Proxy::start(&format!(
        "[listeners.main]\nbind = \"127.0.0.1:0\"\nroutes = [{{ prefix = \"/spare\", upstream = \"s\", strip_prefix = true }}, {{ prefix = \"/\", upstream = \"u\" }}]\n\n[upstreams.u]\nurls = \"{broken_url}\"\n{extra}\n[upstreams.u.health]\nenabled = false\n\n[upstreams.s]\nurls = \"{}\"\n[upstreams.s.health]\nenabled = false\n",
        spare.url()
    ))
    .await;
    (proxy, spare)
}

async fn spare_still_serves(proxy: &Proxy) {
    let r = raw_exchange(
        proxy.addr("main"),
        b"GET /spare/ok HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body_str());
}

#[tokio::test]
async fn backend_killed_mid_stream_aborts_the_client_response() {
    let echo = EchoServer::start().await.unwrap();
    let (proxy, _spare) = proxy_with_spare(&echo.url(), "").await;
    let mut conn = RawConn::connect(proxy.addr("main")).await;
    conn.send(b"GET /sse?n=100000&interval_ms=5 HTTP/1.1\r\nHost: a\r\n\r\n")
        .await;
    // Read the head and some events, then kill the backend.
    let mut seen = Vec::new();
    bounded("first events", async {
        while !seen.windows(6).any(|w| w == b"data: ") {
            let mut buf = [0u8; 4096];
            let n = conn.stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before any event");
            seen.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    let head = String::from_utf8_lossy(&seen).into_owned();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked"));
    echo.kill();
    // The client sees the connection end without the terminating zero-size chunk.
    let rest = conn.until_closed().await;
    seen.extend_from_slice(&rest);
    assert!(
        !seen.ends_with(b"\r\n0\r\n\r\n"),
        "an aborted stream was ended as if complete"
    );
    eventually("in-flight back to 0", || proxy.in_flight() == 0).await;
    spare_still_serves(&proxy).await;
    // The dead backend now gives a defined error at once.
    let r = raw_exchange(
        proxy.addr("main"),
        b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 502, "{}", r.body_str());
    eventually("in-flight back to 0", || proxy.in_flight() == 0).await;
}

#[tokio::test]
async fn backend_killed_mid_download_aborts_the_client_response() {
    let echo = EchoServer::start().await.unwrap();
    let (proxy, _spare) = proxy_with_spare(&echo.url(), "").await;
    let mut conn = RawConn::connect(proxy.addr("main")).await;
    // 1 TiB: never completes on its own.
    conn.send(b"GET /bytes/1099511627776 HTTP/1.1\r\nHost: a\r\n\r\n")
        .await;
    let mut got = 0usize;
    bounded("first megabyte", async {
        while got < 1 << 20 {
            let mut buf = vec![0u8; 65536];
            let n = conn.stream.read(&mut buf).await.unwrap();
            assert!(n > 0);
            got += n;
        }
    })
    .await;
    echo.kill();
    // Bounded: the client must see EOF or a reset, long before 1 TiB.
    bounded("abort reaches the client", async {
        let mut buf = vec![0u8; 65536];
        loop {
            match conn.stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    eventually("in-flight back to 0", || proxy.in_flight() == 0).await;
    spare_still_serves(&proxy).await;
}

/// A backend that accepts, reads the request and never answers.
async fn silent_backend() -> RawBackend {
    RawBackend::start(|mut s| async move {
        let mut buf = vec![0u8; 65536];
        // Read until the peer goes away; never write.
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await
}

#[tokio::test]
async fn backend_that_never_answers_times_out_504() {
    let backend = silent_backend().await;
    let (proxy, _spare) = proxy_with_spare(&backend.url(), "response_timeout = \"300ms\"").await;
    let started = std::time::Instant::now();
    let r = raw_exchange(
        proxy.addr("main"),
        b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    )
    .await;
    assert_eq!(r.status, 504, "{}", r.body_str());
    assert_eq!(error_type(&r), "upstream_timeout");
    assert!(started.elapsed() >= Duration::from_millis(300));
    eventually("in-flight back to 0", || proxy.in_flight() == 0).await;
    spare_still_serves(&proxy).await;
}

#[tokio::test]
async fn backend_that_never_reads_a_big_upload_times_out() {
    // Accepts but never reads: the upload fills the socket buffers and stalls.
    let backend = RawBackend::start(|s| async move {
        let _keep = s;
        std::future::pending::<()>().await;
    })
    .await;
    let (proxy, _spare) = proxy_with_spare(
        &backend.url(),
        "response_timeout = \"500ms\"\nidle_timeout = \"500ms\"",
    )
    .await;
    let mut conn = RawConn::connect(proxy.addr("main")).await;
    let len = 64 << 20;
    conn.send(format!("POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: {len}\r\n\r\n").as_bytes())
        .await;
    let (mut rd, mut wr) = conn.stream.into_split();
    let writer = tokio::spawn(async move {
        let chunk = vec![7u8; 65536];
        let mut sent = 0;
        while sent < len {
            if wr.write_all(&chunk).await.is_err() {
                return;
            }
            sent += chunk.len();
        }
    });
    let mut got = Vec::new();
    bounded("answer or abort", async {
        let mut buf = [0u8; 4096];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
            if got.windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
    })
    .await;
    writer.abort();
    let text = String::from_utf8_lossy(&got);
    assert!(
        got.is_empty() || text.starts_with("HTTP/1.1 504") || text.starts_with("HTTP/1.1 502"),
        "{text}"
    );
    eventually("in-flight back to 0", || proxy.in_flight() == 0).await;
    spare_still_serves(&proxy).await;
}

#[tokio::test]
async fn backend_sending_garbage_is_502() {
    let backend = RawBackend::start(|mut s| async move {
        let mut buf = Vec::new();
        if read_request(&mut s, &mut buf).await.is_some() {
            let _ = s
                .write_all(b"SSH-2.0-OpenSSH_9.6\r\n\x00\x01\x02garbage\r\n\r\n")
                .await;
        }
    })
    .await;
    let (proxy, _spare) = proxy_with_spare(&backend.url(), "").await;
    for _ in 0..3 {
        let r = raw_exchange(
            proxy.addr("main"),
            b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(r.status, 502, "{}", r.body_str());
        assert_eq!(error_type(&r), "upstream_broken");
    }
    eventually("in-flight back to 0", || proxy.in_flight() == 0).await;
    spare_still_serves(&proxy).await;
}

#[tokio::test]
async fn backend_sending_a_broken_body_aborts_the_client_response() {
    // A valid head promising 1000 bytes, then 10 and a close.
    let backend = RawBackend::start(|mut s| async move {
        let mut buf = Vec::new();
        if read_request(&mut s, &mut buf).await.is_some() {
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789")
                .await;
        }
    })
    .await;
    let (proxy, _spare) = proxy_with_spare(&backend.url(), "").await;
    let mut conn = RawConn::connect(proxy.addr("main")).await;
    conn.send(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n").await;
    let res = bounded("response", conn.try_response()).await;
    assert!(
        res.is_err(),
        "a truncated body was delivered as complete: {res:?}"
    );
    eventually("in-flight back to 0", || proxy.in_flight() == 0).await;
    spare_still_serves(&proxy).await;
}

/// A backend that reads part of the request body and then resets the connection (RST).
#[tokio::test]
async fn backend_reset_during_request_body() {
    let backend = RawBackend::start(|mut s| async move {
        let mut buf = vec![0u8; 65536];
        let mut got = 0;
        while got < 256 * 1024 {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got += n,
            }
        }
        #[allow(deprecated)] // SO_LINGER 0 is the point: drop sends a RST, it does not block.
        let _ = s.set_linger(Some(Duration::ZERO));
        drop(s);
    })
    .await;
    let (proxy, _spare) = proxy_with_spare(&backend.url(), "").await;
    let mut conn = RawConn::connect(proxy.addr("main")).await;
    let len = 32 << 20;
    conn.send(format!("POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: {len}\r\n\r\n").as_bytes())
        .await;
    let (mut rd, mut wr) = conn.stream.into_split();
    let writer = tokio::spawn(async move {
        let chunk = vec![9u8; 65536];
        let mut sent = 0;
        while sent < len {
            if wr.write_all(&chunk).await.is_err() {
                return;
            }
            sent += chunk.len();
        }
    });
    let mut got = Vec::new();
    bounded("502 or abort", async {
        let mut buf = [0u8; 4096];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
            if got.windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
    })
    .await;
    writer.abort();
    let text = String::from_utf8_lossy(&got);
    assert!(
        got.is_empty() || text.starts_with("HTTP/1.1 502"),
        "expected 502 or an aborted exchange: {text}"
    );
    eventually("in-flight back to 0", || proxy.in_flight() == 0).await;
    spare_still_serves(&proxy).await;
}

#[tokio::test]
async fn backend_restart_next_requests_succeed() {
    let echo = EchoServer::start().await.unwrap();
    let addr = echo.addr();
    let proxy = Proxy::simple(&echo.url(), NO_HEALTH).await;
    // Warm a pooled keep-alive connection to the backend.
    for _ in 0..3 {
        let r = raw_exchange(
            proxy.addr("main"),
            b"GET /before HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(r.status, 200);
    }
    echo.kill();
    drop(echo);
    // While down: a defined error, no hang.
    let r = raw_exchange(
        proxy.addr("main"),
        b"GET /down HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        matches!(r.status, 502 | 503),
        "{} {}",
        r.status,
        r.body_str()
    );
    // Restart on the same address.
    let echo = bounded("rebind", async {
        loop {
            match EchoServer::start_on(addr).await {
                Ok(e) => return e,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
    .await;
    // Passive ejection (no health checks) lasts a few seconds; the first request after it
    // is the probe. Every answer meanwhile is a defined status, and then requests succeed.
    let ok = bounded("requests succeed again", async {
        loop {
            let r = raw_exchange(
                proxy.addr("main"),
                b"GET /after HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            )
            .await;
            assert!(matches!(r.status, 200 | 502 | 503), "{}", r.status);
            if r.status == 200 {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert_eq!(ok.status, 200);
    for _ in 0..5 {
        let r = raw_exchange(
            proxy.addr("main"),
            b"POST /after HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
        )
        .await;
        assert_eq!(r.status, 200);
    }
    assert_eq!(last_proxied(&echo.recorder()).unwrap().body_str(), "abc");
    eventually("in-flight back to 0", || proxy.in_flight() == 0).await;
}

/// A backend that sends a response head and dies before any body byte: the client sees an
/// aborted exchange (podproxy cannot turn a started response into an error status), never
/// a complete response.
#[tokio::test]
async fn backend_dies_between_head_and_body() {
    let backend = RawBackend::start(|mut s| async move {
        let mut buf = Vec::new();
        if read_request(&mut s, &mut buf).await.is_some() {
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
                .await;
            let _ = s.flush().await;
        }
    })
    .await;
    let (proxy, _spare) = proxy_with_spare(&backend.url(), "").await;
    for _ in 0..5 {
        let mut conn = RawConn::connect(proxy.addr("main")).await;
        conn.send(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n").await;
        let got = conn.until_closed().await;
        let text = String::from_utf8_lossy(&got);
        eprintln!("client got {:?}", text);
        assert!(
            !text.ends_with("0\r\n\r\n"),
            "an aborted stream was ended as if complete: {text}"
        );
    }
    eventually("in-flight back to 0", || proxy.in_flight() == 0).await;
    spare_still_serves(&proxy).await;
}
