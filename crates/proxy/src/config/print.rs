//! The effective config printed in the file format (`podproxy check`, the admin API's
//! `/config`): every default filled in, secrets as `REDACTED` (which refuses to load), so
//! the output can be saved and loaded again as it is once the secrets are put back. The
//! internal types carry no serde: they are turned into the file sections here.

use super::file::{
    AdminSection, BalanceSection, HealthSection, InferenceUpAsyncSection, ListenerSection,
    ListenerTlsSection, PocSection, RouteSection, ServerSection, StringList, UpstreamSection,
    UpstreamTlsSection,
};
use super::longcall::InferenceUpMode;
use super::tls::{ListenerTls, UpstreamTls};
use super::{
    AdminConfig, BalanceConfig, Config, HealthConfig, ListenerConfig, LogFormat, PocConfig,
    RouteConfig, ServerConfig, UpstreamConfig, REDACTED,
};
use serde::Serialize;
use std::collections::BTreeMap;

/// The file's sections, in the file's order.
#[derive(Serialize)]
struct Printed {
    server: ServerSection,
    listeners: BTreeMap<String, ListenerSection>,
    upstreams: BTreeMap<String, UpstreamSection>,
    poc: PocSection,
    admin: Option<AdminSection>,
}

impl Config {
    /// The effective config (every default filled in) in the file format, for
    /// `podproxy check`: it can be saved and loaded again as it is.
    pub fn to_toml(&self) -> String {
        let printed = Printed {
            server: server(&self.server),
            listeners: self
                .listeners
                .iter()
                .map(|l| (l.name.clone(), listener(l)))
                .collect(),
            upstreams: self
                .upstreams
                .iter()
                .map(|u| (u.name.clone(), upstream(u)))
                .collect(),
            poc: poc(&self.poc),
            admin: self.admin.as_ref().map(admin),
        };
        let text = toml::to_string_pretty(&printed)
            .unwrap_or_else(|e| format!("# cannot print config: {e}\n"));
        if self.server.worker_threads.is_some() {
            return text;
        }
        // A default derived from this machine is a comment, not a setting: the file may be
        // copied to a box with more cores.
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        text.replacen(
            "[server]\n",
            &format!(
                "[server]\n# worker_threads: one per CPU ({cpus} on this machine) when not set\n"
            ),
            1,
        )
    }
}

fn server(s: &ServerConfig) -> ServerSection {
    ServerSection {
        shutdown_grace: Some(s.shutdown_grace),
        log_format: Some(
            match s.log_format {
                LogFormat::Text => "text",
                LogFormat::Json => "json",
            }
            .into(),
        ),
        log_level: Some(s.log_level.clone()),
        worker_threads: s.worker_threads,
    }
}

fn listener(l: &ListenerConfig) -> ListenerSection {
    let g = &l.gate;
    ListenerSection {
        bind: l.bind.to_string(),
        strip_version_prefix: l.strip_version_prefix,
        max_connections: Some(l.max_connections),
        max_connections_per_source: l.max_connections_per_source,
        header_timeout: Some(l.header_timeout),
        send_timeout: Some(l.send_timeout),
        routes: l.routes.iter().map(route).collect(),
        tls: l.tls.as_ref().map(listener_tls),
        tokens: redacted(&g.tokens),
        token_file: g.token_file.clone(),
        token_exempt: g.token_exempt.clone(),
        allow_ips: StringList::from(
            g.allow_ips
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>(),
        ),
        block_paths: StringList::from(g.block_paths.clone()),
        allow_training: g.allow_training,
    }
}

/// Never printed: each secret becomes `REDACTED`.
fn redacted(secrets: &[String]) -> StringList {
    StringList::from(vec![REDACTED.to_string(); secrets.len()])
}

fn route(r: &RouteConfig) -> RouteSection {
    RouteSection {
        prefix: r.prefix.clone(),
        upstream: r.upstream.clone(),
        strip_prefix: r.strip_prefix,
        poc: r.poc,
        json_content_type: r.json_content_type,
        inference_up: Some(
            match r.inference_up {
                InferenceUpMode::Direct => "direct",
                InferenceUpMode::Async => "async",
            }
            .into(),
        ),
        inference_up_async: r.inference_up_async.map(|a| InferenceUpAsyncSection {
            poll_interval: Some(a.poll_interval),
            budget: Some(a.budget),
            unreachable_grace: Some(a.unreachable_grace),
        }),
        sse_keepalive: r.sse_keepalive,
    }
}

fn listener_tls(t: &ListenerTls) -> ListenerTlsSection {
    ListenerTlsSection {
        cert: t.cert.clone(),
        key: t.key.clone(),
        client_auth: Some(t.client_auth.clone()),
        client_ca: t.client_ca.clone(),
        client_pins: t.client_pins.clone(),
    }
}

fn upstream(u: &UpstreamConfig) -> UpstreamSection {
    UpstreamSection {
        urls: StringList::from(u.backends.iter().map(|b| b.to_string()).collect::<Vec<_>>()),
        rewrite_host: u.rewrite_host,
        connect_timeout: Some(u.connect_timeout),
        response_timeout: Some(u.response_timeout),
        idle_timeout: Some(u.idle_timeout),
        pool_idle_timeout: Some(u.pool_idle_timeout),
        max_idle_per_backend: Some(u.max_idle_per_backend),
        max_concurrent: u.max_concurrent,
        queue_size: Some(u.queue_size),
        queue_timeout: Some(u.queue_timeout),
        first_byte_timeout: u.first_byte_timeout,
        stuck_after: Some(u.stuck_after),
        health: health(&u.health),
        tls: u.tls.as_ref().map(upstream_tls),
        balance: balance(&u.balance),
    }
}

fn health(h: &HealthConfig) -> HealthSection {
    HealthSection {
        enabled: Some(h.enabled),
        path: Some(h.path.clone()),
        interval: Some(h.interval),
        timeout: Some(h.timeout),
        failures: Some(h.failures),
        successes: Some(h.successes),
    }
}

fn upstream_tls(t: &UpstreamTls) -> UpstreamTlsSection {
    UpstreamTlsSection {
        ca: t.ca.clone(),
        pins: t.pins.clone(),
        client_cert: t.client_cert.clone(),
        client_key: t.client_key.clone(),
        server_name: t.server_name.clone(),
    }
}

fn balance(b: &BalanceConfig) -> BalanceSection {
    BalanceSection {
        signals: Some(b.signals),
        metrics_path: Some(b.metrics_path.clone()),
        scrape_interval: Some(b.scrape_interval),
        scrape_timeout: Some(b.scrape_timeout),
        max_scrape_bytes: Some(b.max_scrape_bytes),
        affinity: Some(b.affinity),
        affinity_prefix_bytes: Some(b.affinity_prefix_bytes),
        affinity_margin: Some(b.affinity_margin),
    }
}

fn poc(p: &PocConfig) -> PocSection {
    PocSection {
        callback_origin: p.callback_origin.clone(),
        mode: Some(p.mode),
        allowed_hosts: p.allowed_hosts.clone(),
        paths: Some(p.paths.clone()),
        max_body_bytes: Some(p.max_body_bytes),
    }
}

fn admin(a: &AdminConfig) -> AdminSection {
    AdminSection {
        bind: Some(a.bind.to_string()),
        token: a.token.as_ref().map(|_| REDACTED.to_string()),
        allow_unauthenticated: a.allow_unauthenticated,
    }
}
