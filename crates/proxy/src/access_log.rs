//! One access-log line and one set of metrics per request, written when the exchange is
//! over: when the response body ended, failed, or was dropped because the client went away.
//! The handler tells the `Exchange` what happened, one method per phase (`routed`,
//! `attempt`, `first_byte`, `refused`, `responded`); it only logs and records. The
//! backend's in-flight slot travels with the connection lease, not here.

use crate::body::{BodyError, Meter};
use crate::error::ProxyError;
use crate::metrics::{ListenerSeries, SseScan, UpstreamSeries};
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

/// What the access log and the metrics need to know about one request, filled in phase by
/// phase and written when it drops (with the response body).
pub struct Exchange {
    listener: Arc<str>,
    /// The client's address as text (made once per connection, `forward::Peer`).
    client: HeaderValue,
    method: Method,
    /// The logged path; `None` when the access log is off (nothing to copy then).
    path: Option<String>,
    request_id: HeaderValue,
    upstream: Option<Arc<str>>,
    /// The backend of the latest attempt.
    backend: Option<Arc<str>>,
    status: u16,
    started: Instant,
    ttfb: Option<Duration>,
    /// `ttfb` is podproxy's own head (`own_head`), not the upstream's.
    ttfb_is_own: bool,
    /// Shared with the request body's meter (`CountIn`), which counts as bytes arrive.
    bytes_in: Arc<AtomicU64>,
    bytes_out: u64,
    error: Option<String>,
    refused: bool,
    outcome: Option<Outcome>,
    /// Route prefix (a bounded metrics label), once routed.
    route: Option<Arc<str>>,
    /// `kind` of podproxy's own error response when it is an upstream failure, for the
    /// upstream-error counter.
    error_kind: Option<&'static str>,
    series: Arc<ListenerSeries>,
    /// The upstream's series, once routed.
    upstream_series: Option<Arc<UpstreamSeries>>,
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
        client: HeaderValue,
        method: Method,
        path: &str,
        request_id: HeaderValue,
        series: Arc<ListenerSeries>,
    ) -> Self {
        // Only the path is logged: no query (it may carry secrets), bounded in length.
        // Copied whenever any access line can be written: at `warn`, failures still are.
        let logged = crate::access_line::enabled(true);
        let path = logged.then(|| match path.len() {
            // Nearly every path: one copy, no char-by-char growing.
            0..=256 => path.to_owned(),
            _ => path.chars().take(256).collect(),
        });
        Exchange {
            listener,
            client,
            method,
            path,
            request_id,
            upstream: None,
            backend: None,
            status: 0,
            started: Instant::now(),
            ttfb: None,
            ttfb_is_own: false,
            bytes_in: Arc::new(AtomicU64::new(0)),
            bytes_out: 0,
            error: None,
            refused: false,
            outcome: None,
            route: None,
            error_kind: None,
            series,
            upstream_series: None,
            sse: None,
        }
    }

    /// A route matched: the request goes to `upstream`.
    pub fn routed(
        &mut self,
        upstream: Arc<str>,
        series: Option<Arc<UpstreamSeries>>,
        route: Arc<str>,
    ) {
        self.upstream = Some(upstream);
        self.upstream_series = series;
        self.route = Some(route);
    }

    /// An attempt goes to `backend` (a retry replaces the previous one).
    pub fn attempt(&mut self, backend: Arc<str>) {
        self.backend = Some(backend);
    }

    /// The request body was read whole: `bytes` of it.
    pub fn received(&self, bytes: u64) {
        self.bytes_in.store(bytes, Ordering::Relaxed);
    }

    /// A meter for a streamed request body, counting into this exchange.
    pub fn count_in(&self) -> CountIn {
        CountIn(self.bytes_in.clone())
    }

    /// The response head is here (the upstream's, or podproxy's own answer to a long call).
    pub fn first_byte(&mut self) {
        self.ttfb = Some(self.started.elapsed());
    }

    /// podproxy sent its own head (an SSE keep-alive stream) while the upstream's is still
    /// to come: the log's `ttfb_ms` is this head, and the upstream's time to its head is
    /// observed by the keep-alive body, not here.
    pub fn own_head(&mut self) {
        self.ttfb = Some(self.started.elapsed());
        self.ttfb_is_own = true;
    }

    /// podproxy answers with its own error response for `e`.
    pub fn refused(&mut self, e: &ProxyError) {
        self.error = Some(e.to_string());
        self.error_kind = e.is_upstream_failure().then(|| e.kind());
        self.refused = true;
    }

    /// The response head goes to the client with `status`.
    pub fn responded(&mut self, status: u16) {
        self.status = status;
    }

    pub fn request_id(&self) -> &HeaderValue {
        &self.request_id
    }

    pub fn upstream(&self) -> Option<&str> {
        self.upstream.as_deref()
    }

    pub fn upstream_series(&self) -> Option<&Arc<UpstreamSeries>> {
        self.upstream_series.as_ref()
    }

    pub fn backend(&self) -> Option<&str> {
        self.backend.as_deref()
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

    fn record_metrics(&self, outcome: Outcome, duration: Duration) {
        let l = &self.series;
        l.request(self.route.as_ref(), self.status);
        l.duration().observe(duration.as_secs_f64());
        l.bytes_in().inc_by(self.bytes_in.load(Ordering::Relaxed));
        l.bytes_out().inc_by(self.bytes_out);
        if let Some(up) = &self.upstream_series {
            if let Some(t) = self.ttfb.filter(|_| !self.ttfb_is_own) {
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

    fn write(&self, duration: Duration) {
        let outcome = self.outcome.unwrap_or(Outcome::ClientGone);
        // Milliseconds with microsecond resolution: readable and exact enough.
        let us = |d: Duration| u64::try_from((d.as_nanos() + 500) / 1000).unwrap_or(u64::MAX);
        crate::access_line::Line {
            // Failures podproxy saw (upstream unreachable, broken streams) stand out.
            warn: outcome == Outcome::Aborted
                || (outcome == Outcome::Refused && self.status >= 500),
            listener: &self.listener,
            client: self.client.to_str().unwrap_or("-"),
            method: self.method.as_str(),
            path: self.path.as_deref().unwrap_or("-"),
            status: self.status,
            upstream: self.upstream.as_deref().unwrap_or("-"),
            backend: self.backend.as_deref().unwrap_or("-"),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            bytes_out: self.bytes_out,
            duration_us: us(duration),
            ttfb_us: self.ttfb.map(us),
            request_id: self.request_id.to_str().unwrap_or("-"),
            outcome: outcome.as_str(),
            error: self.error.as_deref().unwrap_or(""),
        }
        .emit();
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
        // One clock read for the line and the histogram.
        let duration = self.started.elapsed();
        self.write(duration);
        self.record_metrics(self.outcome.unwrap_or(Outcome::ClientGone), duration);
    }
}

/// Counts request-body bytes into the exchange's shared counter (`Exchange::count_in`).
pub struct CountIn(Arc<AtomicU64>);

impl Meter for CountIn {
    fn frame(&mut self, data: &Bytes) {
        self.0.fetch_add(data.len() as u64, Ordering::Relaxed);
    }

    fn end(&mut self, _: Result<(), &BodyError>) {}
}
