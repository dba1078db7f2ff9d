//! Configuration: the external TOML format (`file`), `${VAR}` expansion (`env`), and the
//! validated internal form below that the rest of podproxy runs on. Validation happens once,
//! up front, so a running proxy never meets a half-valid setting and every error can name
//! the key that caused it.

pub mod env;
pub mod file;
pub mod longcall;
pub mod poc;
mod print;
pub mod tls;
mod validate;
pub mod values;

pub use validate::{parse_backend, REDACTED};

use poc::PocConfig;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

/// The default config, compiled in so `podproxy` with no arguments runs the pod-front layout.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../../../config/podproxy.toml");

/// A config that failed to load.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("environment expansion failed at {0}")]
    Env(#[from] env::EnvErrors),
    /// Every problem found, in file order by section.
    #[error("{}", Problems(.0))]
    Invalid(Vec<Problem>),
}

impl ConfigError {
    /// The problems, one `key: reason` each (one entry for read and env failures).
    pub fn problems(&self) -> Vec<String> {
        match self {
            ConfigError::Invalid(p) => p.iter().map(ToString::to_string).collect(),
            ConfigError::Env(e) => e.0.iter().map(ToString::to_string).collect(),
            other => vec![other.to_string()],
        }
    }
}

/// One thing wrong with a config: the dotted key path and what to write instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub reason: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.reason)
    }
}

/// One problem on its own line; several as a counted list.
struct Problems<'a>(&'a [Problem]);

impl std::fmt::Display for Problems<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            [one] => write!(f, "{one}"),
            many => {
                write!(f, "{} problems:", many.len())?;
                for p in many {
                    write!(f, "\n  {p}")?;
                }
                Ok(())
            }
        }
    }
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(vec![Problem {
        key: key.into(),
        reason: reason.into(),
    }])
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl LogFormat {
    pub fn parse(text: &str) -> Result<LogFormat, String> {
        match text.trim() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("must be \"text\" or \"json\", not {other:?}")),
        }
    }
}

/// The validated config every other module runs on.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub listeners: Vec<ListenerConfig>,
    pub upstreams: Vec<UpstreamConfig>,
    pub poc: PocConfig,
    pub admin: Option<AdminConfig>,
    /// Things that work but deserve a look (an open gate, a short token): logged at start,
    /// printed by `check`.
    pub warnings: Vec<String>,
}

/// The admin listener. Its address is fixed at start (a reload does not move it).
#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub bind: SocketAddr,
    /// Printed as `<redacted>`, which refuses to load: a saved `check` output never runs
    /// with a placeholder as its secret.
    pub token: Option<String>,
    pub allow_unauthenticated: bool,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub shutdown_grace: Duration,
    pub log_format: LogFormat,
    pub log_level: String,
    /// Connection worker threads (nginx's `worker_processes`; see `workers`); `None` = one
    /// per CPU of the machine it runs on (so `check` output copied to a bigger box still
    /// uses all of it). Read at start only.
    pub worker_threads: Option<usize>,
}

#[derive(Debug, Clone)]
pub struct ListenerConfig {
    /// The table key; printed as `[listeners.<name>]`.
    pub name: String,
    pub bind: SocketAddr,
    pub strip_version_prefix: bool,
    pub max_connections: usize,
    /// Concurrent connections one source address may hold; `None` = no per-source cap.
    pub max_connections_per_source: Option<usize>,
    pub header_timeout: Duration,
    /// How long a client may accept no bytes while podproxy has some for it.
    pub send_timeout: Duration,
    pub routes: Vec<RouteConfig>,
    pub tls: Option<tls::ListenerTls>,
    pub gate: GateConfig,
}

/// The security gate of a listener (checked in `gate`).
#[derive(Debug, Clone, Default)]
pub struct GateConfig {
    /// Never printed: `podproxy check` shows `<redacted>`, which refuses to load.
    pub tokens: Vec<String>,
    pub token_file: Option<String>,
    pub token_exempt: Vec<String>,
    pub allow_ips: Vec<ipnet::IpNet>,
    pub block_paths: Vec<String>,
    /// `false` (the default): `/api/v1/train/` is blocked (see `gate::TRAINING_PREFIX`).
    pub allow_training: bool,
}

