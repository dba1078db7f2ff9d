//! tracing setup: text or JSON lines on stderr, written off the request path.
//!
//! Which format and level win (one rule for every config, embedded or a file):
//! command-line flag > environment (`PODPROXY_LOG_FORMAT`; `PODPROXY_LOG_LEVEL`, then
//! `RUST_LOG`) > the config's `[server]` > the default (text, info). Text logs carry colour
//! codes only when stderr is a terminal and `NO_COLOR` is not set, so files, `docker logs`
//! and journald get plain lines.

use crate::config::LogFormat;
use crate::log_writer::{FlushGuard, LogWriter};
use std::fmt;
use std::io::IsTerminal;
use std::sync::OnceLock;
use tracing::field::{Field, Visit};
use tracing_subscriber::field::{MakeVisitor, VisitFmt, VisitOutput};
use tracing_subscriber::fmt::format::{DefaultVisitor, Writer};
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::EnvFilter;

/// The background writer, for its count of lines dropped because stderr could not keep
/// up (exported as a metric).
static WRITER: OnceLock<LogWriter> = OnceLock::new();

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

/// Installs the global subscriber with a background writer thread (`log_writer`): a
/// request never waits for stderr; under overload lines are dropped and counted
/// (`log_lines_dropped`) rather than slowing the proxy. Keep the guard until exit:
/// dropping it writes what is buffered.
pub fn init_background(format: LogFormat, level: &str) -> FlushGuard {
    let (writer, guard) =
        crate::log_writer::start(std::io::stderr(), crate::log_writer::MAX_BUFFERED);
    let _ = WRITER.set(writer.clone());
    if format == LogFormat::Text && !colour() {
        crate::access_line::write_directly_to(writer.clone());
    }
    install(format, level, writer);
    guard
}

/// Log lines dropped so far by the background writer.
pub fn dropped_lines() -> u64 {
    WRITER.get().map_or(0, LogWriter::dropped)
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
        LogFormat::Text if colour() => builder.with_ansi(true).try_init(),
        LogFormat::Text => builder
            .with_ansi(false)
            .with_timer(SecondCache)
            .fmt_fields(PlainFields)
            .try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// RFC 3339 UTC with microseconds (`2026-12-01T23:30:00.123456Z`), as the default timer
/// prints it, but with the date and time of day formatted once per second per thread
/// instead of for every line.
pub struct SecondCache;

thread_local! {
    /// The second last formatted on this thread and its text up to the `.`.
    static SECOND: std::cell::RefCell<(u64, String)> = const { std::cell::RefCell::new((u64::MAX, String::new())) };
}

impl SecondCache {
    pub(crate) fn write(w: &mut impl fmt::Write, now: std::time::SystemTime) -> fmt::Result {
        let Ok(since) = now.duration_since(std::time::UNIX_EPOCH) else {
            return write!(w, "{}", humantime::format_rfc3339_micros(now));
        };
        let secs = since.as_secs();
        let mut micros = [b'0'; 6];
        let mut n = since.subsec_micros();
        for d in micros.iter_mut().rev() {
            *d = b'0' + (n % 10) as u8;
            n /= 10;
        }
        SECOND.with(|cell| {
            let mut cached = cell.borrow_mut();
            if cached.0 != secs {
                let whole = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
                let text = humantime::format_rfc3339_seconds(whole).to_string();
                cached.1 = text.trim_end_matches('Z').to_string();
                cached.0 = secs;
            }
            w.write_str(&cached.1)?;
            w.write_char('.')?;
            write_ascii(w, &micros)?;
            w.write_char('Z')
        })
    }
}

impl FormatTime for SecondCache {
    fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
        Self::write(w, std::time::SystemTime::now())
    }
}

/// Text fields without colour, written as tracing-subscriber's default formatter writes
/// them (`name=value`, strings quoted and escaped as `{:?}` does) but without its per-field
/// styling calls, which run even when they print nothing, and with a string that needs no
/// escaping copied whole rather than char by char. The access log's strings (path,
/// upstream, request id) nearly always are such strings. Anything else goes to the default
/// visitor, so the line is the same byte for byte (pinned by a test).
pub struct PlainFields;

impl<'w> MakeVisitor<Writer<'w>> for PlainFields {
    type Visitor = PlainVisitor<'w>;

    fn make_visitor(&self, writer: Writer<'w>) -> PlainVisitor<'w> {
        PlainVisitor {
            writer,
            is_empty: true,
            result: Ok(()),
        }
    }
}

/// The visitor of `PlainFields`.
pub struct PlainVisitor<'w> {
    writer: Writer<'w>,
    is_empty: bool,
    result: fmt::Result,
}

