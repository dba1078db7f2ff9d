//! Long-call mode for `POST /api/v1/inference/up` (route key `inference_up = "async"`).
//!
//! The mlnode's synchronous `inference/up` blocks until vLLM is healthy (cold starts take
//! 9–27 minutes), so behind a hop that cuts responses whose head has not started within
//! 100 s (RunPod's HTTP proxy, i.e. Cloudflare: 524) it can never succeed. In this mode
//! podproxy receives the DAPI's synchronous call and carries it out as
//! `POST …/inference/up/async` (same body, answers at once) followed by
//! `GET …/inference/up/status` polls, every one of them short, and answers the DAPI's
//! connection exactly as the synchronous call would have:
//!
//! | the mlnode says | the DAPI gets |
//! |---|---|
//! | `completed` | 200 `{"status":"OK"}` |
//! | `up/async` answers 409 (already running / starting) | that 409 and its body |
//! | `failed` | 500 `{"detail": <the mlnode's error>}` |
//! | `not_started` after `in_progress` (the process restarted), `cancelled`, or no answer for longer than `unreachable_grace` | 502 `inference_start_interrupted` |
//! | still not `completed` after `budget` | 504 `inference_start_timeout` |
//! | `up/async` answers 404 (an mlnode without it) | the plain synchronous call, with a WARN |
//!
//! A poll that fails (524, 502, a reset, a connect error, any non-200) is retried at the
//! next interval; success is never reported without `completed`. An `up/async` call that
//! fails in transit is ambiguous: `up/status` then decides whether to follow a start that
//! began or to send `up/async` again (within `unreachable_grace`). The polls run in a task
//! of their own, so when the DAPI's client goes away the start (which the mlnode carries on
//! anyway) is still followed to its end, bounded by the budget, and the log says so.
//! See docs/long-calls.md.

use crate::access_log::Exchange;
use crate::body::Relay;
use crate::error::ProxyError;
use crate::upstream::Upstream;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use prometheus_client::metrics::counter::Counter;
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// The synchronous start call the DAPI makes (after the version prefix is stripped).
pub const UP_PATH: &str = "/api/v1/inference/up";
const ASYNC_PATH: &str = "/api/v1/inference/up/async";
const STATUS_PATH: &str = "/api/v1/inference/up/status";
/// `{model, dtype, additional_args}`: small. Larger bodies get 413.
const MAX_REQUEST_BODY: usize = 1024 * 1024;
/// Largest mlnode answer read (status JSON, a 409 body).
const MAX_ANSWER: usize = 64 * 1024;
/// Longest wait for one `up/async` or `up/status` answer: far below any 100 s limit.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

pub use crate::config::longcall::{defaults, InferenceUpMode, LongCallConfig};
pub use crate::metrics::long_calls::{LongCallMetrics, OutcomeLabels, UpstreamLabel};

/// The long-call settings when this request is the synchronous start call on a route in
/// long-call mode. `path` is the upstream path (prefixes already stripped), no query.
pub fn applies(cfg: Option<LongCallConfig>, method: &Method, path: &str) -> Option<LongCallConfig> {
    cfg.filter(|_| method == Method::POST && path == UP_PATH)
}

/// How a long call ended (a bounded metrics label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Completed,
    Failed,
    Conflict,
    Rejected,
    Restarted,
    Unreachable,
    Cancelled,
    Budget,
    FallbackSync,
    Error,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Failed => "failed",
            Outcome::Conflict => "conflict",
            Outcome::Rejected => "rejected",
            Outcome::Restarted => "restarted",
            Outcome::Unreachable => "unreachable",
            Outcome::Cancelled => "cancelled",
            Outcome::Budget => "budget",
            Outcome::FallbackSync => "fallback_sync",
            Outcome::Error => "error",
        }
    }
}

/// What the DAPI gets, decided by the poll task.
enum Answer {
    Ok,
    Failed(String),
    Err(ProxyError),
}

