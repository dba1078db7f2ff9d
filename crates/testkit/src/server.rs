//! Shared HTTP/1.1 server plumbing: accept loop, kill semantics, small response helpers and
//! the scheduled SSE body used by the vLLM simulator and the echo server.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::Request;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Sleep;

use crate::client::{full, BoxError, TkBody};

/// Upper bound on simultaneously open connections per simulator; beyond it new connections
/// are closed immediately so a runaway test cannot exhaust file descriptors.
pub(crate) const MAX_CONNS: usize = 16 * 1024;

pub(crate) type BoxFuture = Pin<Box<dyn Future<Output = Response<TkBody>> + Send>>;
pub(crate) type Handler = Arc<dyn Fn(Request<Incoming>) -> BoxFuture + Send + Sync>;

/// A running accept loop. Aborting its task drops the listener and the `JoinSet` holding
/// every connection task, which aborts them all: connections die without a clean HTTP end.
pub(crate) struct Server {
    addr: SocketAddr,
    accept: AbortHandle,
}

impl Server {
    pub(crate) async fn bind(addr: SocketAddr, handler: Handler) -> io::Result<Server> {
        // uvicorn (vLLM, the mlnode) listens with a backlog of 2048; tokio's bind uses 128,
        // which a proxy opening thousands of upstream connections at once overflows (SYNs
        // dropped, retried after 1 s): a simulator artifact, not backend behaviour.
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        let listener = socket.listen(2048)?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(accept_loop(listener, handler));
        Ok(Server {
            addr,
            accept: task.abort_handle(),
        })
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub(crate) fn kill(&self) {
        self.accept.abort();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn accept_loop(listener: TcpListener, handler: Handler) {
    let mut conns: JoinSet<()> = JoinSet::new();
    loop {
        tokio::select! {
            res = listener.accept() => match res {
                Ok((stream, _peer)) => {
                    while conns.try_join_next().is_some() {}
                    if conns.len() >= MAX_CONNS {
                        tracing::warn!("testkit server: connection limit reached, closing new connection");
                        continue;
                    }
                    conns.spawn(serve_conn(stream, handler.clone()));
                }
                Err(e) => {
                    // Typically EMFILE under load: back off instead of spinning.
                    tracing::debug!(error = %e, "testkit server: accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn serve_conn(stream: TcpStream, handler: Handler) {
    let _ = stream.set_nodelay(true);
    let svc = service_fn(move |req: Request<Incoming>| {
        let fut = handler(req);
        async move { Ok::<_, Infallible>(fut.await) }
    });
    let res = http1::Builder::new()
        .keep_alive(true)
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30))
        .serve_connection(TokioIo::new(stream), svc)
        .await;
    if let Err(e) = res {
        tracing::debug!(error = %e, "testkit server: connection ended with error");
    }
}

/// A response with a body and a content type; never panics.
pub(crate) fn response(
    status: StatusCode,
    content_type: &'static str,
    body: TkBody,
) -> Response<TkBody> {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// A JSON response.
pub(crate) fn json(status: StatusCode, value: &serde_json::Value) -> Response<TkBody> {
    response(status, "application/json", full(value.to_string()))
}

/// FastAPI-style 404.
pub(crate) fn not_found() -> Response<TkBody> {
    json(
        StatusCode::NOT_FOUND,
        &serde_json::json!({"detail": "Not Found"}),
    )
}

/// FastAPI ≥ 0.132 (and so vLLM ≥ 0.20's API server and newer mlnode images) parses a
/// pydantic body only when the request says `Content-Type: application/json` (or another
/// `*/json` / `*+json` type); without one it answers 422 with the body as a string in the
/// error's `input`. `None` when the request may be parsed.
pub(crate) fn fastapi_content_type_check(
    headers: &http::HeaderMap,
    body: &[u8],
) -> Option<Response<TkBody>> {
    let json_type = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            let main = v
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            main == "application/json"
                || (main.starts_with("application/") && main.ends_with("+json"))
        })
        .unwrap_or(false);
    if json_type {
        return None;
    }
    Some(json(
        StatusCode::UNPROCESSABLE_ENTITY,
        &serde_json::json!({"detail": [{
            "type": "model_attributes_type",
            "loc": ["body"],
            "msg": "Input should be a valid dictionary or object to extract fields from",
            "input": String::from_utf8_lossy(body),
        }]}),
    ))
}

/// Reads a whole request body up to `limit` bytes; the error is a ready-made 413/400 response.
pub(crate) async fn read_body(body: Incoming, limit: usize) -> Result<Bytes, Response<TkBody>> {
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(json(
            StatusCode::PAYLOAD_TOO_LARGE,
            &serde_json::json!({"detail": "Request Entity Too Large"}),
        )),
        Err(e) => Err(json(
            StatusCode::BAD_REQUEST,
            &serde_json::json!({"detail": format!("error reading body: {e}")}),
        )),
    }
}

/// Notified when a scheduled stream ends, so the vLLM simulator can count outcomes. A stream
/// dropped before either call was abandoned by the peer (the implementor's `Drop` sees that).
pub(crate) trait StreamEnd: Send + 'static {
    fn completed(&mut self) {}
    fn failed(&mut self) {}
}

impl StreamEnd for () {}

/// Builds the bytes of event `seq` given the send time in µs since the UNIX epoch.
pub(crate) type MakeEvent = Box<dyn FnMut(usize, u64) -> Bytes + Send>;

/// SSE body producing `n` events, one per body frame, `interval` apart (the first one after
/// one interval), then `data: [DONE]`.
///
/// Between frames it returns `Pending` once (after waking itself) so hyper flushes each
/// event in its own write instead of batching consecutive ready frames. It is polled by
/// hyper directly, so when the connection goes away the body — and its `StreamEnd` — is
/// dropped: that is how abandonment is detected, with no extra task. With `fail_after` the
/// body yields an error after that many events, which makes hyper abort the connection
/// without the terminating chunk.
pub(crate) struct EventBody<E: StreamEnd> {
    n: usize,
    next: usize,
    interval: Duration,
    fail_after: Option<usize>,
    sleep: Option<Pin<Box<Sleep>>>,
    yield_next: bool,
    finished: bool,
    make: MakeEvent,
    end: E,
}

impl<E: StreamEnd> EventBody<E> {
    pub(crate) fn new(
        n: usize,
        interval: Duration,
        fail_after: Option<usize>,
        make: MakeEvent,
        end: E,
    ) -> Self {
        let sleep = (!interval.is_zero() && n > 0).then(|| Box::pin(tokio::time::sleep(interval)));
        EventBody {
            n,
            next: 0,
            interval,
            fail_after,
            sleep,
            yield_next: false,
            finished: false,
            make,
            end,
        }
    }
}

/// The injected failure a stream reports under `x-sim-fail-after`.
#[derive(Debug)]
pub(crate) struct InjectedFailure;

impl std::fmt::Display for InjectedFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("testkit: injected stream failure (x-sim-fail-after)")
    }
}

impl std::error::Error for InjectedFailure {}

impl<E: StreamEnd + Unpin> Body for EventBody<E> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.finished {
            return Poll::Ready(None);
        }
        if this.yield_next {
            this.yield_next = false;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        if let Some(sleep) = this.sleep.as_mut() {
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            this.sleep = None;
        }
        if this.fail_after == Some(this.next) {
            this.finished = true;
            this.end.failed();
            return Poll::Ready(Some(Err(Box::new(InjectedFailure))));
        }
        this.yield_next = true;
        if this.next < this.n {
            let frame = (this.make)(this.next, crate::sse::now_us());
            this.next += 1;
            if this.next < this.n && !this.interval.is_zero() {
                this.sleep = Some(Box::pin(tokio::time::sleep(this.interval)));
            }
            return Poll::Ready(Some(Ok(Frame::data(frame))));
        }
        this.finished = true;
        this.end.completed();
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(
            b"data: [DONE]\n\n",
        )))))
    }

    fn is_end_stream(&self) -> bool {
        self.finished
    }
}

/// Wraps an SSE body into a `text/event-stream` response.
pub(crate) fn sse_response<E: StreamEnd + Unpin>(body: EventBody<E>) -> Response<TkBody> {
    let mut resp = response(StatusCode::OK, "text/event-stream", body.boxed_unsync());
    resp.headers_mut().insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache"),
    );
    resp
}
