//! A simulated vLLM OpenAI-compatible server.
//!
//! It produces tokens on a fixed schedule (`prefill`, then one token every `token_interval`)
//! so proxy tests can measure added latency and batching, and it counts generations that
//! were abandoned because the peer went away — the property a streaming proxy must preserve
//! (a client disconnect must reach the GPU and stop the generation).
//!
//! Per-request overrides: body `max_tokens`; headers `x-sim-tokens`, `x-sim-interval-ms`,
//! `x-sim-prefill-ms`, and `x-sim-fail-after: N` (streams only: abort the connection after
//! N events without the terminating chunk).
//!
//! How abandonment is detected: hyper's HTTP/1 server keeps reading the socket while a
//! request is being handled (with the default `half_close(false)`), so a client closing its
//! TCP connection fails the connection and drops the pending handler future (prefill,
//! non-streaming generation) or the response body (mid-stream). Both hold a guard whose
//! `Drop` counts the cancellation; `tests/vllm.rs` proves each case.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use hyper::body::Incoming;
use hyper::Request;
use serde_json::{json, Value};
use tokio::sync::Notify;

use crate::client::TkBody;
use crate::record::{Recorded, Recorder};
use crate::server::{self, EventBody, Server, StreamEnd};

/// Largest accepted request body.
pub const MAX_BODY: usize = 16 * 1024 * 1024;
/// Upper bound on tokens per request, whatever the request asks.
pub const MAX_TOKENS: usize = 1_000_000;
/// Upper bound on the per-token interval and prefill overrides.
pub const MAX_DELAY: Duration = Duration::from_secs(3600);

/// Simulator behaviour; per-request headers override it.
#[derive(Clone, Debug)]
pub struct VllmConfig {
    /// Delay between tokens (default 5 ms).
    pub token_interval: Duration,
    /// Tokens per completion when the request does not say (default 16).
    pub tokens: usize,
    /// Delay before the first token, i.e. before the response head (default 0).
    pub prefill: Duration,
    /// Model id reported everywhere (default `Qwen/Qwen3-32B-FP8`).
    pub model: String,
    /// Answer POSTs 422 when they have no JSON `Content-Type`, as vLLM ≥ 0.20's API server
    /// (FastAPI ≥ 0.132) does. Default off (older vLLM).
    pub strict_content_type: bool,
    /// GPU-like mode (decode slots, KV budget, waiting queue, prefix cache, `/metrics`):
    /// see [`crate::gpu`]. Default off: the fixed schedule above. In this mode `prefill`
    /// and the `x-sim-prefill-ms` / `x-sim-interval-ms` headers are not used; decode runs
    /// at `token_interval`.
    pub gpu: Option<crate::gpu::GpuConfig>,
}

impl Default for VllmConfig {
    fn default() -> Self {
        VllmConfig {
            token_interval: Duration::from_millis(5),
            tokens: 16,
            prefill: Duration::ZERO,
            model: "Qwen/Qwen3-32B-FP8".to_owned(),
            strict_content_type: false,
            gpu: None,
        }
    }
}

/// Counters of the simulator. Fields are public atomics for direct reads; the methods of
/// the same name return plain values. Every change wakes [`wait_until`](Self::wait_until).
#[derive(Debug, Default)]
pub struct VllmStats {
    /// Requests received (any endpoint).
    pub requests: AtomicU64,
    /// Streaming responses whose head was sent (after prefill).
    pub streams_started: AtomicU64,
    /// Streams that produced `data: [DONE]`.
    pub streams_completed: AtomicU64,
    /// Non-streaming generations that finished.
    pub completions: AtomicU64,
    /// Generations abandoned because the peer went away (during prefill, mid-stream, or
    /// during a non-streaming generation), or because the simulator was killed.
    pub cancelled: AtomicU64,
    /// Streams aborted on purpose by `x-sim-fail-after`.
    pub failed: AtomicU64,
    active: AtomicU64,
    notify: Notify,
}

