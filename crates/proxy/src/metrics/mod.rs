//! Prometheus metrics (prometheus-client). One registry for the process lifetime, so
//! counters survive config reloads. Labels stay bounded: listener, route prefix, upstream
//! and backend names come from the config, status is a class; never raw paths or ids.

pub mod long_calls;

use crate::upstream::Upstream;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::{Arc, OnceLock};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub listener: String,
    pub route: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabel {
    pub listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabel {
    pub upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub upstream: String,
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    pub upstream: String,
    pub backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScrapeErrorLabels {
    pub upstream: String,
    pub backend: String,
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AffinityLabels {
    pub upstream: String,
    /// "hit" | "override_full" | "override_margin"
    pub outcome: String,
}

type FloatGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub kind: String,
}

type HistFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency() -> Histogram {
    // 1 ms .. ~33 min: covers a token gap and a 20-minute inference/up.
    Histogram::new(exponential_buckets(0.001, 2.0, 22))
}

fn token_gap() -> Histogram {
    // 0.5 ms .. ~2 s: inter-token latency.
    Histogram::new(exponential_buckets(0.0005, 2.0, 13))
}

fn event_count() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 16))
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub duration: HistFamily<ListenerLabel>,
    pub ttfb: HistFamily<UpstreamLabel>,
    pub sse_events: HistFamily<UpstreamLabel>,
    pub sse_gap: HistFamily<UpstreamLabel>,
    pub streams_in_flight: Family<ListenerLabel, Gauge>,
    pub bytes_in: Family<ListenerLabel, Counter>,
    pub bytes_out: Family<ListenerLabel, Counter>,
    pub upstream_errors: Family<ErrorLabels, Counter>,
    backend_in_flight: Family<BackendLabels, Gauge>,
    backend_healthy: Family<BackendLabels, Gauge>,
    backend_requests: Family<BackendLabels, Gauge>,
    backend_idle: Family<BackendLabels, Gauge>,
    engine_running: Family<BackendLabels, FloatGauge>,
    engine_waiting: Family<BackendLabels, FloatGauge>,
    engine_kv: Family<BackendLabels, FloatGauge>,
    signals_age: Family<BackendLabels, FloatGauge>,
    scrape_errors: Family<ScrapeErrorLabels, Counter>,
    affinity: Family<AffinityLabels, Counter>,
    /// Renders clear and refill the live families: one at a time.
    render_lock: std::sync::Mutex<()>,
    pub poc_rewritten: Counter,
    pub poc_refused: Counter,
    pub callbacks_relayed: Family<ListenerLabel, Counter>,
    pub content_type_added: Family<ListenerLabel, Counter>,
    log_dropped: Counter,
    pub reloads: Family<ResultLabel, Counter>,
    /// Long-call mode and SSE keep-alive (`longcall`, `sse_keepalive`).
    pub long_calls: long_calls::LongCallMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut m = Metrics {
            registry: Registry::with_prefix("podproxy"),
            requests: Family::default(),
            duration: Family::new_with_constructor(latency),
            ttfb: Family::new_with_constructor(latency),
            sse_events: Family::new_with_constructor(event_count),
            sse_gap: Family::new_with_constructor(token_gap),
            streams_in_flight: Family::default(),
            bytes_in: Family::default(),
            bytes_out: Family::default(),
            upstream_errors: Family::default(),
            backend_in_flight: Family::default(),
            backend_healthy: Family::default(),
            backend_requests: Family::default(),
            backend_idle: Family::default(),
            engine_running: Family::default(),
            engine_waiting: Family::default(),
            engine_kv: Family::default(),
            signals_age: Family::default(),
            scrape_errors: Family::default(),
            affinity: Family::default(),
            render_lock: std::sync::Mutex::new(()),
            poc_rewritten: Counter::default(),
            poc_refused: Counter::default(),
            callbacks_relayed: Family::default(),
            content_type_added: Family::default(),
            log_dropped: Counter::default(),
            reloads: Family::default(),
            long_calls: Default::default(),
        };
        let r = &mut m.registry;
        r.register(
            "requests",
            "Requests by listener, route prefix and status class",
            m.requests.clone(),
        );
        r.register(
            "request_duration_seconds",
            "Request duration, until the response body ended",
            m.duration.clone(),
        );
        r.register(
            "upstream_ttfb_seconds",
            "Time to the upstream's response head (time to first token for streams)",
            m.ttfb.clone(),
        );
        r.register(
            "sse_events_per_stream",
            "SSE events relayed per text/event-stream response",
            m.sse_events.clone(),
        );
        r.register(
            "sse_event_gap_seconds",
            "Gap between consecutive SSE events of a stream (inter-token latency)",
            m.sse_gap.clone(),
        );
        r.register(
            "streams_in_flight",
            "text/event-stream responses being relayed",
            m.streams_in_flight.clone(),
        );
        r.register(
            "received_bytes",
            "Request body bytes received from clients",
            m.bytes_in.clone(),
        );
        r.register(
            "sent_bytes",
            "Response body bytes sent to clients",
            m.bytes_out.clone(),
        );
        r.register(
            "upstream_errors",
            "Upstream failures by kind",
            m.upstream_errors.clone(),
        );
        r.register(
            "backend_in_flight",
            "In-flight requests per backend",
            m.backend_in_flight.clone(),
        );
        r.register(
            "backend_healthy",
            "1 when the backend is in rotation",
            m.backend_healthy.clone(),
        );
        r.register(
            "backend_requests",
            "Requests sent to the backend since it was configured",
            m.backend_requests.clone(),
        );
        r.register(
            "backend_idle_connections",
            "Keepalive connections parked for reuse",
            m.backend_idle.clone(),
        );
        r.register(
            "backend_engine_running",
            "vLLM num_requests_running at the last scrape (balance.signals)",
            m.engine_running.clone(),
        );
        r.register(
            "backend_engine_waiting",
            "vLLM num_requests_waiting at the last scrape (balance.signals)",
            m.engine_waiting.clone(),
        );
        r.register(
            "backend_engine_kv_usage",
            "vLLM KV-cache usage (0..1) at the last scrape (balance.signals)",
            m.engine_kv.clone(),
        );
        r.register(
            "backend_signals_age_seconds",
            "Age of the last engine signals; older than two scrape intervals = stale",
            m.signals_age.clone(),
        );
        r.register(
            "backend_scrape_errors",
            "Failed /metrics scrapes by kind (connect, status, timeout, too_large, parse)",
            m.scrape_errors.clone(),
        );
        r.register(
            "affinity_decisions",
            "Prefix-affinity requests: sent to the preferred backend (hit) or moved by the load guard",
            m.affinity.clone(),
        );
        r.register(
            "poc_callback_rewritten",
            "PoC callback urls pointed at the Network Node",
            m.poc_rewritten.clone(),
        );
        r.register(
            "poc_callback_refused",
            "PoC requests refused (foreign callback, malformed, too large)",
            m.poc_refused.clone(),
        );
        r.register(
            "callbacks_relayed",
            "PoC result callbacks (.../poc-batches/...) relayed",
            m.callbacks_relayed.clone(),
        );
        r.register(
            "content_type_added",
            "Header-less JSON request bodies given Content-Type: application/json (json_content_type routes)",
            m.content_type_added.clone(),
        );
        r.register(
            "log_lines_dropped",
            "Log lines dropped because stderr could not keep up (the writer never blocks requests)",
            m.log_dropped.clone(),
        );
        r.register(
            "config_reloads",
            "Config reloads by result",
            m.reloads.clone(),
        );
        m.long_calls.register(r);
        m
    }

    /// Prometheus text exposition. Backend gauges are read from the live upstreams at
    /// scrape time, so removed backends disappear after a reload.
    pub fn render(&self, upstreams: &[Arc<Upstream>]) -> String {
        let _one_at_a_time = self.render_lock.lock();
        self.backend_in_flight.clear();
        self.backend_healthy.clear();
        self.backend_requests.clear();
        self.backend_idle.clear();
        self.engine_running.clear();
        self.engine_waiting.clear();
        self.engine_kv.clear();
        self.signals_age.clear();
        // Counters kept on the live upstreams: re-created with their current value (a
        // rebuilt upstream starts again at 0, which Prometheus reads as a counter reset).
        self.scrape_errors.clear();
        self.affinity.clear();
        let now = std::time::Instant::now();
        for u in upstreams {
            if u.cfg.balance.affinity {
                let a = u.affinity_counts();
                for (outcome, c) in [
                    ("hit", &a.hits),
                    ("override_full", &a.overrides_full),
                    ("override_margin", &a.overrides_margin),
                ] {
                    self.affinity
                        .get_or_create(&AffinityLabels {
                            upstream: u.name.to_string(),
                            outcome: outcome.into(),
                        })
                        .inc_by(c.load(std::sync::atomic::Ordering::Relaxed));
                }
            }
            for (i, b) in u.backends().iter().enumerate() {
                let l = BackendLabels {
                    upstream: u.name.to_string(),
                    backend: b.label.to_string(),
                };
                self.backend_in_flight
                    .get_or_create(&l)
                    .set(b.in_flight() as i64);
                self.backend_healthy
                    .get_or_create(&l)
                    .set(i64::from(b.is_healthy()));
                self.backend_requests
                    .get_or_create(&l)
                    .set(b.requests() as i64);
                self.backend_idle
                    .get_or_create(&l)
                    .set(u.idle_connections_of(i) as i64);
                if !u.cfg.balance.signals {
                    continue;
                }
                for kind in crate::upstream::signals::ScrapeError::ALL {
                    self.scrape_errors
                        .get_or_create(&ScrapeErrorLabels {
                            upstream: l.upstream.clone(),
                            backend: l.backend.clone(),
                            kind: kind.as_str().into(),
                        })
                        .inc_by(b.scrape_errors(kind));
                }
                if let Some(s) = b.signals() {
                    self.engine_running.get_or_create(&l).set(s.running);
                    self.engine_waiting.get_or_create(&l).set(s.waiting);
                    self.engine_kv.get_or_create(&l).set(s.kv_usage);
                    self.signals_age
                        .get_or_create(&l)
                        .set(now.saturating_duration_since(s.at).as_secs_f64());
                }
            }
        }
        let dropped = crate::logging::dropped_lines();
        let seen = self.log_dropped.get();
        if dropped > seen {
            self.log_dropped.inc_by(dropped - seen);
        }
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            out = format!("# encoding failed: {e}\n");
        }
        out
    }
}

