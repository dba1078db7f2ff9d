//! Reload: where the config is read from, the handle that asks the running server for a
//! reload, and the state a reload swaps (shared with the admin API). The server owns the
//! receiving end; admin and SIGHUP only hold a `Reloader`, so neither depends on the server.

use crate::metrics::Metrics;
use crate::runtime::Runtime;
use arc_swap::ArcSwap;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// Where a reload reads the config from.
#[derive(Debug, Clone)]
pub enum ConfigSource {
    /// Not reloadable (tests, `demo`).
    Fixed,
    /// The embedded default, expanded again with the current environment.
    Embedded,
    File(PathBuf),
}

impl std::fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigSource::Fixed => f.write_str("given by the caller (not reloadable)"),
            ConfigSource::Embedded => f.write_str("embedded default"),
            ConfigSource::File(p) => write!(f, "{}", p.display()),
        }
    }
}

/// One reload request: the server answers on it with its verdict.
pub(crate) type ReloadReply = oneshot::Sender<Result<(), String>>;

/// Asks the running server to reload its config; cheap to clone.
#[derive(Clone)]
pub struct Reloader(mpsc::Sender<ReloadReply>);

impl Reloader {
    /// A reloader and the receiving end the server listens on.
    pub(crate) fn channel() -> (Reloader, mpsc::Receiver<ReloadReply>) {
        let (tx, rx) = mpsc::channel(8);
        (Reloader(tx), rx)
    }

    /// Reloads and waits for the verdict. `Err` carries why the new config was rejected
    /// (the old one keeps serving).
    pub async fn reload(&self) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        self.0
            .send(tx)
            .await
            .map_err(|_| "server is not running".to_string())?;
        rx.await
            .map_err(|_| "server stopped during the reload".to_string())?
    }
}

/// What the running server shares with the admin API: the current runtime (swapped whole
/// by a reload), the metrics registry (kept across reloads) and the reload handle.
pub struct Shared {
    pub runtime: ArcSwap<Runtime>,
    pub metrics: Arc<Metrics>,
    pub reloader: Reloader,
}
