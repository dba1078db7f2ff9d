//! Validation: the external file format (`file`) into the internal config. Every problem
//! names the key path (`listeners.poc.routes[0].upstream`) and the reason, and validation
//! goes on after a problem (with a stand-in value) so one run reports all of them.
//! Certificates, keys and token files are loaded here too, so `podproxy check` catches what
//! would otherwise fail at the first handshake.

use super::poc::{self, PocConfig};
use super::{
    defaults, file, AdminConfig, BackendAddr, BalanceConfig, Config, GateConfig, HealthConfig,
    ListenerConfig, LogFormat, Problem, RouteConfig, ServerConfig, UpstreamConfig,
};
use std::net::SocketAddr;
use std::time::Duration;

/// What `podproxy check` prints in place of a secret. A file saved from that output must
/// not load with the placeholder as a working token.
pub const REDACTED: &str = "<redacted>";

/// Problems and warnings found so far.
#[derive(Debug, Default)]
pub(super) struct Findings {
    pub problems: Vec<Problem>,
    pub warnings: Vec<String>,
}

impl Findings {
    pub fn add(&mut self, key: impl Into<String>, reason: impl Into<String>) {
        self.problems.push(Problem {
            key: key.into(),
            reason: reason.into(),
        });
    }

    fn warn(&mut self, text: impl Into<String>) {
        self.warnings.push(text.into());
    }

    /// The value, or the problem recorded and `None`.
    fn ok<T>(&mut self, key: impl Into<String>, r: Result<T, String>) -> Option<T> {
        r.map_err(|reason| self.add(key, reason)).ok()
    }

    /// A duration that must be above zero; its default when absent.
    fn positive(&mut self, key: &str, d: Option<Duration>, default: Duration) -> Duration {
        match d {
            Some(d) if d.is_zero() => {
                self.add(key, "must be above zero, like \"10s\"");
                default
            }
            d => d.unwrap_or(default),
        }
    }

    /// A count that must be at least 1; its default when absent.
    fn at_least_one(&mut self, key: &str, n: Option<usize>, default: usize) -> usize {
        match n {
            Some(0) => {
                self.add(key, "must be at least 1");
                default
            }
            n => n.unwrap_or(default),
        }
    }

    /// A listen address; `example` shows the expected form in the message.
    fn bind(&mut self, key: &str, text: &str, example: &str) -> Option<SocketAddr> {
        let parsed = text.parse::<SocketAddr>().map_err(|_| {
            format!(
                "{text:?} is not an address with a port, like {example} (an IP, not a host name)"
            )
        });
        self.ok(key, parsed)
    }
}

/// The whole file; `None` when any problem was found.
pub(super) fn validate(file: file::FileConfig, f: &mut Findings) -> Option<Config> {
    let server = server(file.server, f);
    // Every upstream named in the file, valid or not: a route to an upstream with a
    // problem of its own is not a second problem.
    let known = file.upstream_names;
    let mut upstreams = Vec::new();
    for (name, u) in file.upstreams {
        if let Some(u) = upstream(name, u, f) {
            upstreams.push(u);
        }
    }
    if !file.has_listeners {
        f.add(
            "listeners",
            "at least one listener is required, like [listeners.poc] with bind and routes",
        );
    }
    let mut listeners = Vec::new();
    for (name, l) in file.listeners {
        if let Some(l) = listener(name, l, &known, f) {
            listeners.push(l);
        }
    }
    let poc = poc_section(file.poc, f);
    let admin = file.admin.and_then(|a| admin(a, f));
    bind_conflicts(&listeners, admin.as_ref(), f);
    if poc.active() && !listeners.iter().any(|l| l.routes.iter().any(|r| r.poc)) {
        f.warn("[poc] is configured but no route has poc = true; PoC bodies pass untouched");
    }
    for l in &listeners {
        open_gate_warning(l, f);
    }
    f.problems.is_empty().then(|| Config {
        server,
        listeners,
        upstreams,
        poc,
        admin,
        warnings: std::mem::take(&mut f.warnings),
    })
}

