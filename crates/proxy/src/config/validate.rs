//! Validation: the external file format (`file`) into the internal config. Every error
//! names the key path (`listeners.poc.routes[0].upstream`) and the reason. Certificates,
//! keys and token files are loaded here too, so `podproxy check` catches what would
//! otherwise fail at the first handshake.

use super::{
    defaults, file, invalid, AdminConfig, BackendAddr, Config, ConfigError, GateConfig,
    HealthConfig, ListenerConfig, LogFormat, RouteConfig, ServerConfig, UpstreamConfig,
};
use crate::poc::{self, PocConfig};
use std::net::SocketAddr;
use std::time::Duration;

pub(super) fn validate(file: file::FileConfig) -> Result<Config, ConfigError> {
    let server = ServerConfig {
        shutdown_grace: file
            .server
            .shutdown_grace
            .unwrap_or(defaults::SHUTDOWN_GRACE),
        log_format: match file.server.log_format.as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(invalid(
                    "server.log_format",
                    format!("must be \"text\" or \"json\", not {other:?}"),
                ))
            }
        },
        log_level: file.server.log_level.unwrap_or_else(|| "info".into()),
        worker_threads: match file.server.worker_threads {
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
            Some(n) if (1..=defaults::MAX_WORKER_THREADS).contains(&n) => n,
            Some(n) => {
                return Err(invalid(
                    "server.worker_threads",
                    format!("must be 1 to {}, not {n}", defaults::MAX_WORKER_THREADS),
                ))
            }
        },
    };

    let mut upstreams = Vec::new();
    for (name, u) in file.upstreams {
        upstreams.push(validate_upstream(name, u)?);
    }

    if file.listeners.is_empty() {
        return Err(invalid("listeners", "at least one listener is required"));
    }
    let mut listeners = Vec::new();
    let mut binds: Vec<(SocketAddr, String)> = Vec::new();
    for (name, l) in file.listeners {
        let key = format!("listeners.{name}");
        let bind: SocketAddr = l.bind.parse().map_err(|_| {
            invalid(
                format!("{key}.bind"),
                format!("{:?} is not an address like 0.0.0.0:8080", l.bind),
            )
        })?;
        if let Some((_, other)) = binds.iter().find(|(b, _)| *b == bind && bind.port() != 0) {
            return Err(invalid(
                format!("{key}.bind"),
                format!("{bind} is already used by listener {other}"),
            ));
        }
        binds.push((bind, name.clone()));
        let max_connections = l.max_connections.unwrap_or(defaults::MAX_CONNECTIONS);
        if max_connections == 0 {
            return Err(invalid(
                format!("{key}.max_connections"),
                "must be at least 1",
            ));
        }
        let header_timeout = l.header_timeout.unwrap_or(defaults::HEADER_TIMEOUT);
        if header_timeout.is_zero() {
            return Err(invalid(
                format!("{key}.header_timeout"),
                "must be above zero",
            ));
        }
        let send_timeout = l.send_timeout.unwrap_or(defaults::SEND_TIMEOUT);
        if send_timeout.is_zero() {
            return Err(invalid(format!("{key}.send_timeout"), "must be above zero"));
        }
        if l.routes.is_empty() {
            return Err(invalid(
                format!("{key}.routes"),
                "at least one route is required",
            ));
        }
        let mut routes: Vec<RouteConfig> = Vec::new();
        for (i, r) in l.routes.into_iter().enumerate() {
            let rkey = format!("{key}.routes[{i}]");
            if !r.prefix.starts_with('/') {
                return Err(invalid(
                    format!("{rkey}.prefix"),
                    format!("{:?} must start with /", r.prefix),
                ));
            }
            if routes.iter().any(|o| o.prefix == r.prefix) {
                return Err(invalid(
                    format!("{rkey}.prefix"),
                    format!("{:?} appears twice in this listener", r.prefix),
                ));
            }
            if !upstreams.iter().any(|u| u.name == r.upstream) {
                let known: Vec<&str> = upstreams.iter().map(|u| u.name.as_str()).collect();
                return Err(invalid(
                    format!("{rkey}.upstream"),
                    format!(
                        "no upstream named {:?} (known: {})",
                        r.upstream,
                        known.join(", ")
                    ),
                ));
            }
            let (inference_up, inference_up_async, sse_keepalive) =
                crate::longcall::validate_route(
                    &rkey,
                    r.inference_up.as_deref(),
                    r.inference_up_async,
                    r.sse_keepalive,
                )?;
            routes.push(RouteConfig {
                prefix: r.prefix,
                upstream: r.upstream,
                strip_prefix: r.strip_prefix,
                poc: r.poc,
                inference_up,
                inference_up_async,
                sse_keepalive,
            });
        }
        let tls = match l.tls {
            None => None,
            Some(t) => Some(validate_listener_tls(&key, t)?),
        };
        let gate = validate_gate(
            &key,
            l.tokens,
            l.token_file,
            l.token_exempt,
            l.allow_ips,
            l.block_paths,
        )?;
        listeners.push(ListenerConfig {
            name,
            bind,
            strip_version_prefix: l.strip_version_prefix,
            max_connections,
            header_timeout,
            send_timeout,
            routes,
            tls,
            gate,
        });
    }
    let poc = validate_poc(file.poc)?;
    let admin = match file.admin {
        None => None,
        Some(a) => {
            let text = a.bind.unwrap_or_else(|| defaults::ADMIN_BIND.into());
            let bind: SocketAddr = text.parse().map_err(|_| {
                invalid(
                    "admin.bind",
                    format!("{text:?} is not an address like 127.0.0.1:9901"),
                )
            })?;
            if let Some((_, other)) = binds.iter().find(|(b, _)| *b == bind && bind.port() != 0) {
                return Err(invalid(
                    "admin.bind",
                    format!("{bind} is already used by listener {other}"),
                ));
            }
            if a.token.as_deref().is_some_and(|t| t.trim().is_empty()) {
                return Err(invalid(
                    "admin.token",
                    "empty token (is its environment variable set?)",
                ));
            }
            Some(AdminConfig {
                bind,
                token: a.token,
            })
        }
    };
    if poc.active() && !listeners.iter().any(|l| l.routes.iter().any(|r| r.poc)) {
        tracing::warn!(
            "[poc] is configured but no route has poc = true; PoC bodies pass untouched"
        );
    }
    Ok(Config {
        server,
        listeners,
        upstreams,
        poc,
        admin,
    })
}

