//! Counters of the long-call mode and the SSE keep-alive (registered with the rest in
//! `metrics`; bounded labels: upstream names from the config, a fixed set of outcomes).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabel {
    pub upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub upstream: String,
    pub outcome: String,
}

/// Counters of the long-call mode and the SSE keep-alive (registered with the rest).
#[derive(Default)]
pub struct LongCallMetrics {
    pub started: Family<UpstreamLabel, Counter>,
    pub polls: Family<UpstreamLabel, Counter>,
    pub outcomes: Family<OutcomeLabels, Counter>,
    pub keepalive_streams: Family<UpstreamLabel, Counter>,
    pub keepalives: Family<UpstreamLabel, Counter>,
}

impl LongCallMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "long_calls_started",
            "inference/up calls carried out as up/async + up/status polls",
            self.started.clone(),
        );
        r.register(
            "long_call_polls",
            "up/status polls sent for long calls",
            self.polls.clone(),
        );
        r.register(
            "long_call_outcomes",
            "How long calls ended (completed, failed, conflict, rejected, restarted, unreachable, cancelled, budget, fallback_sync, error)",
            self.outcomes.clone(),
        );
        r.register(
            "sse_keepalive_streams",
            "Streaming responses whose head podproxy sent before the upstream's (SSE keep-alive)",
            self.keepalive_streams.clone(),
        );
        r.register(
            "sse_keepalives",
            "SSE keep-alive comments sent while waiting for the upstream's head",
            self.keepalives.clone(),
        );
    }

    /// Counts one long call of `upstream` that ended with `outcome` (a bounded label).
    pub fn outcome(&self, upstream: &str, outcome: &'static str) {
        self.outcomes
            .get_or_create(&OutcomeLabels {
                upstream: upstream.to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
    }

    pub fn upstream(family: &Family<UpstreamLabel, Counter>, upstream: &str) -> Counter {
        family
            .get_or_create(&UpstreamLabel {
                upstream: upstream.to_string(),
            })
            .clone()
    }
}
