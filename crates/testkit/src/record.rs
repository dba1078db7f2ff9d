//! Recording of received requests.
//!
//! Proxy tests assert on what a backend *actually received* (raw target, header order,
//! exact body bytes), so each server pushes one [`Recorded`] per request into a
//! [`Recorder`]. Waiting is event-driven ([`Recorder::wait_for`]) so tests never poll with
//! sleeps.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Version;
use tokio::sync::Notify;

use crate::data::sha256_hex;

/// One request as received by a simulated backend.
#[derive(Clone, Debug)]
pub struct Recorded {
    /// Request method, e.g. `"POST"`.
    pub method: String,
    /// Raw request-target exactly as received (path + query for origin-form), never decoded
    /// or normalised: PoC callback paths carry double-escaped model ids.
    pub target: String,
    /// HTTP version of the request.
    pub version: Version,
    /// Headers in received order (hyper's `HeaderMap` iteration order), repeats kept,
    /// lowercase names.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The full body, or empty when the server streamed it (echo `/echo`, `/sink`); use
    /// [`body_len`](Self::body_len) / [`body_sha256_hex`](Self::body_sha256_hex) then.
    pub body: Bytes,
    /// Number of body bytes received (always filled).
    pub body_len: u64,
    /// Lowercase hex SHA-256 of the body bytes received (always filled).
    pub body_sha256_hex: String,
    /// When the request head reached the handler.
    pub at: Instant,
}

impl Recorded {
    /// Builds a record from request parts and a fully read body.
    pub(crate) fn new(parts: &http::request::Parts, body: Bytes, at: Instant) -> Self {
        let sha = sha256_hex(&body);
        let len = body.len() as u64;
        Self::streamed(parts, len, sha, at).with_body(body)
    }

    /// Builds a record for a body that was streamed through and only counted/hashed.
    pub(crate) fn streamed(
        parts: &http::request::Parts,
        body_len: u64,
        body_sha256_hex: String,
        at: Instant,
    ) -> Self {
        Recorded {
            method: parts.method.as_str().to_owned(),
            target: parts.uri.to_string(),
            version: parts.version,
            headers: parts
                .headers
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), v.as_bytes().to_vec()))
                .collect(),
            body: Bytes::new(),
            body_len,
            body_sha256_hex,
            at,
        }
    }

    fn with_body(mut self, body: Bytes) -> Self {
        self.body = body;
        self
    }

    /// First value of header `name` (case-insensitive), lossily decoded as UTF-8.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }

    /// All values of header `name` (case-insensitive) in received order.
    pub fn header_all(&self, name: &str) -> Vec<String> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .collect()
    }

    /// Hex SHA-256 of the received body (works for streamed bodies too).
    pub fn body_sha256(&self) -> String {
        self.body_sha256_hex.clone()
    }

    /// The kept body, lossily decoded as UTF-8.
    pub fn body_str(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The kept body parsed as JSON, if it is JSON.
    pub fn body_json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

/// How many records a [`Recorder`] keeps in memory; older ones are discarded (the count
/// still includes them) so long benchmarks stay bounded.
pub const MAX_KEPT: usize = 4096;

#[derive(Default)]
struct Inner {
    entries: Mutex<VecDeque<Recorded>>,
    total: AtomicUsize,
    notify: Notify,
}

/// Shared, cheaply clonable log of received requests.
#[derive(Clone, Default)]
pub struct Recorder {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("count", &self.count())
            .finish()
    }
}

impl Recorder {
    /// A new, empty recorder.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, VecDeque<Recorded>> {
        // A panic elsewhere while holding the lock must not break every later test assert.
        self.inner
            .entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Appends a record and wakes waiters.
    pub fn push(&self, rec: Recorded) {
        {
            let mut entries = self.lock();
            if entries.len() >= MAX_KEPT {
                entries.pop_front();
            }
            entries.push_back(rec);
            self.inner.total.fetch_add(1, Ordering::SeqCst);
        }
        self.inner.notify.notify_waiters();
    }

    /// All kept records, oldest first (at most [`MAX_KEPT`]).
    pub fn all(&self) -> Vec<Recorded> {
        self.lock().iter().cloned().collect()
    }

    /// The most recent record.
    pub fn last(&self) -> Option<Recorded> {
        self.lock().back().cloned()
    }

    /// Number of requests recorded since creation or the last [`clear`](Self::clear).
    pub fn count(&self) -> usize {
        self.inner.total.load(Ordering::SeqCst)
    }

    /// Forgets every record and resets the count.
    pub fn clear(&self) {
        let mut entries = self.lock();
        entries.clear();
        self.inner.total.store(0, Ordering::SeqCst);
    }

    /// Waits until at least `n` requests were recorded; `false` on timeout.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> bool {
        let deadline = crate::client::deadline(timeout);
        loop {
            let notified = self.inner.notify.notified();
            tokio::pin!(notified);
            // Register before checking so a push between the check and the await is seen.
            notified.as_mut().enable();
            if self.count() >= n {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.count() >= n;
            }
        }
    }
}
