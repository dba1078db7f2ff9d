//! `/metrics` for tests: the OpenMetrics text parsed into samples, and scrapes of the admin
//! listener. Every test that reads a metric reads it through here: `value(text, name,
//! labels)` for one look, `Scrape` for many.
//!
//! Metrics are recorded when an exchange ends (its response body is over), which can be a
//! moment after the client saw the end: counts are awaited (`scrape_until`), never assumed.

use super::{admin, WAIT};
use http::{Method, StatusCode};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

/// One sample line: `name{labels} value`.
#[derive(Debug)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// One `/metrics` scrape, parsed.
pub struct Scrape {
    pub text: String,
    pub samples: Vec<Sample>,
}

/// The sum of the samples named `name` (e.g. `podproxy_requests_total`) whose labels include
/// `labels`; `None` if there is none. With every label of the family given, that is the one
/// series.
pub fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    Scrape::parse(text.to_string()).get(name, labels)
}

impl Scrape {
    pub fn parse(text: String) -> Scrape {
        let samples = text
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(parse_sample)
            .collect();
        Scrape { text, samples }
    }

    /// Sum of the samples named `name` whose labels include `labels`; `None` if none does.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let matching: Vec<f64> = self
            .samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.iter().any(|(sk, sv)| sk == k && sv == v))
            })
            .map(|s| s.value)
            .collect();
        (!matching.is_empty()).then(|| matching.iter().sum())
    }

    /// Like `get`, but the series must exist.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no sample {name}{labels:?} in:\n{}", self.text))
    }

    /// The sample lines only (no `# HELP` / `# TYPE` text).
    pub fn series(&self) -> String {
        self.text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Every sample name.
    pub fn names(&self) -> BTreeSet<&str> {
        self.samples.iter().map(|s| s.name.as_str()).collect()
    }
}

/// `name{k="v",...} value` (OpenMetrics text; label values may contain escapes).
fn parse_sample(line: &str) -> Sample {
    let name_end = line
        .find(['{', ' '])
        .unwrap_or_else(|| panic!("bad line {line:?}"));
    let name = line[..name_end].to_string();
    let mut labels = Vec::new();
    let mut rest = &line[name_end..];
    if let Some(body) = rest.strip_prefix('{') {
        let b = body.as_bytes();
        let mut i = 0;
        loop {
            match b.get(i) {
                Some(b'}') => break,
                Some(b',') => i += 1,
                Some(_) => {
                    let eq = i + body[i..].find('=').expect("label =");
                    let key = body[i..eq].to_string();
                    assert_eq!(b[eq + 1], b'"', "label value not quoted: {line:?}");
                    let mut j = eq + 2;
                    let mut value = Vec::new();
                    while b[j] != b'"' {
                        if b[j] == b'\\' {
                            j += 1;
                            value.push(if b[j] == b'n' { b'\n' } else { b[j] });
                        } else {
                            value.push(b[j]);
                        }
                        j += 1;
                    }
                    labels.push((key, String::from_utf8_lossy(&value).into_owned()));
                    i = j + 1;
                }
                None => panic!("unterminated label set: {line:?}"),
            }
        }
        rest = &body[i + 1..];
    }
    let value = rest
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("bad value in {line:?}"));
    Sample {
        name,
        labels,
        value,
    }
}

/// `GET /metrics` on the admin listener `addr` (with a bearer token when given): answered
/// 200 with OpenMetrics text ending in `# EOF`, parsed.
pub async fn scrape_with(addr: SocketAddr, token: Option<&str>) -> Scrape {
    let (status, headers, text) = admin(addr, Method::GET, "/metrics", token).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let ct = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
    assert!(
        text.ends_with("# EOF\n"),
        "exposition not terminated:\n{text}"
    );
    Scrape::parse(text)
}

/// `scrape_with` without a token.
pub async fn scrape(addr: SocketAddr) -> Scrape {
    scrape_with(addr, None).await
}

/// Scrapes (bounded by `WAIT`) until `pred` holds: metrics are recorded when an exchange
/// ends, a moment after the client saw its end.
pub async fn scrape_until(addr: SocketAddr, what: &str, pred: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let s = scrape(addr).await;
        if pred(&s) {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}:\n{}",
            s.text
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
