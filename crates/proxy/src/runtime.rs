//! What a config becomes when it serves: upstream pools, the PoC guard, one context per
//! listener. Built whole, and fallibly, before it replaces the running one — so a reload
//! with a bad certificate or an unbuildable upstream changes nothing.

use crate::config::Config;
use crate::gate::Gate;
use crate::metrics::{ListenerSeries, Metrics, UpstreamSeries};
use crate::poc::Poc;
use crate::route::RouteTable;
use crate::upstream::Upstream;
use std::sync::Arc;
use std::time::Duration;
use tokio_rustls::TlsAcceptor;

pub struct Runtime {
    pub config: Config,
    pub upstreams: Vec<Arc<Upstream>>,
    /// In the order of `config.listeners`.
    pub listeners: Vec<Arc<ListenerCtx>>,
}

/// What a listener's connections need to forward requests. Shared by all its connections;
/// each request loads the current one when it arrives (so a reload reaches open keep-alive
/// connections) and keeps it to its end, so a reload never changes a request mid-flight.
pub struct ListenerCtx {
    pub name: Arc<str>,
    pub routes: RouteTable,
    pub upstreams: Vec<Arc<Upstream>>,
    /// `X-Forwarded-Proto` value: "http" or "https".
    pub proto: &'static str,
    pub poc: Arc<Poc>,
    pub gate: Gate,
    /// Metric series of this listener, and of each upstream (same order as `upstreams`).
    pub series: Arc<ListenerSeries>,
    pub upstream_series: Vec<Arc<UpstreamSeries>>,
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// Slowloris guard for this listener's connections.
    pub header_timeout: Duration,
    /// Send timeout for this listener's connections (`stall`).
    pub send_timeout: Duration,
}

impl Runtime {
    /// Builds the runtime for `config`. Upstreams whose settings did not change are taken
    /// over from `previous` (pool, health state and in-flight counts carry on).
    pub fn build(
        config: Config,
        metrics: &Arc<Metrics>,
        previous: Option<&Runtime>,
    ) -> Result<Runtime, String> {
        let mut upstreams = Vec::new();
        for u in &config.upstreams {
            let same = previous.and_then(|p| {
                p.upstreams
                    .iter()
                    .find(|o| o.name.as_ref() == u.name && same_settings(&o.cfg, u))
            });
            upstreams.push(match same {
                Some(o) => o.clone(),
                None => Arc::new(Upstream::new(u.clone())?),
            });
        }
        let poc = Arc::new(Poc::with_counters(
            config.poc.clone(),
            metrics.poc_rewritten.clone(),
            metrics.poc_refused.clone(),
        ));
        let upstream_series: Vec<_> = upstreams
            .iter()
            .map(|u| Arc::new(UpstreamSeries::new(metrics.clone(), &u.name)))
            .collect();
        let mut listeners = Vec::new();
        for l in &config.listeners {
            let err = |e: String| format!("listener {}: {e}", l.name);
            let tls = match &l.tls {
                Some(t) => Some(TlsAcceptor::from(
                    crate::config::tls::server_config(t).map_err(err)?,
                )),
                None => None,
            };
            let routes = RouteTable::new(l, |n| config.upstream_index(n));
            let labels: Vec<_> = routes.routes().iter().map(|r| r.label.clone()).collect();
            listeners.push(Arc::new(ListenerCtx {
                name: l.name.as_str().into(),
                series: Arc::new(ListenerSeries::new(metrics.clone(), &l.name, &labels)),
                upstream_series: upstream_series.clone(),
                routes,
                upstreams: upstreams.clone(),
                proto: if tls.is_some() { "https" } else { "http" },
                tls,
                header_timeout: l.header_timeout,
                send_timeout: l.send_timeout,
                poc: poc.clone(),
                gate: Gate::new(&l.gate).map_err(err)?,
            }));
        }
        Ok(Runtime {
            config,
            upstreams,
            listeners,
        })
    }

    /// Upstreams that some route uses and that have no backend in rotation.
    pub fn not_ready(&self) -> Vec<String> {
        self.upstreams
            .iter()
            .filter(|u| {
                self.config
                    .listeners
                    .iter()
                    .any(|l| l.routes.iter().any(|r| r.upstream == *u.name))
            })
            .filter(|u| !u.is_ready())
            .map(|u| u.name.to_string())
            .collect()
    }
}

/// Whether an upstream can be taken over as it is. TLS upstreams are always rebuilt so a
/// reload picks up rotated certificate files under the same paths.
fn same_settings(a: &crate::config::UpstreamConfig, b: &crate::config::UpstreamConfig) -> bool {
    a.tls.is_none() && a == b
}
