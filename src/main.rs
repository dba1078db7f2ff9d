//! podproxy command line: `run` (default), `check`, `demo`. Everything else lives in the
//! `proxy` library crate.

mod demo;

/// jemalloc, not the C library's malloc: the static binary hosts run links musl, whose
/// malloc serialises every thread on one lock, and the connection workers allocate on every
/// CPU. Measured in docs/static-binary.md ("Allocator").
#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
