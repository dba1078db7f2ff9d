//! A generic backend for proxy tests: streaming echo, byte generator, sink, arbitrary
//! status, header mirror, SSE and a never-answering endpoint.
//!
//! Large bodies are never collected: `/echo` and `/sink` stream and hash incrementally and
//! record only length + SHA-256, so 100+ MB transfers run in constant memory.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_LENGTH};
use http::{Method, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::Request;
use serde_json::json;

use crate::client::{BoxError, TkBody};
use crate::data::{PatternStream, StreamDigest};
use crate::record::{Recorded, Recorder};
use crate::server::{self, EventBody, Server};

/// Largest body collected by endpoints other than `/echo` and `/sink`.
pub const MAX_BODY: usize = 16 * 1024 * 1024;
/// Largest `n` accepted by `/bytes/{n}` (1 TiB; it is streamed).
pub const MAX_BYTES: u64 = 1 << 40;
/// Largest `n` accepted by `/sse`.
pub const MAX_EVENTS: usize = 1_000_000;
/// Seed of the data served by `/bytes/{n}`: `testkit::data::pattern(BYTES_SEED, n)`.
pub const BYTES_SEED: u64 = 0;

struct State {
    recorder: Recorder,
}

/// A running echo server. Dropping it kills it.
pub struct EchoServer {
    server: Server,
    state: Arc<State>,
}

impl EchoServer {
    /// Starts on `127.0.0.1:0`.
    pub async fn start() -> std::io::Result<EchoServer> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Starts on a given address.
    pub async fn start_on(addr: SocketAddr) -> std::io::Result<EchoServer> {
        let state = Arc::new(State {
            recorder: Recorder::new(),
        });
        let st = state.clone();
        let server =
            Server::bind(addr, Arc::new(move |req| Box::pin(handle(st.clone(), req)))).await?;
        Ok(EchoServer { server, state })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// Every request received. `/echo` and `/sink` keep only length + hash, and are
    /// recorded when their body ends (or the exchange is dropped).
    pub fn recorder(&self) -> Recorder {
        self.state.recorder.clone()
    }

    /// Stops accepting and aborts every open connection abruptly.
    pub fn kill(&self) {
        self.server.kill();
    }
}

/// Passes the request body through as the response body, hashing it on the way; records
/// once when the body ends, fails, or the response is dropped.
struct TeeBody {
    inner: Incoming,
    digest: StreamDigest,
    pending: Option<(Recorder, http::request::Parts, Instant)>,
}

impl TeeBody {
    fn finish(&mut self) {
        if let Some((rec, parts, at)) = self.pending.take() {
            rec.push(Recorded::streamed(
                &parts,
                self.digest.len(),
                self.digest.hex(),
                at,
            ));
        }
    }
}

impl Drop for TeeBody {
    fn drop(&mut self) {
        self.finish();
    }
}

impl Body for TeeBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.digest.update(d);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.finish();
                Poll::Ready(Some(Err(Box::new(e))))
            }
            Poll::Ready(None) => {
                this.finish();
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn query_param(query: Option<&str>, name: &str) -> Option<u64> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .and_then(|(_, v)| v.parse().ok())
}

fn bad_request(msg: &str) -> hyper::Response<TkBody> {
    server::json(StatusCode::BAD_REQUEST, &json!({"detail": msg}))
}

async fn handle(st: Arc<State>, req: Request<Incoming>) -> hyper::Response<TkBody> {
    let at = Instant::now();
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_owned();

    // Streaming endpoints first: they must not collect the body.
    if path == "/echo" && matches!(parts.method, Method::POST | Method::PUT) {
        let content_length = parts.headers.get(CONTENT_LENGTH).cloned();
        let tee = TeeBody {
            inner: body,
            digest: StreamDigest::new(),
            pending: Some((st.recorder.clone(), parts, at)),
        };
        let mut resp = server::response(
            StatusCode::OK,
            "application/octet-stream",
            tee.boxed_unsync(),
        );
        if let Some(cl) = content_length {
            resp.headers_mut().insert(CONTENT_LENGTH, cl);
        }
        return resp;
    }
    if path == "/sink" && parts.method == Method::POST {
        let mut body = body;
        let mut digest = StreamDigest::new();
        let mut failed = None;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => {
                    if let Some(d) = frame.data_ref() {
                        digest.update(d);
                    }
                }
                Err(e) => {
                    failed = Some(e.to_string());
                    break;
                }
            }
        }
        st.recorder
            .push(Recorded::streamed(&parts, digest.len(), digest.hex(), at));
        return match failed {
            Some(e) => bad_request(&format!("error reading body: {e}")),
            None => server::json(
                StatusCode::OK,
                &json!({"len": digest.len(), "sha256": digest.hex()}),
            ),
        };
    }

    let body = match server::read_body(body, MAX_BODY).await {
        Ok(b) => b,
        Err(resp) => {
            st.recorder.push(Recorded::new(&parts, Bytes::new(), at));
            return resp;
        }
    };
    st.recorder.push(Recorded::new(&parts, body, at));
    let target = parts.uri.to_string();

    if let Some(n) = path.strip_prefix("/bytes/") {
        if parts.method != Method::GET {
            return server::not_found();
        }
        let Some(n) = n.parse::<u64>().ok().filter(|n| *n <= MAX_BYTES) else {
            return bad_request("bad byte count");
        };
        let mut resp = server::response(
            StatusCode::OK,
            "application/octet-stream",
            PatternStream::new(BYTES_SEED, n)
                .map_err(|never| match never {})
                .boxed_unsync(),
        );
        resp.headers_mut()
            .insert(CONTENT_LENGTH, HeaderValue::from(n));
        return resp;
    }
    if let Some(code) = path.strip_prefix("/status/") {
        let Some(status) = code
            .parse::<u16>()
            .ok()
            .filter(|c| (200..=599).contains(c))
            .and_then(|c| StatusCode::from_u16(c).ok())
        else {
            return bad_request("status must be 200..=599");
        };
        if matches!(status.as_u16(), 204 | 304) {
            return server::response(status, "application/json", crate::client::empty());
        }
        return server::json(status, &json!({"status": status.as_u16()}));
    }
    match (&parts.method, path.as_str()) {
        (&Method::GET, "/headers") => {
            let headers: Vec<[String; 2]> = parts
                .headers
                .iter()
                .map(|(k, v)| {
                    [
                        k.as_str().to_owned(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    ]
                })
                .collect();
            server::json(
                StatusCode::OK,
                &json!({"target": target, "headers": headers}),
            )
        }
        (&Method::GET, "/sse") => {
            let q = parts.uri.query();
            let n = query_param(q, "n").unwrap_or(10).min(MAX_EVENTS as u64) as usize;
            let interval =
                Duration::from_millis(query_param(q, "interval_ms").unwrap_or(10).min(60_000));
            let make = Box::new(|seq: usize, sent_us: u64| {
                Bytes::from(format!(
                    "data: {}\n\n",
                    json!({"seq": seq, "sent_us": sent_us})
                ))
            });
            server::sse_response(EventBody::new(n, interval, None, make, ()))
        }
        (&Method::GET, "/hang") => std::future::pending().await,
        _ => server::json(StatusCode::OK, &json!({"target": target})),
    }
}
