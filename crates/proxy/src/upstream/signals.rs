//! Engine signals: a task per upstream scrapes each backend's vLLM `/metrics` every
//! `balance.scrape_interval` (never on a request's path), bounded in time
//! (`scrape_timeout`) and size (`max_scrape_bytes`), and stores the queue and KV figures
//! on the backend for the choice in `score`.
//!
//! The parser reads only the series it needs from the Prometheus text format (no crate:
//! the maintained Prometheus crates encode, and the parsers on crates.io are unmaintained
//! and parse everything into owned structures). It is a byte scanner over input that is
//! already bounded in size; any line it does not understand is skipped, so a malformed
//! answer can at worst lack the series, which is a scrape error.

use super::backend::Backend;
use super::score::Signals;
use super::Upstream;
use crate::body::Relay;
use http::{header, HeaderValue, Request};
use http_body_util::{BodyExt, Limited};
use std::sync::Arc;
use std::time::Instant;
use tokio::task::JoinSet;

pub const RUNNING: &str = "vllm:num_requests_running";
pub const WAITING: &str = "vllm:num_requests_waiting";
pub const KV_USAGE: &str = "vllm:kv_cache_usage_perc";
/// The name before vLLM 0.10 (same meaning: a fraction despite the name).
pub const KV_USAGE_OLD: &str = "vllm:gpu_cache_usage_perc";

/// Why a scrape gave no signals; the label of `podproxy_backend_scrape_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScrapeError {
    /// Connect failure or broken response.
    Connect,
    /// A status other than 200.
    Status,
    /// No complete answer within `scrape_timeout`.
    Timeout,
    /// Larger than `max_scrape_bytes`.
    TooLarge,
    /// No `vllm:num_requests_running` / `_waiting` series (not a vLLM, or a broken answer).
    Parse,
}

impl ScrapeError {
    pub const ALL: [ScrapeError; 5] = [
        ScrapeError::Connect,
        ScrapeError::Status,
        ScrapeError::Timeout,
        ScrapeError::TooLarge,
        ScrapeError::Parse,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ScrapeError::Connect => "connect",
            ScrapeError::Status => "status",
            ScrapeError::Timeout => "timeout",
            ScrapeError::TooLarge => "too_large",
            ScrapeError::Parse => "parse",
        }
    }
}

/// The figures of one `/metrics` answer: running and waiting summed over every series
/// (engines, models), KV usage the highest of any series.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EngineFigures {
    pub running: f64,
    pub waiting: f64,
    pub kv_usage: f64,
}

/// Reads the figures from a Prometheus text exposition. Needs both request gauges; the KV
/// usage (either name) defaults to 0 when absent.
pub fn parse(text: &[u8]) -> Option<EngineFigures> {
    let (mut running, mut waiting, mut kv, mut kv_old) = (None, None, None, None);
    for line in text.split(|&b| b == b'\n') {
        let Some((name, value)) = sample(line) else {
            continue;
        };
        let sum = match name {
            n if n == RUNNING.as_bytes() => &mut running,
            n if n == WAITING.as_bytes() => &mut waiting,
            n if n == KV_USAGE.as_bytes() => &mut kv,
            n if n == KV_USAGE_OLD.as_bytes() => &mut kv_old,
            _ => continue,
        };
        let is_kv = name.ends_with(b"_perc");
        *sum = Some(match *sum {
            None => value,
            Some(v) if is_kv => f64::max(v, value),
            Some(v) => v + value,
        });
    }
    Some(EngineFigures {
        running: running?,
        waiting: waiting?,
        kv_usage: kv.or(kv_old).unwrap_or(0.0).clamp(0.0, 1.0),
    })
}

/// `name{labels} value [timestamp]` → (name, value); comments, blank lines and anything
/// malformed → None. Label values may contain `}` inside quotes (and escaped quotes).
fn sample(line: &[u8]) -> Option<(&[u8], f64)> {
    let line = line.trim_ascii();
    if line.is_empty() || line[0] == b'#' {
        return None;
    }
    let name_end = line
        .iter()
        .position(|&b| b == b'{' || b == b' ' || b == b'\t')?;
    let name = &line[..name_end];
    let mut rest = &line[name_end..];
    if rest.first() == Some(&b'{') {
        let mut in_quotes = false;
        let mut escaped = false;
        let mut close = None;
        for (i, &b) in rest.iter().enumerate().skip(1) {
            match b {
                _ if escaped => escaped = false,
                b'\\' if in_quotes => escaped = true,
                b'"' => in_quotes = !in_quotes,
                b'}' if !in_quotes => {
                    close = Some(i);
                    break;
                }
                _ => {}
            }
        }
        rest = &rest[close? + 1..];
    }
    let value = rest
        .trim_ascii()
        .split(|b| b.is_ascii_whitespace())
        .next()?;
    let v: f64 = std::str::from_utf8(value).ok()?.parse().ok()?;
    v.is_finite().then_some((name, v))
}