impl VllmStats {
    /// Requests received.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }
    /// Streams started.
    pub fn streams_started(&self) -> u64 {
        self.streams_started.load(Ordering::SeqCst)
    }
    /// Streams completed.
    pub fn streams_completed(&self) -> u64 {
        self.streams_completed.load(Ordering::SeqCst)
    }
    /// Non-streaming completions finished.
    pub fn completions(&self) -> u64 {
        self.completions.load(Ordering::SeqCst)
    }
    /// Generations cancelled by the peer going away.
    pub fn cancelled(&self) -> u64 {
        self.cancelled.load(Ordering::SeqCst)
    }
    /// Streams failed on purpose.
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::SeqCst)
    }
    /// Generations currently running (prefill, streaming or non-streaming).
    pub fn in_flight(&self) -> u64 {
        self.active.load(Ordering::SeqCst)
    }

    fn bump(&self, counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    /// Waits until `pred` holds; `false` on timeout. Event-driven: re-checked on every
    /// counter change.
    pub async fn wait_until(&self, timeout: Duration, pred: impl Fn(&VllmStats) -> bool) -> bool {
        let deadline = crate::client::deadline(timeout);
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if pred(self) {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return pred(self);
            }
        }
    }

    /// Waits until at least `n` generations were cancelled.
    pub async fn wait_cancelled(&self, n: u64, timeout: Duration) -> bool {
        self.wait_until(timeout, |s| s.cancelled() >= n).await
    }

    /// Waits until no generation is running.
    pub async fn wait_idle(&self, timeout: Duration) -> bool {
        self.wait_until(timeout, |s| s.in_flight() == 0).await
    }
}

#[derive(PartialEq)]
enum Outcome {
    Running,
    Completed,
    Failed,
}

/// Lives as long as a generation; its `Drop` classifies how the generation ended. Dropped
/// while still `Running` means nobody is waiting for the tokens any more: a cancellation.
struct GenGuard {
    stats: Arc<VllmStats>,
    streaming: bool,
    outcome: Outcome,
}

impl GenGuard {
    fn new(stats: Arc<VllmStats>, streaming: bool) -> Self {
        stats.bump(&stats.active);
        GenGuard {
            stats,
            streaming,
            outcome: Outcome::Running,
        }
    }
}

impl StreamEnd for GenGuard {
    fn completed(&mut self) {
        self.outcome = Outcome::Completed;
    }
    fn failed(&mut self) {
        self.outcome = Outcome::Failed;
    }
}

/// A streamed generation's end: the counters, and (GPU mode) its decode slot.
struct Generation {
    guard: GenGuard,
    slot: Option<crate::gpu::Slot>,
}

impl StreamEnd for Generation {
    fn completed(&mut self) {
        self.guard.completed();
        if let Some(s) = self.slot.as_mut() {
            s.finished();
        }
    }
    fn failed(&mut self) {
        self.guard.failed();
    }
}

impl Drop for GenGuard {
    fn drop(&mut self) {
        let s = &self.stats;
        let counter = match (&self.outcome, self.streaming) {
            (Outcome::Running, _) => &s.cancelled,
            (Outcome::Completed, true) => &s.streams_completed,
            (Outcome::Completed, false) => &s.completions,
            (Outcome::Failed, _) => &s.failed,
        };
        counter.fetch_add(1, Ordering::SeqCst);
        s.active.fetch_sub(1, Ordering::SeqCst);
        s.notify.notify_waiters();
    }
}

struct State {
    engine: Option<Arc<crate::gpu::Engine>>,
    cfg: VllmConfig,
    recorder: Recorder,
    stats: Arc<VllmStats>,
    next_id: AtomicU64,
}

/// A running vLLM simulator. Dropping it kills it.
pub struct VllmSim {
    server: Server,
    state: Arc<State>,
}

