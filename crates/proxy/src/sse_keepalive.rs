//! SSE keep-alive before the first token (route key `sse_keepalive = "20s"`).
//!
//! Behind a hop that cuts a response whose head has not started within 100 s (RunPod's
//! HTTP proxy, i.e. Cloudflare: 524), a streaming completion that sits in vLLM's queue or
//! prefill for longer never reaches its client. On routes with `sse_keepalive`, for a
//! request whose JSON body says `"stream": true`: if the upstream's response head has not
//! arrived within the interval, podproxy sends the head itself (200,
//! `text/event-stream`) and an SSE comment (`: keep-alive`) at once and then every
//! interval until the upstream answers, then relays the upstream's events as they come.
//!
//! The status is committed early: if the upstream then answers non-2xx or fails before
//! its head, the client gets one final `data: {"error": {...}}` event in the OpenAI error
//! shape and the stream is aborted (h1: no terminating chunk; h2: RST_STREAM), never
//! ended as if complete. The upstream request is the one `Upstream::send` runs, so the
//! stuck-engine guard (`first_byte_timeout`) still measures the upstream's head, not the
//! keep-alives, and a client that goes away drops it (vLLM aborts the generation).
//! See docs/long-calls.md.

use crate::body::{BodyError, Relay};
use crate::error::ProxyError;
use crate::upstream::backend::InFlight;
use crate::upstream::pool::Lease;
use crate::upstream::Upstream;
use bytes::{Bytes, BytesMut};
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, Sleep};

/// Largest request body read to find `"stream": true`. Bodies with a larger (or no)
/// `Content-Length` are relayed as usual, without keep-alives.
pub const MAX_SNIFF_BODY: u64 = 8 * 1024 * 1024;
/// Largest upstream error body read to build the final error event.
const MAX_ERROR_BODY: usize = 16 * 1024;
const COMMENT: &[u8] = b": keep-alive\n\n";

/// Whether this request may get keep-alives: the route has them, it is a POST, and its
/// body has a known length up to `MAX_SNIFF_BODY`. Returns the interval.
pub fn candidate(
    every: Option<Duration>,
    method: &Method,
    headers: &http::HeaderMap,
) -> Option<Duration> {
    let every = every?;
    if method != Method::POST {
        return None;
    }
    let len: u64 = headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    (len > 0 && len <= MAX_SNIFF_BODY).then_some(every)
}

/// Reads a candidate's body whole (its length is known and bounded).
pub async fn read_body(body: Incoming, idle: Duration) -> Result<Bytes, ProxyError> {
    Limited::new(Relay::stream(body, idle), MAX_SNIFF_BODY as usize)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| ProxyError::RequestBody(e.to_string()))
}

/// Whether a JSON request body asks for a stream (top-level `"stream": true`).
pub fn is_stream_request(body: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(default)]
        stream: Option<serde_json::Value>,
    }
    serde_json::from_slice::<Probe>(body)
        .ok()
        .and_then(|p| p.stream)
        .and_then(|v| v.as_bool())
        .unwrap_or(false)
}

type SendFuture =
    Pin<Box<dyn Future<Output = Result<(Response<Incoming>, Lease), ProxyError>> + Send>>;

/// The outcome of `send`.
pub enum Sent {
    /// The upstream answered (or failed) within the interval: handled as usual.
    Head(Result<(Response<Incoming>, Lease), ProxyError>),
    /// podproxy's own head; the upstream request continues inside the body.
    KeepAlive(Response<Relay>),
}

/// What the keep-alive body records.
pub struct Counters {
    pub streams: Counter,
    pub keepalives: Counter,
    /// Time to the upstream's head (the exchange's own ttfb is podproxy's head then).
    pub ttfb: Option<Histogram>,
}

impl Counters {
    pub fn new(metrics: &crate::metrics::Metrics, ex: &crate::access_log::Exchange) -> Self {
        let label = crate::metrics::long_calls::UpstreamLabel {
            upstream: ex.upstream().unwrap_or("-").to_string(),
        };
        let lc = &metrics.long_calls;
        Counters {
            streams: lc.keepalive_streams.get_or_create(&label).clone(),
            keepalives: lc.keepalives.get_or_create(&label).clone(),
            ttfb: ex.upstream_series().map(|s| s.ttfb().clone()),
        }
    }
}