fn validate_listener_tls(
    key: &str,
    t: file::ListenerTlsSection,
) -> Result<crate::tls::ListenerTls, ConfigError> {
    use crate::tls::ClientAuth;
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
            return Err(invalid(
                format!("{key}.tls"),
                "client_pins and client_ca both given: set client_auth to \"pin\" or \"ca\"",
            ))
        }
    };
    let ignored = match client_auth {
        ClientAuth::None => (!t.client_pins.is_empty() || !t.client_ca.is_empty())
            .then_some("client_pins/client_ca"),
        ClientAuth::Pin => (!t.client_ca.is_empty()).then_some("client_ca"),
        ClientAuth::Ca => (!t.client_pins.is_empty()).then_some("client_pins"),
    };
    if let Some(what) = ignored {
        return Err(invalid(
            format!("{key}.tls.{}", what.split('/').next().unwrap_or(what)),
            format!("{what} given but client_auth = {client_auth:?} would ignore it"),
        ));
    }
    match client_auth {
        ClientAuth::Ca if t.client_ca.is_empty() => {
            return Err(invalid(
                format!("{key}.tls.client_ca"),
                "client_auth = \"ca\" needs at least one CA file",
            ))
        }
        ClientAuth::Pin if t.client_pins.is_empty() => {
            return Err(invalid(
                format!("{key}.tls.client_pins"),
                "client_auth = \"pin\" needs at least one pinned certificate",
            ))
        }
        _ => {}
    }
    let tls = crate::tls::ListenerTls {
        cert: t.cert,
        key: t.key,
        client_auth,
        client_ca: t.client_ca,
        client_pins: t.client_pins,
    };
    // Build it once now: missing files, expired certificates and keys that do not fit
    // their certificate are config errors, reported before anything listens.
    crate::tls::server_config(&tls).map_err(|r| invalid(format!("{key}.tls"), r))?;
    Ok(tls)
}

