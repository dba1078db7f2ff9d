//! Upstream name resolution with a one-second memory and one lookup at a time per name.
//!
//! hyper-util's resolver runs `getaddrinfo` on a blocking thread for every new connection.
//! A burst of new streams to a named backend (`mlnode-308` in the compose layout, resolved
//! by Docker's DNS) then meant one DNS query and one blocking thread per stream: a burst of
//! 1,000 streams to `localhost` started 42–204 threads and waited for them. Here the
//! concurrent connections share one lookup, and its answer serves new connections for
//! [`TTL`]. A recreated container is still found within that second, and at once after a
//! connection to the old address fails ([`CachingResolver::forget`]).

use hyper_util::client::legacy::connect::dns::{GaiResolver, Name};
use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::sync::OnceCell;
use tower_service::Service;

/// How long an answer serves new connections (nginx in Gonka's compose: `valid=10s`).
pub const TTL: Duration = Duration::from_secs(1);

type Answer = Result<Arc<[SocketAddr]>, String>;

struct Slot {
    /// Empty while the lookup runs; every caller in that time waits for the same one.
    answer: Arc<OnceCell<Answer>>,
    started: Instant,
}

/// A resolver for `HttpConnector` that remembers answers for `ttl` and lets concurrent
/// lookups of one name share a single call of the inner resolver.
#[derive(Clone)]
pub struct CachingResolver<R = GaiResolver> {
    inner: R,
    ttl: Duration,
    slots: Arc<Mutex<HashMap<Name, Slot>>>,
}

impl CachingResolver {
    pub fn new() -> Self {
        Self::with(GaiResolver::new(), TTL)
    }
}

impl Default for CachingResolver {
    fn default() -> Self {
        Self::new()
    }
}

impl<R> CachingResolver<R> {
    pub fn with(inner: R, ttl: Duration) -> Self {
        CachingResolver {
            inner,
            ttl,
            slots: Arc::default(),
        }
    }

    /// Drops what is known about `host`: the next connection looks it up again (called
    /// when a connection to its address failed, e.g. a recreated container).
    pub fn forget(&self, host: &str) {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.retain(|name, _| name.as_str() != host);
    }

    /// The lookup for `name` to wait on: the running one, a fresh answer, or a new one.
    fn slot(&self, name: &Name) -> Arc<OnceCell<Answer>> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if let Some(slot) = slots.get(name) {
            let usable = match slot.answer.get() {
                None => true,
                Some(Ok(_)) => now.duration_since(slot.started) < self.ttl,
                // A failure is not remembered: the next connection asks again.
                Some(Err(_)) => false,
            };
            if usable {
                return slot.answer.clone();
            }
        }
        // Names come from the config, so the map stays small; stale answers go here.
        slots.retain(|_, s| s.answer.get().is_none() || now.duration_since(s.started) < self.ttl);
        let answer = Arc::new(OnceCell::new());
        slots.insert(
            name.clone(),
            Slot {
                answer: answer.clone(),
                started: now,
            },
        );
        answer
    }
}

impl<R> Service<Name> for CachingResolver<R>
where
    R: Service<Name> + Clone + Send + 'static,
    R::Response: Iterator<Item = SocketAddr>,
    R::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    R::Future: Send,
{
    type Response = Addrs;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The inner resolver is made ready inside the lookup that uses it.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let answer = self.slot(&name);
        let mut inner = self.inner.clone();
        Box::pin(async move {
            let lookup = async move {
                poll_fn(|cx| inner.poll_ready(cx))
                    .await
                    .map_err(|e| e.into().to_string())?;
                let addrs = inner.call(name).await.map_err(|e| e.into().to_string())?;
                Ok(addrs.collect::<Vec<_>>().into())
            };
            match answer.get_or_init(|| lookup).await {
                Ok(addrs) => Ok(Addrs {
                    addrs: addrs.clone(),
                    next: 0,
                }),
                Err(e) => Err(std::io::Error::other(e.clone())),
            }
        })
    }
}

/// The addresses of one answer, shared by every connection it serves.
#[derive(Debug)]
pub struct Addrs {
    addrs: Arc<[SocketAddr]>,
    next: usize,
}

impl Iterator for Addrs {
    type Item = SocketAddr;
    fn next(&mut self) -> Option<SocketAddr> {
        let addr = self.addrs.get(self.next).copied();
        self.next += 1;
        addr
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Counts lookups; each takes until `gate` opens, and answers `addr` (or fails).
    #[derive(Clone)]
    struct Counting {
        calls: Arc<AtomicUsize>,
        gate: Arc<tokio::sync::Semaphore>,
        fail: bool,
    }

    impl Service<Name> for Counting {
        type Response = std::vec::IntoIter<SocketAddr>;
        type Error = std::io::Error;
        type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, _: Name) -> Self::Future {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let (gate, fail) = (self.gate.clone(), self.fail);
            Box::pin(async move {
                let _open = gate.acquire().await;
                if fail {
                    return Err(std::io::Error::other("no such host"));
                }
                Ok(vec![SocketAddr::from(([127, 0, 0, 7], 0))].into_iter())
            })
        }
    }

    fn counting(open: bool, fail: bool) -> Counting {
        Counting {
            calls: Arc::default(),
            gate: Arc::new(tokio::sync::Semaphore::new(if open {
                tokio::sync::Semaphore::MAX_PERMITS
            } else {
                0
            })),
            fail,
        }
    }

    fn name() -> Name {
        Name::from_str("mlnode-308").unwrap()
    }

    #[tokio::test]
    async fn concurrent_lookups_of_one_name_share_one_call() {
        let inner = counting(false, false);
        let mut r = CachingResolver::with(inner.clone(), Duration::from_secs(60));
        let lookups: Vec<_> = (0..100).map(|_| tokio::spawn(r.call(name()))).collect();
        // Lookups that start while the first is still running wait for it.
        tokio::task::yield_now().await;
        inner.gate.add_permits(1);
        for l in lookups {
            let addrs: Vec<_> = l.await.unwrap().unwrap().collect();
            assert_eq!(addrs, [SocketAddr::from(([127, 0, 0, 7], 0))]);
        }
        assert_eq!(inner.calls.load(Ordering::SeqCst), 1);
        // A fresh answer serves later connections too.
        r.call(name()).await.unwrap();
        assert_eq!(inner.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn answers_expire_and_can_be_forgotten() {
        let inner = counting(true, false);
        let mut r = CachingResolver::with(inner.clone(), Duration::ZERO);
        r.call(name()).await.unwrap();
        r.call(name()).await.unwrap();
        assert_eq!(
            inner.calls.load(Ordering::SeqCst),
            2,
            "ttl 0: every call asks"
        );

        let mut r = CachingResolver::with(inner.clone(), Duration::from_secs(60));
        r.call(name()).await.unwrap();
        r.call(name()).await.unwrap();
        assert_eq!(inner.calls.load(Ordering::SeqCst), 3);
        r.forget("other-host");
        r.call(name()).await.unwrap();
        assert_eq!(inner.calls.load(Ordering::SeqCst), 3);
        r.forget("mlnode-308");
        r.call(name()).await.unwrap();
        assert_eq!(inner.calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn a_failure_reaches_its_waiters_and_is_not_remembered() {
        let inner = counting(true, true);
        let mut r = CachingResolver::with(inner.clone(), Duration::from_secs(60));
        let e = r.call(name()).await.unwrap_err();
        assert!(e.to_string().contains("no such host"), "{e}");
        assert!(r.call(name()).await.is_err());
        assert_eq!(inner.calls.load(Ordering::SeqCst), 2);
    }
}