/// Sends `req` to backend `index` (holding `slot` there); when no head has come within
/// `every`, answers with a keep-alive stream that carries the upstream request on.
pub async fn send(
    upstream: &Arc<Upstream>,
    index: usize,
    slot: InFlight,
    req: Request<Relay>,
    every: Duration,
    counters: Counters,
) -> Sent {
    let up = upstream.clone();
    let started = Instant::now();
    let mut fut: SendFuture = Box::pin(async move { up.send_holding(index, slot, req).await });
    match tokio::time::timeout(every, &mut fut).await {
        Ok(r) => Sent::Head(r),
        Err(_) => {
            counters.streams.inc();
            tracing::debug!(
                upstream = &*upstream.name,
                "no response head within {}: sending SSE keep-alives",
                humantime::format_duration(every)
            );
            let body = KeepAliveBody {
                state: State::Waiting {
                    fut,
                    tick: Box::pin(tokio::time::sleep(every)),
                    first: true,
                },
                every,
                idle: upstream.cfg.idle_timeout,
                started,
                counters,
                flush_first: false,
            };
            let mut resp = Response::new(Relay::boxed(body));
            let h = resp.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            );
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            Sent::KeepAlive(resp)
        }
    }
}

enum State {
    /// Waiting for the upstream's head; a comment every tick.
    Waiting {
        fut: SendFuture,
        tick: Pin<Box<Sleep>>,
        first: bool,
    },
    /// The upstream answered 2xx: its body, relayed frame by frame.
    Relaying(Relay),
    /// The upstream answered non-2xx: its body is read for the error event.
    ReadingError {
        status: StatusCode,
        body: Relay,
        buf: BytesMut,
    },
    /// The final error event is to be sent, then the abort.
    Failing {
        event: Option<Bytes>,
        reason: String,
    },
    Done,
}

struct KeepAliveBody {
    state: State,
    every: Duration,
    idle: Duration,
    started: Instant,
    counters: Counters,
    /// Return `Pending` once (woken at once) before the next poll, so hyper flushes the
    /// frame just written before an abort discards its buffer.
    flush_first: bool,
}

impl Body for KeepAliveBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        loop {
            match &mut this.state {
                State::Waiting { fut, tick, first } => {
                    match fut.as_mut().poll(cx) {
                        Poll::Ready(Ok((resp, lease))) => {
                            if let Some(h) = &this.counters.ttfb {
                                h.observe(this.started.elapsed().as_secs_f64());
                            }
                            let status = resp.status();
                            let body = Relay::upstream(resp.into_body(), lease, this.idle);
                            this.state = if status.is_success() {
                                State::Relaying(body)
                            } else {
                                State::ReadingError {
                                    status,
                                    body,
                                    buf: BytesMut::new(),
                                }
                            };
                            continue;
                        }
                        Poll::Ready(Err(e)) => {
                            // The client's event never names a backend address; the
                            // access log's reason does.
                            let event =
                                error_event(e.kind(), &e.public_message(), e.status().as_u16());
                            this.state = State::Failing {
                                event: Some(event),
                                reason: e.to_string(),
                            };
                            continue;
                        }
                        Poll::Pending => {}
                    }
                    if *first {
                        *first = false;
                    } else {
                        if tick.as_mut().poll(cx).is_pending() {
                            return Poll::Pending;
                        }
                        tick.as_mut().reset(Instant::now() + this.every);
                    }
                    this.counters.keepalives.inc();
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(COMMENT)))));
                }
                State::Relaying(body) => {
                    return Pin::new(body).poll_frame(cx);
                }
                State::ReadingError { status, body, buf } => {
                    let status = *status;
                    let done = match Pin::new(body).poll_frame(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Some(Ok(frame))) => {
                            if let Ok(data) = frame.into_data() {
                                let room = MAX_ERROR_BODY.saturating_sub(buf.len());
                                buf.extend_from_slice(&data[..data.len().min(room)]);
                            }
                            buf.len() >= MAX_ERROR_BODY
                        }
                        Poll::Ready(Some(Err(_)) | None) => true,
                    };
                    if done {
                        let (kind, message) = upstream_error(status, buf);
                        this.state = State::Failing {
                            event: Some(error_event(&kind, &message, status.as_u16())),
                            reason: format!("status {status}: {message}"),
                        };
                    }
                }
                State::Failing { event, reason } => {
                    if let Some(ev) = event.take() {
                        this.flush_first = true;
                        return Poll::Ready(Some(Ok(Frame::data(ev))));
                    }
                    if this.flush_first {
                        this.flush_first = false;
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                    let reason = std::mem::take(reason);
                    this.state = State::Done;
                    return Poll::Ready(Some(Err(BodyError::Upstream(reason))));
                }
                State::Done => return Poll::Ready(None),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.state {
            State::Relaying(b) => b.is_end_stream(),
            State::Done => true,
            _ => false,
        }
    }
}

