//! One backend of an upstream and its live counters. In-flight requests are released by a
//! drop guard that travels with the response body, so a 5-minute stream holds its slot for
//! 5 minutes, and a cancelled request releases it the moment hyper drops the body.

use crate::config::BackendAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

#[derive(Debug)]
pub struct Backend {
    pub addr: BackendAddr,
    /// `http://host:port`, shared into access-log lines without reformatting.
    pub label: Arc<str>,
    in_flight: AtomicUsize,
    requests: AtomicU64,
}

impl Backend {
    pub fn new(addr: BackendAddr) -> Self {
        Backend {
            label: addr.to_string().into(),
            addr,
            in_flight: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

/// Holds one in-flight slot on a backend until dropped.
#[derive(Debug)]
pub struct InFlight(Arc<Backend>);

impl InFlight {
    pub fn acquire(backend: Arc<Backend>) -> Self {
        backend.in_flight.fetch_add(1, Ordering::Relaxed);
        backend.requests.fetch_add(1, Ordering::Relaxed);
        InFlight(backend)
    }

    pub fn backend(&self) -> &Arc<Backend> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Least outstanding requests; ties go to the first candidate after a rotating start so
/// equal backends share the load evenly.
pub fn least_loaded(backends: &[Arc<Backend>], start: usize) -> Option<&Arc<Backend>> {
    let n = backends.len();
    (0..n)
        .map(|i| &backends[(start + i) % n])
        .min_by_key(|b| b.in_flight())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends(n: u16) -> Vec<Arc<Backend>> {
        (0..n)
            .map(|i| {
                Arc::new(Backend::new(
                    crate::config::parse_backend(&format!("http://127.0.0.1:{}", 5001 + i))
                        .unwrap(),
                ))
            })
            .collect()
    }

    #[test]
    fn guard_counts_until_dropped() {
        let b = backends(1);
        let g1 = InFlight::acquire(b[0].clone());
        let g2 = InFlight::acquire(b[0].clone());
        assert_eq!(b[0].in_flight(), 2);
        drop(g1);
        assert_eq!(b[0].in_flight(), 1);
        drop(g2);
        assert_eq!(b[0].in_flight(), 0);
        assert_eq!(b[0].requests(), 2);
    }

    #[test]
    fn picks_least_loaded_and_rotates_ties() {
        let b = backends(3);
        let _busy = InFlight::acquire(b[0].clone());
        let picks: Vec<&str> = (0..3)
            .map(|s| &*least_loaded(&b, s).unwrap().label)
            .collect();
        assert_eq!(
            picks,
            [
                "http://127.0.0.1:5002",
                "http://127.0.0.1:5002",
                "http://127.0.0.1:5003"
            ]
        );
        assert!(least_loaded(&[], 0).is_none());
    }
}