impl VllmSim {
    /// Starts on `127.0.0.1:0`.
    pub async fn start(cfg: VllmConfig) -> std::io::Result<VllmSim> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), cfg).await
    }

    /// Starts on a given address (the demo uses fixed ports).
    pub async fn start_on(addr: SocketAddr, cfg: VllmConfig) -> std::io::Result<VllmSim> {
        let state = Arc::new(State {
            engine: cfg
                .gpu
                .clone()
                .map(|g| crate::gpu::Engine::new(g, cfg.model.clone())),
            cfg,
            recorder: Recorder::new(),
            stats: Arc::new(VllmStats::default()),
            next_id: AtomicU64::new(1),
        });
        let st = state.clone();
        let server =
            Server::bind(addr, Arc::new(move |req| Box::pin(handle(st.clone(), req)))).await?;
        Ok(VllmSim { server, state })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// Requests received (recorded after the body was read, before prefill).
    pub fn recorder(&self) -> Recorder {
        self.state.recorder.clone()
    }

    /// Counters.
    pub fn stats(&self) -> &VllmStats {
        &self.state.stats
    }

    /// The GPU-like engine's state (None unless `VllmConfig::gpu` is set).
    pub fn gpu_stats(&self) -> Option<crate::gpu::GpuStats> {
        self.state.engine.as_ref().map(|e| e.stats())
    }

    /// Stops accepting and aborts every open connection abruptly (no clean HTTP end).
    pub fn kill(&self) {
        self.server.kill();
    }
}

fn header_num(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

fn header_ms(headers: &HeaderMap, name: &str) -> Option<Duration> {
    header_num(headers, name).map(|ms| Duration::from_millis(ms).min(MAX_DELAY))
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn token_text(i: usize) -> String {
    format!("tok{i} ")
}

async fn handle(st: Arc<State>, req: Request<Incoming>) -> hyper::Response<TkBody> {
    let at = Instant::now();
    st.stats.bump(&st.stats.requests);
    let (parts, body) = req.into_parts();
    let body = match server::read_body(body, MAX_BODY).await {
        Ok(b) => b,
        Err(resp) => {
            st.recorder.push(Recorded::new(&parts, Bytes::new(), at));
            return resp;
        }
    };
    st.recorder.push(Recorded::new(&parts, body.clone(), at));

    let path = parts.uri.path();
    if st.cfg.strict_content_type && parts.method == Method::POST {
        if let Some(resp) = server::fastapi_content_type_check(&parts.headers, &body) {
            return resp;
        }
    }
    match (&parts.method, path) {
        (&Method::GET, "/health") => {
            server::response(StatusCode::OK, "application/json", crate::client::empty())
        }
        (&Method::GET, "/v1/models") => server::json(
            StatusCode::OK,
            &json!({"object": "list", "data": [{
                "id": st.cfg.model, "object": "model", "created": unix_secs(), "owned_by": "vllm",
                "root": st.cfg.model, "parent": null, "max_model_len": 32768,
            }]}),
        ),
        (&Method::GET, "/metrics") if st.engine.is_some() => match &st.engine {
            Some(e) => server::response(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                crate::client::full(e.metrics_text()),
            ),
            None => server::not_found(),
        },
        (&Method::POST, "/tokenize") => tokenize(&body),
        (&Method::POST, "/v1/chat/completions") => generate(st, &parts.headers, &body, true).await,
        (&Method::POST, "/v1/completions") => generate(st, &parts.headers, &body, false).await,
        _ => server::not_found(),
    }
}

fn bad_request(msg: String) -> hyper::Response<TkBody> {
    server::json(
        StatusCode::BAD_REQUEST,
        &json!({"object": "error", "message": msg, "type": "BadRequestError", "param": null, "code": 400}),
    )
}

fn tokenize(body: &[u8]) -> hyper::Response<TkBody> {
    let v: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return bad_request(format!("invalid JSON: {e}")),
    };
    let mut text = String::new();
    if let Some(p) = v.get("prompt").and_then(Value::as_str) {
        text.push_str(p);
    }
    if let Some(msgs) = v.get("messages").and_then(Value::as_array) {
        for m in msgs {
            if let Some(c) = m.get("content").and_then(Value::as_str) {
                text.push(' ');
                text.push_str(c);
            }
        }
    }
    // One token per whitespace-separated word; ids derived from the word so they are stable.
    let tokens: Vec<u64> = text
        .split_whitespace()
        .take(MAX_TOKENS)
        .map(|w| {
            w.bytes()
                .fold(17u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64))
                % 151_936
        })
        .collect();
    server::json(
        StatusCode::OK,
        &json!({"count": tokens.len(), "max_model_len": 32768, "tokens": tokens}),
    )
}

