//! The access line's fields, and its text written by hand where hosts run it.
//!
//! A container's stderr is not a terminal, so the line a host's proxy writes per request is
//! plain text. Through tracing-subscriber's formatter that line cost about 9.8 k
//! instructions (event dispatch, the `dyn fmt::Write` per field, the line buffer), a tenth
//! of the static binary's small-request throughput. When the background writer takes plain
//! text (`logging::init_background`), the line is formatted here instead: the same bytes
//! (pinned by a test against the formatter), with the level still decided by the tracing
//! filter. JSON lines, coloured lines and subscribers a test installs go through tracing.

use crate::log_writer::LogWriter;
use crate::logging::{needs_no_escaping, write_thousandths, Digits, SecondCache};
use std::cell::RefCell;
use std::fmt::Write as _;
use std::sync::OnceLock;
use std::time::SystemTime;

/// The events' target: what a filter names to turn the access log off or on.
pub const TARGET: &str = "podproxy::access";

/// Set once when plain text goes to the background writer: lines are written here directly.
static DIRECT: OnceLock<LogWriter> = OnceLock::new();

/// From now on, access lines go to `writer` as plain text, formatted here.
pub(crate) fn write_directly_to(writer: LogWriter) {
    let _ = DIRECT.set(writer);
}

/// Whether access lines are written at all, at info (a line that went well) or at warn.
pub fn enabled(warn: bool) -> bool {
    if warn {
        tracing::enabled!(target: TARGET, tracing::Level::WARN)
    } else {
        tracing::enabled!(target: TARGET, tracing::Level::INFO)
    }
}

thread_local! {
    /// Each thread formats its lines in one buffer that keeps its capacity.
    static TEXT: RefCell<String> = const { RefCell::new(String::new()) };
}

/// One request's access line, in the order it is written.
pub struct Line<'a> {
    /// Written at warn: a failure podproxy saw (aborted stream, its own 5xx).
    pub warn: bool,
    pub listener: &'a str,
    /// The TCP peer's address: the address `allow_ips` checks (not `X-Forwarded-For`).
    pub client: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub upstream: &'a str,
    pub backend: &'a str,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Written as milliseconds (`duration_ms=12.345`).
    pub duration_us: u64,
    /// Written as milliseconds; `None` (no response head) is written `ttfb_ms=-1.0`.
    pub ttfb_us: Option<u64>,
    pub request_id: &'a str,
    pub outcome: &'a str,
    pub error: &'a str,
}

