//! Process signals. podproxy installs its own handlers, so SIGTERM/SIGINT work even as
//! PID 1 in a container (where the kernel applies no default action).

/// Resolves on the first SIGTERM or SIGINT.
pub async fn shutdown() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received"),
                    _ = int.recv() => tracing::info!("SIGINT received"),
                }
            }
            _ => {
                tracing::error!("cannot install signal handlers; falling back to Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Installs the SIGHUP handler now, so a SIGHUP that arrives while the server is still
/// starting does not kill the process (tokio keeps a handler registered for the process
/// lifetime). Call before binding.
pub fn catch_hangup_early() {
    #[cfg(unix)]
    if let Err(e) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        tracing::warn!("cannot install the SIGHUP handler: {e}");
    }
}

/// SIGHUP reloads the config (and no longer terminates the process, as it would by
/// default). Runs until the server stops.
pub async fn reload_on_hangup(reloader: crate::reload::Reloader) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(
                    "cannot install the SIGHUP handler, reload via the admin API only: {e}"
                );
                return;
            }
        };
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP received: reloading the config");
            // The verdict is logged by the server.
            let _ = reloader.reload().await;
        }
    }
    #[cfg(not(unix))]
    {
        let _ = reloader;
        std::future::pending::<()>().await;
    }
}