/// `data: {"error": {...}}` in the OpenAI error shape.
fn error_event(kind: &str, message: &str, code: u16) -> Bytes {
    let v = serde_json::json!({
        "error": {"message": message, "type": kind, "param": null, "code": code}
    });
    Bytes::from(format!("data: {v}\n\n"))
}

/// The type and message of an upstream's error body: OpenAI's `{"error": {...}}`, vLLM's
/// flat `{"object": "error", "message", "type"}`, FastAPI's `{"detail"}`, or the text.
fn upstream_error(status: StatusCode, body: &[u8]) -> (String, String) {
    let v: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let obj = v.as_ref().map(|v| v.get("error").unwrap_or(v));
    let text = |key: &str| -> Option<String> {
        let x = obj?.get(key)?;
        Some(match x.as_str() {
            Some(s) => s.to_string(),
            None => x.to_string(),
        })
    };
    let message = text("message")
        .or_else(|| text("detail"))
        .unwrap_or_else(|| {
            let t = String::from_utf8_lossy(body).trim().to_string();
            if t.is_empty() {
                format!("upstream answered {status}")
            } else {
                t
            }
        });
    let kind = text("type").unwrap_or_else(|| "upstream_error".to_string());
    (kind, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_top_level_stream_true_is_a_stream_request() {
        assert!(is_stream_request(br#"{"model":"m","stream":true}"#));
        assert!(is_stream_request(
            br#" {"messages":[{"role":"user","content":"\"stream\": false"}], "stream": true}"#
        ));
        assert!(!is_stream_request(br#"{"stream":false}"#));
        assert!(!is_stream_request(br#"{"stream":"true"}"#));
        assert!(!is_stream_request(br#"{"opts":{"stream":true}}"#));
        assert!(!is_stream_request(b"not json"));
        assert!(!is_stream_request(br#"[{"stream":true}]"#));
    }

    #[test]
    fn candidates_are_posts_with_a_bounded_known_length() {
        let every = Some(Duration::from_secs(20));
        let mut h = http::HeaderMap::new();
        assert_eq!(candidate(every, &Method::POST, &h), None);
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("120"));
        assert_eq!(candidate(every, &Method::POST, &h), every);
        assert_eq!(candidate(every, &Method::GET, &h), None);
        assert_eq!(candidate(None, &Method::POST, &h), None);
        h.insert(
            header::CONTENT_LENGTH,
            HeaderValue::from(MAX_SNIFF_BODY + 1),
        );
        assert_eq!(candidate(every, &Method::POST, &h), None);
    }

    #[test]
    fn error_events_carry_the_upstreams_message_in_the_openai_shape() {
        let (k, m) = upstream_error(
            StatusCode::BAD_REQUEST,
            br#"{"object":"error","message":"too long","type":"BadRequestError","param":null,"code":400}"#,
        );
        assert_eq!((k.as_str(), m.as_str()), ("BadRequestError", "too long"));
        let (k, m) = upstream_error(
            StatusCode::SERVICE_UNAVAILABLE,
            br#"{"error":{"message":"busy","type":"overloaded"}}"#,
        );
        assert_eq!((k.as_str(), m.as_str()), ("overloaded", "busy"));
        let (k, m) = upstream_error(StatusCode::BAD_GATEWAY, b"");
        assert_eq!(k, "upstream_error");
        assert!(m.contains("502"), "{m}");
        let ev = error_event("overloaded", "busy", 503);
        let text = std::str::from_utf8(&ev).unwrap();
        assert!(
            text.starts_with("data: ") && text.ends_with("\n\n"),
            "{text}"
        );
        let v: serde_json::Value = serde_json::from_str(&text[6..]).unwrap();
        assert_eq!(v["error"]["message"], "busy");
        assert_eq!(v["error"]["type"], "overloaded");
        assert_eq!(v["error"]["code"], 503);
    }
}
