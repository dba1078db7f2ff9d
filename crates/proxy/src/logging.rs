//! tracing setup: text or JSON lines on stderr, written off the request path.
//!
//! Which format and level win (one rule for every config, embedded or a file):
//! command-line flag > environment (`PODPROXY_LOG_FORMAT`; `PODPROXY_LOG_LEVEL`, then
//! `RUST_LOG`) > the config's `[server]` > the default (text, info). Text logs carry colour
//! codes only when stderr is a terminal and `NO_COLOR` is not set, so files, `docker logs`
//! and journald get plain lines.

use crate::config::LogFormat;
use std::io::IsTerminal;
use std::sync::OnceLock;
use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

/// Lines the log writer may hold before it drops new ones (and counts them) instead of
/// making a request wait for stderr.
const BUFFERED_LINES: usize = 64 * 1024;

/// Log lines dropped because stderr could not keep up (exported as a metric).
static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// The format after flag and environment: `flag` > `PODPROXY_LOG_FORMAT` > `file`. An
/// unknown value in the environment is an error naming the variable.
pub fn effective_format(flag: Option<&str>, file: LogFormat) -> Result<LogFormat, String> {
    if let Some(f) = flag {
        return LogFormat::parse(f).map_err(|e| format!("--log-format {e}"));
    }
    match std::env::var("PODPROXY_LOG_FORMAT") {
        Ok(v) if !v.trim().is_empty() => {
            LogFormat::parse(&v).map_err(|e| format!("PODPROXY_LOG_FORMAT {e}"))
        }
        _ => Ok(file),
    }
}

/// The level filter after flag and environment: `flag` > `PODPROXY_LOG_LEVEL` > `RUST_LOG`
/// > `file`.
pub fn effective_level(flag: Option<&str>, file: &str) -> String {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    flag.map(str::to_string)
        .or_else(|| env("PODPROXY_LOG_LEVEL"))
        .or_else(|| env("RUST_LOG"))
        .unwrap_or_else(|| file.to_string())
}

/// Whether text logs get ANSI colour: only on a terminal, and never with `NO_COLOR` set to
/// anything but the empty string (no-color.org).
pub fn colour() -> bool {
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    !no_color && std::io::stderr().is_terminal()
}

/// Installs the global subscriber writing to stderr directly (tests). Safe to call twice
/// (the second call is a no-op). `level` is a tracing filter; an invalid one means info.
pub fn init(format: LogFormat, level: &str) {
    install(format, level, std::io::stderr);
}

/// Installs the global subscriber with a buffered writer thread: a request never waits for
/// stderr; under overload lines are dropped and counted (`log_lines_dropped`) rather than
/// slowing the proxy. Keep the guard until exit: dropping it flushes what is buffered.
pub fn init_background(format: LogFormat, level: &str) -> WorkerGuard {
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(BUFFERED_LINES)
        .thread_name("podproxy-log")
        .finish(std::io::stderr());
    let _ = DROPPED.set(writer.error_counter());
    install(format, level, writer);
    guard
}

/// Log lines dropped so far by the background writer.
pub fn dropped_lines() -> u64 {
    DROPPED.get().map_or(0, |c| c.dropped_lines() as u64)
}

fn install<W>(format: LogFormat, level: &str, writer: W)
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    let _ = match format {
        LogFormat::Text => builder.with_ansi(colour()).try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