/// "2xx".."5xx" (or "0xx" when the client left before a response head).
pub fn status_class(status: u16) -> String {
    format!("{}xx", status / 100)
}

/// One series of a labelled family, looked up on first use and kept. Looking a series up
/// costs label `String`s, a SipHash and a lock; a request records about ten of them, so
/// the handles are resolved once per runtime build instead (measured: ~9% of podproxy's
/// instructions per small request went to label building and hashing). Lazy, so
/// `/metrics` still lists only series that saw traffic.
struct Series<M>(OnceLock<M>);

impl<M: Clone> Series<M> {
    fn new() -> Self {
        Series(OnceLock::new())
    }

    fn get<L, C>(&self, family: &Family<L, M, C>, labels: impl FnOnce() -> L) -> &M
    where
        L: Clone + std::hash::Hash + Eq,
        C: prometheus_client::metrics::family::MetricConstructor<M>,
    {
        self.0
            .get_or_init(|| family.get_or_create(&labels()).clone())
    }
}

/// Status classes a response can be in: 0xx (no response head) .. 5xx, anything else.
const CLASSES: usize = 7;

/// The series one listener's exchanges record into.
pub struct ListenerSeries {
    metrics: Arc<Metrics>,
    listener: String,
    duration: Series<Histogram>,
    bytes_in: Series<Counter>,
    bytes_out: Series<Counter>,
    streams: Series<Gauge>,
    callbacks: Series<Counter>,
    content_type: Series<Counter>,
    /// Requests by route label (routes are few: a linear scan by pointer) and class.
    requests: Vec<(Arc<str>, [Series<Counter>; CLASSES])>,
}

