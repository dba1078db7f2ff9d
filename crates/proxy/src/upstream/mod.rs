//! An upstream: its backends, its keepalive pool, and how a request is sent to it.

pub mod backend;

use crate::body::Relay;
use crate::config::UpstreamConfig;
use crate::error::ProxyError;
use backend::{least_loaded, Backend, InFlight};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

pub struct Upstream {
    pub name: Arc<str>,
    pub cfg: UpstreamConfig,
    backends: Vec<Arc<Backend>>,
    client: Client<HttpConnector, Relay>,
    rotation: AtomicUsize,
}

impl Upstream {
    pub fn new(cfg: UpstreamConfig) -> Self {
        let mut connector = HttpConnector::new();
        // The resolver runs on every new connection, so a recreated container is found.
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(cfg.connect_timeout));
        connector.set_keepalive(Some(std::time::Duration::from_secs(60)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(cfg.pool_idle_timeout)
            .pool_max_idle_per_host(cfg.max_idle_per_backend)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            // A request that lost the race with a keepalive close before any byte was sent
            // is retried once on a fresh connection (hyper-util's "canceled" retry).
            .retry_canceled_requests(true)
            .set_host(true)
            .build(connector);
        Upstream {
            name: cfg.name.as_str().into(),
            backends: cfg
                .backends
                .iter()
                .cloned()
                .map(|a| Arc::new(Backend::new(a)))
                .collect(),
            cfg,
            client,
            rotation: AtomicUsize::new(0),
        }
    }

    pub fn backends(&self) -> &[Arc<Backend>] {
        &self.backends
    }

    /// Picks a backend and takes an in-flight slot on it.
    pub fn pick(&self) -> Result<InFlight, ProxyError> {
        let start = self.rotation.fetch_add(1, Ordering::Relaxed);
        least_loaded(&self.backends, start)
            .map(|b| InFlight::acquire(b.clone()))
            .ok_or_else(|| ProxyError::NoHealthyBackend {
                upstream: self.name.to_string(),
            })
    }

    /// Sends a request (its URI already absolute, pointing at `backend`) and waits for the
    /// response head, bounded by the upstream's response timeout.
    pub async fn send(
        &self,
        backend: &Backend,
        req: Request<Relay>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let call = self.client.request(req);
        match tokio::time::timeout(self.cfg.response_timeout, call).await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) if e.is_connect() => Err(ProxyError::Connect {
                upstream: self.name.to_string(),
                backend: backend.label.to_string(),
                detail: error_chain(&e),
            }),
            Ok(Err(e)) => Err(ProxyError::UpstreamBroken {
                upstream: self.name.to_string(),
                backend: backend.label.to_string(),
                detail: error_chain(&e),
            }),
            Err(_) => Err(ProxyError::UpstreamTimeout {
                upstream: self.name.to_string(),
                backend: backend.label.to_string(),
                timeout: self.cfg.response_timeout,
            }),
        }
    }
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
