#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::BodyExt;
use testkit::client::{full, http_client, HttpClient, TkBody};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Bound for every wait in the tests: generous for a loaded 2-core machine.
pub const T: Duration = Duration::from_secs(20);

pub fn client() -> HttpClient {
    http_client()
}

pub async fn send(
    c: &HttpClient,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: TkBody,
) -> (StatusCode, HeaderMap, Bytes) {
    let mut b = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = tokio::time::timeout(T, c.request(b.body(body).unwrap()))
        .await
        .expect("request timed out")
        .expect("request failed");
    let (parts, body) = resp.into_parts();
    let bytes = tokio::time::timeout(T, body.collect())
        .await
        .expect("body timed out")
        .expect("body failed")
        .to_bytes();
    (parts.status, parts.headers, bytes)
}

pub async fn get(c: &HttpClient, url: &str) -> (StatusCode, HeaderMap, Bytes) {
    send(c, "GET", url, &[], testkit::client::empty()).await
}

pub async fn post_json(
    c: &HttpClient,
    url: &str,
    headers: &[(&str, &str)],
    json: &str,
) -> (StatusCode, HeaderMap, Bytes) {
    send(c, "POST", url, headers, full(json.to_owned())).await
}

pub fn json(b: &Bytes) -> serde_json::Value {
    serde_json::from_slice(b).expect("response is JSON")
}

/// Opens a raw TCP connection and writes a request with a body; used where the test must
/// control exactly when the client's socket goes away.
pub async fn raw_request(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "{method} {target} HTTP/1.1\r\nhost: test\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).await.unwrap();
    s
}

/// Reads from a raw socket until `needle` was seen (bounded by [`T`]); returns what was read.
pub async fn read_until(s: &mut TcpStream, needle: &str) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(T, async {
        loop {
            let n = s.read(&mut buf).await.unwrap();
            assert!(
                n > 0,
                "EOF before {needle:?}; got {:?}",
                String::from_utf8_lossy(&got)
            );
            got.extend_from_slice(&buf[..n]);
            if String::from_utf8_lossy(&got).contains(needle) {
                break;
            }
        }
    })
    .await
    .expect("read_until timed out");
    String::from_utf8_lossy(&got).into_owned()
}
