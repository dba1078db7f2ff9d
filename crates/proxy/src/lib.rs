//! podproxy: a streaming reverse proxy for Gonka ML nodes. docs/architecture.md describes
//! the request's way through these modules; `forward` reads as one request's way.

pub mod access_line;
pub mod access_log;
pub mod admin;
pub mod body;
pub mod config;
pub mod conn;
pub mod detect;
pub mod error;
pub mod fd_table;
pub mod forward;
pub mod gate;
pub mod headers;
pub mod lazy_timer;
pub mod listener;
pub mod log_writer;
pub mod logging;
pub mod longcall;
pub mod metrics;
pub mod poc;
pub mod reload;
pub mod route;
pub mod runtime;
pub mod server;
pub mod signals;
pub mod sse_keepalive;
pub mod stall;
pub mod upstream;
pub mod workers;

pub use config::Config;
pub use server::Server;
