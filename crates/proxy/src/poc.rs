//! PoC callback guard: points the top-level `url` of PoC init/generate bodies at the Network
//! Node (or refuses foreign URLs), changing nothing else in the body. The body is spliced,
//! never re-serialised, so key order, whitespace and numbers such as `1.4013564660458173`
//! reach the mlnode exactly as the DAPI wrote them.

use crate::body::Relay;
use crate::config::poc::split_origin;
pub use crate::config::poc::{Mode, PocConfig, DEFAULT_MAX_BODY, DEFAULT_PATHS};
use crate::error::ProxyError;
use bytes::{Bytes, BytesMut};
use http::{header, HeaderMap, HeaderValue, Method};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use prometheus_client::metrics::counter::Counter;
use std::ops::Range;
use std::time::Duration;

/// Whether a request is a PoC batch callback (counted per listener, relayed untouched).
pub fn is_callback(method: &Method, path: &str) -> bool {
    method == Method::POST && path.contains("/poc-batches/")
}

/// Live PoC guard with its counters (shared with the metrics registry, so they survive
/// a reload that replaces the guard).
#[derive(Debug, Default)]
pub struct Poc {
    pub cfg: PocConfig,
    pub rewritten: Counter,
    pub refused: Counter,
}

/// What the guard decided for one body.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Forward these bytes (unchanged or rewritten).
    Forward(Bytes),
    Refuse(String),
    Malformed(String),
}

impl Poc {
    pub fn new(cfg: PocConfig) -> Self {
        Poc {
            cfg,
            ..Default::default()
        }
    }

    /// A guard counting into the given (registered) counters.
    pub fn with_counters(cfg: PocConfig, rewritten: Counter, refused: Counter) -> Self {
        Poc {
            cfg,
            rewritten,
            refused,
        }
    }

    /// Whether this request's body must go through the guard. `upstream_path` is compared
    /// after normalisation (see `route::normalize_for_match`), so encoded variants of a PoC
    /// path are guarded too.
    pub fn applies(&self, method: &Method, upstream_path: &str) -> bool {
        if !(self.cfg.active() && method == Method::POST) {
            return false;
        }
        let normalized = crate::route::normalize_for_match(upstream_path);
        let path = normalized.trim_end_matches('/');
        self.cfg
            .paths
            .iter()
            .any(|p| p.trim_end_matches('/') == path)
    }

    /// Reads the body (bounded, idle-timed), checks/rewrites it, and returns the body to
    /// forward with `Content-Length` fixed, and how many bytes the client sent.
    pub async fn guard_body(
        &self,
        body: Incoming,
        headers: &mut HeaderMap,
        idle: Duration,
        path: &str,
    ) -> Result<(Bytes, u64), ProxyError> {
        let limit = self.cfg.max_body_bytes;
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit) {
            self.refused.inc();
            return Err(ProxyError::PayloadTooLarge { limit });
        }
        let collected = Limited::new(Relay::stream(body, idle), limit as usize)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    self.refused.inc();
                    ProxyError::PayloadTooLarge { limit }
                } else {
                    ProxyError::RequestBody(e.to_string())
                }
            })?
            .to_bytes();
        let received = collected.len() as u64;
        match self.check(collected) {
            Verdict::Forward(bytes) => {
                headers.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
                Ok((bytes, received))
            }
            Verdict::Refuse(reason) => {
                self.refused.inc();
                tracing::warn!(path, "PoC request refused: {reason}");
                Err(ProxyError::Forbidden(reason))
            }
            Verdict::Malformed(reason) => {
                self.refused.inc();
                tracing::warn!(path, "PoC request refused: {reason}");
                Err(ProxyError::BadRequest(reason))
            }
        }
    }

    /// The decision on a complete body. Pure, so it is unit-tested and fuzzable.
    pub fn check(&self, body: Bytes) -> Verdict {
        let spans = match url_spans(&body) {
            Ok(s) => s,
            Err(reason) => return Verdict::Malformed(reason),
        };
        let mut out: Option<BytesMut> = None;
        let mut copied = 0;
        for span in spans {
            let raw = &body[span.clone()];
            if raw == b"null" {
                continue;
            }
            let Ok(url) = serde_json::from_slice::<String>(raw) else {
                return Verdict::Malformed("callback \"url\" must be a string".into());
            };
            let Some((origin, rest)) = split_origin(&url) else {
                return Verdict::Malformed(format!(
                    "callback url {url:?} is not an absolute http(s) URL"
                ));
            };
            let replacement = match self.decide(origin, rest) {
                Ok(None) => continue,
                Ok(Some(new_url)) => new_url,
                Err(reason) => return Verdict::Refuse(reason),
            };
            tracing::info!(from = %url, to = %replacement, "PoC callback url rewritten");
            self.rewritten.inc();
            let buf = out.get_or_insert_with(|| BytesMut::with_capacity(body.len() + 64));
            buf.extend_from_slice(&body[copied..span.start]);
            // serde_json escapes only what JSON requires; the path part is kept verbatim.
            let encoded =
                serde_json::to_string(&replacement).unwrap_or_else(|_| format!("{replacement:?}"));
            buf.extend_from_slice(encoded.as_bytes());
            copied = span.end;
        }
        match out {
            Some(mut buf) => {
                buf.extend_from_slice(&body[copied..]);
                Verdict::Forward(buf.freeze())
            }
            None => Verdict::Forward(body),
        }
    }

    /// `Ok(None)`: forward unchanged; `Ok(Some(url))`: forward with this url; `Err`: refuse.
    fn decide(&self, origin: &str, rest: &str) -> Result<Option<String>, String> {
        if let Some(target) = &self.cfg.callback_origin {
            if origin.eq_ignore_ascii_case(target) {
                return Ok(None);
            }
            return match self.cfg.mode {
                Mode::Rewrite => Ok(Some(format!("{target}{rest}"))),
                Mode::Reject => Err(format!(
                    "callback origin {origin} is not the Network Node ({target})"
                )),
            };
        }
        let host = host_of(origin).unwrap_or_default();
        if self.cfg.allowed_hosts.is_empty()
            || self
                .cfg
                .allowed_hosts
                .iter()
                .any(|h| h.eq_ignore_ascii_case(&host))
        {
            Ok(None)
        } else {
            Err(format!("callback host {host} is not in poc.allowed_hosts"))
        }
    }
}

