//! The LLM-aware choice as pure functions: a backend's score from its engine signals, when
//! signals are stale, the optimistic bump by podproxy's own in-flight changes since the
//! scrape, rendezvous hashing and the load guard. No clocks, locks or I/O here: the caller
//! passes `now` and the counters, so every rule is unit-tested as it is written in
//! docs/balancing.md.

use std::time::{Duration, Instant};

/// Weight of one waiting (queued) request against one running request. A queued request
/// cannot start until a running one ends, so it costs far more time to first token.
pub const WAITING_WEIGHT: f64 = 4.0;
/// Weight of a full KV cache (usage 1.0): near full, the engine queues or preempts new
/// requests even with decode capacity free.
pub const KV_WEIGHT: f64 = 8.0;
/// KV usage below this costs nothing: vLLM admits new requests freely until the cache is
/// nearly full, and a replica holding long prompts is no slower for the next request.
pub const KV_KNEE: f64 = 0.8;

/// What one scrape of a backend's `/metrics` said, and podproxy's in-flight count for that
/// backend when the answer arrived.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Signals {
    pub running: f64,
    pub waiting: f64,
    /// KV-cache usage, 0.0..=1.0.
    pub kv_usage: f64,
    /// podproxy's in-flight requests to this backend when the scrape answered.
    pub in_flight_at_scrape: usize,
    pub at: Instant,
}

/// Signals older than two scrape intervals are stale (one scrape may be late or lost).
pub fn is_fresh(s: &Signals, now: Instant, interval: Duration) -> bool {
    now.saturating_duration_since(s.at) <= interval.saturating_mul(2)
}

/// The signals as they probably are now: podproxy's in-flight change since the scrape is
/// applied on top. Requests added since then join the queue if the engine already had one
/// (no free slot), else they run; requests finished since then first drain the queue (a
/// finished request frees a slot for a waiting one), then the running count. Never below
/// zero.
pub fn bumped(s: &Signals, in_flight_now: usize) -> (f64, f64) {
    let (mut running, mut waiting) = (s.running.max(0.0), s.waiting.max(0.0));
    if in_flight_now >= s.in_flight_at_scrape {
        let added = (in_flight_now - s.in_flight_at_scrape) as f64;
        if waiting > 0.0 {
            waiting += added;
        } else {
            running += added;
        }
    } else {
        let done = (s.in_flight_at_scrape - in_flight_now) as f64;
        let from_queue = done.min(waiting);
        waiting -= from_queue;
        running = (running - (done - from_queue)).max(0.0);
    }
    (running, waiting)
}

/// `score = running + 4 × waiting + 8 × max(0, (kv_usage − 0.8) / 0.2)`, with running and
/// waiting bumped by podproxy's in-flight change since the scrape. Lower is better; one
/// running request's worth of difference is 1.
pub fn score(s: &Signals, in_flight_now: usize) -> f64 {
    let (running, waiting) = bumped(s, in_flight_now);
    running + WAITING_WEIGHT * waiting + KV_WEIGHT * kv_pressure(s.kv_usage)
}

/// 0 up to the knee, then linear to 1 at a full cache.
pub fn kv_pressure(kv_usage: f64) -> f64 {
    ((kv_usage.clamp(0.0, 1.0) - KV_KNEE) / (1.0 - KV_KNEE)).max(0.0)
}

/// One backend the request may go to (healthy, not already tried), with its load in
/// score units: the signals score when every candidate has fresh signals, else its
/// in-flight count.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    pub index: usize,
    pub load: f64,
    /// At `max_concurrent`.
    pub full: bool,
    /// The backend's rendezvous seed (`seed_of` its URL).
    pub seed: u64,
}

/// Why the preferred backend was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Override {
    /// At `max_concurrent`.
    Full,
    /// Its load exceeds the best candidate's by more than the margin.
    Margin,
}

/// The outcome of a choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pick {
    /// No prompt key: the least-loaded candidate.
    Best(usize),
    /// The prompt's preferred backend (an affinity hit).
    Preferred(usize),
    /// The load guard sent the request to the least-loaded candidate instead.
    Guarded { index: usize, reason: Override },
    /// Every candidate is at `max_concurrent` (the caller queues).
    AllFull,
}

impl Pick {
    pub fn index(self) -> Option<usize> {
        match self {
            Pick::Best(i) | Pick::Preferred(i) | Pick::Guarded { index: i, .. } => Some(i),
            Pick::AllFull => None,
        }
    }
}