fn server(s: file::ServerSection, f: &mut Findings) -> ServerConfig {
    let log_format = match s.log_format.as_deref() {
        None => LogFormat::Text,
        Some(text) => f
            .ok("server.log_format", LogFormat::parse(text))
            .unwrap_or(LogFormat::Text),
    };
    let worker_threads = match s.worker_threads {
        Some(n) if !(1..=defaults::MAX_WORKER_THREADS).contains(&n) => {
            f.add(
                "server.worker_threads",
                format!(
                    "must be 1 to {}, not {n} (leave it out for one per CPU)",
                    defaults::MAX_WORKER_THREADS
                ),
            );
            None
        }
        n => n,
    };
    ServerConfig {
        shutdown_grace: s.shutdown_grace.unwrap_or(defaults::SHUTDOWN_GRACE),
        log_format,
        log_level: s.log_level.unwrap_or_else(|| "info".into()),
        worker_threads,
    }
}

fn listener(
    name: String,
    l: file::ListenerSection,
    upstreams: &[String],
    f: &mut Findings,
) -> Option<ListenerConfig> {
    let key = format!("listeners.{name}");
    let bind = f.bind(&format!("{key}.bind"), &l.bind, "0.0.0.0:8080");
    let max_connections = f.at_least_one(
        &format!("{key}.max_connections"),
        l.max_connections,
        defaults::MAX_CONNECTIONS,
    );
    let max_connections_per_source = match l.max_connections_per_source {
        Some(0) => {
            f.add(
                format!("{key}.max_connections_per_source"),
                "must be at least 1 (or left out for no per-source cap)",
            );
            None
        }
        n => n,
    };
    let header_timeout = f.positive(
        &format!("{key}.header_timeout"),
        l.header_timeout,
        defaults::HEADER_TIMEOUT,
    );
    let send_timeout = f.positive(
        &format!("{key}.send_timeout"),
        l.send_timeout,
        defaults::SEND_TIMEOUT,
    );
    if l.routes.is_empty() {
        f.add(
            format!("{key}.routes"),
            "at least one route is required, like routes = [{ prefix = \"/\", upstream = \"mlnode\" }]",
        );
    }
    let mut routes: Vec<RouteConfig> = Vec::new();
    for (i, r) in l.routes.into_iter().enumerate() {
        if let Some(r) = route(&format!("{key}.routes[{i}]"), r, &routes, upstreams, f) {
            routes.push(r);
        }
    }
    let tls = l.tls.and_then(|t| listener_tls(&key, t, f));
    let gate = gate(
        &key,
        GateInput {
            tokens: l.tokens,
            token_file: l.token_file,
            token_exempt: l.token_exempt,
            allow_ips: l.allow_ips,
            block_paths: l.block_paths,
            allow_training: l.allow_training,
        },
        f,
    );
    Some(ListenerConfig {
        name,
        bind: bind?,
        strip_version_prefix: l.strip_version_prefix,
        max_connections,
        max_connections_per_source,
        header_timeout,
        send_timeout,
        routes,
        tls,
        gate: gate?,
    })
}

fn route(
    key: &str,
    r: file::RouteSection,
    earlier: &[RouteConfig],
    upstreams: &[String],
    f: &mut Findings,
) -> Option<RouteConfig> {
    let mut ok = true;
    if !r.prefix.starts_with('/') {
        f.add(
            format!("{key}.prefix"),
            format!("{:?} must start with /, like \"/v1/\"", r.prefix),
        );
        ok = false;
    }
    if earlier.iter().any(|o| o.prefix == r.prefix) {
        f.add(
            format!("{key}.prefix"),
            format!("{:?} appears twice in this listener", r.prefix),
        );
        ok = false;
    }
    if !upstreams.contains(&r.upstream) {
        f.add(
            format!("{key}.upstream"),
            format!(
                "no upstream named {:?} (known: {})",
                r.upstream,
                upstreams.join(", ")
            ),
        );
        ok = false;
    }
    if ok && super::values::version_segment_len(&r.prefix).is_some() && !r.strip_prefix {
        f.warn(format!(
            "{key}: prefix {:?} is a version segment but strip_prefix is false: the mlnode gets \
             {}api/v1/... and answers 404; side-by-side versions need strip_prefix = true",
            r.prefix, r.prefix
        ));
    }
    let (inference_up, inference_up_async, sse_keepalive) = match super::longcall::validate_route(
        key,
        r.inference_up.as_deref(),
        r.inference_up_async,
        r.sse_keepalive,
    ) {
        Ok(settings) => settings,
        Err(p) => {
            f.add(p.key, p.reason);
            return None;
        }
    };
    ok.then_some(RouteConfig {
        prefix: r.prefix,
        upstream: r.upstream,
        strip_prefix: r.strip_prefix,
        poc: r.poc,
        json_content_type: r.json_content_type,
        inference_up,
        inference_up_async,
        sse_keepalive,
    })
}