/// One request to the mlnode for this long call: the client's request headers (as
/// prepared for the upstream: forwarding headers, `Host`, `x-request-id`), another path.
struct Caller {
    upstream: Arc<Upstream>,
    index: usize,
    headers: HeaderMap,
    idle: Duration,
}

impl Caller {
    fn request(&self, method: Method, path: &str, body: Bytes) -> Result<Request<Relay>, String> {
        let uri: Uri = path.parse().map_err(|e| format!("bad path {path}: {e}"))?;
        let mut headers = self.headers.clone();
        if body.is_empty() {
            for h in [
                header::CONTENT_LENGTH,
                header::CONTENT_TYPE,
                header::TRANSFER_ENCODING,
            ] {
                headers.remove(h);
            }
        } else {
            headers.remove(header::TRANSFER_ENCODING);
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        }
        if self.upstream.cfg.rewrite_host {
            if let Some(b) = self.upstream.backends().get(self.index) {
                if let Ok(host) = HeaderValue::from_str(b.addr.authority.as_str()) {
                    headers.insert(header::HOST, host);
                }
            }
        }
        let mut req = Request::new(Relay::full(body));
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        *req.headers_mut() = headers;
        Ok(req)
    }

    /// Sends a short call and reads its (small) answer whole.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<(StatusCode, HeaderMap, Bytes), String> {
        let req = self.request(method, path, body)?;
        let sent = tokio::time::timeout(CALL_TIMEOUT, async {
            let (resp, lease) = self
                .upstream
                .send(self.index, req)
                .await
                .map_err(|e| e.to_string())?;
            let (parts, body) = resp.into_parts();
            let body = Relay::upstream(body, lease, self.idle);
            let bytes = Limited::new(body, MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| format!("reading the answer: {e}"))?
                .to_bytes();
            Ok::<_, String>((parts.status, parts.headers, bytes))
        })
        .await;
        match sent {
            Ok(r) => r,
            Err(_) => Err(format!(
                "no answer within {}",
                humantime::format_duration(CALL_TIMEOUT)
            )),
        }
    }

    fn backend_label(&self) -> String {
        self.upstream
            .backends()
            .get(self.index)
            .map_or_else(|| "-".to_string(), |b| b.label.to_string())
    }
}

/// `GET up/status` answer (the fields podproxy reads).
#[derive(Deserialize)]
struct StartupStatus {
    status: String,
    #[serde(default)]
    error: Option<String>,
}

/// One long call as `forward` hands it over.
pub struct Call<'a> {
    pub upstream: &'a Arc<Upstream>,
    pub cfg: LongCallConfig,
    /// The request's query, kept on the `up/async` call.
    pub query: Option<&'a str>,
    /// The route's `json_content_type` applies (and the request has no Content-Type).
    pub json_content_type: bool,
    pub series: &'a crate::metrics::ListenerSeries,
}