fn host_of(origin: &str) -> Option<String> {
    let authority = origin.split_once("://")?.1;
    let auth: http::uri::Authority = authority.parse().ok()?;
    Some(
        auth.host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
    )
}

/// Byte ranges of the values of every top-level `"url"` key (duplicates included: the
/// mlnode's parser keeps the last one, so all are checked). Validates the JSON first, so
/// the scanner below only ever walks well-formed input.
fn url_spans(body: &[u8]) -> Result<Vec<Range<usize>>, String> {
    if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(body) {
        return Err(format!("PoC body is not valid JSON: {e}"));
    }
    let mut s = Scan { b: body, i: 0 };
    s.ws();
    if s.peek() != Some(b'{') {
        return Ok(Vec::new());
    }
    s.i += 1;
    let mut spans = Vec::new();
    loop {
        s.ws();
        if s.peek() != Some(b'"') {
            break; // `}` of an empty object
        }
        let key_start = s.i;
        s.string();
        let key = &body[key_start..s.i.min(body.len())];
        s.ws();
        s.i += 1; // ':'
        s.ws();
        let value_start = s.i;
        s.value();
        let is_url = key == b"\"url\""
            || (key.contains(&b'\\')
                && serde_json::from_slice::<String>(key).is_ok_and(|k| k == "url"));
        if is_url {
            spans.push(value_start..s.i.min(body.len()));
        }
        s.ws();
        if s.peek() == Some(b',') {
            s.i += 1;
        } else {
            break;
        }
    }
    Ok(spans)
}

/// Minimal cursor over already-validated JSON. Indexing is checked; on any surprise the
/// cursor simply runs to the end.
struct Scan<'a> {
    b: &'a [u8],
    i: usize,
}

impl Scan<'_> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\r' | b'\n')) {
            self.i += 1;
        }
    }

    /// At an opening quote: moves past the closing one.
    fn string(&mut self) {
        self.i += 1;
        while let Some(c) = self.peek() {
            self.i += if c == b'\\' { 2 } else { 1 };
            if c == b'"' {
                return;
            }
        }
    }

    fn value(&mut self) {
        match self.peek() {
            Some(b'"') => self.string(),
            Some(b'{' | b'[') => {
                let mut depth = 0usize;
                while let Some(c) = self.peek() {
                    match c {
                        b'"' => {
                            self.string();
                            continue;
                        }
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth = depth.saturating_sub(1);
                            if depth == 0 {
                                self.i += 1;
                                return;
                            }
                        }
                        _ => {}
                    }
                    self.i += 1;
                }
            }
            _ => {
                while !matches!(
                    self.peek(),
                    None | Some(b',' | b'}' | b']' | b' ' | b'\t' | b'\r' | b'\n')
                ) {
                    self.i += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