fn listener_tls(
    key: &str,
    t: file::ListenerTlsSection,
    f: &mut Findings,
) -> Option<super::tls::ListenerTls> {
    use super::tls::ClientAuth;
    // Pins or CAs without a mode mean that mode; lists that the mode would ignore are an
    // error, never a listener silently open to anonymous clients.
    let client_auth = match (
        t.client_auth,
        t.client_pins.is_empty(),
        t.client_ca.is_empty(),
    ) {
        (Some(mode), _, _) => mode,
        (None, false, true) => ClientAuth::Pin,
        (None, true, false) => ClientAuth::Ca,
        (None, true, true) => ClientAuth::None,
        (None, false, false) => {
            f.add(
                format!("{key}.tls"),
                "client_pins and client_ca both given: set client_auth to \"pin\" or \"ca\"",
            );
            return None;
        }
    };
    let ignored = match client_auth {
        ClientAuth::None => (!t.client_pins.is_empty() || !t.client_ca.is_empty())
            .then_some("client_pins/client_ca"),
        ClientAuth::Pin => (!t.client_ca.is_empty()).then_some("client_ca"),
        ClientAuth::Ca => (!t.client_pins.is_empty()).then_some("client_pins"),
    };
    if let Some(what) = ignored {
        f.add(
            format!("{key}.tls.{}", what.split('/').next().unwrap_or(what)),
            format!("{what} given but client_auth = {client_auth:?} would ignore it"),
        );
        return None;
    }
    match client_auth {
        ClientAuth::Ca if t.client_ca.is_empty() => {
            f.add(
                format!("{key}.tls.client_ca"),
                "client_auth = \"ca\" needs at least one CA file, like [\"ca.pem\"]",
            );
            return None;
        }
        ClientAuth::Pin if t.client_pins.is_empty() => {
            f.add(
                format!("{key}.tls.client_pins"),
                "client_auth = \"pin\" needs at least one pinned certificate, like [\"dapi.crt\"]",
            );
            return None;
        }
        _ => {}
    }
    let tls = super::tls::ListenerTls {
        cert: t.cert,
        key: t.key,
        client_auth,
        client_ca: t.client_ca,
        client_pins: t.client_pins,
    };
    // Build it once now: missing files, expired certificates and keys that do not fit
    // their certificate are config errors, reported before anything listens.
    f.ok(format!("{key}.tls"), super::tls::server_config(&tls))?;
    Some(tls)
}

struct GateInput {
    tokens: file::StringList,
    token_file: Option<String>,
    token_exempt: Vec<String>,
    allow_ips: file::StringList,
    block_paths: file::StringList,
    allow_training: bool,
}

