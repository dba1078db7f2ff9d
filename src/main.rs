//! podproxy command line: `run` (default), `check`, `demo`. Everything else lives in the
//! `proxy` library crate.

mod demo;

/// jemalloc, not the C library's malloc: the static binary hosts run links musl, whose
/// malloc serialises every thread on one lock, and the connection workers allocate on every
/// CPU. Measured in docs/static-binary.md ("Allocator").
#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read once before `main` (its `malloc_conf` symbol, which this
/// strong definition overrides; `_RJEM_MALLOC_CONF` in the environment still wins).
///
/// `slab_sizes`: every size class between one page and 16 KiB gets a 64 KiB slab. By
/// default an 8 KiB class slab holds one region, so each 8 KiB allocation not found in the
/// thread cache (five per stream: hyper's read and write buffers on both connections and
/// its request channel's block) allocated and later freed a whole extent:
/// in a burst of 1,000 new streams that page-level bookkeeping was about a tenth of
/// podproxy's instructions, and its metadata 1–2 KB of every slow stream's memory.
/// Measured in benches/compare/RESULTS.md ("After run 19").
#[cfg(feature = "jemalloc")]
#[export_name = "_rjem_malloc_conf"]
static MALLOC_CONF: Option<&'static u8> = Some(&MALLOC_OPTIONS[0]);
#[cfg(feature = "jemalloc")]
const MALLOC_OPTIONS: &[u8] = b"slab_sizes:4097-16384:16\0";

use clap::{Parser, Subcommand};
use proxy::config::Config;
use proxy::reload::ConfigSource;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "podproxy",
    version = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("PODPROXY_GIT_COMMIT"), ")"),
    about = "Streaming reverse proxy for Gonka ML nodes"
)]
struct Cli {
    /// Config file (TOML). Without it the embedded pod-front default is used.
    #[arg(long, short, env = "PODPROXY_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Log format: text or json. Wins over PODPROXY_LOG_FORMAT and the config.
    #[arg(long, global = true, value_parser = ["text", "json"])]
    log_format: Option<String>,
    /// Log level or tracing filter (e.g. debug, info,proxy=debug). Wins over
    /// PODPROXY_LOG_LEVEL, RUST_LOG and the config.
    #[arg(long, global = true)]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (the default).
    Run,
    /// Validate the config, try to bind its addresses, print the effective config; exit 2
    /// when anything is wrong.
    Check {
        /// Do not try to bind the listen addresses (checking a file for a running
        /// podproxy's reload, whose ports are taken by that podproxy).
        #[arg(long)]
        skip_bind: bool,
    },
    /// Run podproxy with the default layout in front of simulated mlnode and vLLM backends.
    Demo {
        /// Listen on every interface instead of 127.0.0.1 only.
        #[arg(long)]
        listen_all: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let logs = LogFlags {
        format: cli.log_format.clone(),
        level: cli.log_level.clone(),
    };
    match cli.command.unwrap_or(Command::Run) {
        Command::Check { skip_bind } => check(cli.config, skip_bind),
        Command::Run => {
            let config = match load(cli.config.as_deref(), &logs) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let source = match &cli.config {
                Some(p) => ConfigSource::File(p.clone()),
                None => ConfigSource::Embedded,
            };
            // While podproxy has one thread: a grown descriptor table costs no wait then.
            let fds = proxy::fd_table::prepare(&config);
            // Connections are served on the server's own worker threads
            // (`server.worker_threads`); this runtime keeps the accept loops, admin API,
            // health checks, reloads and signals, which one thread carries.
            match runtime(Some(1)) {
                Ok(rt) => rt.block_on(run(config, source, fds)),
                Err(code) => code,
            }
        }
        Command::Demo { listen_all } => match runtime(None) {
            Ok(rt) => rt.block_on(demo::run(&logs, listen_all)),
            Err(code) => code,
        },
    }
}

/// `--log-format` / `--log-level` as given.
pub struct LogFlags {
    pub format: Option<String>,
    pub level: Option<String>,
}

impl LogFlags {
    /// Applies flag > environment > file to the config's log settings.
    pub fn apply(&self, config: &mut Config) -> Result<(), String> {
        config.server.log_format =
            proxy::logging::effective_format(self.format.as_deref(), config.server.log_format)?;
        config.server.log_level =
            proxy::logging::effective_level(self.level.as_deref(), &config.server.log_level);
        Ok(())
    }
}

/// The async runtime with `workers` threads (tokio's default: one per CPU). The demo's
/// simulators run on it too.
fn runtime(workers: Option<usize>) -> Result<tokio::runtime::Runtime, ExitCode> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(n) = workers {
        builder.worker_threads(n);
    }
    builder.build().map_err(|e| {
        eprintln!("podproxy: cannot start the async runtime: {e}");
        ExitCode::FAILURE
    })
}

