//! A stand-in for Cloudflare in front of a RunPod pod (`*.proxy.runpod.net`): a reverse
//! proxy that answers **524** when the upstream's response head has not arrived within
//! `limit` (Cloudflare: 100 s; tests scale it down), and otherwise relays the response as
//! it streams.
//!
//! Every request gets its own upstream connection, driven by a task that is aborted when
//! the request is given up (524, or the client gone before or during the response), so
//! the upstream sees the close exactly as it would behind the real hop.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, StatusCode};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::task::AbortHandle;

use crate::client::{BoxError, TkBody};
use crate::server::{self, Server};

struct State {
    upstream: SocketAddr,
    limit: Duration,
    cut: AtomicU64,
    relayed: AtomicU64,
}

/// A running hop. Dropping it kills it.
pub struct HeadTimeoutHop {
    server: Server,
    state: Arc<State>,
}

impl HeadTimeoutHop {
    /// Starts on `127.0.0.1:0` in front of `upstream` (`host:port`, plain HTTP/1.1).
    pub async fn start(upstream: SocketAddr, limit: Duration) -> std::io::Result<Self> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), upstream, limit).await
    }

    /// Starts on a given address.
    pub async fn start_on(
        addr: SocketAddr,
        upstream: SocketAddr,
        limit: Duration,
    ) -> std::io::Result<Self> {
        let state = Arc::new(State {
            upstream,
            limit,
            cut: AtomicU64::new(0),
            relayed: AtomicU64::new(0),
        });
        let st = state.clone();
        let server =
            Server::bind(addr, Arc::new(move |req| Box::pin(handle(st.clone(), req)))).await?;
        Ok(HeadTimeoutHop { server, state })
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// Requests answered 524.
    pub fn cut(&self) -> u64 {
        self.state.cut.load(Ordering::SeqCst)
    }

    /// Responses relayed from the upstream (head in time).
    pub fn relayed(&self) -> u64 {
        self.state.relayed.load(Ordering::SeqCst)
    }
}

/// Aborts the upstream connection's task when dropped.
struct Abort(AbortHandle);

impl Drop for Abort {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The upstream's response body; holds the connection task.
struct Relayed {
    body: Incoming,
    _conn: Abort,
}

impl Body for Relayed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.body)
            .poll_frame(cx)
            .map_err(|e| Box::new(e) as BoxError)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }
}

fn cloudflare(status: StatusCode, code: u16) -> hyper::Response<TkBody> {
    let mut resp = server::response(
        status,
        "text/plain; charset=UTF-8",
        crate::client::full(format!("error code: {code}")),
    );
    resp.headers_mut()
        .insert("server", HeaderValue::from_static("cloudflare"));
    resp
}

async fn handle(st: Arc<State>, req: Request<Incoming>) -> hyper::Response<TkBody> {
    let stream = match tokio::net::TcpStream::connect(st.upstream).await {
        Ok(s) => s,
        Err(_) => return cloudflare(StatusCode::BAD_GATEWAY, 502),
    };
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) =
        match hyper::client::conn::http1::handshake::<_, TkBody>(TokioIo::new(stream)).await {
            Ok(x) => x,
            Err(_) => return cloudflare(StatusCode::BAD_GATEWAY, 502),
        };
    let guard = Abort(tokio::spawn(conn).abort_handle());
    let (parts, body) = req.into_parts();
    let body = body.map_err(|e| Box::new(e) as BoxError).boxed_unsync();
    let up = Request::from_parts(parts, body);
    match tokio::time::timeout(st.limit, sender.send_request(up)).await {
        Err(_) => {
            st.cut.fetch_add(1, Ordering::SeqCst);
            drop(guard);
            cloudflare(
                StatusCode::from_u16(524).unwrap_or(StatusCode::GATEWAY_TIMEOUT),
                524,
            )
        }
        Ok(Err(_)) => cloudflare(StatusCode::BAD_GATEWAY, 502),
        Ok(Ok(resp)) => {
            st.relayed.fetch_add(1, Ordering::SeqCst);
            let (mut parts, body) = resp.into_parts();
            for h in [header::CONNECTION, header::TRANSFER_ENCODING] {
                parts.headers.remove(h);
            }
            let body = Relayed { body, _conn: guard }.boxed_unsync();
            hyper::Response::from_parts(parts, body)
        }
    }
}