fn gate(key: &str, g: GateInput, f: &mut Findings) -> Option<GateConfig> {
    let before = f.problems.len();
    // The array form lists tokens one by one: an empty one is an unset variable, never
    // "no authentication". The string form may legitimately be empty (none).
    for (i, t) in g.tokens.raw().iter().enumerate() {
        let tkey = format!("{key}.tokens[{i}]");
        if t.is_empty() {
            f.add(tkey, "empty token (is its environment variable set?)");
        } else if t == REDACTED {
            f.add(tkey, redacted_reason());
        } else if t.len() < 16 {
            f.warn(format!(
                "{tkey} is shorter than 16 characters; use a long random token"
            ));
        }
    }
    if let Some(path) = &g.token_file {
        match super::values::read_token_file(path) {
            Err(reason) => f.add(format!("{key}.token_file"), reason),
            Ok(loaded) if loaded.is_empty() => f.add(
                format!("{key}.token_file"),
                format!("{path}: no token in the file (one per line)"),
            ),
            Ok(loaded) if loaded.iter().any(|t| t == REDACTED) => {
                f.add(format!("{key}.token_file"), redacted_reason())
            }
            Ok(_) => {}
        }
    }
    for (name, list) in [
        ("token_exempt", g.token_exempt.as_slice()),
        ("block_paths", g.block_paths.raw()),
    ] {
        if let Some(bad) = list.iter().find(|p| !p.starts_with('/')) {
            f.add(
                format!("{key}.{name}"),
                format!("{bad:?} must start with /, like \"/api/v1/train/\""),
            );
        }
    }
    let mut nets = Vec::new();
    for (i, text) in g.allow_ips.items().iter().enumerate() {
        if let Some(net) = f.ok(
            format!("{key}.allow_ips[{i}]"),
            super::values::parse_net(text),
        ) {
            nets.push(net);
        }
    }
    (f.problems.len() == before).then(|| GateConfig {
        tokens: g.tokens.items(),
        token_file: g.token_file,
        token_exempt: g.token_exempt,
        allow_ips: nets,
        block_paths: g.block_paths.items(),
        allow_training: g.allow_training,
    })
}

fn redacted_reason() -> String {
    format!(
        "{REDACTED:?} is what `podproxy check` prints in place of a secret, not a token: \
         put the real one back, e.g. \"${{PODPROXY_TOKEN}}\""
    )
}

fn admin(a: file::AdminSection, f: &mut Findings) -> Option<AdminConfig> {
    let text = a.bind.unwrap_or_else(|| defaults::ADMIN_BIND.into());
    let bind = f.bind("admin.bind", &text, "127.0.0.1:9901")?;
    // Empty means none: `"${PODPROXY_ADMIN_TOKEN:-}"` off. A public bind without one is
    // refused below, so an unset variable cannot open the admin API to the network.
    let token = a.token.filter(|t| !t.trim().is_empty());
    if token.as_deref() == Some(REDACTED) {
        f.add("admin.token", redacted_reason());
        return None;
    }
    if token.is_none() && !bind.ip().is_loopback() && !a.allow_unauthenticated {
        f.add(
            "admin.bind",
            format!(
                "{bind} is reachable from the network, and the admin API can reload the config \
                 and show it: set admin.token (e.g. \"${{PODPROXY_ADMIN_TOKEN}}\"), bind a loopback \
                 address, or set allow_unauthenticated = true if a firewall guards the port"
            ),
        );
        return None;
    }
    Some(AdminConfig {
        bind,
        token,
        allow_unauthenticated: a.allow_unauthenticated,
    })
}

/// Two listeners (or a listener and the admin API) on one address.
fn bind_conflicts(listeners: &[ListenerConfig], admin: Option<&AdminConfig>, f: &mut Findings) {
    let mut seen: Vec<(SocketAddr, String)> = Vec::new();
    let binds = listeners
        .iter()
        .map(|l| (l.bind, format!("listeners.{}.bind", l.name), l.name.clone()))
        .chain(admin.map(|a| (a.bind, "admin.bind".to_string(), "admin".to_string())));
    for (bind, key, owner) in binds {
        if bind.port() != 0 {
            if let Some((_, other)) = seen.iter().find(|(b, _)| *b == bind) {
                f.add(key, format!("{bind} is already used by listener {other}"));
            }
        }
        seen.push((bind, owner));
    }
}

