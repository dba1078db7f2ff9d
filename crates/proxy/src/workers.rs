//! Connection workers: threads that each run a single-threaded runtime with its own epoll
//! and timers, and serve the connections the accept loop hands them (round robin), as
//! nginx's worker processes do.
//!
//! Why not serve connections on the multi-threaded runtime: there, its threads woke each
//! other to share the work (2,000 streams × 10 tokens @ 500 ms: 5,181 `futex` calls;
//! here 42). On a worker a connection, its upstream connection (see the pool's per-worker
//! idle stacks) and their timers stay on one thread. Measured on the 2-core box (same
//! load, three interleaved pairs): CPU per streamed token 49–57 → 38.5–42.5 µs.
//!
//! The multi-threaded runtime keeps the accept loops, the admin API, health checks,
//! reloads and signals.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::runtime::Handle;
use tokio::sync::oneshot;

thread_local! {
    /// This thread's worker index; `None` off the workers.
    static INDEX: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The worker serving the current thread's tasks, if it is one.
pub fn current() -> Option<usize> {
    INDEX.with(Cell::get)
}

/// The running workers. Dropping this stops them: tasks still on them are dropped, which
/// closes their connections (the server drops it after the drain).
pub struct Workers {
    handles: Vec<Handle>,
    next: AtomicUsize,
    stops: Vec<oneshot::Sender<()>>,
}

impl Workers {
    /// Starts `n` workers (at least one).
    pub fn start(n: usize) -> std::io::Result<Workers> {
        let mut handles = Vec::new();
        let mut stops = Vec::new();
        for i in 0..n.max(1) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (stop, stopped) = oneshot::channel::<()>();
            handles.push(rt.handle().clone());
            stops.push(stop);
            std::thread::Builder::new()
                .name(format!("podproxy-worker-{i}"))
                .spawn(move || {
                    INDEX.with(|c| c.set(Some(i)));
                    rt.block_on(async {
                        tokio::select! {
                            _ = stopped => {}
                            () = heartbeat() => {}
                        }
                    });
                    // Not waiting for blocking tasks: a stopping proxy must not hang on one.
                    rt.shutdown_background();
                })?;
        }
        Ok(Workers {
            handles,
            next: AtomicUsize::new(0),
            stops,
        })
    }

    /// The worker for the next connection.
    pub fn pick(&self) -> &Handle {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        &self.handles[i]
    }

    pub fn len(&self) -> usize {
        self.handles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for stop in self.stops.drain(..) {
            let _ = stop.send(());
        }
    }
}

/// How often a worker's timer fires for nothing (see `heartbeat`).
const HEARTBEAT: Duration = Duration::from_secs(1);

/// Keeps a timer due within `HEARTBEAT` on the worker, forever.
///
/// Why: when a timer is set to fire before every timer the worker's driver knew of when it
/// last went to sleep (or when it knew of none), tokio wakes the driver through its
/// `eventfd` so it can sleep shorter, even when the timer is set on the driver's own
/// thread and it is not asleep. hyper sets one (`header_timeout`, 10 s by default) each
/// time a keep-alive connection waits for its next request; a worker whose other
/// connections all waited on upstreams (30 min timers) took that path, about once per four
/// small requests: an 8-byte `write` and a wasted `epoll_wait` return. With a timer always
/// due within a second, no timer of a second or more is earlier.
async fn heartbeat() {
    let mut tick = tokio::time::interval(HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
    }
}

/// The worker count for `configured` (`server.worker_threads`): one per CPU when unset.
pub fn count(configured: Option<usize>) -> usize {
    configured
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(1)
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_run_on_their_worker_and_stop_with_it() {
        let workers = Workers::start(2).unwrap();
        assert_eq!(workers.len(), 2);
        let mut seen = Vec::new();
        for _ in 0..4 {
            let (tx, rx) = std::sync::mpsc::channel();
            workers.pick().spawn(async move {
                tx.send(current()).unwrap();
            });
            seen.push(rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap());
        }
        assert_eq!(seen, [Some(0), Some(1), Some(0), Some(1)]);
        assert_eq!(current(), None);
        // A task still waiting when the workers stop is dropped (its sender with it).
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        workers.pick().spawn(async move {
            std::future::pending::<()>().await;
            drop(tx);
        });
        drop(workers);
        assert!(matches!(
            rx.recv_timeout(std::time::Duration::from_secs(10)),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected)
        ));
    }
}
