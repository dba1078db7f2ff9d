//! A simulated Gonka `mlnode` (FastAPI management + Proof-of-Compute API).
//!
//! It answers the endpoints the DAPI calls on the PoC/management port with the right shapes,
//! records every request with its exact body (PoC tests compare the bytes the proxy
//! forwarded, e.g. after rewriting the callback `url`), and answers unknown paths with
//! FastAPI's 404 because the DAPI gives a 404 meaning.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};
use hyper::body::Incoming;
use hyper::Request;
use serde_json::json;

use crate::client::TkBody;
use crate::record::{Recorded, Recorder};
use crate::server::{self, Server};

/// Largest accepted request body (PoC batches can be tens of MB).
pub const MAX_BODY: usize = 256 * 1024 * 1024;

/// Simulator behaviour.
#[derive(Clone, Debug, Default)]
pub struct MlnodeConfig {
    /// How long `POST /api/v1/inference/up` blocks before answering (the real one waits
    /// for vLLM to start: minutes). Default 0.
    pub inference_up_delay: Duration,
    /// Answer JSON-body endpoints 422 when the request has no JSON `Content-Type`, as
    /// FastAPI ≥ 0.132 (newer mlnode images) does. Default off (older images).
    pub strict_content_type: bool,
}

struct State {
    cfg: MlnodeConfig,
    recorder: Recorder,
}

/// A running mlnode simulator. Dropping it kills it.
pub struct MlnodeSim {
    server: Server,
    state: Arc<State>,
}

impl MlnodeSim {
    /// Starts on `127.0.0.1:0`.
    pub async fn start(cfg: MlnodeConfig) -> std::io::Result<MlnodeSim> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), cfg).await
    }

    /// Starts on a given address.
    pub async fn start_on(addr: SocketAddr, cfg: MlnodeConfig) -> std::io::Result<MlnodeSim> {
        let state = Arc::new(State {
            cfg,
            recorder: Recorder::new(),
        });
        let st = state.clone();
        let server =
            Server::bind(addr, Arc::new(move |req| Box::pin(handle(st.clone(), req)))).await?;
        Ok(MlnodeSim { server, state })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// Every request received, with full bodies (recorded before any delay).
    pub fn recorder(&self) -> Recorder {
        self.state.recorder.clone()
    }

    /// Stops accepting and aborts every open connection abruptly.
    pub fn kill(&self) {
        self.server.kill();
    }
}

/// Endpoints whose FastAPI handler takes a pydantic body.
fn has_pydantic_body(method: &Method, path: &str) -> bool {
    matches!(
        (method, path),
        (
            &Method::POST,
            "/api/v1/inference/up"
                | "/api/v1/inference/up/async"
                | "/api/v1/pow/init/generate"
                | "/api/v1/pow/init/validate"
                | "/api/v1/pow/validate"
                | "/api/v1/inference/pow/init/generate"
                | "/api/v1/inference/pow/generate"
        ) | (&Method::DELETE, "/api/v1/models")
    )
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
    st.recorder.push(Recorded::new(&parts, body.clone(), at));

    let ok = || server::json(StatusCode::OK, &json!({"status": "OK"}));
    if st.cfg.strict_content_type && has_pydantic_body(&parts.method, parts.uri.path()) {
        if let Some(resp) = server::fastapi_content_type_check(&parts.headers, &body) {
            return resp;
        }
    }
    match (&parts.method, parts.uri.path()) {
        (&Method::GET, "/api/v1/state") => {
            server::json(StatusCode::OK, &json!({"state": "STOPPED"}))
        }
        (&Method::POST, "/api/v1/stop") => ok(),
        (&Method::POST, "/api/v1/inference/up") => {
            if !st.cfg.inference_up_delay.is_zero() {
                tokio::time::sleep(st.cfg.inference_up_delay).await;
            }
            ok()
        }
        (&Method::GET, "/api/v1/pow/status") => server::json(
            StatusCode::OK,
            &json!({"status": "IDLE", "is_model_initialized": false}),
        ),
        (
            &Method::POST,
            "/api/v1/pow/init/generate"
            | "/api/v1/pow/init/validate"
            | "/api/v1/pow/validate"
            | "/api/v1/inference/pow/init/generate"
            | "/api/v1/inference/pow/generate"
            | "/api/v1/inference/pow/stop",
        ) => ok(),
        (&Method::GET | &Method::POST, "/api/v1/inference/pow/status") => ok(),
        (&Method::DELETE, "/api/v1/models") => ok(),
        (&Method::GET, "/health" | "/livez" | "/readyz") => ok(),
        _ => server::not_found(),
    }
}