/// Carries out the DAPI's synchronous `inference/up` in long-call mode. `parts` are the
/// request's parts with headers already prepared for the upstream.
pub async fn inference_up(
    call: Call<'_>,
    mut parts: http::request::Parts,
    body: Incoming,
    ex: &mut Exchange,
) -> Result<Response<Relay>, ProxyError> {
    let Call {
        upstream,
        cfg,
        query,
        json_content_type,
        series,
    } = call;
    let metrics = series.metrics();
    let idle = upstream.cfg.idle_timeout;
    let body = Limited::new(Relay::stream(body, idle), MAX_REQUEST_BODY)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                ProxyError::PayloadTooLarge {
                    limit: MAX_REQUEST_BODY as u64,
                }
            } else {
                ProxyError::RequestBody(e.to_string())
            }
        })?
        .to_bytes();
    ex.received(body.len() as u64);
    if json_content_type {
        crate::headers::json_content_type(
            &mut parts.headers,
            std::slice::from_ref(&body),
            series.content_type_added(),
        );
    }

    // The slot is held for the whole long call: by the synchronous fallback's lease, or by
    // the task that follows the start.
    let (index, slot) = upstream.acquire(&[]).await?;
    ex.attempt(slot.backend().label.clone());
    let lc = &metrics.long_calls;
    let name = upstream.name.to_string();
    LongCallMetrics::upstream(&lc.started, &name).inc();
    let caller = Caller {
        upstream: upstream.clone(),
        index,
        headers: parts.headers,
        idle,
    };
    let with_query = |path: &str| match query {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };

    let (status, headers, answer) =
        match start(&caller, cfg, &with_query(ASYNC_PATH), body.clone()).await {
            Started::Answer(r) => r,
            Started::Running => (StatusCode::OK, HeaderMap::new(), Bytes::new()),
            Started::Failed(detail) => {
                lc.outcome(&name, Outcome::Error.label());
                return Err(ProxyError::UpstreamBroken {
                    upstream: name,
                    backend: caller.backend_label(),
                    detail: format!("{ASYNC_PATH}: {detail}"),
                });
            }
        };
    if status == StatusCode::NOT_FOUND {
        tracing::warn!(
            upstream = &*name,
            backend = caller.backend_label(),
            "the mlnode has no {ASYNC_PATH} (404): forwarding the synchronous {UP_PATH}, \
             which a hop with a 100 s limit (RunPod's HTTP proxy) will cut"
        );
        lc.outcome(&name, Outcome::FallbackSync.label());
        let req = caller
            .request(Method::POST, &with_query(UP_PATH), body)
            .map_err(ProxyError::BadRequest)?;
        let (resp, lease) = upstream.send_holding(index, slot, req).await?;
        ex.first_byte();
        let (mut parts, body) = resp.into_parts();
        crate::headers::remove_hop_by_hop(&mut parts.headers);
        parts.version = http::Version::HTTP_11;
        return Ok(Response::from_parts(
            parts,
            Relay::upstream(body, lease, idle),
        ));
    }
    if !status.is_success() {
        // A 409 (already running / starting) or any other refusal: exactly what the
        // synchronous call would have answered.
        lc.outcome(
            &name,
            if status == StatusCode::CONFLICT {
                Outcome::Conflict
            } else {
                Outcome::Rejected
            }
            .label(),
        );
        ex.first_byte();
        return Ok(answer_as_is(status, &headers, answer));
    }
    tracing::info!(
        upstream = &*name,
        backend = caller.backend_label(),
        "inference start initiated via {ASYNC_PATH}; polling {STATUS_PATH} every {} (budget {})",
        humantime::format_duration(cfg.poll_interval),
        humantime::format_duration(cfg.budget),
    );

    let (tx, rx) = oneshot::channel();
    let request_id = ex.request_id().to_str().unwrap_or("-").to_string();
    let polls = LongCallMetrics::upstream(&lc.polls, &name);
    let outcomes = lc.outcomes.clone();
    tokio::spawn(async move {
        let _slot = slot;
        let (outcome, answer) = follow(&caller, cfg, polls, tx).await;
        outcomes
            .get_or_create(&OutcomeLabels {
                upstream: caller.upstream.name.to_string(),
                outcome: outcome.label().to_string(),
            })
            .inc();
        if let Some(answer) = answer {
            let what = match &answer {
                Answer::Ok => "completed".to_string(),
                Answer::Failed(d) => format!("failed: {d}"),
                Answer::Err(e) => e.to_string(),
            };
            tracing::warn!(
                upstream = &*caller.upstream.name,
                request_id,
                "inference start ended ({what}) after the DAPI's connection had closed; \
                 nobody was left to tell"
            );
        }
    });
    let answer = rx.await.map_err(|_| ProxyError::UpstreamBroken {
        upstream: name.clone(),
        backend: ex.backend().unwrap_or("-").to_string(),
        detail: "the long-call task ended without an answer".into(),
    })?;
    ex.first_byte();
    match answer {
        Answer::Ok => Ok(json(StatusCode::OK, &serde_json::json!({"status": "OK"}))),
        Answer::Failed(detail) => Ok(json(
            StatusCode::INTERNAL_SERVER_ERROR,
            &serde_json::json!({ "detail": detail }),
        )),
        Answer::Err(e) => Err(e),
    }
}