/// Scrapes every backend of `up` each interval until aborted (with the server or the
/// upstream, on reload). One backend's slow answer does not delay another's.
pub async fn run(up: Arc<Upstream>) {
    let interval = up.cfg.balance.scrape_interval;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let mut round = JoinSet::new();
        for (i, b) in up.backends().iter().enumerate() {
            let (up, b) = (up.clone(), b.clone());
            round.spawn(async move {
                let timeout = up.cfg.balance.scrape_timeout;
                let result = match tokio::time::timeout(timeout, scrape(&up, i, &b)).await {
                    Ok(r) => r,
                    Err(_) => Err(ScrapeError::Timeout),
                };
                match result {
                    Ok(s) => b.set_signals(s),
                    Err(e) => {
                        tracing::debug!(
                            upstream = &*up.name,
                            backend = &*b.label,
                            "scrape failed: {}",
                            e.as_str()
                        );
                        b.scrape_failed(e);
                    }
                }
            });
        }
        while round.join_next().await.is_some() {}
    }
}

async fn scrape(up: &Upstream, index: usize, b: &Backend) -> Result<Signals, ScrapeError> {
    let cfg = &up.cfg.balance;
    let mut req = Request::get(cfg.metrics_path.as_str())
        .body(Relay::empty())
        .map_err(|_| ScrapeError::Connect)?;
    req.headers_mut().insert(
        header::USER_AGENT,
        HeaderValue::from_static("podproxy-signals"),
    );
    let (resp, lease) = up
        .pool
        .send(index, req, None)
        .await
        .map_err(|_| ScrapeError::Connect)?;
    let in_flight_at_scrape = b.in_flight();
    let at = Instant::now();
    if resp.status() != http::StatusCode::OK {
        return Err(ScrapeError::Status);
    }
    let body = Relay::upstream(resp.into_body(), lease, cfg.scrape_timeout);
    let bytes = Limited::new(body, cfg.max_scrape_bytes)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                ScrapeError::TooLarge
            } else {
                ScrapeError::Connect
            }
        })?
        .to_bytes();
    let f = parse(&bytes).ok_or(ScrapeError::Parse)?;
    Ok(Signals {
        running: f.running,
        waiting: f.waiting,
        kv_usage: f.kv_usage,
        in_flight_at_scrape,
        at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const VLLM: &str = r#"# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="Qwen/Qwen3-32B-FP8"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="Qwen/Qwen3-32B-FP8"} 2.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="Qwen/Qwen3-32B-FP8"} 0.4375
vllm:num_requests_running_total{engine="0"} 99
vllm:time_to_first_token_seconds_bucket{le="0.001",model_name="Qwen/Qwen3-32B-FP8"} 0.0
"#;

    #[test]
    fn reads_vllms_request_and_kv_gauges() {
        let f = parse(VLLM.as_bytes());
        assert_eq!(
            f,
            Some(EngineFigures {
                running: 3.0,
                waiting: 2.0,
                kv_usage: 0.4375
            })
        );
    }

    #[test]
    fn sums_requests_over_engines_and_takes_the_highest_kv_usage() {
        let text = "vllm:num_requests_running{engine=\"0\"} 2\nvllm:num_requests_running{engine=\"1\"} 5\n\
                    vllm:num_requests_waiting{engine=\"0\"} 1\nvllm:num_requests_waiting{engine=\"1\"} 0\n\
                    vllm:gpu_cache_usage_perc{engine=\"0\"} 0.2\nvllm:gpu_cache_usage_perc{engine=\"1\"} 0.7\n";
        let f = parse(text.as_bytes()).map(|f| (f.running, f.waiting, f.kv_usage));
        assert_eq!(f, Some((7.0, 1.0, 0.7)));
    }

    #[test]
    fn quoted_braces_timestamps_and_crlf_are_handled() {
        let text = "vllm:num_requests_running{model_name=\"a}b\\\"{c\"} 4 1700000000000\r\n\
                    vllm:num_requests_waiting 1e0\r\n";
        let f = parse(text.as_bytes()).map(|f| (f.running, f.waiting, f.kv_usage));
        assert_eq!(f, Some((4.0, 1.0, 0.0)));
    }

    #[test]
    fn missing_or_non_finite_series_are_not_signals() {
        assert_eq!(parse(b""), None);
        assert_eq!(parse(b"vllm:num_requests_running 1\n"), None);
        assert_eq!(
            parse(b"vllm:num_requests_running NaN\nvllm:num_requests_waiting 0\n"),
            None
        );
        assert_eq!(parse(b"<html>not metrics</html>"), None);
        assert_eq!(
            parse(b"vllm:num_requests_running{unclosed=\"} 1\nvllm:num_requests_waiting 0\n"),
            None
        );
    }

    #[test]
    fn any_bytes_are_safe() {
        let mut x = 3u64;
        let alphabet = b"vllm:num_requests_running{}\"\\ =\n\t#01.e+-NaInf";
        for _ in 0..3000 {
            let mut text = Vec::new();
            for _ in 0..80 {
                x = super::super::score::mix(x);
                text.push(alphabet[(x % alphabet.len() as u64) as usize]);
            }
            let _ = parse(&text);
        }
        for end in 0..VLLM.len() {
            let _ = parse(&VLLM.as_bytes()[..end]);
        }
    }
}