/// A listener anyone on the network can use: name it and the risk, once, at start and in
/// `check`.
fn open_gate_warning(l: &ListenerConfig, f: &mut Findings) {
    let public = !l.bind.ip().is_loopback();
    let client_auth = l
        .tls
        .as_ref()
        .is_some_and(|t| t.client_auth != super::tls::ClientAuth::None);
    let gated = client_auth
        || !l.gate.tokens.is_empty()
        || l.gate.token_file.is_some()
        || !l.gate.allow_ips.is_empty();
    if !public || gated {
        return;
    }
    let risk = if l.routes.iter().any(|r| r.poc) {
        "anyone who reaches it can start PoC with their own callback URL, stop the node or delete its models"
    } else {
        "anyone who reaches it can run inference on your GPUs"
    };
    f.warn(format!(
        "listener {} on {} has no gate (no TLS client auth, token or allow_ips): {risk}. \
         Set tokens/allow_ips/tls (embedded default: PODPROXY_TOKEN, PODPROXY_ALLOW_IPS) or firewall the port",
        l.name, l.bind
    ));
}

fn poc_section(p: file::PocSection, f: &mut Findings) -> PocConfig {
    let defaults = PocConfig::default();
    let callback_origin = match p.callback_origin.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(text) => f.ok("poc.callback_origin", poc::parse_origin(text)),
    };
    let mode = p.mode.unwrap_or(defaults.mode);
    if mode == poc::Mode::Reject && callback_origin.is_none() {
        f.add(
            "poc.mode",
            "\"reject\" needs poc.callback_origin (the only origin callbacks may use), like \"http://203.0.113.7:9100\"",
        );
    }
    let paths = p.paths.unwrap_or(defaults.paths);
    if let Some(bad) = paths.iter().find(|p| !p.starts_with('/')) {
        f.add(
            "poc.paths",
            format!("{bad:?} must start with /, like \"/api/v1/inference/pow/init/generate\""),
        );
    }
    let max_body_bytes = match p.max_body_bytes {
        Some(0) => {
            f.add("poc.max_body_bytes", "must be above zero");
            defaults.max_body_bytes
        }
        n => n.unwrap_or(defaults.max_body_bytes),
    };
    PocConfig {
        callback_origin,
        mode,
        allowed_hosts: p.allowed_hosts,
        paths,
        max_body_bytes,
    }
}