/// How the `up/async` call went.
enum Started {
    /// The mlnode's answer (2xx, 404, 409, any other refusal).
    Answer((StatusCode, HeaderMap, Bytes)),
    /// The call failed in transit, but `up/status` shows a start running (ours, whose
    /// answer was lost, or one already under way): follow it.
    Running,
    /// No answer, and no start seen, within the grace.
    Failed(String),
}

/// A status a hop gives when it could not get an answer (Cloudflare's 52x included): the
/// call may or may not have reached the mlnode.
fn transient(status: StatusCode) -> bool {
    matches!(status.as_u16(), 502..=504 | 520..=527)
}

/// Sends `up/async`. A failure in transit (reset, connect error, 502/503/504/52x from a
/// hop) is ambiguous, so `up/status` decides: a start in progress (or vLLM up) is followed,
/// otherwise `up/async` is sent again, for up to `unreachable_grace`.
async fn start(caller: &Caller, cfg: LongCallConfig, path: &str, body: Bytes) -> Started {
    let give_up = Instant::now() + cfg.unreachable_grace;
    loop {
        let failure = match caller.call(Method::POST, path, body.clone()).await {
            Ok((status, _, _)) if transient(status) => format!("answered {status}"),
            Ok(answer) => return Started::Answer(answer),
            Err(e) => e,
        };
        tracing::info!(
            upstream = &*caller.upstream.name,
            backend = caller.backend_label(),
            "{ASYNC_PATH} failed ({failure}); asking {STATUS_PATH} whether the start began"
        );
        if let Ok((StatusCode::OK, _, b)) =
            caller.call(Method::GET, STATUS_PATH, Bytes::new()).await
        {
            if let Ok(s) = serde_json::from_slice::<StartupStatus>(&b) {
                if matches!(s.status.as_str(), "in_progress" | "completed") {
                    return Started::Running;
                }
            }
        }
        if Instant::now() + cfg.poll_interval > give_up {
            return Started::Failed(failure);
        }
        tokio::time::sleep(cfg.poll_interval).await;
    }
}

