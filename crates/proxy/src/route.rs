//! The route table of one listener: optional version-segment strip, then longest-prefix
//! match, then optional prefix strip. Works on the raw request-target: nothing is decoded
//! or normalised, so `%252F` and `//` reach the upstream exactly as the client sent them.

use crate::config::values::version_segment_len;
use crate::config::ListenerConfig;

#[derive(Debug, Clone)]
pub struct Route {
    pub prefix: String,
    /// Index into the runtime's upstream list.
    pub upstream: usize,
    pub strip_prefix: bool,
    pub poc: bool,
    /// Add `Content-Type: application/json` to header-less JSON bodies.
    pub json_content_type: bool,
    /// The prefix is itself a version segment (`/v3.0.13/`): on a version-stripping
    /// listener it is matched before the strip, so side-by-side mlnode versions work.
    pub versioned: bool,
    /// Long-call mode for `inference/up` (`longcall`), when on.
    pub long_call: Option<crate::config::longcall::LongCallConfig>,
    /// SSE keep-alive interval (`sse_keepalive`), when on.
    pub sse_keepalive: Option<std::time::Duration>,
    /// The prefix as a shared string: the route's metrics label.
    pub label: std::sync::Arc<str>,
}

#[derive(Debug, Clone)]
pub struct RouteTable {
    strip_version_prefix: bool,
    /// Sorted by prefix length, longest first, so the first hit is the longest match.
    routes: Vec<Route>,
}

/// A routing decision: which route, and the path-and-query to send upstream.
#[derive(Debug)]
pub struct Matched<'a> {
    pub route: &'a Route,
    pub path_and_query: String,
}

impl RouteTable {
    /// Builds the table; `upstream_index` maps upstream names (already validated) to indices.
    pub fn new(cfg: &ListenerConfig, upstream_index: impl Fn(&str) -> Option<usize>) -> Self {
        let mut routes: Vec<Route> = cfg
            .routes
            .iter()
            .filter_map(|r| {
                Some(Route {
                    prefix: r.prefix.clone(),
                    upstream: upstream_index(&r.upstream)?,
                    strip_prefix: r.strip_prefix,
                    poc: r.poc,
                    json_content_type: r.json_content_type,
                    versioned: version_segment_len(&r.prefix).is_some(),
                    long_call: r.inference_up_async,
                    sse_keepalive: r.sse_keepalive,
                    label: r.prefix.as_str().into(),
                })
            })
            .collect();
        routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        RouteTable {
            strip_version_prefix: cfg.strip_version_prefix,
            routes,
        }
    }

    /// The routes, longest prefix first.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// Routes a raw `path?query` (origin-form request-target).
    pub fn resolve(&self, path_and_query: &str) -> Option<Matched<'_>> {
        // A route for one version (an upgrade running side by side) wins over the strip.
        let raw_path = split_query(path_and_query).0;
        let versioned = self.strip_version_prefix
            && self
                .routes
                .iter()
                .any(|r| r.versioned && raw_path.starts_with(&r.prefix));
        let target = if self.strip_version_prefix && !versioned {
            strip_version_segment(path_and_query)
        } else {
            std::borrow::Cow::Borrowed(path_and_query)
        };
        let (path, _) = split_query(&target);
        let route = self.routes.iter().find(|r| path.starts_with(&r.prefix))?;
        // nginx `proxy_pass http://u/;`: the matched prefix is replaced by `/`, whatever
        // follows it (an empty segment included) is kept.
        let path_and_query = if route.strip_prefix {
            format!("/{}", &target[route.prefix.len()..])
        } else {
            target.into_owned()
        };
        Some(Matched {
            route,
            path_and_query,
        })
    }
}

/// `(path, "?query")` of a request-target.
pub fn split_query(target: &str) -> (&str, &str) {
    match target.find('?') {
        Some(i) => (&target[..i], &target[i..]),
        None => (target, ""),
    }
}

/// The path as the application behind the proxy will understand it: percent-decoded, `//`
/// collapsed, `.` and `..` segments resolved. Used only to *decide* (PoC guard, blocked
/// paths), never to forward: `/api/v1/pow/init/%67enerate` must not slip past a check
/// that uvicorn's decoding would then route to `/api/v1/pow/init/generate`.
pub fn normalize_for_match(path: &str) -> std::borrow::Cow<'_, str> {
    normalize(path, true)
}

