//! One backend of an upstream and its live state. In-flight requests are released by a drop
//! guard that travels with the response body, so a 5-minute stream holds its slot for
//! 5 minutes, and a cancelled request releases it the moment hyper drops the body.

use super::score::{self, Candidate, Pick, Signals};
use super::signals::ScrapeError;
use crate::config::{BackendAddr, BalanceConfig};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Without active health checks nothing would ever bring an ejected backend back, so
/// passive ejection then only lasts this long; the next request after it is the probe.
pub const PASSIVE_EJECTION: Duration = Duration::from_secs(5);
/// A backend ejected by the stuck-engine guard stays out this long even if `/health` says
/// 200 (that is the point of the guard), then gets one chance: a single further miss
/// ejects it again.
pub const STUCK_HOLD_DOWN: Duration = Duration::from_secs(30);

/// Milliseconds since the first call, for deadlines kept in atomics.
fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

#[derive(Debug)]
pub struct Backend {
    pub addr: BackendAddr,
    /// `http://host:port`, shared into access-log lines without reformatting.
    pub label: Arc<str>,
    /// Requests queued for a slot on this upstream (shared by its backends).
    waiters: Arc<Waiters>,
    in_flight: AtomicUsize,
    requests: AtomicU64,
    healthy: AtomicBool,
    /// Consecutive health-check results against the current state.
    streak: AtomicU32,
    /// Consecutive first-byte timeouts (stuck-engine guard).
    stuck_misses: AtomicU32,
    /// `now_ms()` before which a down backend may not come back (stuck-engine hold-down).
    hold_until: AtomicU64,
    /// `now_ms()` after which a passively ejected backend is tried again; 0 = never
    /// (active health checks decide instead).
    retry_at: AtomicU64,
    /// Set when the upstream has no active health checks.
    passive_only: bool,
    /// Whether a health check has answered yet: the first one decides at once.
    probed: AtomicBool,
    last_error: Mutex<Option<String>>,
    /// Rendezvous seed from the URL (prefix affinity).
    seed: u64,
    /// The last engine signals scraped, and the last scrape's error (balance.signals).
    signals: Mutex<SignalState>,
    /// Scrape errors by kind, in the order of `ScrapeError::ALL`.
    scrape_errors: [AtomicU64; 5],
}

#[derive(Debug, Default)]
struct SignalState {
    last: Option<Signals>,
    last_error: Option<ScrapeError>,
}

impl Backend {
    pub fn new(addr: BackendAddr, waiters: Arc<Waiters>, passive_only: bool) -> Self {
        let addr_label = addr.to_string();
        Backend {
            label: addr_label.as_str().into(),
            addr,
            waiters,
            in_flight: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            // Optimistic until proven otherwise: the first health round runs at once, and
            // a connect failure before then ejects the backend and retries elsewhere.
            healthy: AtomicBool::new(true),
            streak: AtomicU32::new(0),
            stuck_misses: AtomicU32::new(0),
            hold_until: AtomicU64::new(0),
            retry_at: AtomicU64::new(0),
            passive_only,
            probed: AtomicBool::new(false),
            last_error: Mutex::new(None),
            seed: score::seed_of(&addr_label),
            signals: Mutex::new(SignalState::default()),
            scrape_errors: Default::default(),
        }
    }

    /// Whether an active health check has answered (or failed) yet.
    pub fn probed(&self) -> bool {
        self.probed.load(Ordering::Relaxed)
    }

    /// The last engine signals (fresh or not).
    pub fn signals(&self) -> Option<Signals> {
        self.signals.lock().ok().and_then(|s| s.last)
    }

    /// The last scrape's error, if the last scrape failed.
    pub fn last_scrape_error(&self) -> Option<ScrapeError> {
        self.signals.lock().ok().and_then(|s| s.last_error)
    }

