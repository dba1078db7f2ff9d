//! `[poc]`: the callback guard's validated settings and the origin syntax they accept
//! (the guard itself is `crate::poc`).

/// The PoC endpoints whose bodies carry a callback `url`. PoC v2 first: it runs inside
/// vLLM and is what the DAPI uses today (it dropped the v1 callback routes in v0.2.12);
/// v1 stays for older nodes (`/pow/init` is the mlnode's plain init, same body type).
pub const DEFAULT_PATHS: [&str; 5] = [
    "/api/v1/inference/pow/init/generate",
    "/api/v1/inference/pow/generate",
    "/api/v1/pow/init",
    "/api/v1/pow/init/generate",
    "/api/v1/pow/init/validate",
];

/// Retried PoC batches reach tens of MB; the bound only stops a body from eating memory.
pub const DEFAULT_MAX_BODY: u64 = 64 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Point a foreign callback at the configured origin.
    Rewrite,
    /// Refuse (403) a body whose callback points anywhere but the configured origin.
    Reject,
}

/// Validated `[poc]` settings.
#[derive(Debug, Clone)]
pub struct PocConfig {
    /// `scheme://host[:port]` of the Network Node callback server (or the local relay).
    pub callback_origin: Option<String>,
    pub mode: Mode,
    /// Without an origin: the callback hosts that may be used (empty = any).
    pub allowed_hosts: Vec<String>,
    pub paths: Vec<String>,
    pub max_body_bytes: u64,
}

impl Default for PocConfig {
    fn default() -> Self {
        PocConfig {
            callback_origin: None,
            mode: Mode::Rewrite,
            allowed_hosts: Vec::new(),
            paths: DEFAULT_PATHS.iter().map(|p| p.to_string()).collect(),
            max_body_bytes: DEFAULT_MAX_BODY,
        }
    }
}

impl PocConfig {
    /// Whether PoC bodies need to be looked at at all; when not, they stream untouched.
    pub fn active(&self) -> bool {
        self.callback_origin.is_some() || !self.allowed_hosts.is_empty()
    }
}

/// Checks an origin given in config: `http(s)://host[:port]`, trailing `/` tolerated.
pub fn parse_origin(text: &str) -> Result<String, String> {
    let trimmed = text.trim().trim_end_matches('/');
    match split_origin(trimmed) {
        Some((origin, "")) => Ok(origin.to_string()),
        Some(_) => Err(format!(
            "{text:?} must be an origin only (scheme://host:port), without a path"
        )),
        None => Err(format!("{text:?} is not an http:// or https:// origin")),
    }
}

/// Splits `scheme://authority` from the rest (path, query, fragment) of an absolute URL.
pub(crate) fn split_origin(url: &str) -> Option<(&str, &str)> {
    let scheme_len = if url
        .get(..7)
        .is_some_and(|s| s.eq_ignore_ascii_case("http://"))
    {
        7
    } else if url
        .get(..8)
        .is_some_and(|s| s.eq_ignore_ascii_case("https://"))
    {
        8
    } else {
        return None;
    };
    let end = url[scheme_len..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| scheme_len + i);
    (end > scheme_len).then(|| (&url[..end], &url[end..]))
}