impl Line<'_> {
    /// Writes the line where the installed logging wants it, if its level is enabled.
    pub fn emit(&self) {
        match DIRECT.get() {
            Some(writer) => {
                if enabled(self.warn) {
                    TEXT.with(|text| {
                        // A line being formatted on this thread cannot log again, but a
                        // borrowed buffer must not panic: format into a fresh one then.
                        let mut fresh = String::new();
                        let mut borrowed = text.try_borrow_mut();
                        let buf = borrowed.as_deref_mut().unwrap_or(&mut fresh);
                        buf.clear();
                        self.text(SystemTime::now(), buf);
                        writer.append(buf.as_bytes());
                    });
                }
            }
            None => self.trace(),
        }
    }

    /// The event, for whatever subscriber is installed (JSON, colour, tests).
    fn trace(&self) {
        macro_rules! event {
            ($level:ident) => {
                tracing::$level!(
                    target: TARGET,
                    listener = self.listener,
                    client = self.client,
                    method = self.method,
                    path = self.path,
                    status = self.status,
                    upstream = self.upstream,
                    backend = self.backend,
                    bytes_in = self.bytes_in,
                    bytes_out = self.bytes_out,
                    duration_ms = self.duration_us as f64 / 1000.0,
                    ttfb_ms = self.ttfb_us.map_or(-1.0, |t| t as f64 / 1000.0),
                    request_id = self.request_id,
                    outcome = self.outcome,
                    error = self.error,
                )
            };
        }
        if self.warn {
            event!(warn);
        } else {
            event!(info);
        }
    }

    /// The line as tracing-subscriber's plain text formatter writes it (`SecondCache`
    /// timestamp, `PlainFields` fields), ending in a newline.
    pub fn text(&self, now: SystemTime, out: &mut String) {
        // Writing into a String cannot fail.
        let _ = SecondCache::write(out, now);
        out.push_str(if self.warn { "  WARN " } else { "  INFO " });
        out.push_str(TARGET);
        out.push_str(": ");
        // Macros, not closures: each name is a constant its copy is compiled into (a
        // closure's name is a runtime length, one more `memcpy` call per field).
        macro_rules! quoted {
            ($name:literal, $value:expr) => {{
                let value: &str = $value;
                if needs_no_escaping(value) {
                    out.push_str(concat!($name, "\""));
                    out.push_str(value);
                    out.push('"');
                } else {
                    out.push_str($name);
                    let _ = write!(out, "{value:?}");
                }
            }};
        }
        macro_rules! number {
            ($name:literal, $value:expr) => {{
                out.push_str($name);
                let _ = Digits::of($value, false).write_to(out);
            }};
        }
        macro_rules! millis {
            ($name:literal, $micros:expr) => {{
                out.push_str($name);
                match $micros {
                    Some(us) => {
                        let _ = write_thousandths(out, us);
                    }
                    None => out.push_str("-1.0"),
                }
            }};
        }
        out.reserve(320 + self.path.len() + self.error.len());
        quoted!("listener=", self.listener);
        quoted!(" client=", self.client);
        quoted!(" method=", self.method);
        quoted!(" path=", self.path);
        number!(" status=", u64::from(self.status));
        quoted!(" upstream=", self.upstream);
        quoted!(" backend=", self.backend);
        number!(" bytes_in=", self.bytes_in);
        number!(" bytes_out=", self.bytes_out);
        millis!(" duration_ms=", Some(self.duration_us));
        millis!(" ttfb_ms=", self.ttfb_us);
        quoted!(" request_id=", self.request_id);
        quoted!(" outcome=", self.outcome);
        quoted!(" error=", self.error);
        out.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logging::tests::Buf;
    use crate::logging::PlainFields;
    use std::time::{Duration, UNIX_EPOCH};
    use tracing_subscriber::fmt::format::Writer;
    use tracing_subscriber::fmt::time::FormatTime;

    /// 2026-12-01T23:59:59.012345Z, for both formatters.
    fn at() -> SystemTime {
        UNIX_EPOCH + Duration::from_micros(1_796_169_599_012_345)
    }

    struct Fixed;

    impl FormatTime for Fixed {
        fn format_time(&self, w: &mut Writer<'_>) -> std::fmt::Result {
            SecondCache::write(w, at())
        }
    }

    /// What tracing-subscriber writes for `line`, configured as `logging` configures plain
    /// text (no colour, `SecondCache`, `PlainFields`), at the filter's `level`.
    fn formatter(line: &Line<'_>, level: &str) -> String {
        let buf = Buf::default();
        let out = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(level))
            .with_ansi(false)
            .with_timer(Fixed)
            .fmt_fields(PlainFields)
            .with_writer(move || buf.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            if enabled(line.warn) {
                line.trace();
            }
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        text
    }

    fn mine(line: &Line<'_>) -> String {
        let mut text = String::new();
        line.text(at(), &mut text);
        text
    }

    fn sample() -> Line<'static> {
        Line {
            warn: false,
            listener: "inference",
            client: "203.0.113.7",
            method: "POST",
            path: "/v1/chat/completions",
            status: 200,
            upstream: "vllm",
            backend: "127.0.0.1:5001",
            bytes_in: 412,
            bytes_out: 18_233,
            duration_us: 1_234_567,
            ttfb_us: Some(12_500),
            request_id: "0f3a-77",
            outcome: "complete",
            error: "",
        }
    }

    #[test]
    fn the_hand_written_line_is_the_formatters_byte_for_byte() {
        let lines = [
            sample(),
            Line {
                warn: true,
                status: 502,
                upstream: "-",
                backend: "-",
                bytes_in: 0,
                bytes_out: 0,
                duration_us: 0,
                ttfb_us: None,
                request_id: "-",
                outcome: "refused",
                error: "upstream \"vllm\" unreachable: connection refused",
                ..sample()
            },
            Line {
                path: "/caf\u{e9}/\u{1b}[31m\\x\"y\"",
                client: "2001:db8::1",
                method: "GET",
                status: 0,
                duration_us: 1,
                ttfb_us: Some(123_456_789),
                bytes_out: u64::MAX,
                outcome: "client_gone",
                error: "line\nbreak",
                ..sample()
            },
            Line {
                // Beyond 2^42 microseconds: written through the float, as tracing does.
                duration_us: 1 << 42,
                ttfb_us: Some(u64::MAX),
                request_id: "",
                ..sample()
            },
        ];
        for line in &lines {
            let expected = formatter(line, "info");
            assert_eq!(expected.lines().count(), 1, "{expected}");
            assert_eq!(mine(line), expected);
        }
    }

    #[test]
    fn the_filter_decides_which_lines_are_written() {
        let warn = Line {
            warn: true,
            ..sample()
        };
        for (level, info_shown, warn_shown) in [
            ("info", true, true),
            ("warn", false, true),
            ("podproxy::access=off,info", false, false),
            ("error", false, false),
        ] {
            assert_eq!(
                !formatter(&sample(), level).is_empty(),
                info_shown,
                "{level}"
            );
            assert_eq!(!formatter(&warn, level).is_empty(), warn_shown, "{level}");
        }
    }
}
