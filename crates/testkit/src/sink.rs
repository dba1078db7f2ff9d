//! The Network Node's PoC callback server (DAPI :9100), as seen by ML nodes.
//!
//! It records every callback with its full body (batches can be tens of MB) so tests can
//! check what arrived after the proxy, and its answer status can be changed at run time to
//! exercise the senders' retry-on-≥400 path.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::StatusCode;
use hyper::body::Incoming;
use hyper::Request;

use crate::client::{full, TkBody};
use crate::record::{Recorded, Recorder};
use crate::server::{self, Server};

/// Largest accepted callback body.
pub const MAX_BODY: usize = 256 * 1024 * 1024;

struct State {
    recorder: Recorder,
    status: AtomicU16,
}

/// A running callback sink. Dropping it kills it.
pub struct CallbackSink {
    server: Server,
    state: Arc<State>,
}

impl CallbackSink {
    /// Starts on `127.0.0.1:0`.
    pub async fn start() -> std::io::Result<CallbackSink> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Starts on a given address.
    pub async fn start_on(addr: SocketAddr) -> std::io::Result<CallbackSink> {
        let state = Arc::new(State {
            recorder: Recorder::new(),
            status: AtomicU16::new(200),
        });
        let st = state.clone();
        let server =
            Server::bind(addr, Arc::new(move |req| Box::pin(handle(st.clone(), req)))).await?;
        Ok(CallbackSink { server, state })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// Every callback received, with full bodies.
    pub fn recorder(&self) -> Recorder {
        self.state.recorder.clone()
    }

    /// Status for subsequent answers (default 200). Values outside 200..=599 answer 500.
    pub fn set_status(&self, status: u16) {
        self.state.status.store(status, Ordering::SeqCst);
    }

    /// Stops accepting and aborts every open connection abruptly.
    pub fn kill(&self) {
        self.server.kill();
    }
}

async fn handle(st: Arc<State>, req: Request<Incoming>) -> hyper::Response<TkBody> {
    let at = Instant::now();
    let (parts, body) = req.into_parts();
    let body = match server::read_body(body, MAX_BODY).await {
        Ok(b) => b,
        Err(resp) => {
            st.recorder.push(Recorded::new(&parts, Bytes::new(), at));
            return resp;
        }
    };
    st.recorder.push(Recorded::new(&parts, body, at));
    let status = st.status.load(Ordering::SeqCst);
    let status = match StatusCode::from_u16(status) {
        Ok(s) if (200..=599).contains(&status) => s,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let body = if matches!(status.as_u16(), 204 | 304) {
        crate::client::empty()
    } else {
        full("{}")
    };
    server::response(status, "application/json", body)
}