impl ListenerSeries {
    /// `routes` are the listener's route labels ("-" is added for unrouted requests).
    pub fn new(metrics: Arc<Metrics>, listener: &str, routes: &[Arc<str>]) -> Self {
        let requests = routes
            .iter()
            .cloned()
            .chain(std::iter::once(Arc::from("-")))
            .map(|r| (r, std::array::from_fn(|_| Series::new())))
            .collect();
        let series = ListenerSeries {
            metrics,
            listener: listener.to_string(),
            duration: Series::new(),
            bytes_in: Series::new(),
            bytes_out: Series::new(),
            streams: Series::new(),
            callbacks: Series::new(),
            content_type: Series::new(),
            requests,
        };
        // Counters that dashboards and alerts compare against are listed from the start
        // (at 0), not only after their first event.
        series.callbacks_relayed();
        series.content_type_added();
        series
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    fn label(&self) -> ListenerLabel {
        ListenerLabel {
            listener: self.listener.clone(),
        }
    }

    /// Counts a request by route (`None`: unrouted) and status class.
    pub fn request(&self, route: Option<&Arc<str>>, status: u16) {
        let class = usize::from(status / 100).min(CLASSES - 1);
        let found = self.requests.iter().find(|(r, _)| match route {
            Some(route) => Arc::ptr_eq(r, route) || **r == **route,
            None => &**r == "-",
        });
        let labels = |r: &str| RequestLabels {
            listener: self.listener.clone(),
            route: r.to_string(),
            status: status_class(status),
        };
        match found {
            Some((r, classes)) => classes[class]
                .get(&self.metrics.requests, || labels(r))
                .inc(),
            // A route label not known at build time: looked up the slow way.
            None => self
                .metrics
                .requests
                .get_or_create(&labels(route.map_or("-", |r| &**r)))
                .inc(),
        };
    }

    pub fn duration(&self) -> &Histogram {
        self.duration.get(&self.metrics.duration, || self.label())
    }

    pub fn bytes_in(&self) -> &Counter {
        self.bytes_in.get(&self.metrics.bytes_in, || self.label())
    }

    pub fn bytes_out(&self) -> &Counter {
        self.bytes_out.get(&self.metrics.bytes_out, || self.label())
    }

    pub fn streams_in_flight(&self) -> &Gauge {
        self.streams
            .get(&self.metrics.streams_in_flight, || self.label())
    }

    pub fn callbacks_relayed(&self) -> &Counter {
        self.callbacks
            .get(&self.metrics.callbacks_relayed, || self.label())
    }

    pub fn content_type_added(&self) -> &Counter {
        self.content_type
            .get(&self.metrics.content_type_added, || self.label())
    }
}

/// The `kind` label values of `upstream_errors`: podproxy's own upstream error responses
/// (`ProxyError::kind` of the upstream failures) and streams aborted mid-body.
pub const UPSTREAM_ERROR_KINDS: [&str; 4] = [
    "upstream_connect",
    "upstream_broken",
    "upstream_timeout",
    "stream_aborted",
];

/// The series one upstream's exchanges record into.
pub struct UpstreamSeries {
    metrics: Arc<Metrics>,
    upstream: String,
    ttfb: Series<Histogram>,
    sse_events: Series<Histogram>,
    sse_gap: Series<Histogram>,
}

impl UpstreamSeries {
    pub fn new(metrics: Arc<Metrics>, upstream: &str) -> Self {
        // Every failure kind is listed from the start (at 0), so an alert on a rate sees
        // the series before the first failure.
        for kind in UPSTREAM_ERROR_KINDS {
            drop(metrics.upstream_errors.get_or_create(&ErrorLabels {
                upstream: upstream.to_string(),
                kind: kind.to_string(),
            }));
        }
        UpstreamSeries {
            metrics,
            upstream: upstream.to_string(),
            ttfb: Series::new(),
            sse_events: Series::new(),
            sse_gap: Series::new(),
        }
    }

