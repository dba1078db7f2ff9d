//! The stable, external config format (what operators write, and what `check` prints:
//! `config::print` fills these sections from the internal form). Every section rejects
//! unknown keys so a typo is an error, not a silently ignored setting. Validation into the
//! internal form lives in `config::validate`.

use super::validate::Findings;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// The whole file, read section by section by `from_table`: the sections that could be
/// read, so validation still finds the problems of the others.
#[derive(Debug)]
pub struct FileConfig {
    pub server: ServerSection,
    pub listeners: BTreeMap<String, ListenerSection>,
    pub upstreams: BTreeMap<String, UpstreamSection>,
    pub poc: PocSection,
    pub admin: Option<AdminSection>,
    /// Every `[upstreams.<name>]` of the file, readable or not.
    pub upstream_names: Vec<String>,
    /// Whether the file has any `[listeners.<name>]`, readable or not.
    pub has_listeners: bool,
}

impl FileConfig {
    /// Reads each section (and each listener and upstream) on its own, recording every
    /// section's problem in `f`.
    pub(super) fn from_table(mut table: toml::Table, f: &mut Findings) -> FileConfig {
        let names = |table: &toml::Table, key: &str| -> Vec<String> {
            table
                .get(key)
                .and_then(toml::Value::as_table)
                .map(|t| t.keys().cloned().collect())
                .unwrap_or_default()
        };
        let upstream_names = names(&table, "upstreams");
        let has_listeners = !names(&table, "listeners").is_empty();
        let server = take(&mut table, "server", f).unwrap_or_default();
        let listeners = take_map(&mut table, "listeners", f);
        let upstreams = take_map(&mut table, "upstreams", f);
        let poc = take(&mut table, "poc", f).unwrap_or_default();
        let admin = take(&mut table, "admin", f);
        for key in table.keys() {
            f.add(
                "(top level)",
                format!(
                    "unknown field `{key}`, expected one of `server`, `listeners`, `upstreams`, `poc`, `admin`"
                ),
            );
        }
        FileConfig {
            server,
            listeners,
            upstreams,
            poc,
            admin,
            upstream_names,
            has_listeners,
        }
    }
}

fn take<T: DeserializeOwned>(table: &mut toml::Table, key: &str, f: &mut Findings) -> Option<T> {
    section(table.remove(key)?, key, f)
}

/// `[listeners.<name>]` / `[upstreams.<name>]`: every entry read on its own.
fn take_map<T: DeserializeOwned>(
    table: &mut toml::Table,
    key: &str,
    f: &mut Findings,
) -> BTreeMap<String, T> {
    let mut out = BTreeMap::new();
    match table.remove(key) {
        None => {}
        Some(toml::Value::Table(entries)) => {
            for (name, value) in entries {
                if let Some(v) = section(value, &format!("{key}.{name}"), f) {
                    out.insert(name, v);
                }
            }
        }
        Some(_) => f.add(
            key,
            format!("must be tables like [{key}.<name>], not a plain value"),
        ),
    }
    out
}

/// One section; after a problem the offending key is taken out and the section read
/// again (at most once per key), so every wrong key of a section is reported in one run.
fn section<T: DeserializeOwned>(value: toml::Value, key: &str, f: &mut Findings) -> Option<T> {
    let mut value = value;
    let mut removed: Vec<String> = Vec::new();
    let rounds = value.as_table().map_or(0, toml::Table::len) + 1;
    for _ in 0..rounds {
        let e = match serde_path_to_error::deserialize::<_, T>(value.clone()) {
            Ok(v) => return Some(v),
            Err(e) => e,
        };
        let path = e.path().to_string();
        let message = e.into_inner().to_string();
        // "missing field" for a key we took out is that key's problem, already reported.
        if removed
            .iter()
            .any(|k| message.contains(&format!("missing field `{k}`")))
        {
            return None;
        }
        let full = if path == "." {
            key.to_string()
        } else {
            format!("{key}.{path}")
        };
        f.add(&full, friendly(&full, &message));
        let mut segments = path_segments(&path);
        if segments.is_empty() {
            match unknown_field(&message) {
                Some(k) => segments.push(Segment::Key(k)),
                None => return None,
            }
        }
        match remove_at(&mut value, &segments) {
            Some(name) => removed.push(name),
            None => return None,
        }
    }
    None
}