/// Printable ASCII without `"` and `\`: what `{:?}` writes unchanged between its quotes.
/// Every byte is looked at, without an early exit, so the loop is vectorised (16 bytes a
/// step); byte by byte it cost about 9 instructions a byte, some 600 per access line.
pub(crate) fn needs_no_escaping(s: &str) -> bool {
    s.bytes().fold(true, |plain, b| {
        plain & (0x20..0x7f).contains(&b) & (b != b'"') & (b != b'\\')
    })
}

impl PlainVisitor<'_> {
    /// Writes `name=` with the separating space; `false` when the field is not written.
    fn name(&mut self, field: &Field) -> bool {
        if self.result.is_err() {
            return false;
        }
        let name = field.name();
        let name = name.strip_prefix("r#").unwrap_or(name);
        let pad = if self.is_empty { "" } else { " " };
        self.is_empty = false;
        self.result = self
            .writer
            .write_str(pad)
            .and_then(|()| self.writer.write_str(name))
            .and_then(|()| self.writer.write_char('='));
        self.result.is_ok()
    }

    /// Hands one field to tracing-subscriber's own visitor (messages, escaping, errors).
    fn default(&mut self, record: impl FnOnce(&mut DefaultVisitor<'_>)) {
        if self.result.is_err() {
            return;
        }
        let mut v = DefaultVisitor::new(self.writer.by_ref(), self.is_empty);
        record(&mut v);
        self.result = v.finish();
        self.is_empty = false;
    }

    /// A number or a bool: `name=` and `write`; as the message, the default visitor's text.
    fn scalar(
        &mut self,
        field: &Field,
        write: impl FnOnce(&mut Writer<'_>) -> fmt::Result,
        default: impl FnOnce(&mut DefaultVisitor<'_>),
    ) {
        if Self::is_log_metadata(field) {
            return;
        }
        if field.name() == "message" {
            return self.default(default);
        }
        if self.name(field) {
            self.result = write(&mut self.writer);
        }
    }

    /// `log.*` fields are the `log` crate's metadata, already printed by the formatter.
    fn is_log_metadata(field: &Field) -> bool {
        field.name().starts_with("log.")
    }
}

impl Visit for PlainVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if Self::is_log_metadata(field) {
            return;
        }
        if field.name() == "message" || !needs_no_escaping(value) {
            return self.default(|v| v.record_str(field, value));
        }
        if self.name(field) {
            self.result = self
                .writer
                .write_char('"')
                .and_then(|()| self.writer.write_str(value))
                .and_then(|()| self.writer.write_char('"'));
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.scalar(
            field,
            |w| Digits::of(value, false).write_to(w),
            |v| v.record_u64(field, value),
        );
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        let text = Digits::of(value.unsigned_abs(), value < 0);
        self.scalar(field, |w| text.write_to(w), |v| v.record_i64(field, value));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.scalar(
            field,
            |w| write_f64(w, value),
            |v| v.record_f64(field, value),
        );
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.scalar(
            field,
            |w| w.write_str(if value { "true" } else { "false" }),
            |v| v.record_bool(field, value),
        );
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        if !Self::is_log_metadata(field) {
            self.default(|v| v.record_error(field, value));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if !Self::is_log_metadata(field) {
            self.default(|v| v.record_debug(field, value));
        }
    }
}

/// `value` as `{:?}` prints it. The access log's durations are milliseconds rounded to the
/// microsecond (`k / 1000`); those are written from the integer, without the shortest-
/// representation search, which is exact: below 2^42 thousandths (about 50 days) doubles
/// are closer together than 0.001, so the decimal with at most three fraction digits that
/// equals the value is also its shortest representation. Anything else goes through `{:?}`.
pub(crate) fn write_f64(w: &mut impl fmt::Write, value: f64) -> fmt::Result {
    let k = (value * 1000.0).round();
    let fits = k.abs() < (1u64 << 42) as f64 && (value == 0.0 || value.abs() >= 1e-4);
    if !(fits && k / 1000.0 == value) || (value == 0.0 && value.is_sign_negative()) {
        return write!(w, "{value:?}");
    }
    Digits::thousandths(k.abs() as u64, k < 0.0).write_to(w)
}

/// `thousandths / 1000` exactly as [`write_f64`] writes that value (`1234567` →
/// `1234.567`, `1500` → `1.5`, `0` → `0.0`): the access line's durations are whole
/// microseconds, and below 2^42 of them (about 50 days) they are written from the integer,
/// without the float's multiply, round and checks (about 300 instructions per field).
pub(crate) fn write_thousandths(w: &mut impl fmt::Write, thousandths: u64) -> fmt::Result {
    if thousandths >= 1 << 42 {
        return write_f64(w, thousandths as f64 / 1000.0);
    }
    Digits::thousandths(thousandths, false).write_to(w)
}

/// ASCII bytes, one `write_char` each. For the few bytes of a number this is cheaper than
/// making them a `&str` (`str::from_utf8`: about 90 instructions a call) and copying that.
fn write_ascii(w: &mut impl fmt::Write, ascii: &[u8]) -> fmt::Result {
    ascii.iter().try_for_each(|&b| w.write_char(char::from(b)))
}

/// A number's text built right to left in a fixed buffer, then written (the `{}`
/// machinery costs several hundred instructions per field).
pub(crate) struct Digits {
    buf: [u8; 24],
    at: usize,
}

impl Digits {
    fn new() -> Self {
        Digits {
            buf: [0; 24],
            at: 24,
        }
    }

    fn put(&mut self, b: u8) {
        self.at -= 1;
        self.buf[self.at] = b;
    }

    /// `n`'s digits, with a `-` in front when `negative`.
    pub(crate) fn of(n: u64, negative: bool) -> Self {
        let mut d = Digits::new();
        d.number(n);
        if negative {
            d.put(b'-');
        }
        d
    }

    /// `k / 1000` with 1 to 3 fraction digits (trailing zeros dropped, at least one),
    /// with a `-` in front when `negative`.
    fn thousandths(k: u64, negative: bool) -> Self {
        let (whole, frac) = (k / 1000, k % 1000);
        let mut d = Digits::new();
        let shown = match frac {
            0 => 1,
            f if f % 100 == 0 => 1,
            f if f % 10 == 0 => 2,
            _ => 3,
        };
        let digits = [frac / 100, frac / 10 % 10, frac % 10];
        for x in digits[..shown].iter().rev() {
            d.put(b'0' + *x as u8);
        }
        d.put(b'.');
        d.number(whole);
        if negative {
            d.put(b'-');
        }
        d
    }

    /// At most 20 digits (`u64::MAX`), so it always fits beside a sign and three decimals.
    fn number(&mut self, mut n: u64) {
        loop {
            self.put(b'0' + (n % 10) as u8);
            n /= 10;
            if n == 0 {
                break;
            }
        }
    }

    pub(crate) fn write_to(&self, w: &mut impl fmt::Write) -> fmt::Result {
        write_ascii(w, &self.buf[self.at..])
    }
}

impl VisitOutput<fmt::Result> for PlainVisitor<'_> {
    fn finish(self) -> fmt::Result {
        self.result
    }
}

impl VisitFmt for PlainVisitor<'_> {
    fn writer(&mut self) -> &mut dyn fmt::Write {
        &mut self.writer
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A writer the test reads back: what a subscriber wrote, line after line.
    #[derive(Clone, Default)]
    pub(crate) struct Buf(pub(crate) Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// What `events` print with the default field formatter and with `PlainFields`.
    fn both(events: impl Fn()) -> (String, String) {
        let run = |plain: bool| {
            let buf = Buf::default();
            let out = buf.clone();
            let builder = tracing_subscriber::fmt()
                .with_ansi(false)
                .without_time()
                .with_max_level(tracing::Level::TRACE)
                .with_writer(move || buf.clone());
            if plain {
                tracing::subscriber::with_default(
                    builder.fmt_fields(PlainFields).finish(),
                    &events,
                );
            } else {
                tracing::subscriber::with_default(builder.finish(), &events);
            }
            let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
            text
        };
        (run(false), run(true))
    }

    #[test]
    fn plain_fields_print_what_the_default_formatter_prints() {
        let (default, plain) = both(|| {
            let err = std::io::Error::other("disk \"full\"");
            tracing::info!(
                target: "podproxy::access",
                listener = "inference",
                method = "POST",
                path = "/v1/chat/completions",
                status = 200u16,
                bytes_in = 12u64,
                duration_ms = 1.25f64,
                ttfb_ms = -1.0f64,
                delta = -7i64,
                ok = true,
                error = "",
                "a message"
            );
            tracing::warn!(
                path = "/with \"quotes\" and \\ and\nnewline",
                unicode = "caf\u{e9} \u{1b}[31mred",
                r#type = "raw",
                err = &err as &(dyn std::error::Error + 'static),
                debug = ?Some(3),
                shown = %"display",
                "escape \u{1b}[2J in {}", "message"
            );
            let span = tracing::info_span!("conn", peer = "10.0.0.1:5", n = 3u64);
            let _g = span.enter();
            tracing::error!(upstream = "vllm", count = 7u64);
            tracing::debug!(message = "only a message");
        });
        assert_eq!(default.lines().count(), 4, "{default}");
        assert_eq!(plain, default);
    }

    #[test]
    fn cached_seconds_print_what_humantime_and_the_default_timer_print() {
        use std::time::{Duration, SystemTime, UNIX_EPOCH};
        let base = UNIX_EPOCH + Duration::from_secs(1_796_169_599); // 2026-12-01T23:59:59Z
        for t in [
            base,
            base + Duration::from_micros(7),
            base + Duration::from_micros(999_999),
            base + Duration::from_secs(1),
            base + Duration::from_secs(1) + Duration::from_micros(123_456),
            base - Duration::from_secs(86_400 * 400),
            base,
        ] {
            let mut mine = String::new();
            SecondCache::write(&mut mine, t).unwrap();
            assert_eq!(mine, humantime::format_rfc3339_micros(t).to_string());
        }
        // The default timer's text for "now" has the same shape.
        let mut default = String::new();
        tracing_subscriber::fmt::time::SystemTime
            .format_time(&mut Writer::new(&mut default))
            .unwrap();
        let mut mine = String::new();
        SecondCache::write(&mut mine, SystemTime::now()).unwrap();
        assert_eq!(mine.len(), default.len(), "{mine} vs {default}");
        assert_eq!(mine.as_bytes()[19], b'.');
        assert_eq!(default.as_bytes()[19], b'.');
        assert!(mine.ends_with('Z') && default.ends_with('Z'));
    }

    #[test]
    fn milliseconds_print_as_debug_prints_them() {
        let mut values = vec![
            0.0,
            -0.0,
            1.0,
            -1.0,
            0.001,
            0.01,
            0.1,
            0.5,
            1.25,
            12.345,
            999.999,
            1e-4,
            9e-5,
            1e-7,
            123456.789,
            4e12,
            5e15,
            1e16,
            1e300,
            f64::NAN,
            f64::INFINITY,
            0.1 + 0.2,
        ];
        // Every duration the access log can write below 10 s, and a spread above.
        values.extend(
            (0..10_000_000u64)
                .step_by(7)
                .map(|us| (us as f64 / 1e6 * 1e6).round() / 1e3),
        );
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..200_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            values.push((x % (1 << 45)) as f64 / 1e3);
            values.push(f64::from_bits(x));
        }
        for v in values {
            let mut mine = String::new();
            write_f64(&mut mine, v).unwrap();
            assert_eq!(mine, format!("{v:?}"), "{v:e}");
        }
    }

    #[test]
    fn whole_microseconds_are_written_as_their_milliseconds_float_prints() {
        let mut values: Vec<u64> = (0..2_000_000u64).step_by(3).collect();
        values.extend([
            999,
            1000,
            1001,
            1500,
            10_010,
            (1 << 42) - 1,
            1 << 42,
            u64::MAX,
        ]);
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..200_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            values.push(x % (1 << 45));
            values.push(x);
        }
        for us in values {
            let mut mine = String::new();
            write_thousandths(&mut mine, us).unwrap();
            assert_eq!(mine, format!("{:?}", us as f64 / 1000.0), "{us}");
        }
    }

    #[test]
    fn only_printable_ascii_without_quote_or_backslash_skips_escaping() {
        assert!(needs_no_escaping("/v1/chat/completions?x=1 ~"));
        assert!(needs_no_escaping(""));
        for s in ["a\"b", "a\\b", "a\nb", "caf\u{e9}", "\u{1b}", "\u{7f}"] {
            assert!(!needs_no_escaping(s), "{s:?}");
        }
        // Every ASCII byte, at the start, inside and at the end of strings longer than a
        // vector step: skipped exactly when `{:?}` would write the string unchanged.
        for b in 0u8..0x80 {
            for at in [0, 17, 47] {
                let mut bytes = vec![b'x'; 48];
                bytes[at] = b;
                let s = String::from_utf8(bytes).unwrap();
                let unchanged = format!("{s:?}") == format!("\"{s}\"");
                assert_eq!(needs_no_escaping(&s), unchanged, "byte {b:#x} at {at}");
            }
        }
    }
}