    pub fn set_signals(&self, s: Signals) {
        if let Ok(mut st) = self.signals.lock() {
            st.last = Some(s);
            st.last_error = None;
        }
    }

    /// Keeps the last signals (they go stale by age) and counts the error.
    pub fn scrape_failed(&self, e: ScrapeError) {
        if let Some(i) = ScrapeError::ALL.iter().position(|k| *k == e) {
            self.scrape_errors[i].fetch_add(1, Ordering::Relaxed);
        }
        if let Ok(mut st) = self.signals.lock() {
            st.last_error = Some(e);
        }
    }

    /// Scrape errors of one kind since the backend was configured.
    pub fn scrape_errors(&self, e: ScrapeError) -> u64 {
        ScrapeError::ALL
            .iter()
            .position(|k| *k == e)
            .map_or(0, |i| self.scrape_errors[i].load(Ordering::Relaxed))
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// In rotation: up, or (without health checks) ejected long enough ago to be probed.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed) || self.probe_due()
    }

    fn probe_due(&self) -> bool {
        let at = self.retry_at.load(Ordering::Relaxed);
        at != 0 && now_ms() >= at
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }

    /// Takes the backend out of rotation at once (passive ejection, stuck engine, or the
    /// health check's verdict). Returns whether this call changed the state.
    pub fn mark_down(&self, upstream: &str, reason: &str) -> bool {
        if let Ok(mut e) = self.last_error.lock() {
            *e = Some(reason.to_string());
        }
        self.streak.store(0, Ordering::Relaxed);
        if self.passive_only {
            self.retry_at.store(
                now_ms() + PASSIVE_EJECTION.as_millis() as u64,
                Ordering::Relaxed,
            );
        }
        let changed = self.healthy.swap(false, Ordering::Relaxed);
        if changed {
            tracing::warn!(upstream, backend = &*self.label, reason, "backend DOWN");
            // Queued requests re-check: with no healthy backend left they fail at once.
            self.waiters.wake();
        }
        changed
    }

    /// Puts the backend back in rotation and wakes queued requests.
    pub fn mark_up(&self, upstream: &str) -> bool {
        self.streak.store(0, Ordering::Relaxed);
        self.retry_at.store(0, Ordering::Relaxed);
        let changed = !self.healthy.swap(true, Ordering::Relaxed);
        if changed {
            tracing::info!(upstream, backend = &*self.label, "backend UP");
            self.waiters.wake();
        }
        changed
    }

    /// Feeds one health-check result; flips the state after `to_down` (or `to_up`)
    /// consecutive results that disagree with it. The very first result decides at once:
    /// a backend that does not answer its first probe was never up, so it starts down
    /// instead of taking `to_down` rounds of traffic.
    pub fn health_result(&self, upstream: &str, ok: Result<(), String>, to_down: u32, to_up: u32) {
        let first = !self.probed.swap(true, Ordering::Relaxed);
        if first {
            if let Err(reason) = &ok {
                self.mark_down(upstream, &format!("first health check: {reason}"));
                return;
            }
        }
        self.observe(upstream, ok, to_down, to_up);
    }

    /// One observation of the backend's health, from a check or from traffic (a
    /// connection that broke before the response head): `to_down` in a row flip it.
    pub fn observe(&self, upstream: &str, ok: Result<(), String>, to_down: u32, to_up: u32) {
        let healthy = self.is_healthy();
        match ok {
            Ok(()) if healthy => self.streak.store(0, Ordering::Relaxed),
            Err(_) if !healthy => self.streak.store(0, Ordering::Relaxed),
            Ok(()) if now_ms() < self.hold_until.load(Ordering::Relaxed) => {
                // Stuck-engine hold-down: a 200 from /health does not prove the engine works.
                self.streak.store(0, Ordering::Relaxed);
            }
            Ok(()) => {
                if self.streak.fetch_add(1, Ordering::Relaxed) + 1 >= to_up {
                    self.mark_up(upstream);
                }
            }
            Err(reason) => {
                if let Ok(mut e) = self.last_error.lock() {
                    *e = Some(reason.clone());
                }
                if self.streak.fetch_add(1, Ordering::Relaxed) + 1 >= to_down {
                    self.mark_down(upstream, &format!("health check: {reason}"));
                }
            }
        }
    }

