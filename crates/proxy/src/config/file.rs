//! The stable, external config format (what operators write). Every section rejects unknown
//! keys so a typo is an error, not a silently ignored setting. Validation into the internal
//! form lives in `config::validate`.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::time::Duration;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub server: ServerSection,
    #[serde(default)]
    pub listeners: BTreeMap<String, ListenerSection>,
    #[serde(default)]
    pub upstreams: BTreeMap<String, UpstreamSection>,
    #[serde(default)]
    pub poc: PocSection,
    pub admin: Option<AdminSection>,
}

/// The admin listener (health, readiness, metrics, backends, config, reload).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    pub bind: Option<String>,
    pub token: Option<String>,
}

/// PoC callback guard (applies on routes with `poc = true`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PocSection {
    /// Empty means unset, so `"${POC_CALLBACK_URL:-}"` switches the rewrite off.
    pub callback_origin: Option<String>,
    pub mode: Option<crate::poc::Mode>,
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    pub paths: Option<Vec<String>>,
    pub max_body_bytes: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    #[serde(default, with = "humantime_serde")]
    pub shutdown_grace: Option<Duration>,
    pub log_format: Option<String>,
    pub log_level: Option<String>,
    pub worker_threads: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerSection {
    pub bind: String,
    #[serde(default)]
    pub strip_version_prefix: bool,
    pub max_connections: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    pub header_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub send_timeout: Option<Duration>,
    #[serde(default)]
    pub routes: Vec<RouteSection>,
    pub tls: Option<ListenerTlsSection>,
    /// Bearer tokens accepted on this listener (several for rotation).
    #[serde(default)]
    pub tokens: Vec<String>,
    /// File with one token per line (blank lines and `#` comments ignored).
    pub token_file: Option<String>,
    /// Paths (after prefix stripping) that need no token, e.g. "/health".
    #[serde(default)]
    pub token_exempt: Vec<String>,
    /// Source addresses allowed to connect (CIDR or single address); empty = any.
    #[serde(default)]
    pub allow_ips: Vec<String>,
    /// Path prefixes refused with 403, e.g. "/api/v1/train/".
    #[serde(default)]
    pub block_paths: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerTlsSection {
    pub cert: String,
    pub key: String,
    pub client_auth: Option<crate::tls::ClientAuth>,
    #[serde(default)]
    pub client_ca: Vec<String>,
    #[serde(default)]
    pub client_pins: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsSection {
    pub ca: Option<String>,
    #[serde(default)]
    pub pins: Vec<String>,
    pub client_cert: Option<String>,
    pub client_key: Option<String>,
    pub server_name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSection {
    pub prefix: String,
    pub upstream: String,
    #[serde(default)]
    pub strip_prefix: bool,
    #[serde(default)]
    pub poc: bool,
    /// `"direct"` (default) or `"async"`: long-call mode for `POST /api/v1/inference/up`
    /// (`longcall`).
    pub inference_up: Option<String>,
    pub inference_up_async: Option<InferenceUpAsyncSection>,
    /// SSE keep-alive before the first token of `"stream": true` requests (absent = off).
    #[serde(default, with = "humantime_serde")]
    pub sse_keepalive: Option<Duration>,
}

/// Settings of `inference_up = "async"` (all optional).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InferenceUpAsyncSection {
    #[serde(default, with = "humantime_serde")]
    pub poll_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub budget: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub unreachable_grace: Option<Duration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSection {
    pub urls: UrlList,
    #[serde(default)]
    pub rewrite_host: bool,
    #[serde(default, with = "humantime_serde")]
    pub connect_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub response_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub idle_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub pool_idle_timeout: Option<Duration>,
    pub max_idle_per_backend: Option<usize>,
    pub max_concurrent: Option<usize>,
    pub queue_size: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    pub queue_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub first_byte_timeout: Option<Duration>,
    pub stuck_after: Option<u32>,
    #[serde(default)]
    pub health: HealthSection,
    pub tls: Option<UpstreamTlsSection>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthSection {
    pub enabled: Option<bool>,
    pub path: Option<String>,
    #[serde(default, with = "humantime_serde")]
    pub interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    pub failures: Option<u32>,
    pub successes: Option<u32>,
}

/// `urls` accepts an array or one string with comma-separated URLs, so a single env var
/// (`VLLM_URLS=http://127.0.0.1:5001,http://127.0.0.1:5002`) can carry a whole list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum UrlList {
    One(String),
    Many(Vec<String>),
}

impl UrlList {
    pub fn items(&self) -> Vec<String> {
        let raw: Vec<&str> = match self {
            UrlList::One(s) => s.split(',').collect(),
            UrlList::Many(v) => v.iter().map(String::as_str).collect(),
        };
        raw.into_iter()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    }
}