/// Like `normalize_for_match` but keeps `..` segments: a server that does not resolve
/// them (uvicorn does not) routes `/a/train/../x` under `/a/train/`, so a block rule must
/// look at both forms.
pub fn normalize_keep_dot_dot(path: &str) -> std::borrow::Cow<'_, str> {
    normalize(path, false)
}

/// A path with nothing to decode, no empty segment and no dot segment is already in
/// normal form: the common case costs no allocation.
fn already_normal(path: &str) -> bool {
    let b = path.as_bytes();
    b.first() == Some(&b'/')
        && memchr::memchr(b'%', b).is_none()
        && memchr::memchr_iter(b'/', b).all(|i| !matches!(b.get(i + 1), Some(b'/' | b'.')))
}

fn normalize(path: &str, resolve_dot_dot: bool) -> std::borrow::Cow<'_, str> {
    if already_normal(path) {
        return std::borrow::Cow::Borrowed(path);
    }
    std::borrow::Cow::Owned(normalize_slow(path, resolve_dot_dot))
}

fn normalize_slow(path: &str, resolve_dot_dot: bool) -> String {
    let decoded = percent_encoding::percent_decode_str(path).decode_utf8_lossy();
    let mut segments: Vec<&str> = Vec::new();
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." if resolve_dot_dot => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len() + 1);
    for seg in &segments {
        out.push('/');
        out.push_str(seg);
    }
    if out.is_empty() || (decoded.ends_with('/') && !segments.is_empty()) {
        out.push('/');
    }
    out
}