    /// Stuck-engine guard: one more missed first-byte deadline; ejects after `limit`, and
    /// keeps the backend out for `STUCK_HOLD_DOWN` whatever `/health` says. The miss
    /// count is kept one short of the limit, so after the hold-down a backend that is
    /// still stuck is ejected by its next miss.
    pub fn first_byte_missed(&self, upstream: &str, limit: u32) {
        let misses = self.stuck_misses.fetch_add(1, Ordering::Relaxed) + 1;
        if misses >= limit {
            self.stuck_misses
                .store(limit.saturating_sub(1), Ordering::Relaxed);
            let hold = now_ms() + STUCK_HOLD_DOWN.as_millis() as u64;
            self.hold_until.store(hold, Ordering::Relaxed);
            self.mark_down(
                upstream,
                &format!("{misses} first-byte timeouts in a row (engine stuck?)"),
            );
            if self.passive_only {
                self.retry_at.store(hold, Ordering::Relaxed);
            }
        }
    }

    /// A response head arrived: the engine answers. Also ends a passive ejection whose
    /// probe just succeeded.
    pub fn first_byte_ok(&self, upstream: &str) {
        if self.stuck_misses.load(Ordering::Relaxed) != 0 {
            self.stuck_misses.store(0, Ordering::Relaxed);
        }
        if self.passive_only && !self.healthy.load(Ordering::Relaxed) {
            self.mark_up(upstream);
        }
    }
}

/// The admission queue of one upstream: requests waiting for a backend slot.
#[derive(Debug, Default)]
pub struct Waiters {
    notify: Notify,
    count: AtomicUsize,
}

impl Waiters {
    /// Called whenever a slot frees up or a backend comes up. Costs one atomic load when
    /// nobody waits (the common case, on every request's end).
    fn wake(&self) {
        if self.count.load(Ordering::SeqCst) > 0 {
            self.notify.notify_waiters();
        }
    }

    pub fn waiting(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// Joins the queue if it has room (`limit`); the ticket leaves it when dropped.
    pub fn join(self: &Arc<Self>, limit: usize) -> Option<QueueTicket> {
        let mut cur = self.count.load(Ordering::SeqCst);
        loop {
            if cur >= limit {
                return None;
            }
            match self
                .count
                .compare_exchange(cur, cur + 1, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => return Some(QueueTicket(self.clone())),
                Err(now) => cur = now,
            }
        }
    }
}

/// A place in an upstream's admission queue.
pub struct QueueTicket(Arc<Waiters>);

impl QueueTicket {
    /// A future that completes at the next release. Create and `enable` it *before*
    /// re-checking for a slot so no wake-up is missed in between.
    pub fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.0.notify.notified()
    }
}

impl Drop for QueueTicket {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Holds one in-flight slot on a backend until dropped.
#[derive(Debug)]
pub struct InFlight(Arc<Backend>);

impl InFlight {
    fn acquire(backend: Arc<Backend>) -> Self {
        backend.in_flight.fetch_add(1, Ordering::SeqCst);
        backend.requests.fetch_add(1, Ordering::Relaxed);
        InFlight(backend)
    }

    pub fn backend(&self) -> &Arc<Backend> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.0.waiters.wake();
    }
}

/// Why no slot could be taken right now.
#[derive(Debug, PartialEq, Eq)]
pub enum NoSlot {
    /// No healthy backend (left after exclusions).
    NoneHealthy,
    /// Healthy backends exist but all are at `max_concurrent`.
    AllFull,
}