enum Segment {
    Key(String),
    Index(usize),
}

/// `routes[0].upstream` → routes, 0, upstream; `.` → nothing.
fn path_segments(path: &str) -> Vec<Segment> {
    let mut out = Vec::new();
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let mut pieces = part.split('[');
        if let Some(name) = pieces.next().filter(|n| !n.is_empty()) {
            out.push(Segment::Key(name.to_string()));
        }
        for idx in pieces {
            if let Ok(i) = idx.trim_end_matches(']').parse() {
                out.push(Segment::Index(i));
            }
        }
    }
    out
}

/// Removes the value at `segments` (its last key or array element); returns the removed
/// key's name.
fn remove_at(value: &mut toml::Value, segments: &[Segment]) -> Option<String> {
    let (last, parents) = segments.split_last()?;
    let mut cur = value;
    for s in parents {
        cur = match s {
            Segment::Key(k) => cur.as_table_mut()?.get_mut(k)?,
            Segment::Index(i) => cur.as_array_mut()?.get_mut(*i)?,
        };
    }
    match last {
        Segment::Key(k) => cur.as_table_mut()?.remove(k).map(|_| k.clone()),
        Segment::Index(i) => {
            let arr = cur.as_array_mut()?;
            (*i < arr.len()).then(|| {
                arr.remove(*i);
                format!("[{i}]")
            })
        }
    }
}

/// The key named by serde's "unknown field `x`, expected ...".
fn unknown_field(message: &str) -> Option<String> {
    let rest = message.split("unknown field `").nth(1)?;
    Some(rest.split('`').next()?.to_string())
}

/// serde's words for a type ("expected usize") in words an operator can act on, with an
/// example of the expected form.
fn friendly(key: &str, message: &str) -> String {
    // toml adds "\nin `key`" lines: the key path is already in front of the message.
    let mut m = message.lines().next().unwrap_or("").trim().to_string();
    for t in ["usize", "u64", "u32", "u16", "u8", "i64"] {
        m = m.replace(
            &format!("expected {t}"),
            "expected a whole number without quotes, like 500",
        );
    }
    m = m.replace(
        "expected a boolean",
        "expected true or false, without quotes",
    );
    let is_duration = ["timeout", "interval", "grace"]
        .iter()
        .any(|w| key.rsplit('.').next().is_some_and(|last| last.contains(w)));
    if is_duration && !m.contains("unknown field") {
        m.push_str(" (a duration in quotes, like \"500ms\", \"10s\", \"30m\" or \"1h\")");
    }
    m
}

/// The admin listener (health, readiness, metrics, backends, config, reload).
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    pub bind: Option<String>,
    /// Empty means none (so `"${PODPROXY_ADMIN_TOKEN:-}"` leaves a loopback admin open).
    pub token: Option<String>,
    /// A non-loopback `bind` without `token` is refused unless this is true (for a host
    /// that firewalls the port itself).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_unauthenticated: bool,
}