/// `/v3.0.8/api/v1/state?x` → `/api/v1/state?x`; `/v3.0.8` → `/`; anything else unchanged.
pub fn strip_version_segment(target: &str) -> std::borrow::Cow<'_, str> {
    match version_segment_len(target) {
        Some(n) => {
            let rest = &target[n..];
            if rest.starts_with('/') {
                std::borrow::Cow::Borrowed(rest)
            } else {
                std::borrow::Cow::Owned(format!("/{rest}"))
            }
        }
        None => std::borrow::Cow::Borrowed(target),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RouteConfig;

    fn table(strip_version: bool, routes: &[(&str, &str, bool)]) -> RouteTable {
        let cfg = ListenerConfig {
            name: "t".into(),
            bind: "127.0.0.1:0".parse().unwrap(),
            strip_version_prefix: strip_version,
            max_connections: 1,
            max_connections_per_source: None,
            header_timeout: std::time::Duration::from_secs(1),
            send_timeout: std::time::Duration::from_secs(1),
            routes: routes
                .iter()
                .map(|(p, u, s)| RouteConfig {
                    prefix: p.to_string(),
                    upstream: u.to_string(),
                    strip_prefix: *s,
                    poc: false,
                    json_content_type: false,
                    inference_up: Default::default(),
                    inference_up_async: None,
                    sse_keepalive: None,
                })
                .collect(),
            tls: None,
            gate: Default::default(),
        };
        RouteTable::new(&cfg, |n| match n {
            "mlnode" => Some(0),
            "vllm" => Some(1),
            _ => None,
        })
    }

    fn resolve(t: &RouteTable, target: &str) -> Option<(usize, String)> {
        t.resolve(target)
            .map(|m| (m.route.upstream, m.path_and_query))
    }

    #[test]
    fn the_no_allocation_path_agrees_with_full_normalisation() {
        for p in [
            "/",
            "/api/v1/state",
            "/api/v1/state/",
            "/v1/chat/completions",
            "/api/v1/train",
            "/a-b_c~d/e:f@g",
        ] {
            assert!(already_normal(p), "{p}");
            assert_eq!(normalize_slow(p, true), p);
            assert_eq!(normalize_slow(p, false), p);
        }
        for p in [
            "/a//b", "/a/./b", "/a/../b", "/%61", "/a/.", "x", "/.env", "", "//", "/a/%",
        ] {
            assert!(!already_normal(p), "{p}");
        }
    }

    #[test]
    fn longest_prefix_wins_regardless_of_order() {
        let t = table(false, &[("/", "mlnode", false), ("/v1/", "vllm", false)]);
        assert_eq!(
            resolve(&t, "/v1/chat/completions"),
            Some((1, "/v1/chat/completions".into()))
        );
        assert_eq!(
            resolve(&t, "/api/v1/state"),
            Some((0, "/api/v1/state".into()))
        );
        assert_eq!(resolve(&t, "/v1"), Some((0, "/v1".into())));
    }

    #[test]
    fn a_version_route_wins_over_the_generic_strip() {
        let t = table(
            true,
            &[
                ("/v3.0.13/", "vllm", true),
                ("/v1/", "vllm", false),
                ("/", "mlnode", false),
            ],
        );
        assert_eq!(
            resolve(&t, "/v3.0.13/api/v1/state?x=1"),
            Some((1, "/api/v1/state?x=1".into()))
        );
        assert_eq!(
            resolve(&t, "/v3.0.8/api/v1/state"),
            Some((0, "/api/v1/state".into()))
        );
        assert_eq!(
            resolve(&t, "/api/v1/state"),
            Some((0, "/api/v1/state".into()))
        );
        // Another version, or a longer one that merely starts alike, takes the strip.
        assert_eq!(
            resolve(&t, "/v3.0.130/api/v1/state"),
            Some((0, "/api/v1/state".into()))
        );
        assert_eq!(
            resolve(&t, "/v3.0.8/v1/models"),
            Some((1, "/v1/models".into()))
        );
    }

    #[test]
    fn no_match_is_none() {
        let t = table(false, &[("/api/", "mlnode", false)]);
        assert_eq!(resolve(&t, "/health"), None);
    }

    #[test]
    fn strip_prefix_has_nginx_semantics() {
        let t = table(false, &[("/v3.0.8/", "mlnode", true), ("/x", "vllm", true)]);
        assert_eq!(
            resolve(&t, "/v3.0.8/api/v1/state"),
            Some((0, "/api/v1/state".into()))
        );
        assert_eq!(resolve(&t, "/v3.0.8/"), Some((0, "/".into())));
        assert_eq!(resolve(&t, "/v3.0.8//x"), Some((0, "//x".into())));
        assert_eq!(resolve(&t, "/x/y"), Some((1, "//y".into())));
        assert_eq!(resolve(&t, "/xyz?q=1"), Some((1, "/yz?q=1".into())));
        assert_eq!(resolve(&t, "/x?q=1"), Some((1, "/?q=1".into())));
    }

    #[test]
    fn raw_bytes_survive() {
        let t = table(true, &[("/", "mlnode", false)]);
        let raw = "/v3.0.8/v2/poc-batches/Qwen%252FQwen3-32B//generated?a=%2F&b=..%2f";
        assert_eq!(
            resolve(&t, raw),
            Some((
                0,
                "/v2/poc-batches/Qwen%252FQwen3-32B//generated?a=%2F&b=..%2f".into()
            ))
        );
    }

    #[test]
    fn any_version_segment_is_stripped_before_routing() {
        let t = table(true, &[("/", "mlnode", false), ("/v1/", "vllm", false)]);
        for v in ["v3.0.8", "v3.0.12", "v10.2.33-rc1", "v0.0.1post2"] {
            assert_eq!(
                resolve(&t, &format!("/{v}/api/v1/state")),
                Some((0, "/api/v1/state".into())),
                "{v}"
            );
            assert_eq!(
                resolve(&t, &format!("/{v}/v1/models")),
                Some((1, "/v1/models".into())),
                "{v}"
            );
        }
        assert_eq!(resolve(&t, "/v3.0.8"), Some((0, "/".into())));
        assert_eq!(resolve(&t, "/v3.0.8?x=1"), Some((0, "/?x=1".into())));
    }

    #[test]
    fn normalisation_for_decisions() {
        for (raw, want) in [
            ("/api/v1/pow/init/generate", "/api/v1/pow/init/generate"),
            ("/api/v1/pow/init/%67enerate", "/api/v1/pow/init/generate"),
            ("/api/v1/pow/init%2Fvalidate", "/api/v1/pow/init/validate"),
            (
                "//api//v1/./pow/x/../init/generate",
                "/api/v1/pow/init/generate",
            ),
            ("/api/v1/train/", "/api/v1/train/"),
            ("/../../etc", "/etc"),
            ("/", "/"),
            ("", "/"),
            ("/%ff", "/\u{fffd}"),
        ] {
            assert_eq!(normalize_for_match(raw), want, "{raw}");
        }
    }

    #[test]
    fn non_version_segments_are_left_alone() {
        for p in [
            "/v1/models",
            "/v1.2/x",
            "/v3.0/x",
            "/vx.0.1/x",
            "/v3..8/x",
            "/v.1.2/x",
            "/version/x",
            "/v3.0.a/x",
        ] {
            assert_eq!(version_segment_len(p), None, "{p}");
        }
        let t = table(true, &[("/", "mlnode", false)]);
        assert_eq!(resolve(&t, "/v1/models"), Some((0, "/v1/models".into())));
    }
}