async fn generate(
    st: Arc<State>,
    headers: &HeaderMap,
    body: &[u8],
    chat: bool,
) -> hyper::Response<TkBody> {
    let req: Value = match serde_json::from_slice(body) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => return bad_request("request body must be a JSON object".to_owned()),
        Err(e) => return bad_request(format!("invalid JSON: {e}")),
    };
    let stream = req.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let mut tokens = st.cfg.tokens;
    if let Some(m) = req.get("max_tokens").and_then(Value::as_u64) {
        tokens = m as usize;
    }
    if let Some(t) = header_num(headers, "x-sim-tokens") {
        tokens = t as usize;
    }
    let tokens = tokens.min(MAX_TOKENS);
    let interval = header_ms(headers, "x-sim-interval-ms").unwrap_or(st.cfg.token_interval);
    let prefill = header_ms(headers, "x-sim-prefill-ms").unwrap_or(st.cfg.prefill);
    let fail_after = header_num(headers, "x-sim-fail-after").map(|n| n as usize);
    let prompt_tokens = (body.len() / 4).max(1);

    let id_num = st.next_id.fetch_add(1, Ordering::Relaxed);
    let (id, object) = if chat {
        (
            format!("chatcmpl-sim{id_num}"),
            if stream {
                "chat.completion.chunk"
            } else {
                "chat.completion"
            },
        )
    } else {
        (format!("cmpl-sim{id_num}"), "text_completion")
    };
    let created = unix_secs();
    let model = st.cfg.model.clone();

    // From here the generation exists: if this future (or the body) is dropped before it
    // ends, the guard counts a cancellation.
    let mut guard = GenGuard::new(st.stats.clone(), stream);
    let (interval, mut slot, cached) = match &st.engine {
        Some(engine) => {
            let prompt = crate::gpu::prompt_of(&req, engine.block_tokens());
            let slot = engine.admit(&prompt, tokens).await;
            let cached = engine.prefill(&prompt).await;
            (
                st.cfg.token_interval,
                Some(slot),
                Some((prompt.tokens, cached)),
            )
        }
        None => {
            if !prefill.is_zero() {
                tokio::time::sleep(prefill).await;
            }
            (interval, None, None)
        }
    };
    let prompt_tokens = cached.map_or(prompt_tokens, |(t, _)| t);

    if stream {
        st.stats.bump(&st.stats.streams_started);
        let make = Box::new(move |seq: usize, sent_us: u64| {
            let finish = if seq + 1 == tokens {
                json!("length")
            } else {
                Value::Null
            };
            let choice = if chat {
                let mut delta = json!({"content": token_text(seq)});
                if seq == 0 {
                    delta["role"] = json!("assistant");
                }
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            } else {
                json!({"index": 0, "text": token_text(seq), "logprobs": null, "finish_reason": finish})
            };
            let ev = json!({
                "id": id, "object": object, "created": created, "model": model,
                "choices": [choice], "seq": seq, "sent_us": sent_us,
            });
            Bytes::from(format!("data: {ev}\n\n"))
        });
        let end = Generation { guard, slot };
        return server::sse_response(EventBody::new(tokens, interval, fail_after, make, end));
    }

    if !interval.is_zero() && tokens > 0 {
        let total = interval.saturating_mul(u32::try_from(tokens).unwrap_or(u32::MAX));
        tokio::time::sleep(total).await;
    }
    guard.completed();
    drop(guard);
    if let Some(s) = slot.as_mut() {
        s.finished();
    }
    drop(slot);
    let text: String = (0..tokens).map(token_text).collect();
    let choice = if chat {
        json!({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": null, "finish_reason": "length"})
    } else {
        json!({"index": 0, "text": text, "logprobs": null, "finish_reason": "length"})
    };
    server::json(
        StatusCode::OK,
        &json!({
            "id": id, "object": object, "created": created, "model": model, "choices": [choice],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": tokens, "total_tokens": prompt_tokens + tokens,
                      "prompt_tokens_details": cached.map(|(_, c)| json!({"cached_tokens": c}))},
        }),
    )
}