#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub prefix: String,
    pub upstream: String,
    pub strip_prefix: bool,
    /// Body of PoC init/generate requests goes through the callback guard (`[poc]`).
    pub poc: bool,
    /// A request with a JSON body and no `Content-Type` gets `application/json`: FastAPI
    /// 0.132 and later (vLLM 0.20 and later, newer mlnode images) answers such a request
    /// 422, and the DAPI sends its JSON POSTs without the header.
    pub json_content_type: bool,
    /// `POST /api/v1/inference/up` carried out as `up/async` + `up/status` polls.
    pub inference_up: longcall::InferenceUpMode,
    pub inference_up_async: Option<longcall::LongCallConfig>,
    /// SSE keep-alive interval before the first token of streaming requests.
    pub sse_keepalive: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    /// The table key; printed as `[upstreams.<name>]`.
    pub name: String,
    /// Port ranges already expanded.
    pub backends: Vec<BackendAddr>,
    pub rewrite_host: bool,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    pub idle_timeout: Duration,
    pub pool_idle_timeout: Duration,
    pub max_idle_per_backend: usize,
    /// Per-backend cap on in-flight requests; `None` = unlimited.
    pub max_concurrent: Option<usize>,
    /// Requests that may wait for a free slot when every backend is at its cap.
    pub queue_size: usize,
    pub queue_timeout: Duration,
    /// Stuck-engine guard: response head deadline that, missed `stuck_after` times in a
    /// row, ejects the backend (vLLM's /health can say 200 while the engine hangs).
    pub first_byte_timeout: Option<Duration>,
    pub stuck_after: u32,
    pub health: HealthConfig,
    pub tls: Option<tls::UpstreamTls>,
    pub balance: BalanceConfig,
}

/// LLM-aware balancing of one upstream (docs/balancing.md). Both halves are off by
/// default; then the choice is plain least outstanding requests.
#[derive(Debug, Clone, PartialEq)]
pub struct BalanceConfig {
    /// Scrape each backend's vLLM `/metrics` and balance on its queue and KV pressure.
    pub signals: bool,
    pub metrics_path: String,
    pub scrape_interval: Duration,
    pub scrape_timeout: Duration,
    /// A larger `/metrics` answer is a scrape error.
    pub max_scrape_bytes: usize,
    /// Prefer one backend per prompt opening (rendezvous hashing), guarded by load.
    pub affinity: bool,
    /// Request-body bytes read to find the prompt; the body is relayed whole either way.
    pub affinity_prefix_bytes: usize,
    /// Load guard: leave the preferred backend when its score exceeds the best one's by
    /// more than this (score units: one running request = 1).
    pub affinity_margin: f64,
}

impl BalanceConfig {
    /// Whether the choice may differ from plain least outstanding at all.
    pub fn enabled(&self) -> bool {
        self.signals || self.affinity
    }
}

impl Default for BalanceConfig {
    fn default() -> Self {
        BalanceConfig {
            signals: false,
            metrics_path: defaults::METRICS_PATH.into(),
            scrape_interval: defaults::SCRAPE_INTERVAL,
            scrape_timeout: defaults::SCRAPE_INTERVAL,
            max_scrape_bytes: defaults::MAX_SCRAPE_BYTES,
            affinity: false,
            affinity_prefix_bytes: defaults::AFFINITY_PREFIX_BYTES,
            affinity_margin: defaults::AFFINITY_MARGIN,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthConfig {
    pub enabled: bool,
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive failures that take a backend down.
    pub failures: u32,
    /// Consecutive successes that bring it back.
    pub successes: u32,
}

/// One backend origin (`http://host:port`), kept as text for logs and as parts for requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendAddr {
    pub scheme: http::uri::Scheme,
    pub authority: http::uri::Authority,
}

impl std::fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}", self.scheme, self.authority)
    }
}

