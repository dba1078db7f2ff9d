//! A simulated Gonka `mlnode` (FastAPI management + Proof-of-Compute API).
//!
//! It answers the endpoints the DAPI calls on the PoC/management port with the right shapes,
//! records every request with its exact body (PoC tests compare the bytes the proxy
//! forwarded, e.g. after rewriting the callback `url`), and answers unknown paths with
//! FastAPI's 404 because the DAPI gives a 404 meaning.
//!
//! Starting inference follows the mlnode's `api/inference/routes.py`:
//! - `POST /api/v1/inference/up` starts vLLM and blocks until the start has ended: 200
//!   `{"status":"OK"}`, or 500 `{"detail": <error>}` when it failed;
//! - `POST /api/v1/inference/up/async` starts it and answers at once, 200
//!   `{"status":"starting","message":"Inference startup initiated in background"}`;
//! - both answer 409 `{"detail": ...}` while a start is in progress or vLLM is running;
//! - `GET /api/v1/inference/up/status` → 200 `{status, is_starting, is_running,
//!   elapsed_seconds, error}`, status `not_started | in_progress | completed | failed |
//!   cancelled`;
//! - `POST /api/v1/inference/down` stops vLLM (a start in progress becomes `cancelled`).
//!
//! A start takes `inference_up_delay`; with `start_error` it then fails, and with
//! `exit_after_failure` the process "exits" that long after the failure and comes back
//! fresh (`not_started`), as the real container does. [`MlnodeSim::restart`] restarts the
//! process at any moment (open connections dropped, state lost), e.g. mid-start.

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
    /// The start fails with this error (after `inference_up_delay`). Default: it succeeds.
    pub start_error: Option<String>,
    /// After a failed start the process exits and restarts this much later (status back
    /// to `not_started`). Default: `failed` stays visible.
    pub exit_after_failure: Option<Duration>,
    /// An older mlnode without `up/async` and `up/status` (they answer 404).
    pub no_async: bool,
    /// `up/async` answers this late (the start has begun already): lets a hop cut the
    /// answer of a call that did reach the mlnode.
    pub async_answer_delay: Duration,
}

/// The start state machine (lazy: computed from the clock when asked).
#[derive(Debug, Clone)]
enum Phase {
    NotStarted,
    Starting {
        since: Instant,
        until: Instant,
        error: Option<String>,
    },
    Cancelled {
        since: Instant,
    },
}

/// What `up/status` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartStatus {
    NotStarted,
    InProgress,
    Completed,
    Failed,
    Cancelled,
}

impl StartStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            StartStatus::NotStarted => "not_started",
            StartStatus::InProgress => "in_progress",
            StartStatus::Completed => "completed",
            StartStatus::Failed => "failed",
            StartStatus::Cancelled => "cancelled",
        }
    }
}

struct State {
    cfg: MlnodeConfig,
    recorder: Recorder,
    phase: std::sync::Mutex<Phase>,
}

impl State {
    fn lock(&self) -> std::sync::MutexGuard<'_, Phase> {
        self.phase.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The status now; a failed start whose process has "exited" is reset here.
    fn status(&self) -> (StartStatus, Option<Instant>, Option<String>) {
        let now = Instant::now();
        let mut phase = self.lock();
        match phase.clone() {
            Phase::NotStarted => (StartStatus::NotStarted, None, None),
            Phase::Cancelled { since } => (StartStatus::Cancelled, Some(since), None),
            Phase::Starting { since, until, .. } if now < until => {
                (StartStatus::InProgress, Some(since), None)
            }
            Phase::Starting {
                since, error: None, ..
            } => (StartStatus::Completed, Some(since), None),
            Phase::Starting {
                since,
                until,
                error: Some(e),
            } => match self.cfg.exit_after_failure {
                Some(exit) if now >= until + exit => {
                    *phase = Phase::NotStarted;
                    (StartStatus::NotStarted, None, None)
                }
                _ => (StartStatus::Failed, Some(since), Some(e)),
            },
        }
    }

    /// Starts vLLM unless a start is in progress or vLLM runs: then the 409 detail.
    fn begin(&self) -> Result<Instant, &'static str> {
        let (status, _, _) = self.status();
        match status {
            StartStatus::InProgress => {
                Err("VLLM startup is already in progress. Use /inference/down to stop it first.")
            }
            StartStatus::Completed => {
                Err("VLLM is already running. Use /inference/down to stop it first.")
            }
            _ => {
                let since = Instant::now();
                let until = since + self.cfg.inference_up_delay;
                *self.lock() = Phase::Starting {
                    since,
                    until,
                    error: self.cfg.start_error.clone(),
                };
                Ok(until)
            }
        }
    }
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
            phase: std::sync::Mutex::new(Phase::NotStarted),
        });
        let server = Self::serve(addr, state.clone()).await?;
        Ok(MlnodeSim { server, state })
    }

    async fn serve(addr: SocketAddr, st: Arc<State>) -> std::io::Result<Server> {
        Server::bind(addr, Arc::new(move |req| Box::pin(handle(st.clone(), req)))).await
    }

    /// The process restarts: every open connection is dropped, the start state is lost
    /// (`not_started`), and it listens again on the same address. The recorder is kept.
    pub async fn restart(&mut self) -> std::io::Result<()> {
        let addr = self.server.addr();
        self.server.kill();
        *self.state.lock() = Phase::NotStarted;
        // The aborted accept task releases the port when the runtime next polls it; an
        // abort offers nothing to await, so the bind is retried briefly (bounded).
        let mut tries = 0;
        loop {
            match Self::serve(addr, self.state.clone()).await {
                Ok(server) => {
                    self.server = server;
                    return Ok(());
                }
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tries < 200 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// What `up/status` would report now.
    pub fn start_status(&self) -> StartStatus {
        self.state.status().0
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
        (&Method::POST, "/api/v1/inference/up") => match st.begin() {
            Err(detail) => server::json(StatusCode::CONFLICT, &json!({ "detail": detail })),
            Ok(until) => {
                tokio::time::sleep_until(until.into()).await;
                match st.cfg.start_error.as_deref() {
                    None => ok(),
                    Some(e) => {
                        server::json(StatusCode::INTERNAL_SERVER_ERROR, &json!({ "detail": e }))
                    }
                }
            }
        },
        (_, "/api/v1/inference/up/async" | "/api/v1/inference/up/status") if st.cfg.no_async => {
            server::not_found()
        }
        (&Method::POST, "/api/v1/inference/up/async") => match st.begin() {
            Err(detail) => server::json(StatusCode::CONFLICT, &json!({ "detail": detail })),
            Ok(_) => {
                tokio::time::sleep(st.cfg.async_answer_delay).await;
                server::json(
                    StatusCode::OK,
                    &json!({"status": "starting", "message": "Inference startup initiated in background"}),
                )
            }
        },
        (&Method::GET, "/api/v1/inference/up/status") => {
            let (status, since, error) = st.status();
            server::json(
                StatusCode::OK,
                &json!({
                    "status": status.as_str(),
                    "is_starting": status == StartStatus::InProgress,
                    "is_running": status == StartStatus::Completed,
                    "elapsed_seconds": since.map(|s| s.elapsed().as_secs_f64()),
                    "error": error,
                }),
            )
        }
        (&Method::POST, "/api/v1/inference/down") => {
            let (status, _, _) = st.status();
            *st.lock() = if status == StartStatus::InProgress {
                Phase::Cancelled {
                    since: Instant::now(),
                }
            } else {
                Phase::NotStarted
            };
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
