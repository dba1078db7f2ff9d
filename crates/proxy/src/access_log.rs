//! One access-log line per request, written when the exchange is over: when the response
//! body ended, failed, or was dropped because the client went away. Holding the backend's
//! in-flight guard here ties the slot's lifetime to the response body, not to the handler.

use crate::body::{BodyError, Meter};
use crate::metrics::{ListenerSeries, SseScan, UpstreamSeries};
use crate::upstream::backend::InFlight;
use bytes::Bytes;
use http::{HeaderValue, Method};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How the exchange ended, as written in the log's `outcome` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The response body was delivered to its end.
    Complete,
    /// podproxy answered with its own error response.
    Refused,
    /// The upstream body broke or went idle: the client's response was aborted.
    Aborted,
    /// The client went away before the end; the upstream request was dropped with it.
    ClientGone,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Complete => "complete",
            Outcome::Refused => "refused",
            Outcome::Aborted => "aborted",
            Outcome::ClientGone => "client_gone",
        }
    }
}

pub struct Exchange {
    pub listener: Arc<str>,
    pub method: Method,
    /// The logged path; `None` when the access log is off (nothing to copy then).
    pub path: Option<String>,
    pub request_id: HeaderValue,
    pub upstream: Option<Arc<str>>,
    pub backend: Option<Arc<str>>,
    pub status: u16,
    pub started: Instant,
    pub ttfb: Option<Duration>,
    pub bytes_in: Arc<AtomicU64>,
    pub bytes_out: u64,
    pub error: Option<String>,
    pub refused: bool,
    pub outcome: Option<Outcome>,
    pub slot: Option<InFlight>,
    /// Route prefix (a bounded metrics label), once routed.
    pub route: Option<Arc<str>>,
    /// `kind` of podproxy's own error response when it is an upstream failure, for the
    /// upstream-error counter.
    pub error_kind: Option<&'static str>,
    pub series: Arc<ListenerSeries>,
    /// The upstream's series, once routed.
    pub upstream_series: Option<Arc<UpstreamSeries>>,
    sse: Option<SseState>,
}

/// Event counting for a `text/event-stream` response.
struct SseState {
    scan: SseScan,
    last_event: Option<Instant>,
}

impl Exchange {
    pub fn start(
        listener: Arc<str>,
        method: Method,
        path: &str,
        request_id: HeaderValue,
        series: Arc<ListenerSeries>,
    ) -> Self {
        // Only the path is logged: no query (it may carry secrets), bounded in length.
        let path = tracing::enabled!(target: "podproxy::access", tracing::Level::INFO)
            .then(|| path.chars().take(256).collect());
        Exchange {
            listener,
            method,
            path,
            request_id,
            upstream: None,
            backend: None,
            status: 0,
            started: Instant::now(),
            ttfb: None,
            bytes_in: Arc::new(AtomicU64::new(0)),
            bytes_out: 0,
            error: None,
            refused: false,
            outcome: None,
            slot: None,
            route: None,
            error_kind: None,
            series,
            upstream_series: None,
            sse: None,
        }
    }

    /// The response is an SSE stream: count its events and gaps, and it is a stream in
    /// flight until the exchange ends.
    pub fn start_sse(&mut self) {
        self.series.streams_in_flight().inc();
        self.sse = Some(SseState {
            scan: SseScan::default(),
            last_event: None,
        });
    }

    fn record_metrics(&self, outcome: Outcome) {
        let l = &self.series;
        l.request(self.route.as_ref(), self.status);
        l.duration().observe(self.started.elapsed().as_secs_f64());
        l.bytes_in().inc_by(self.bytes_in.load(Ordering::Relaxed));
        l.bytes_out().inc_by(self.bytes_out);
        if let Some(up) = &self.upstream_series {
            if let Some(t) = self.ttfb {
                up.ttfb().observe(t.as_secs_f64());
            }
            if let Some(sse) = &self.sse {
                up.sse_events().observe(sse.scan.events as f64);
            }
            let kind = match (outcome, self.error_kind) {
                (Outcome::Aborted, _) => Some("stream_aborted"),
                (Outcome::Refused, Some(k)) => Some(k),
                _ => None,
            };
            if let Some(kind) = kind {
                up.error(kind);
            }
        }
        if self.sse.is_some() {
            l.streams_in_flight().dec();
        }
    }

    fn write(&self) {
        let outcome = self.outcome.unwrap_or(Outcome::ClientGone);
        // Milliseconds with microsecond resolution: readable and exact enough.
        let ms = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
        macro_rules! line {
            ($level:ident) => {
                tracing::$level!(
                    target: "podproxy::access",
                    listener = &*self.listener,
                    method = self.method.as_str(),
                    path = self.path.as_deref().unwrap_or("-"),
                    status = self.status,
                    upstream = self.upstream.as_deref().unwrap_or("-"),
                    backend = self.backend.as_deref().unwrap_or("-"),
                    bytes_in = self.bytes_in.load(Ordering::Relaxed),
                    bytes_out = self.bytes_out,
                    duration_ms = ms(self.started.elapsed()),
                    ttfb_ms = self.ttfb.map(ms).unwrap_or(-1.0),
                    request_id = self.request_id.to_str().unwrap_or("-"),
                    outcome = outcome.as_str(),
                    error = self.error.as_deref().unwrap_or(""),
                )
            };
        }
        // Failures podproxy saw (upstream unreachable, broken streams) stand out as warnings.
        if outcome == Outcome::Aborted || (outcome == Outcome::Refused && self.status >= 500) {
            line!(warn);
        } else {
            line!(info);
        }
    }
}

impl Meter for Exchange {
    fn frame(&mut self, data: &Bytes) {
        self.bytes_out += data.len() as u64;
        if let Some(sse) = &mut self.sse {
            let events = sse.scan.scan(data);
            if events > 0 {
                let now = Instant::now();
                if let Some(up) = &self.upstream_series {
                    let gap = up.sse_gap();
                    // One gap per event: the first since the previous frame's last event;
                    // the rest of a batched frame arrived together (gap 0).
                    if let Some(last) = sse.last_event {
                        gap.observe((now - last).as_secs_f64());
                    }
                    for _ in 1..events {
                        gap.observe(0.0);
                    }
                }
                sse.last_event = Some(now);
            }
        }
    }

    fn end(&mut self, result: Result<(), &BodyError>) {
        self.outcome = Some(match result {
            Ok(()) if self.refused => Outcome::Refused,
            Ok(()) => Outcome::Complete,
            Err(e) => {
                self.error = Some(e.to_string());
                Outcome::Aborted
            }
        });
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        self.write();
        self.record_metrics(self.outcome.unwrap_or(Outcome::ClientGone));
    }
}

/// Counts request-body bytes into the exchange's shared counter.
pub struct CountIn(pub Arc<AtomicU64>);

impl Meter for CountIn {
    fn frame(&mut self, data: &Bytes) {
        self.0.fetch_add(data.len() as u64, Ordering::Relaxed);
    }

    fn end(&mut self, _: Result<(), &BodyError>) {}
}