fn validate_gate(
    key: &str,
    tokens: Vec<String>,
    token_file: Option<String>,
    token_exempt: Vec<String>,
    allow_ips: Vec<String>,
    block_paths: Vec<String>,
) -> Result<GateConfig, ConfigError> {
    for (i, t) in tokens.iter().enumerate() {
        // An unset ${VAR:-} must not silently turn authentication off.
        if t.trim().is_empty() {
            return Err(invalid(
                format!("{key}.tokens[{i}]"),
                "empty token (is its environment variable set?)",
            ));
        }
        if t.len() < 16 {
            tracing::warn!(
                listener = key,
                "tokens[{i}] is shorter than 16 characters; use a long random token"
            );
        }
    }
    if let Some(path) = &token_file {
        let loaded = crate::gate::read_token_file(path)
            .map_err(|r| invalid(format!("{key}.token_file"), r))?;
        if loaded.is_empty() {
            return Err(invalid(
                format!("{key}.token_file"),
                format!("{path}: no token in the file"),
            ));
        }
    }
    for (name, list) in [
        ("token_exempt", &token_exempt),
        ("block_paths", &block_paths),
    ] {
        if let Some(bad) = list.iter().find(|p| !p.starts_with('/')) {
            return Err(invalid(
                format!("{key}.{name}"),
                format!("{bad:?} must start with /"),
            ));
        }
    }
    let mut nets = Vec::new();
    for (i, text) in allow_ips.iter().enumerate() {
        let net = crate::gate::parse_net(text)
            .map_err(|r| invalid(format!("{key}.allow_ips[{i}]"), r))?;
        nets.push(net);
    }
    Ok(GateConfig {
        tokens,
        token_file,
        token_exempt,
        allow_ips: nets,
        block_paths,
    })
}

fn validate_poc(p: file::PocSection) -> Result<PocConfig, ConfigError> {
    let defaults = PocConfig::default();
    let callback_origin = match p.callback_origin.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(text) => Some(poc::parse_origin(text).map_err(|r| invalid("poc.callback_origin", r))?),
    };
    let mode = p.mode.unwrap_or(defaults.mode);
    if mode == poc::Mode::Reject && callback_origin.is_none() {
        return Err(invalid(
            "poc.mode",
            "\"reject\" needs poc.callback_origin (the only origin callbacks may use)",
        ));
    }
    let paths = p.paths.unwrap_or(defaults.paths);
    if let Some(bad) = paths.iter().find(|p| !p.starts_with('/')) {
        return Err(invalid("poc.paths", format!("{bad:?} must start with /")));
    }
    let max_body_bytes = p.max_body_bytes.unwrap_or(defaults.max_body_bytes);
    if max_body_bytes == 0 {
        return Err(invalid("poc.max_body_bytes", "must be above zero"));
    }
    Ok(PocConfig {
        callback_origin,
        mode,
        allowed_hosts: p.allowed_hosts,
        paths,
        max_body_bytes,
    })
}