/// PoC callback guard (applies on routes with `poc = true`).
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PocSection {
    /// Empty means unset, so `"${POC_CALLBACK_URL:-}"` switches the rewrite off.
    pub callback_origin: Option<String>,
    pub mode: Option<super::poc::Mode>,
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    pub paths: Option<Vec<String>>,
    pub max_body_bytes: Option<u64>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    #[serde(default, with = "humantime_serde")]
    pub shutdown_grace: Option<Duration>,
    pub log_format: Option<String>,
    pub log_level: Option<String>,
    pub worker_threads: Option<usize>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerSection {
    pub bind: String,
    #[serde(default)]
    pub strip_version_prefix: bool,
    pub max_connections: Option<usize>,
    /// Per-source-address cap on concurrent connections; absent = none.
    pub max_connections_per_source: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    pub header_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub send_timeout: Option<Duration>,
    #[serde(default)]
    pub routes: Vec<RouteSection>,
    pub tls: Option<ListenerTlsSection>,
    /// Bearer tokens accepted on this listener (several for rotation). The string form
    /// carries zero or more comma-separated tokens, so one env var can switch them on.
    #[serde(default, skip_serializing_if = "StringList::is_empty")]
    pub tokens: StringList,
    /// File with one token per line (blank lines and `#` comments ignored).
    pub token_file: Option<String>,
    /// Paths (after prefix stripping) that need no token, e.g. "/health".
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub token_exempt: Vec<String>,
    /// Source addresses allowed to connect (CIDR or single address); empty = any.
    #[serde(default, skip_serializing_if = "StringList::is_empty")]
    pub allow_ips: StringList,
    /// Path prefixes refused with 403, e.g. "/api/v1/train/".
    #[serde(default, skip_serializing_if = "StringList::is_empty")]
    pub block_paths: StringList,
    /// `/api/v1/train/` is refused unless this is true (see `gate`).
    #[serde(default)]
    pub allow_training: bool,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerTlsSection {
    pub cert: String,
    pub key: String,
    pub client_auth: Option<super::tls::ClientAuth>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub client_ca: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub client_pins: Vec<String>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsSection {
    pub ca: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pins: Vec<String>,
    pub client_cert: Option<String>,
    pub client_key: Option<String>,
    pub server_name: Option<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSection {
    pub prefix: String,
    pub upstream: String,
    #[serde(default)]
    pub strip_prefix: bool,
    #[serde(default)]
    pub poc: bool,
    #[serde(default)]
    pub json_content_type: bool,
    /// `"direct"` (default) or `"async"`: long-call mode for `POST /api/v1/inference/up`
    /// (`longcall`).
    pub inference_up: Option<String>,
    pub inference_up_async: Option<InferenceUpAsyncSection>,
    /// SSE keep-alive before the first token of `"stream": true` requests (absent = off).
    #[serde(default, with = "humantime_serde")]
    pub sse_keepalive: Option<Duration>,
}

/// Settings of `inference_up = "async"` (all optional).
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InferenceUpAsyncSection {
    #[serde(default, with = "humantime_serde")]
    pub poll_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub budget: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub unreachable_grace: Option<Duration>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSection {
    pub urls: StringList,
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
    /// LLM-aware balancing (engine signals, prompt-prefix affinity); docs/balancing.md.
    #[serde(default)]
    pub balance: BalanceSection,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BalanceSection {
    pub signals: Option<bool>,
    pub metrics_path: Option<String>,
    #[serde(default, with = "humantime_serde")]
    pub scrape_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub scrape_timeout: Option<Duration>,
    pub max_scrape_bytes: Option<usize>,
    pub affinity: Option<bool>,
    pub affinity_prefix_bytes: Option<usize>,
    pub affinity_margin: Option<f64>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
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

/// A list written as an array of strings or as one string of comma-separated items, so a
/// single env var (`VLLM_URLS=http://127.0.0.1:5001,http://127.0.0.1:5002`) can carry a
/// whole list. Blank items are dropped.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StringList {
    /// As written: the array form keeps blank items (an empty token there is an error),
    /// the string form has none (an empty string means "none").
    items: Vec<String>,
}

impl StringList {
    /// The items, blank ones dropped.
    pub fn items(&self) -> Vec<String> {
        self.items
            .iter()
            .filter(|s| !s.is_empty())
            .cloned()
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.items.iter().all(String::is_empty)
    }

    /// The raw items, blank ones included (array form only keeps them, for "empty token"
    /// errors).
    pub fn raw(&self) -> &[String] {
        &self.items
    }
}

impl From<Vec<String>> for StringList {
    fn from(items: Vec<String>) -> Self {
        StringList { items }
    }
}

/// Printed as an array (the form that keeps every item as it is).
impl Serialize for StringList {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(&self.items)
    }
}

impl<'de> Deserialize<'de> for StringList {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = StringList;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(
                    "a string or an array of strings, like \"a,b\" or [\"a\", \"b\"] (quoted)",
                )
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<StringList, E> {
                Ok(StringList {
                    items: v
                        .split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(str::to_string)
                        .collect(),
                })
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<StringList, A::Error> {
                let mut items = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    items.push(s.trim().to_string());
                }
                Ok(StringList { items })
            }
        }
        d.deserialize_any(V)
    }
}
