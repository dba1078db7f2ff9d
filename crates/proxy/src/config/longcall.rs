//! The long-call route keys: `inference_up`, `inference_up_async` and `sse_keepalive`,
//! validated with their key paths.

use super::Problem;
use std::time::Duration;

pub mod defaults {
    use std::time::Duration;
    pub const POLL_INTERVAL: Duration = Duration::from_secs(5);
    /// Measured cold starts reach 27 minutes; the DAPI's own client gives up at 15.
    pub const BUDGET: Duration = Duration::from_secs(60 * 60);
    /// A RunPod pod restart or a short network cut must not fail the start at once.
    pub const UNREACHABLE_GRACE: Duration = Duration::from_secs(60);
    /// Cloudflare's limit for a response head (and between bytes): `sse_keepalive` must
    /// be shorter.
    pub const CLOUDFLARE_LIMIT: Duration = Duration::from_secs(100);
}

/// How a route carries out `POST /api/v1/inference/up`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum InferenceUpMode {
    /// Forwarded as it is (the 100 s limit of a Cloudflare hop applies).
    #[default]
    Direct,
    /// `up/async` + `up/status` polls.
    Async,
}

/// Settings of the long-call mode (validated).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LongCallConfig {
    pub poll_interval: Duration,
    /// Longest the whole start may take before the DAPI gets 504.
    pub budget: Duration,
    /// Longest the mlnode may go without answering a poll before the DAPI gets 502.
    pub unreachable_grace: Duration,
}

type RouteSettings = (InferenceUpMode, Option<LongCallConfig>, Option<Duration>);

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> Problem {
    Problem {
        key: key.into(),
        reason: reason.into(),
    }
}

