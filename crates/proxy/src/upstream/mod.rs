//! An upstream: its backends, its keepalive pool, admission, and how one attempt is sent.

pub mod affinity;
pub mod backend;
pub mod health;
pub mod io;
pub mod own_wakes;
pub mod pool;
pub mod resolve;
pub mod score;
pub mod signals;

use crate::body::Relay;
use crate::config::UpstreamConfig;
use crate::error::ProxyError;
use backend::{take_balanced, take_least_loaded, Backend, InFlight, NoSlot, Waiters};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use pool::{Lease, Pool, SendError};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub struct Upstream {
    pub name: Arc<str>,
    pub cfg: UpstreamConfig,
    backends: Vec<Arc<Backend>>,
    pool: Arc<Pool>,
    rotation: AtomicUsize,
    waiters: Arc<Waiters>,
    affinity: AffinityCounts,
}

/// How prefix affinity decided, since the upstream was configured.
#[derive(Debug, Default)]
pub struct AffinityCounts {
    /// Requests sent to their prompt's preferred backend.
    pub hits: AtomicU64,
    /// Load guard: the preferred backend was at `max_concurrent`.
    pub overrides_full: AtomicU64,
    /// Load guard: the preferred backend's score exceeded the best by the margin.
    pub overrides_margin: AtomicU64,
}