/// A 64-bit finaliser (splitmix64): mixes every input bit into every output bit.
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A backend's rendezvous seed from its URL (FNV-1a, then mixed): stable across restarts,
/// reloads and the order backends are listed in.
pub fn seed_of(label: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in label.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    mix(h)
}

/// Rendezvous (highest random weight) hashing: the candidate whose `mix(key ^ seed)` is
/// highest. Removing a backend moves only the keys that preferred it; nothing is stored
/// per key.
pub fn rendezvous(cands: &[Candidate], key: u64) -> Option<&Candidate> {
    cands
        .iter()
        .max_by_key(|c| (mix(key ^ c.seed), std::cmp::Reverse(c.index)))
}

/// The least-loaded candidate not at its cap; ties go to the earliest in `cands` (the
/// caller orders them from a rotating start, so equal backends share the load).
pub fn best(cands: &[Candidate]) -> Option<&Candidate> {
    let mut best: Option<&Candidate> = None;
    for c in cands.iter().filter(|c| !c.full) {
        if best.is_none_or(|b| c.load < b.load) {
            best = Some(c);
        }
    }
    best
}

/// The choice: without a key, the least-loaded candidate. With one, its rendezvous
/// backend unless the load guard says otherwise: that backend is full, or its load
/// exceeds the best candidate's by more than `margin`.
pub fn pick(cands: &[Candidate], key: Option<u64>, margin: f64) -> Pick {
    let Some(best) = best(cands) else {
        return Pick::AllFull;
    };
    let Some(key) = key else {
        return Pick::Best(best.index);
    };
    let Some(preferred) = rendezvous(cands, key) else {
        return Pick::Best(best.index);
    };
    if preferred.full {
        Pick::Guarded {
            index: best.index,
            reason: Override::Full,
        }
    } else if preferred.load > best.load + margin {
        Pick::Guarded {
            index: best.index,
            reason: Override::Margin,
        }
    } else {
        Pick::Preferred(preferred.index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sig(running: f64, waiting: f64, kv: f64, in_flight: usize) -> Signals {
        Signals {
            running,
            waiting,
            kv_usage: kv,
            in_flight_at_scrape: in_flight,
            at: Instant::now(),
        }
    }

    fn cand(index: usize, load: f64, full: bool) -> Candidate {
        Candidate {
            index,
            load,
            full,
            seed: seed_of(&format!("http://127.0.0.1:{}", 5001 + index)),
        }
    }

    #[test]
    fn score_weights_waiting_and_kv_pressure_over_running() {
        assert_eq!(score(&sig(0.0, 0.0, 0.0, 0), 0), 0.0);
        assert_eq!(score(&sig(3.0, 0.0, 0.0, 0), 0), 3.0);
        assert_eq!(score(&sig(3.0, 2.0, 0.5, 0), 0), 3.0 + 8.0);
        // KV usage counts only near full: 0.9 is half-way from the knee to full.
        assert!((score(&sig(3.0, 2.0, 0.9, 0), 0) - (3.0 + 8.0 + 4.0)).abs() < 1e-9);
        assert_eq!(kv_pressure(0.8), 0.0);
        assert_eq!(kv_pressure(1.0), 1.0);
        // One queued request outweighs three running ones.
        assert!(score(&sig(0.0, 1.0, 0.0, 0), 0) > score(&sig(3.0, 0.0, 0.0, 0), 0));
        // Out-of-range KV usage is clamped, negative counts are treated as zero.
        assert_eq!(score(&sig(-1.0, -1.0, 7.0, 0), 0), KV_WEIGHT);
    }

    #[test]
    fn signals_are_stale_after_two_intervals() {
        let s = sig(1.0, 0.0, 0.0, 0);
        let i = Duration::from_millis(250);
        assert!(is_fresh(&s, s.at, i));
        assert!(is_fresh(&s, s.at + Duration::from_millis(500), i));
        assert!(!is_fresh(&s, s.at + Duration::from_millis(501), i));
        // A clock reading before the scrape (racing threads) counts as fresh.
        assert!(is_fresh(&s, s.at - Duration::from_millis(1), i));
    }

    #[test]
    fn requests_sent_since_the_scrape_run_or_queue() {
        // Idle engine at scrape time, 3 sent since: they run.
        assert_eq!(bumped(&sig(0.0, 0.0, 0.0, 0), 3), (3.0, 0.0));
        // An engine with a queue: the new ones queue behind it.
        assert_eq!(bumped(&sig(8.0, 2.0, 0.9, 10), 13), (8.0, 5.0));
        // So a burst stops piling onto the backend that looked idle at the scrape.
        let idle_then = score(&sig(0.0, 0.0, 0.0, 0), 6);
        let busy_then = score(&sig(4.0, 0.0, 0.0, 4), 4);
        assert!(idle_then > busy_then);
    }

    #[test]
    fn requests_finished_since_the_scrape_drain_the_queue_first() {
        assert_eq!(bumped(&sig(8.0, 3.0, 0.0, 11), 9), (8.0, 1.0));
        assert_eq!(bumped(&sig(8.0, 3.0, 0.0, 11), 6), (6.0, 0.0));
        // Never negative, even when other clients' requests were in the counts.
        assert_eq!(bumped(&sig(1.0, 0.0, 0.0, 5), 0), (0.0, 0.0));
    }

    #[test]
    fn without_a_key_the_least_loaded_wins_and_ties_go_first() {
        let c = [cand(2, 1.0, false), cand(0, 1.0, false), cand(1, 0.5, true)];
        assert_eq!(pick(&c, None, 4.0), Pick::Best(2));
        let c = [cand(0, 3.0, false), cand(1, 2.0, false)];
        assert_eq!(pick(&c, None, 4.0), Pick::Best(1));
        assert_eq!(pick(&[], None, 4.0), Pick::AllFull);
        assert_eq!(pick(&[cand(0, 0.0, true)], Some(1), 4.0), Pick::AllFull);
    }

    #[test]
    fn rendezvous_is_stable_and_spreads_keys() {
        let c: Vec<Candidate> = (0..4).map(|i| cand(i, 0.0, false)).collect();
        let mut per = [0usize; 4];
        for key in 0..4000u64 {
            let a = rendezvous(&c, mix(key)).map(|c| c.index);
            // Order of the candidates does not matter.
            let mut rev = c.clone();
            rev.reverse();
            assert_eq!(a, rendezvous(&rev, mix(key)).map(|c| c.index));
            per[a.unwrap_or(9)] += 1;
        }
        for n in per {
            assert!((800..1200).contains(&n), "uneven spread {per:?}");
        }
    }

    #[test]
    fn removing_a_backend_moves_only_its_keys() {
        let all: Vec<Candidate> = (0..4).map(|i| cand(i, 0.0, false)).collect();
        let without: Vec<Candidate> = all.iter().copied().filter(|c| c.index != 2).collect();
        for key in 0..2000u64 {
            let before = rendezvous(&all, mix(key)).map(|c| c.index);
            let after = rendezvous(&without, mix(key)).map(|c| c.index);
            if before != Some(2) {
                assert_eq!(before, after, "key {key} moved although its backend stayed");
            }
        }
    }

    #[test]
    fn a_key_goes_to_its_preferred_backend_within_the_margin() {
        let c: Vec<Candidate> = (0..4).map(|i| cand(i, i as f64, false)).collect();
        let key = 42;
        let preferred = rendezvous(&c, key).map(|c| c.index).unwrap_or(9);
        // Loads 0..3, margin 4: the preferred one is never more than 3 above the best.
        assert_eq!(pick(&c, Some(key), 4.0), Pick::Preferred(preferred));
    }

    #[test]
    fn the_load_guard_leaves_a_full_or_much_busier_preferred_backend() {
        let mut c: Vec<Candidate> = (0..4).map(|i| cand(i, 1.0, false)).collect();
        let key = 7;
        let p = rendezvous(&c, key).map(|c| c.index).unwrap_or(9);
        c[p].full = true;
        let best = if p == 0 { 1 } else { 0 };
        assert_eq!(
            pick(&c, Some(key), 4.0),
            Pick::Guarded {
                index: best,
                reason: Override::Full
            }
        );
        c[p].full = false;
        c[p].load = 5.0; // exactly best + margin: still preferred
        assert_eq!(pick(&c, Some(key), 4.0), Pick::Preferred(p));
        c[p].load = 5.5;
        assert_eq!(
            pick(&c, Some(key), 4.0),
            Pick::Guarded {
                index: best,
                reason: Override::Margin
            }
        );
        assert_eq!(Pick::AllFull.index(), None);
    }

    #[test]
    fn seeds_differ_per_backend_url() {
        assert_ne!(
            seed_of("http://127.0.0.1:5001"),
            seed_of("http://127.0.0.1:5002")
        );
        assert_eq!(
            seed_of("http://127.0.0.1:5001"),
            seed_of("http://127.0.0.1:5001")
        );
    }
}