fn upstream(name: String, u: file::UpstreamSection, f: &mut Findings) -> Option<UpstreamConfig> {
    let key = format!("upstreams.{name}");
    let before = f.problems.len();
    let items = u.urls.items();
    if items.is_empty() {
        f.add(
            format!("{key}.urls"),
            "at least one URL is required, like \"http://127.0.0.1:5001\"",
        );
    }
    let mut backends = Vec::new();
    for item in items.iter().flat_map(|i| expand_port_range(i)) {
        let Some(item) = f.ok(format!("{key}.urls"), item) else {
            continue;
        };
        let Some(b) = f.ok(format!("{key}.urls"), parse_backend(&item)) else {
            continue;
        };
        if backends.contains(&b) {
            f.add(format!("{key}.urls"), format!("{item} is listed twice"));
        }
        backends.push(b);
    }
    let pool_idle_timeout = f.positive(
        &format!("{key}.pool_idle_timeout"),
        u.pool_idle_timeout,
        defaults::POOL_IDLE_TIMEOUT,
    );
    if pool_idle_timeout >= Duration::from_secs(5) {
        f.warn(format!(
            "{key}.pool_idle_timeout {} is not below uvicorn/vLLM's 5 s keepalive; expect stale connections",
            humantime::format_duration(pool_idle_timeout)
        ));
    }
    if u.max_concurrent == Some(0) {
        f.add(
            format!("{key}.max_concurrent"),
            "must be at least 1 (or left out for no cap)",
        );
    }
    let h = u.health;
    let health = HealthConfig {
        enabled: h.enabled.unwrap_or(true),
        path: h.path.unwrap_or_else(|| defaults::HEALTH_PATH.into()),
        interval: f.positive(
            &format!("{key}.health.interval"),
            h.interval,
            defaults::HEALTH_INTERVAL,
        ),
        timeout: f.positive(
            &format!("{key}.health.timeout"),
            h.timeout,
            defaults::HEALTH_TIMEOUT,
        ),
        failures: h.failures.unwrap_or(defaults::HEALTH_FAILURES).max(1),
        successes: h.successes.unwrap_or(defaults::HEALTH_SUCCESSES).max(1),
    };
    if !health.path.starts_with('/') {
        f.add(
            format!("{key}.health.path"),
            format!("{:?} must start with /, like \"/health\"", health.path),
        );
    }
    let first_byte_timeout = match u.first_byte_timeout {
        Some(d) if d.is_zero() => {
            f.add(
                format!("{key}.first_byte_timeout"),
                "must be above zero, like \"120s\" (or left out for none)",
            );
            None
        }
        other => other,
    };
    let tls = u.tls.and_then(|t| upstream_tls(&key, t, &backends, f));
    let balance = balance_section(&key, u.balance, f);
    let cfg = UpstreamConfig {
        balance,
        tls,
        max_concurrent: u.max_concurrent,
        queue_size: u.queue_size.unwrap_or(defaults::QUEUE_SIZE),
        queue_timeout: u.queue_timeout.unwrap_or(defaults::QUEUE_TIMEOUT),
        first_byte_timeout,
        stuck_after: u.stuck_after.unwrap_or(defaults::STUCK_AFTER).max(1),
        health,
        backends,
        rewrite_host: u.rewrite_host,
        connect_timeout: f.positive(
            &format!("{key}.connect_timeout"),
            u.connect_timeout,
            defaults::CONNECT_TIMEOUT,
        ),
        response_timeout: f.positive(
            &format!("{key}.response_timeout"),
            u.response_timeout,
            defaults::RESPONSE_TIMEOUT,
        ),
        idle_timeout: f.positive(
            &format!("{key}.idle_timeout"),
            u.idle_timeout,
            defaults::IDLE_TIMEOUT,
        ),
        pool_idle_timeout,
        max_idle_per_backend: u
            .max_idle_per_backend
            .unwrap_or(defaults::MAX_IDLE_PER_BACKEND),
        name,
    };
    (f.problems.len() == before).then_some(cfg)
}

fn upstream_tls(
    key: &str,
    t: file::UpstreamTlsSection,
    backends: &[BackendAddr],
    f: &mut Findings,
) -> Option<super::tls::UpstreamTls> {
    let tls = super::tls::UpstreamTls {
        ca: t.ca,
        pins: t.pins,
        client_cert: t.client_cert,
        client_key: t.client_key,
        server_name: t.server_name,
    };
    f.ok(format!("{key}.tls"), super::tls::client_config(&tls))?;
    if let Some(name) = &tls.server_name {
        let parsed = rustls::pki_types::ServerName::try_from(name.as_str())
            .map(|_| ())
            .map_err(|e| format!("{name:?}: {e}"));
        f.ok(format!("{key}.tls.server_name"), parsed)?;
    }
    if !backends
        .iter()
        .any(|b| b.scheme == http::uri::Scheme::HTTPS)
    {
        f.add(format!("{key}.tls"), "set, but no upstream URL is https://");
        return None;
    }
    Some(tls)
}