    fn label(&self) -> UpstreamLabel {
        UpstreamLabel {
            upstream: self.upstream.clone(),
        }
    }

    pub fn ttfb(&self) -> &Histogram {
        self.ttfb.get(&self.metrics.ttfb, || self.label())
    }

    pub fn sse_events(&self) -> &Histogram {
        self.sse_events
            .get(&self.metrics.sse_events, || self.label())
    }

    pub fn sse_gap(&self) -> &Histogram {
        self.sse_gap.get(&self.metrics.sse_gap, || self.label())
    }

    /// Counts an upstream failure (rare: looked up each time).
    pub fn error(&self, kind: &str) {
        self.metrics
            .upstream_errors
            .get_or_create(&ErrorLabels {
                upstream: self.upstream.clone(),
                kind: kind.to_string(),
            })
            .inc();
    }
}

/// Counts SSE events in relayed frames without copying or parsing them: an event ends at a
/// blank line, i.e. "\n\n" (also across a frame boundary).
#[derive(Debug, Default)]
pub struct SseScan {
    pub events: u64,
    last_byte_newline: bool,
}

/// The blank line that ends an event, as a searcher built once: building one per frame
/// (`memmem::find_iter`) cost more than the search.
static EVENT_END: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\n\n"));

impl SseScan {
    /// Events completed by this frame.
    pub fn scan(&mut self, data: &[u8]) -> u64 {
        let mut n = 0;
        if self.last_byte_newline && data.first() == Some(&b'\n') {
            n += 1;
        }
        n += EVENT_END.find_iter(data).count() as u64;
        if let Some(&last) = data.last() {
            // "\n\n\n" at the boundary must not count twice: only a lone trailing '\n'
            // can pair with the next frame's first byte.
            self.last_byte_newline = last == b'\n' && !data.ends_with(b"\n\n");
        }
        self.events += n;
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_scan_counts_events_across_frames() {
        let mut s = SseScan::default();
        assert_eq!(s.scan(b"data: a\n\n"), 1);
        assert_eq!(s.scan(b"data: b\n\ndata: c\n\n"), 2);
        assert_eq!(s.scan(b"data: d\n"), 0);
        assert_eq!(s.scan(b"\ndata: e"), 1);
        assert_eq!(s.scan(b"\n\n"), 1);
        assert_eq!(s.scan(b": comment\n\n"), 1);
        assert_eq!(s.events, 6);
    }

    #[test]
    fn render_has_the_families_and_backend_gauges() {
        let m = Metrics::new();
        m.requests
            .get_or_create(&RequestLabels {
                listener: "inference".into(),
                route: "/".into(),
                status: status_class(200),
            })
            .inc();
        m.poc_rewritten.inc();
        m.sse_gap
            .get_or_create(&UpstreamLabel {
                upstream: "vllm".into(),
            })
            .observe(0.004);
        let text = m.render(&[]);
        assert!(
            text.contains(
                "podproxy_requests_total{listener=\"inference\",route=\"/\",status=\"2xx\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("podproxy_poc_callback_rewritten_total 1"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE podproxy_sse_event_gap_seconds histogram"),
            "{text}"
        );
    }
}