impl Upstream {
    /// Fails only if the TLS settings cannot be built (already checked by config
    /// validation, so only when files changed in between).
    pub fn new(cfg: UpstreamConfig) -> Result<Self, String> {
        // Names are looked up again after a second, or after a connection to the address
        // failed, so a recreated container is found (`resolve`).
        let resolver = resolve::CachingResolver::new();
        let mut http = HttpConnector::new_with_resolver(resolver.clone());
        http.set_nodelay(true);
        http.set_connect_timeout(Some(cfg.connect_timeout));
        http.set_keepalive(Some(Duration::from_secs(60)));
        http.enforce_http(false);
        let tls =
            crate::config::tls::client_config(cfg.tls.as_ref().unwrap_or(&Default::default()))
                .map_err(|e| format!("upstream {}: {e}", cfg.name))?;
        let builder = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http();
        let builder = match cfg.tls.as_ref().and_then(|t| t.server_name.clone()) {
            Some(name) => {
                let name = rustls::pki_types::ServerName::try_from(name)
                    .map_err(|e| format!("upstream {}: tls.server_name: {e}", cfg.name))?;
                builder.with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(name))
            }
            None => builder,
        };
        let connector = builder.enable_http1().wrap_connector(http);
        let pool = Pool::new(
            connector,
            resolver,
            &cfg.backends,
            cfg.rewrite_host,
            cfg.pool_idle_timeout,
            cfg.max_idle_per_backend,
        )
        .map_err(|e| format!("upstream {}: {e}", cfg.name))?;
        let waiters = Arc::new(Waiters::default());
        Ok(Upstream {
            name: cfg.name.as_str().into(),
            backends: cfg
                .backends
                .iter()
                .cloned()
                .map(|a| Arc::new(Backend::new(a, waiters.clone(), !cfg.health.enabled)))
                .collect(),
            cfg,
            pool,
            rotation: AtomicUsize::new(0),
            waiters,
            affinity: AffinityCounts::default(),
        })
    }

    pub fn backends(&self) -> &[Arc<Backend>] {
        &self.backends
    }

    /// Whether at least one backend is in rotation (feeds readiness). With active health
    /// checks, not before the first round has answered: until then "healthy" is a guess.
    pub fn is_ready(&self) -> bool {
        let checked = !self.cfg.health.enabled || self.backends.iter().all(|b| b.probed());
        checked && self.backends.iter().any(|b| b.is_healthy())
    }

    /// Requests currently waiting in the admission queue.
    pub fn queued(&self) -> usize {
        self.waiters.waiting()
    }

    /// `/backends`: backend `index`'s last engine signals and their age (with
    /// `balance.signals` on; None otherwise).
    pub fn signals_view(&self, index: usize) -> Option<serde_json::Value> {
        if !self.cfg.balance.signals {
            return None;
        }
        let b = self.backends.get(index)?;
        let now = std::time::Instant::now();
        let last = b.signals().map(|s| {
            serde_json::json!({
                "running": s.running,
                "waiting": s.waiting,
                "kv_usage": s.kv_usage,
                "in_flight_at_scrape": s.in_flight_at_scrape,
                "age_ms": now.saturating_duration_since(s.at).as_millis() as u64,
                "fresh": score::is_fresh(&s, now, self.cfg.balance.scrape_interval),
                "score": score::score(&s, b.in_flight()),
            })
        });
        Some(serde_json::json!({
            "last": last,
            "last_scrape_error": b.last_scrape_error().map(|e| e.as_str()),
        }))
    }

    /// `/backends`: prefix-affinity decisions (with `balance.affinity` on).
    pub fn affinity_view(&self) -> Option<serde_json::Value> {
        if !self.cfg.balance.affinity {
            return None;
        }
        let a = &self.affinity;
        Some(serde_json::json!({
            "hits": a.hits.load(Ordering::Relaxed),
            "overrides_full": a.overrides_full.load(Ordering::Relaxed),
            "overrides_margin": a.overrides_margin.load(Ordering::Relaxed),
        }))
    }

    /// Prefix-affinity decisions so far.
    pub fn affinity_counts(&self) -> &AffinityCounts {
        &self.affinity
    }

    /// Takes an in-flight slot on the least-loaded healthy backend not in `exclude`. When
    /// every healthy backend is at `max_concurrent`, waits in the bounded queue up to
    /// `queue_timeout`; no healthy backend at all fails at once.
    pub async fn acquire(&self, exclude: &[usize]) -> Result<(usize, InFlight), ProxyError> {
        self.acquire_for(exclude, None).await
    }

    /// `acquire` with the request's prompt key (prefix affinity, `affinity::prompt_key`).
    /// With `balance` off for this upstream the key is ignored and the choice is exactly
    /// `acquire`'s: least outstanding requests.
    pub async fn acquire_for(
        &self,
        exclude: &[usize],
        key: Option<u64>,
    ) -> Result<(usize, InFlight), ProxyError> {
        let no_healthy = || ProxyError::NoHealthyBackend {
            upstream: self.name.to_string(),
        };
        let overloaded = || ProxyError::Overloaded {
            upstream: self.name.to_string(),
        };
        let cap = self.cfg.max_concurrent;
        let start = self.rotation.fetch_add(1, Ordering::Relaxed);
        let balance = &self.cfg.balance;
        let plain = !balance.signals && (key.is_none() || !balance.affinity);
        let take = || {
            if plain {
                return take_least_loaded(&self.backends, start, cap, exclude);
            }
            let now = std::time::Instant::now();
            let (i, slot, pick) =
                take_balanced(&self.backends, start, cap, exclude, balance, key, now)?;
            let counter = match pick {
                score::Pick::Preferred(_) => Some(&self.affinity.hits),
                score::Pick::Guarded { reason, .. } => Some(match reason {
                    score::Override::Full => &self.affinity.overrides_full,
                    score::Override::Margin => &self.affinity.overrides_margin,
                }),
                _ => None,
            };
            if let Some(c) = counter {
                c.fetch_add(1, Ordering::Relaxed);
            }
            Ok((i, slot))
        };
        match take() {
            Ok(slot) => return Ok(slot),
            Err(NoSlot::NoneHealthy) => return Err(no_healthy()),
            Err(NoSlot::AllFull) => {}
        }
        let ticket = self
            .waiters
            .join(self.cfg.queue_size)
            .ok_or_else(overloaded)?;
        let deadline = tokio::time::Instant::now() + self.cfg.queue_timeout;
        loop {
            let notified = ticket.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            match take() {
                Ok(slot) => return Ok(slot),
                Err(NoSlot::NoneHealthy) => return Err(no_healthy()),
                Err(NoSlot::AllFull) => {}
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(overloaded());
            }
        }
    }

    /// Parked keepalive connections, all backends.
    pub fn idle_connections(&self) -> usize {
        self.pool.idle_count()
    }

    /// Parked keepalive connections to backend `index` (same order as `backends()`).
    pub fn idle_connections_of(&self, index: usize) -> usize {
        self.pool.idle_count_of(index)
    }

    /// `send` for a request that holds `slot` on backend `index`: the lease keeps it until
    /// the response body is over, and a failed attempt frees it at once.
    pub async fn send_holding(
        &self,
        index: usize,
        slot: InFlight,
        req: Request<Relay>,
    ) -> Result<(Response<Incoming>, Lease), ProxyError> {
        let (resp, mut lease) = self.send(index, req).await?;
        lease.hold(slot);
        Ok((resp, lease))
    }

    /// Sends one attempt (origin-form URI) to backend `index` and waits for the response
    /// head; the lease must travel with the response body. Feeds passive health: a connect
    /// failure ejects the backend at once; a close or reset before any response byte counts
    /// as one failed health observation (`health.failures` in a row eject it); missed
    /// first-byte deadlines count toward the stuck-engine guard.
    pub async fn send(
        &self,
        index: usize,
        req: Request<Relay>,
    ) -> Result<(Response<Incoming>, Lease), ProxyError> {
        let Some(backend) = self.backends.get(index) else {
            return Err(ProxyError::NoHealthyBackend {
                upstream: self.name.to_string(),
            });
        };
        let (limit, stuck_guard) = match self.cfg.first_byte_timeout {
            Some(fb) if fb < self.cfg.response_timeout => (fb, true),
            _ => (self.cfg.response_timeout, false),
        };
        let upstream = &*self.name;
        // The deadline covers finding a connection too (a connect waits at most this long).
        let deadline = tokio::time::Instant::now() + limit;
        match self.pool.send(index, req, Some(deadline)).await {
            Ok(resp) => {
                backend.first_byte_ok(upstream);
                Ok(resp)
            }
            Err(SendError::TimedOut) => {
                if stuck_guard {
                    backend.first_byte_missed(upstream, self.cfg.stuck_after);
                }
                Err(ProxyError::UpstreamTimeout {
                    upstream: upstream.to_string(),
                    backend: backend.label.to_string(),
                    timeout: limit,
                })
            }
            Err(e @ SendError::Connect(_)) => {
                let detail = e.detail();
                backend.mark_down(upstream, &format!("connect failed: {detail}"));
                Err(ProxyError::Connect {
                    upstream: upstream.to_string(),
                    backend: backend.label.to_string(),
                    detail,
                })
            }
            Err(e) => {
                let detail = e.detail();
                let by_body = matches!(&e, SendError::Http(h) if caused_by_request_body(h));
                // A connection closed or reset before the response head may be a keepalive
                // close racing our request (the backend is fine) or a crash: it counts as one
                // failed health observation, so `health.failures` of them in a row eject the
                // backend while a single lost race does not. A failing client body (upload
                // aborted) is not the backend's fault at all.
                if by_body {
                    // The client's body was malformed (bad chunk framing), stalled past the
                    // idle timeout, or was cut off: the client's fault, not the backend's.
                    return Err(ProxyError::RequestBody(detail));
                }
                let h = &self.cfg.health;
                backend.observe(
                    upstream,
                    Err(format!("failed before responding: {detail}")),
                    h.failures,
                    h.successes,
                );
                Err(ProxyError::UpstreamBroken {
                    upstream: upstream.to_string(),
                    backend: backend.label.to_string(),
                    detail,
                })
            }
        }
    }
}

/// An upstream's background work until aborted: active health checks and engine-signal
/// scrapes (`balance.signals`), each when configured.
pub async fn background(up: Arc<Upstream>) {
    let health = async {
        if up.cfg.health.enabled {
            health::run(up.clone()).await;
        }
    };
    let signals = async {
        if up.cfg.balance.signals {
            signals::run(up.clone()).await;
        }
    };
    tokio::join!(health, signals);
}

fn caused_by_request_body(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.is::<crate::body::BodyError>() {
            return true;
        }
        if let Some(h) = err.downcast_ref::<hyper::Error>() {
            if h.is_user() || h.is_body_write_aborted() {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

/// `a: b: c` from an error and its sources, for log lines and error bodies.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        let text = src.to_string();
        if !s.ends_with(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cur = src.source();
    }
    s
}