fn balance_section(key: &str, b: file::BalanceSection, f: &mut Findings) -> BalanceConfig {
    let key = format!("{key}.balance");
    let d = BalanceConfig::default();
    let scrape_interval = f.positive(
        &format!("{key}.scrape_interval"),
        b.scrape_interval,
        d.scrape_interval,
    );
    // The timeout defaults to the interval: a scrape never overlaps the next one.
    let scrape_timeout = f.positive(
        &format!("{key}.scrape_timeout"),
        b.scrape_timeout,
        scrape_interval,
    );
    if scrape_timeout > scrape_interval {
        f.add(
            format!("{key}.scrape_timeout"),
            format!(
                "{} is longer than scrape_interval ({})",
                humantime::format_duration(scrape_timeout),
                humantime::format_duration(scrape_interval)
            ),
        );
    }
    let metrics_path = b.metrics_path.unwrap_or(d.metrics_path);
    if !metrics_path.starts_with('/') {
        f.add(
            format!("{key}.metrics_path"),
            format!("{metrics_path:?} must start with /, like \"/metrics\""),
        );
    }
    let max_scrape_bytes = b.max_scrape_bytes.unwrap_or(d.max_scrape_bytes);
    if max_scrape_bytes < 1024 {
        f.add(format!("{key}.max_scrape_bytes"), "must be at least 1024");
    }
    let affinity_prefix_bytes = b.affinity_prefix_bytes.unwrap_or(d.affinity_prefix_bytes);
    if !(64..=defaults::MAX_AFFINITY_PREFIX_BYTES).contains(&affinity_prefix_bytes) {
        f.add(
            format!("{key}.affinity_prefix_bytes"),
            format!(
                "must be between 64 and {}",
                defaults::MAX_AFFINITY_PREFIX_BYTES
            ),
        );
    }
    let affinity_margin = b.affinity_margin.unwrap_or(d.affinity_margin);
    if !affinity_margin.is_finite() || affinity_margin < 0.0 {
        f.add(
            format!("{key}.affinity_margin"),
            "must be a number of at least 0, like 4.0",
        );
    }
    BalanceConfig {
        signals: b.signals.unwrap_or(false),
        metrics_path,
        scrape_interval,
        scrape_timeout,
        max_scrape_bytes,
        affinity: b.affinity.unwrap_or(false),
        affinity_prefix_bytes,
        affinity_margin,
    }
}

/// `http://127.0.0.1:5001-5004` → the four URLs; anything else passes through. Lets one
/// setting cover every vLLM port a node may start (`5000 + i + 1`).
fn expand_port_range(item: &str) -> Vec<Result<String, String>> {
    let trimmed = item.trim_end_matches('/');
    let Some((head, range)) = trimmed.rsplit_once(':') else {
        return vec![Ok(item.to_string())];
    };
    // Only a `:<port>-<port>` suffix is a range: after the last ':' of a URL without a
    // port comes `//host...`, and host names may contain '-'.
    let Some((lo, hi)) = range
        .split_once('-')
        .filter(|_| !range.contains(['/', '.', ']']))
    else {
        return vec![Ok(item.to_string())];
    };
    let (Ok(lo), Ok(hi)) = (lo.parse::<u16>(), hi.parse::<u16>()) else {
        return vec![Err(format!(
            "{item:?}: a port range is written low-high, like 5001-5008"
        ))];
    };
    if lo == 0 || hi < lo || u32::from(hi - lo) >= defaults::MAX_PORT_RANGE {
        return vec![Err(format!(
            "{item:?}: port range must be ascending, non-zero and at most {} ports",
            defaults::MAX_PORT_RANGE
        ))];
    }
    (lo..=hi).map(|p| Ok(format!("{head}:{p}"))).collect()
}

/// Parses `http://host:port` (a trailing `/` is allowed; any other path is refused because
/// podproxy forwards the client's path byte for byte and never prepends one).
pub fn parse_backend(text: &str) -> Result<BackendAddr, String> {
    let uri: http::Uri = text
        .parse()
        .map_err(|e| format!("{text:?} is not a URL like \"http://127.0.0.1:5001\": {e}"))?;
    let scheme = uri
        .scheme()
        .cloned()
        .ok_or_else(|| format!("{text:?} needs a scheme, like \"http://{text}\""))?;
    if scheme != http::uri::Scheme::HTTP && scheme != http::uri::Scheme::HTTPS {
        return Err(format!("{text:?}: the scheme must be http:// or https://"));
    }
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| format!("{text:?} needs a host"))?;
    if authority.host().is_empty() {
        return Err(format!("{text:?} needs a host"));
    }
    if authority.as_str().contains('@') {
        return Err(format!(
            "{text:?}: credentials in upstream URLs are not supported"
        ));
    }
    if !matches!(uri.path_and_query().map(|p| p.as_str()), None | Some("/")) {
        return Err(format!(
            "{text:?}: an upstream URL cannot carry a path; use a route with strip_prefix instead"
        ));
    }
    Ok(BackendAddr { scheme, authority })
}