fn validate_upstream(
    name: String,
    u: file::UpstreamSection,
) -> Result<UpstreamConfig, ConfigError> {
    let key = format!("upstreams.{name}");
    let items = u.urls.items();
    if items.is_empty() {
        return Err(invalid(
            format!("{key}.urls"),
            "at least one URL is required",
        ));
    }
    let mut backends = Vec::new();
    for item in items.iter().flat_map(|i| expand_port_range(i)) {
        let item = item.map_err(|reason| invalid(format!("{key}.urls"), reason))?;
        let b = parse_backend(&item).map_err(|reason| invalid(format!("{key}.urls"), reason))?;
        if backends.contains(&b) {
            return Err(invalid(
                format!("{key}.urls"),
                format!("{item} is listed twice"),
            ));
        }
        backends.push(b);
    }
    let pool_idle_timeout = u.pool_idle_timeout.unwrap_or(defaults::POOL_IDLE_TIMEOUT);
    if pool_idle_timeout >= Duration::from_secs(5) {
        tracing::warn!(
            upstream = %name,
            "pool_idle_timeout {} is not below uvicorn/vLLM's 5 s keepalive; expect stale connections",
            humantime::format_duration(pool_idle_timeout)
        );
    }
    let nonzero = |d: Option<Duration>, def: Duration, field: &str| {
        let d = d.unwrap_or(def);
        if d.is_zero() {
            Err(invalid(format!("{key}.{field}"), "must be above zero"))
        } else {
            Ok(d)
        }
    };
    if u.max_concurrent == Some(0) {
        return Err(invalid(
            format!("{key}.max_concurrent"),
            "must be at least 1 (or left out for no cap)",
        ));
    }
    let h = u.health;
    let health = HealthConfig {
        enabled: h.enabled.unwrap_or(true),
        path: h.path.unwrap_or_else(|| defaults::HEALTH_PATH.into()),
        interval: nonzero(h.interval, defaults::HEALTH_INTERVAL, "health.interval")?,
        timeout: nonzero(h.timeout, defaults::HEALTH_TIMEOUT, "health.timeout")?,
        failures: h.failures.unwrap_or(defaults::HEALTH_FAILURES).max(1),
        successes: h.successes.unwrap_or(defaults::HEALTH_SUCCESSES).max(1),
    };
    if !health.path.starts_with('/') {
        return Err(invalid(
            format!("{key}.health.path"),
            format!("{:?} must start with /", health.path),
        ));
    }
    let first_byte_timeout = match u.first_byte_timeout {
        Some(d) if d.is_zero() => {
            return Err(invalid(
                format!("{key}.first_byte_timeout"),
                "must be above zero",
            ))
        }
        other => other,
    };
    let tls = match u.tls {
        None => None,
        Some(t) => {
            let tls = crate::tls::UpstreamTls {
                ca: t.ca,
                pins: t.pins,
                client_cert: t.client_cert,
                client_key: t.client_key,
                server_name: t.server_name,
            };
            crate::tls::client_config(&tls).map_err(|r| invalid(format!("{key}.tls"), r))?;
            if let Some(name) = &tls.server_name {
                rustls::pki_types::ServerName::try_from(name.as_str()).map_err(|e| {
                    invalid(format!("{key}.tls.server_name"), format!("{name:?}: {e}"))
                })?;
            }
            if !backends
                .iter()
                .any(|b| b.scheme == http::uri::Scheme::HTTPS)
            {
                return Err(invalid(
                    format!("{key}.tls"),
                    "set, but no upstream URL is https://",
                ));
            }
            Some(tls)
        }
    };
    Ok(UpstreamConfig {
        tls,
        max_concurrent: u.max_concurrent,
        queue_size: u.queue_size.unwrap_or(defaults::QUEUE_SIZE),
        queue_timeout: u.queue_timeout.unwrap_or(defaults::QUEUE_TIMEOUT),
        first_byte_timeout,
        stuck_after: u.stuck_after.unwrap_or(defaults::STUCK_AFTER).max(1),
        health,
        backends,
        rewrite_host: u.rewrite_host,
        connect_timeout: nonzero(
            u.connect_timeout,
            defaults::CONNECT_TIMEOUT,
            "connect_timeout",
        )?,
        response_timeout: nonzero(
            u.response_timeout,
            defaults::RESPONSE_TIMEOUT,
            "response_timeout",
        )?,
        idle_timeout: nonzero(u.idle_timeout, defaults::IDLE_TIMEOUT, "idle_timeout")?,
        pool_idle_timeout,
        max_idle_per_backend: u
            .max_idle_per_backend
            .unwrap_or(defaults::MAX_IDLE_PER_BACKEND),
        name,
    })
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
        .map_err(|e| format!("{text:?} is not a URL: {e}"))?;
    let scheme = uri
        .scheme()
        .cloned()
        .ok_or_else(|| format!("{text:?} needs a scheme (http://)"))?;
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