/// Validates a route's `inference_up`, `inference_up_async` and `sse_keepalive` keys;
/// `key` is the route's key path (`listeners.poc.routes[0]`).
pub fn validate_route(
    key: &str,
    mode: Option<&str>,
    table: Option<super::file::InferenceUpAsyncSection>,
    keepalive: Option<Duration>,
) -> Result<RouteSettings, Problem> {
    let mode = match mode {
        None | Some("direct") => InferenceUpMode::Direct,
        Some("async") => InferenceUpMode::Async,
        Some(other) => {
            return Err(invalid(
                format!("{key}.inference_up"),
                format!("must be \"direct\" or \"async\", not {other:?}"),
            ))
        }
    };
    let long_call = match (mode, table) {
        (InferenceUpMode::Direct, None) => None,
        (InferenceUpMode::Direct, Some(_)) => {
            return Err(invalid(
                format!("{key}.inference_up_async"),
                "set, but inference_up is not \"async\" (it would be ignored)",
            ))
        }
        (InferenceUpMode::Async, t) => {
            let t = t.unwrap_or_default();
            let nonzero = |d: Option<Duration>, def: Duration, field: &str| {
                let d = d.unwrap_or(def);
                if d.is_zero() {
                    Err(invalid(
                        format!("{key}.inference_up_async.{field}"),
                        "must be above zero",
                    ))
                } else {
                    Ok(d)
                }
            };
            let cfg = LongCallConfig {
                poll_interval: nonzero(t.poll_interval, defaults::POLL_INTERVAL, "poll_interval")?,
                budget: nonzero(t.budget, defaults::BUDGET, "budget")?,
                unreachable_grace: nonzero(
                    t.unreachable_grace,
                    defaults::UNREACHABLE_GRACE,
                    "unreachable_grace",
                )?,
            };
            if cfg.budget <= cfg.poll_interval {
                return Err(invalid(
                    format!("{key}.inference_up_async.budget"),
                    format!(
                        "{} must be longer than poll_interval ({})",
                        humantime::format_duration(cfg.budget),
                        humantime::format_duration(cfg.poll_interval)
                    ),
                ));
            }
            if cfg.unreachable_grace < cfg.poll_interval {
                return Err(invalid(
                    format!("{key}.inference_up_async.unreachable_grace"),
                    format!(
                        "{} is shorter than poll_interval ({}): one missed poll would fail the start",
                        humantime::format_duration(cfg.unreachable_grace),
                        humantime::format_duration(cfg.poll_interval)
                    ),
                ));
            }
            Some(cfg)
        }
    };
    if let Some(every) = keepalive {
        if every.is_zero() {
            return Err(invalid(
                format!("{key}.sse_keepalive"),
                "must be above zero (leave it out to switch keep-alives off)",
            ));
        }
        if every >= defaults::CLOUDFLARE_LIMIT {
            return Err(invalid(
                format!("{key}.sse_keepalive"),
                format!(
                    "{} is not below Cloudflare's 100 s limit; the hop would cut the stream first",
                    humantime::format_duration(every)
                ),
            ));
        }
    }
    Ok((mode, long_call, keepalive))
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn route(extra: &str) -> String {
        format!(
            "[listeners.poc]\nbind = \"127.0.0.1:0\"\nroutes = [{{ prefix = \"/\", upstream = \"m\"{extra} }}]\n\n[upstreams.m]\nurls = \"http://127.0.0.1:9\"\n"
        )
    }

    fn err(extra: &str) -> String {
        match Config::from_toml(&route(extra)) {
            Ok(_) => panic!("accepted: {extra}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn async_mode_fills_in_its_defaults_and_check_prints_them() {
        let cfg = Config::from_toml(&route(
            ", inference_up = \"async\", sse_keepalive = \"20s\"",
        ))
        .unwrap();
        let r = &cfg.listeners[0].routes[0];
        assert_eq!(r.inference_up, crate::longcall::InferenceUpMode::Async);
        let lc = r.inference_up_async.unwrap();
        assert_eq!(lc.poll_interval, crate::longcall::defaults::POLL_INTERVAL);
        assert_eq!(lc.budget, crate::longcall::defaults::BUDGET);
        assert_eq!(
            lc.unreachable_grace,
            crate::longcall::defaults::UNREACHABLE_GRACE
        );
        let text = cfg.to_toml();
        assert!(text.contains("inference_up = \"async\""), "{text}");
        assert!(text.contains("poll_interval = \"5s\""), "{text}");
        assert!(text.contains("budget = \"1h\""), "{text}");
        assert!(text.contains("sse_keepalive = \"20s\""), "{text}");
        // The printed config loads again as it is.
        let again = Config::from_toml(&text).unwrap();
        assert_eq!(again.listeners[0].routes[0].inference_up_async, Some(lc));
    }

    #[test]
    fn bad_long_call_settings_name_their_key() {
        let e = err(", inference_up = \"later\"");
        assert!(
            e.starts_with("listeners.poc.routes[0].inference_up: must be"),
            "{e}"
        );
        let e = err(", inference_up_async = { budget = \"10m\" }");
        assert!(
            e.starts_with("listeners.poc.routes[0].inference_up_async: set, but"),
            "{e}"
        );
        let e = err(", inference_up = \"async\", inference_up_async = { poll_interval = \"0s\" }");
        assert!(
            e.starts_with(
                "listeners.poc.routes[0].inference_up_async.poll_interval: must be above zero"
            ),
            "{e}"
        );
        let e = err(", inference_up = \"async\", inference_up_async = { poll_interval = \"10s\", budget = \"5s\" }");
        assert!(
            e.starts_with("listeners.poc.routes[0].inference_up_async.budget:"),
            "{e}"
        );
        let e =
            err(", inference_up = \"async\", inference_up_async = { unreachable_grace = \"1s\" }");
        assert!(
            e.starts_with("listeners.poc.routes[0].inference_up_async.unreachable_grace:"),
            "{e}"
        );
        let e = err(", inference_up = \"async\", inference_up_async = { poll = \"1s\" }");
        assert!(e.contains("unknown field"), "{e}");
        let e = err(", sse_keepalive = \"0s\"");
        assert!(
            e.starts_with("listeners.poc.routes[0].sse_keepalive: must be above zero"),
            "{e}"
        );
        let e = err(", sse_keepalive = \"2m\"");
        assert!(
            e.starts_with("listeners.poc.routes[0].sse_keepalive:") && e.contains("100 s"),
            "{e}"
        );
    }

    #[test]
    fn direct_mode_is_the_default_and_only_the_sync_start_call_applies() {
        let cfg = Config::from_toml(&route("")).unwrap();
        let r = &cfg.listeners[0].routes[0];
        assert_eq!(r.inference_up, crate::longcall::InferenceUpMode::Direct);
        assert!(r.inference_up_async.is_none() && r.sse_keepalive.is_none());
        let lc = Some(crate::longcall::LongCallConfig {
            poll_interval: std::time::Duration::from_secs(1),
            budget: std::time::Duration::from_secs(10),
            unreachable_grace: std::time::Duration::from_secs(2),
        });
        use http::Method;
        assert!(crate::longcall::applies(lc, &Method::POST, "/api/v1/inference/up").is_some());
        assert!(crate::longcall::applies(lc, &Method::GET, "/api/v1/inference/up").is_none());
        assert!(
            crate::longcall::applies(lc, &Method::POST, "/api/v1/inference/up/async").is_none()
        );
        assert!(crate::longcall::applies(None, &Method::POST, "/api/v1/inference/up").is_none());
    }
}