/// Polls `up/status` until the start ends, the budget runs out or the node stays
/// unreachable. Returns the outcome, and the answer when the DAPI was no longer there to
/// take it.
async fn follow(
    caller: &Caller,
    cfg: LongCallConfig,
    polls: Counter,
    mut tx: oneshot::Sender<Answer>,
) -> (Outcome, Option<Answer>) {
    let upstream = caller.upstream.name.to_string();
    let backend = caller.backend_label();
    let interrupted = |detail: String| {
        Answer::Err(ProxyError::StartInterrupted {
            upstream: upstream.clone(),
            backend: backend.clone(),
            detail,
        })
    };
    let started = Instant::now();
    let deadline = started + cfg.budget;
    let mut last_answer = started;
    let mut seen_in_progress = false;
    let mut client_gone = false;
    let grace = humantime::format_duration(cfg.unreachable_grace);
    let (outcome, answer) = loop {
        let next = (Instant::now() + cfg.poll_interval).min(deadline);
        if !client_gone {
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {}
                _ = tx.closed() => {
                    client_gone = true;
                    tracing::warn!(
                        upstream = &*upstream,
                        backend = &*backend,
                        "the DAPI's connection closed during a long inference/up; the start \
                         continues on the mlnode and podproxy follows it to its end (budget {})",
                        humantime::format_duration(cfg.budget)
                    );
                    tokio::time::sleep_until(next).await;
                }
            }
        } else {
            tokio::time::sleep_until(next).await;
        }
        let now = Instant::now();
        if now >= deadline {
            break (
                Outcome::Budget,
                Answer::Err(ProxyError::StartTimeout {
                    upstream: upstream.clone(),
                    backend: backend.clone(),
                    budget: cfg.budget,
                }),
            );
        }
        polls.inc();
        let polled = tokio::time::timeout_at(
            deadline,
            caller.call(Method::GET, STATUS_PATH, Bytes::new()),
        )
        .await
        .unwrap_or_else(|_| Err("the budget ran out during the poll".into()));
        let failure = match polled {
            Ok((StatusCode::OK, _, body)) => {
                match serde_json::from_slice::<StartupStatus>(&body) {
                    Ok(s) => {
                        last_answer = Instant::now();
                        match s.status.as_str() {
                            "completed" => break (Outcome::Completed, Answer::Ok),
                            "in_progress" => {
                                seen_in_progress = true;
                                continue;
                            }
                            "failed" => {
                                let detail = s
                                    .error
                                    .filter(|e| !e.is_empty())
                                    .unwrap_or_else(|| "inference startup failed".into());
                                break (Outcome::Failed, Answer::Failed(detail));
                            }
                            "cancelled" => break (
                                Outcome::Cancelled,
                                interrupted(
                                    "the mlnode reports the start as cancelled (inference/down?)"
                                        .into(),
                                ),
                            ),
                            "not_started" if seen_in_progress => {
                                break (
                                    Outcome::Restarted,
                                    interrupted(
                                        "the mlnode restarted during the start (status went from \
                                     in_progress back to not_started)"
                                            .into(),
                                    ),
                                )
                            }
                            // Just after up/async the start may not be registered yet; if it
                            // never is, the grace below ends the wait.
                            "not_started" => {
                                if now.duration_since(started) > cfg.unreachable_grace {
                                    break (
                                        Outcome::Restarted,
                                        interrupted(format!(
                                            "the mlnode still reports not_started {grace} after \
                                         up/async accepted the start (restarted?)"
                                        )),
                                    );
                                }
                                continue;
                            }
                            other => format!("unknown start status {other:?}"),
                        }
                    }
                    Err(e) => format!("unreadable status answer: {e}"),
                }
            }
            Ok((status, _, _)) => format!("status poll answered {status}"),
            Err(e) => e,
        };
        // A transient failure: retried at the next interval, unless the node has been
        // silent for longer than the grace.
        let silent = Instant::now().duration_since(last_answer);
        tracing::info!(
            upstream = &*upstream,
            backend = &*backend,
            "long-call status poll failed ({failure}); retrying"
        );
        if silent > cfg.unreachable_grace {
            tracing::warn!(
                upstream = &*upstream,
                backend = &*backend,
                "no answer to a status poll for {}s; the last failure: {failure}",
                silent.as_secs()
            );
            break (
                Outcome::Unreachable,
                interrupted(format!(
                    "the mlnode did not answer a status poll for {} (restarting or \
                     unreachable)",
                    humantime::format_duration(Duration::from_secs(silent.as_secs()))
                )),
            );
        }
    };
    tracing::info!(
        upstream = &*upstream,
        backend = &*backend,
        outcome = outcome.label(),
        elapsed_s = started.elapsed().as_secs(),
        "long inference/up ended"
    );
    match tx.send(answer) {
        Ok(()) => (outcome, None),
        Err(answer) => (outcome, Some(answer)),
    }
}

fn json(status: StatusCode, v: &serde_json::Value) -> Response<Relay> {
    let mut resp = Response::new(Relay::full(v.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// An mlnode answer relayed with its status, type and body.
fn answer_as_is(status: StatusCode, headers: &HeaderMap, body: Bytes) -> Response<Relay> {
    let mut resp = Response::new(Relay::full(body));
    *resp.status_mut() = status;
    if let Some(t) = headers.get(header::CONTENT_TYPE) {
        resp.headers_mut().insert(header::CONTENT_TYPE, t.clone());
    }
    resp
}