/// Defaults, chosen so no legitimate Gonka call is ever cut (see docs/configuration.md, "Timeouts").
pub mod defaults {
    use std::time::Duration;
    pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
    /// Upper bound for `server.worker_threads`: a typo must not start thousands of threads.
    pub const MAX_WORKER_THREADS: usize = 256;
    /// nginx's stock config resets streams beyond ~250; a Gonka node registers 500.
    pub const MAX_CONNECTIONS: usize = 10_000;
    /// Slowloris guard, also covers HTTP/1-vs-2 detection.
    pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
    /// nginx's `send_timeout` default; a client that reads at all never meets it.
    pub const SEND_TIMEOUT: Duration = Duration::from_secs(60);
    pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
    /// `POST /api/v1/inference/up` blocks until vLLM is up: up to ~20 minutes.
    pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30 * 60);
    /// Gap allowed between two body frames (either direction).
    pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10 * 60);
    /// Below uvicorn/vLLM's 5 s keepalive, so we never reuse a connection they are closing.
    pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(4);
    pub const MAX_IDLE_PER_BACKEND: usize = 1024;
    pub const QUEUE_SIZE: usize = 1024;
    pub const QUEUE_TIMEOUT: Duration = Duration::from_secs(30);
    pub const STUCK_AFTER: u32 = 3;
    pub const HEALTH_PATH: &str = "/health";
    pub const HEALTH_INTERVAL: Duration = Duration::from_secs(2);
    pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
    pub const HEALTH_FAILURES: u32 = 3;
    pub const HEALTH_SUCCESSES: u32 = 1;
    /// Upper bound on backends one port range may expand to.
    pub const MAX_PORT_RANGE: u32 = 256;
    pub const ADMIN_BIND: &str = "127.0.0.1:9901";
    pub const METRICS_PATH: &str = "/metrics";
    pub const SCRAPE_INTERVAL: Duration = Duration::from_millis(250);
    /// vLLM's `/metrics` is tens of KiB (histograms); 1 MiB leaves room for many models.
    pub const MAX_SCRAPE_BYTES: usize = 1024 * 1024;
    pub const AFFINITY_PREFIX_BYTES: usize = 16 * 1024;
    /// Upper bound on `affinity_prefix_bytes`: the prefix is held in memory per request.
    pub const MAX_AFFINITY_PREFIX_BYTES: usize = 1024 * 1024;
    pub const AFFINITY_MARGIN: f64 = 4.0;

    // Fixed limits: not config keys, kept here beside the defaults they bound.

    /// HTTP/2 streams per client connection; a DAPI multiplexing one connection must not be
    /// capped below what a node registers (`max_concurrent: 500`).
    pub const H2_MAX_STREAMS: u32 = 1024;

    /// hyper's per-connection buffer cap (read buffer, and the write queue towards the client).
    /// It bounds what a client that stops reading can make podproxy hold: hyper's default
    /// (~400 KiB, on this side and on the upstream side) cost ~1.2 MiB of RSS per stalled
    /// reader; 64 KiB costs ~0.24 MiB. It also caps a request head at 64 KiB (nginx: 32 KiB).
    pub const MAX_BUF_SIZE: usize = 64 * 1024;
}

impl Config {
    /// Loads a config file (or the embedded default when `path` is None), expanding env vars.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let text = match path {
            Some(p) => std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                path: p.display().to_string(),
                source,
            })?,
            None => EMBEDDED_DEFAULT.to_string(),
        };
        Self::from_toml(&env::expand_env(&text)?)
    }

    /// Parses already-expanded TOML text and validates it. Sections are read one by one,
    /// so a type error in one listener does not hide the problems of the others.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| invalid("(toml)", e.to_string().trim().to_string()))?;
        let mut findings = validate::Findings::default();
        let file = file::FileConfig::from_table(table, &mut findings);
        match validate::validate(file, &mut findings) {
            Some(config) if findings.problems.is_empty() => Ok(config),
            _ => Err(ConfigError::Invalid(findings.problems)),
        }
    }

    /// One line for the start log: each listener with its address and routes, each
    /// upstream with its backends (a long list shortened), the admin address.
    pub fn summary(&self) -> String {
        let listeners: Vec<String> = self
            .listeners
            .iter()
            .map(|l| {
                let routes: Vec<String> = l
                    .routes
                    .iter()
                    .map(|r| format!("{}->{}", r.prefix, r.upstream))
                    .collect();
                format!("{} {} [{}]", l.name, l.bind, routes.join(" "))
            })
            .collect();
        let upstreams: Vec<String> = self
            .upstreams
            .iter()
            .map(|u| {
                let list = match u.backends.as_slice() {
                    [one] => one.to_string(),
                    [first, .., last] => {
                        format!("{first} .. {last} ({} backends)", u.backends.len())
                    }
                    [] => "none".into(),
                };
                format!("{} {list}", u.name)
            })
            .collect();
        let admin = self
            .admin
            .as_ref()
            .map_or_else(|| "off".to_string(), |a| a.bind.to_string());
        format!(
            "listeners: {}; upstreams: {}; admin: {admin}",
            listeners.join(", "),
            upstreams.join(", ")
        )
    }

    pub fn upstream_index(&self, name: &str) -> Option<usize> {
        self.upstreams.iter().position(|u| u.name == name)
    }
}

#[cfg(test)]
mod tests;