/// Least outstanding requests among healthy backends under their cap, skipping `exclude`d
/// ones (already tried by this request); ties go to the first candidate after a rotating
/// `start`, so equal backends share the load evenly.
pub fn take_least_loaded(
    backends: &[Arc<Backend>],
    start: usize,
    cap: Option<usize>,
    exclude: &[usize],
) -> Result<(usize, InFlight), NoSlot> {
    let n = backends.len();
    let mut any_healthy = false;
    let mut best: Option<(usize, usize)> = None;
    for k in 0..n {
        let i = (start + k) % n;
        let b = &backends[i];
        if exclude.contains(&i) || !b.is_healthy() {
            continue;
        }
        any_healthy = true;
        let load = b.in_flight();
        if cap.is_some_and(|c| load >= c) {
            continue;
        }
        if best.is_none_or(|(_, l)| load < l) {
            best = Some((i, load));
        }
    }
    match best {
        // Between the check and the increment another request may take the same slot; the
        // cap can then be exceeded by at most the number of racing requests, which is fine
        // for a soft admission limit.
        Some((i, _)) => Ok((i, InFlight::acquire(backends[i].clone()))),
        None if any_healthy => Err(NoSlot::AllFull),
        None => Err(NoSlot::NoneHealthy),
    }
}

/// The LLM-aware choice (`balance` on): the same candidates as `take_least_loaded`
/// (healthy, not excluded), loaded by their engine-signals score when every one of them
/// has fresh signals, else by in-flight count; then `score::pick` with the prompt key.
pub fn take_balanced(
    backends: &[Arc<Backend>],
    start: usize,
    cap: Option<usize>,
    exclude: &[usize],
    policy: &BalanceConfig,
    key: Option<u64>,
    now: Instant,
) -> Result<(usize, InFlight, Pick), NoSlot> {
    let n = backends.len();
    let mut cands = Vec::with_capacity(n);
    let mut all_fresh = policy.signals;
    for k in 0..n {
        let i = (start + k) % n;
        let b = &backends[i];
        if exclude.contains(&i) || !b.is_healthy() {
            continue;
        }
        let in_flight = b.in_flight();
        let mut load = in_flight as f64;
        if all_fresh {
            match b.signals() {
                Some(s) if score::is_fresh(&s, now, policy.scrape_interval) => {
                    load = score::score(&s, in_flight);
                }
                _ => all_fresh = false,
            }
        }
        cands.push(Candidate {
            index: i,
            load,
            full: cap.is_some_and(|c| in_flight >= c),
            seed: b.seed,
        });
    }
    if cands.is_empty() {
        return Err(NoSlot::NoneHealthy);
    }
    if policy.signals && !all_fresh {
        // Scores and in-flight counts do not compare: everyone by in-flight count.
        for c in &mut cands {
            c.load = backends[c.index].in_flight() as f64;
        }
    }
    let key = if policy.affinity { key } else { None };
    let pick = score::pick(&cands, key, policy.affinity_margin);
    match pick.index() {
        Some(i) => Ok((i, InFlight::acquire(backends[i].clone()), pick)),
        None => Err(NoSlot::AllFull),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends(n: u16) -> Vec<Arc<Backend>> {
        let notify = Arc::new(Waiters::default());
        (0..n)
            .map(|i| {
                Arc::new(Backend::new(
                    crate::config::parse_backend(&format!("http://127.0.0.1:{}", 5001 + i))
                        .unwrap(),
                    notify.clone(),
                    false,
                ))
            })
            .collect()
    }

    fn pick(
        b: &[Arc<Backend>],
        start: usize,
        cap: Option<usize>,
        exclude: &[usize],
    ) -> Result<usize, NoSlot> {
        take_least_loaded(b, start, cap, exclude).map(|(i, _)| i)
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
        let picks: Vec<usize> = (0..3).map(|s| pick(&b, s, None, &[]).unwrap()).collect();
        assert_eq!(picks, [1, 1, 2]);
        assert_eq!(pick(&[], 0, None, &[]), Err(NoSlot::NoneHealthy));
    }

    #[test]
    fn skips_down_excluded_and_full_backends() {
        let b = backends(3);
        b[1].mark_down("u", "test");
        assert_eq!(pick(&b, 1, None, &[]), Ok(2));
        assert_eq!(pick(&b, 0, None, &[0]), Ok(2));
        assert_eq!(pick(&b, 0, None, &[0, 2]), Err(NoSlot::NoneHealthy));
        let _a = InFlight::acquire(b[0].clone());
        let _c = InFlight::acquire(b[2].clone());
        assert_eq!(pick(&b, 0, Some(1), &[]), Err(NoSlot::AllFull));
        assert_eq!(pick(&b, 0, Some(2), &[]), Ok(0));
    }

    #[test]
    fn health_streaks_flip_state() {
        let b = backends(1);
        let b = &b[0];
        b.health_result("u", Ok(()), 3, 2);
        b.health_result("u", Err("x".into()), 3, 2);
        b.health_result("u", Err("x".into()), 3, 2);
        assert!(b.is_healthy());
        b.health_result("u", Ok(()), 3, 2); // resets the failure streak
        b.health_result("u", Err("x".into()), 3, 2);
        b.health_result("u", Err("x".into()), 3, 2);
        assert!(b.is_healthy());
        b.health_result("u", Err("x".into()), 3, 2);
        assert!(!b.is_healthy());
        assert!(b.last_error().unwrap().contains("health check"));
        b.health_result("u", Ok(()), 3, 2);
        assert!(!b.is_healthy());
        b.health_result("u", Ok(()), 3, 2);
        assert!(b.is_healthy());
    }

    #[test]
    fn a_failed_first_probe_is_down_at_once() {
        let b = backends(2);
        b[0].health_result("u", Err("connection refused".into()), 3, 1);
        assert!(!b[0].is_healthy());
        assert!(b[0].last_error().unwrap().contains("first health check"));
        b[1].health_result("u", Ok(()), 3, 1);
        assert!(b[1].is_healthy());
        // Later failures take the streak again.
        b[1].health_result("u", Err("x".into()), 3, 1);
        assert!(b[1].is_healthy());
        // A failure seen in traffic is no probe: it never decides at once.
        let c = backends(1);
        c[0].observe("u", Err("reset".into()), 3, 1);
        assert!(c[0].is_healthy());
        assert!(!c[0].probed());
    }

    #[test]
    fn stuck_engine_guard_ejects_after_limit_and_holds_down() {
        let b = backends(1);
        let b = &b[0];
        b.first_byte_missed("u", 3);
        b.first_byte_missed("u", 3);
        b.first_byte_ok("u");
        b.first_byte_missed("u", 3);
        b.first_byte_missed("u", 3);
        assert!(b.is_healthy());
        b.first_byte_missed("u", 3);
        assert!(!b.is_healthy());
        // /health says 200, but the hold-down keeps the stuck engine out.
        for _ in 0..5 {
            b.health_result("u", Ok(()), 3, 1);
        }
        assert!(!b.is_healthy());
    }

    #[test]
    fn passive_only_ejection_expires_into_a_probe() {
        let b = Backend::new(
            crate::config::parse_backend("http://127.0.0.1:5001").unwrap(),
            Arc::new(Waiters::default()),
            true,
        );
        b.mark_down("u", "connect failed");
        assert!(!b.is_healthy());
        // Pretend the ejection is over: a deadline already in the past.
        std::thread::sleep(Duration::from_millis(2));
        b.retry_at.store(1, Ordering::Relaxed);
        assert!(b.is_healthy(), "eligible again as a probe");
        b.first_byte_ok("u");
        assert!(b.healthy.load(Ordering::Relaxed));
        assert_eq!(b.retry_at.load(Ordering::Relaxed), 0);
    }
}
