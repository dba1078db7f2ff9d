//! podproxy command line: `run` (default), `check`, `demo`. Everything else lives in the
//! `proxy` library crate.

mod demo;

/// Off by default: measured against musl's allocator, see README "Static binary".
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{Parser, Subcommand};
use proxy::config::{Config, LogFormat};
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
    /// Log format, overriding the config: text or json.
    #[arg(long, global = true, value_parser = ["text", "json"])]
    log_format: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (the default).
    Run,
    /// Validate the config and print the effective config; exit non-zero when invalid.
    Check,
    /// Run podproxy with the default layout in front of simulated mlnode and vLLM backends.
    Demo,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run) {
        Command::Check => check(cli.config),
        Command::Run => {
            let config = match load(cli.config.as_deref(), cli.log_format.as_deref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let source = match &cli.config {
                Some(p) => proxy::server::ConfigSource::File(p.clone()),
                None => proxy::server::ConfigSource::Embedded,
            };
            match runtime(Some(config.server.worker_threads)) {
                Ok(rt) => rt.block_on(run(config, source)),
                Err(code) => code,
            }
        }
        Command::Demo => match runtime(None) {
            Ok(rt) => rt.block_on(demo::run(cli.log_format.as_deref())),
            Err(code) => code,
        },
    }
}

/// The async runtime; `workers` from `server.worker_threads` (tokio's default: one per CPU).
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

fn load(path: Option<&std::path::Path>, log_format: Option<&str>) -> Result<Config, ExitCode> {
    let mut config = Config::load(path).map_err(|e| {
        eprintln!("podproxy: invalid config ({}): {e}", source_name(path));
        ExitCode::from(2)
    })?;
    match log_format {
        Some("json") => config.server.log_format = LogFormat::Json,
        Some("text") => config.server.log_format = LogFormat::Text,
        _ => {}
    }
    Ok(config)
}

fn source_name(path: Option<&std::path::Path>) -> String {
    path.map_or_else(|| "embedded default".into(), |p| p.display().to_string())
}

fn check(path: Option<PathBuf>) -> ExitCode {
    match Config::load(path.as_deref()) {
        Ok(config) => {
            println!("# effective config ({}): OK", source_name(path.as_deref()));
            print!("{}", config.to_toml());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!(
                "podproxy: invalid config ({}): {e}",
                source_name(path.as_deref())
            );
            ExitCode::from(2)
        }
    }
}

async fn run(config: Config, source: proxy::server::ConfigSource) -> ExitCode {
    proxy::logging::init(config.server.log_format, &config.server.log_level);
    proxy::signals::raise_fd_limit();
    proxy::signals::catch_hangup_early();
    let server = match proxy::Server::bind(&config).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("podproxy: {e}");
            return ExitCode::FAILURE;
        }
    };
    server
        .with_source(source)
        .run(proxy::signals::shutdown())
        .await;
    ExitCode::SUCCESS
}
