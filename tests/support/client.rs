//! Clients: the testkit's pooled HTTP/1.1 client, h2c, and streaming chat completions.

use super::bounded;
use bytes::Bytes;
use http_body_util::BodyExt;
use std::net::SocketAddr;
use tokio::net::TcpStream;

/// Sends `req` with the testkit's pooled HTTP/1.1 client; returns head and whole body.
pub async fn send(
    client: &testkit::client::HttpClient,
    req: http::Request<testkit::TkBody>,
) -> (http::response::Parts, Bytes) {
    let resp = bounded("response head", client.request(req))
        .await
        .expect("request failed");
    whole("response body", resp).await
}

/// A response's head and its whole body, read under `WAIT` (`what` names the body when it
/// fails).
pub async fn whole<B>(what: &str, resp: http::Response<B>) -> (http::response::Parts, Bytes)
where
    B: hyper::body::Body,
    B::Error: std::fmt::Debug,
{
    let (parts, body) = resp.into_parts();
    let body = bounded(what, body.collect())
        .await
        .unwrap_or_else(|e| panic!("{what} failed: {e:?}"))
        .to_bytes();
    (parts, body)
}

/// An HTTP/2 prior-knowledge (h2c) connection to `addr`.
pub async fn h2c_connect(
    addr: SocketAddr,
) -> hyper::client::conn::http2::SendRequest<http_body_util::Full<Bytes>> {
    let tcp = bounded("connect", TcpStream::connect(addr))
        .await
        .expect("connect");
    let (send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .expect("h2c handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

/// Sends one request over an h2c connection; returns head and whole body.
pub async fn h2c_send(
    sender: &mut hyper::client::conn::http2::SendRequest<http_body_util::Full<Bytes>>,
    req: http::Request<http_body_util::Full<Bytes>>,
) -> (http::response::Parts, Bytes) {
    let resp = bounded("h2c response head", sender.send_request(req))
        .await
        .expect("h2c request failed");
    whole("h2c body", resp).await
}

/// The body of a streaming chat completion of `tokens` tokens.
pub fn chat_json(tokens: usize) -> String {
    format!(
        r#"{{"model":"Qwen/Qwen3-32B-FP8","stream":true,"max_tokens":{tokens},"messages":[{{"role":"user","content":"hi"}}]}}"#
    )
}

/// A streaming chat completion to `url` (the whole URL): `tokens` token events, one every
/// `interval_ms` (vLLM simulator header).
pub fn streaming_chat(
    url: String,
    tokens: usize,
    interval_ms: u64,
) -> http::Request<testkit::TkBody> {
    http::Request::post(url)
        .header("content-type", "application/json")
        .header("x-sim-interval-ms", interval_ms.to_string())
        .body(testkit::client::full(chat_json(tokens)))
        .unwrap()
}

/// Sends a streaming request and returns the response head and body once the first event
/// has arrived (status 200 asserted), with the bytes read so far.
pub async fn open_stream(
    client: &testkit::client::HttpClient,
    req: http::Request<testkit::TkBody>,
) -> (http::response::Parts, hyper::body::Incoming, Vec<u8>) {
    let resp = bounded("stream head", client.request(req))
        .await
        .expect("stream request");
    assert_eq!(resp.status(), http::StatusCode::OK);
    let (parts, mut body) = resp.into_parts();
    let mut seen = Vec::new();
    while !seen.windows(2).any(|w| w == b"\n\n") {
        let frame = bounded("first event", body.frame())
            .await
            .expect("body ended before the first event")
            .expect("body failed before the first event");
        if let Ok(data) = frame.into_data() {
            seen.extend_from_slice(&data);
        }
    }
    (parts, body, seen)
}

/// Reads the rest of a body (bounded): `Ok(all bytes)` on a clean end, `Err` if aborted.
pub async fn read_rest(
    mut body: hyper::body::Incoming,
    mut seen: Vec<u8>,
) -> Result<String, String> {
    bounded("stream end", async {
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => {
                    if let Ok(d) = f.into_data() {
                        seen.extend_from_slice(&d);
                    }
                }
                Err(e) => return Err(format!("{e} after {} bytes", seen.len())),
            }
        }
        Ok(String::from_utf8_lossy(&seen).into_owned())
    })
    .await
}