fn load(path: Option<&std::path::Path>, logs: &LogFlags) -> Result<Config, ExitCode> {
    let mut config = Config::load(path).map_err(|e| {
        eprintln!("podproxy: invalid config ({}): {e}", source_name(path));
        ExitCode::from(2)
    })?;
    logs.apply(&mut config).map_err(|e| {
        eprintln!("podproxy: {e}");
        ExitCode::from(2)
    })?;
    Ok(config)
}

fn source_name(path: Option<&std::path::Path>) -> String {
    path.map_or_else(|| "embedded default".into(), |p| p.display().to_string())
}

fn check(path: Option<PathBuf>, skip_bind: bool) -> ExitCode {
    let name = source_name(path.as_deref());
    let config = match Config::load(path.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("podproxy: invalid config ({name}): {e}");
            return ExitCode::from(2);
        }
    };
    for w in &config.warnings {
        eprintln!("podproxy: warning: {w}");
    }
    if !skip_bind {
        let busy = proxy::listener::busy_addresses(&config);
        if !busy.is_empty() {
            eprintln!(
                "podproxy: config ({name}) is valid, but {} cannot be bound:",
                if busy.len() == 1 {
                    "one address"
                } else {
                    "some addresses"
                }
            );
            for b in &busy {
                eprintln!("  {b}");
            }
            eprintln!("  (checking a file for a running podproxy's reload? add --skip-bind)");
            return ExitCode::from(2);
        }
    }
    println!("# effective config ({name}): OK");
    print!("{}", config.to_toml());
    ExitCode::SUCCESS
}

async fn run(config: Config, source: ConfigSource, fds: proxy::fd_table::Prepared) -> ExitCode {
    // Held until the end of `run`: dropping it flushes the buffered log lines.
    let _log_guard =
        proxy::logging::init_background(config.server.log_format, &config.server.log_level);
    fds.log();
    proxy::signals::catch_hangup_early();
    let server = match proxy::Server::bind(&config).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    server
        .with_source(source)
        .run(proxy::signals::shutdown())
        .await;
    ExitCode::SUCCESS
}

#[cfg(all(test, feature = "jemalloc"))]
mod tests {
    use std::ffi::{c_void, CStr};

    /// Reads a `size_t`-sized (or `unsigned`-sized) jemalloc control by name.
    fn mallctl<T: Default + Copy>(name: &CStr) -> T {
        let mut value = T::default();
        let mut len = std::mem::size_of::<T>();
        // SAFETY: `name` is NUL-terminated; `value` is writable for `len` bytes, the size
        // jemalloc documents for these controls; nothing is written to jemalloc.
        let rc = unsafe {
            tikv_jemalloc_sys::mallctl(
                name.as_ptr(),
                (&mut value as *mut T).cast::<c_void>(),
                &mut len,
                std::ptr::null_mut(),
                0,
            )
        };
        assert_eq!(rc, 0, "mallctl {name:?}");
        value
    }

    /// The options reach jemalloc: the symbol it reads is this binary's, not its own
    /// (weak) empty default, so the 8 KiB class's slab holds eight regions, not one.
    #[test]
    fn jemalloc_takes_podproxys_slab_sizes() {
        let bins: u32 = mallctl(c"arenas.nbins");
        let slab_of = |size: usize| {
            (0..bins).find_map(|i| {
                let size_name = format!("arenas.bin.{i}.size\0");
                let name = CStr::from_bytes_with_nul(size_name.as_bytes()).ok()?;
                (mallctl::<usize>(name) == size).then(|| {
                    let slab_name = format!("arenas.bin.{i}.slab_size\0");
                    CStr::from_bytes_with_nul(slab_name.as_bytes())
                        .map(mallctl::<usize>)
                        .ok()
                })?
            })
        };
        assert_eq!(slab_of(8192), Some(64 << 10));
        assert_eq!(slab_of(16384), None, "16 KiB is a large class, not a bin");
        // Below a page the defaults stay: the 2 KiB class's slab is one page.
        assert_eq!(slab_of(2048), Some(4096));
    }
}
