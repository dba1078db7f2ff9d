//! Wakes an upstream connection raises while the task that owns it is polling it.
//!
//! An upstream connection is driven by the task that relays its response (`pool`): one
//! poll drives the connection, then takes the frame it produced from hyper's body channel.
//! That channel wakes the body's reader when the connection puts a frame in, and the
//! connection when the reader takes it out: both inside that same poll, both for the task
//! doing it, so tokio polls the task once more for nothing. Polled through
//! `OwnWakes::poll`, a wake raised during the poll is held. If the poll returns `Ready`,
//! the wake is dropped: the caller polls again when it wants more, and that poll redoes
//! everything the wake asked for. If it returns `Pending`, the wake goes to the task, so
//! none that matters is lost (tokio's cooperative budget, for one, wakes the task from
//! inside a poll and answers `Pending`). Wakes outside a poll go straight to the task.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Wake, Waker};

const IDLE: u8 = 0;
const POLLING: u8 = 1;
/// Polling, and woken since the poll began.
const WOKEN: u8 = 2;

struct Inner {
    state: AtomicU8,
    /// The waker of the task that last polled.
    task: Mutex<Waker>,
}

impl Inner {
    /// The task's waker, also after a thread panicked holding the lock (it holds a waker).
    fn task(&self) -> MutexGuard<'_, Waker> {
        self.task.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Wake for Inner {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        match self
            .state
            .compare_exchange(POLLING, WOKEN, Ordering::AcqRel, Ordering::Acquire)
        {
            // Held for the end of the poll.
            Ok(_) | Err(WOKEN) => {}
            Err(_) => self.task().wake_by_ref(),
        }
    }
}

/// The waker one upstream connection is polled with (one per connection, reused by every
/// request it carries). Cheap to clone.
#[derive(Clone)]
pub struct OwnWakes {
    inner: Arc<Inner>,
    waker: Waker,
}

impl Default for OwnWakes {
    fn default() -> Self {
        let inner = Arc::new(Inner {
            state: AtomicU8::new(IDLE),
            task: Mutex::new(Waker::noop().clone()),
        });
        let waker = Waker::from(inner.clone());
        OwnWakes { inner, waker }
    }
}

impl OwnWakes {
    /// Runs `f`, which polls the connection and what it feeds, for the task behind `cx`.
    pub fn poll<T>(
        &self,
        cx: &mut Context<'_>,
        f: impl FnOnce(&mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        {
            let mut task = self.inner.task();
            if !task.will_wake(cx.waker()) {
                task.clone_from(cx.waker());
            }
        }
        self.inner.state.store(POLLING, Ordering::Release);
        let polled = f(&mut Context::from_waker(&self.waker));
        let woken = self.inner.state.swap(IDLE, Ordering::AcqRel) == WOKEN;
        if woken && polled.is_pending() {
            cx.waker().wake_by_ref();
        }
        polled
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A waker counting its wakes.
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn task() -> (Arc<Count>, Waker) {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        (count, waker)
    }

    #[test]
    fn a_wake_inside_a_poll_that_is_ready_is_dropped() {
        let (count, waker) = task();
        let wakes = OwnWakes::default();
        let polled = wakes.poll(&mut Context::from_waker(&waker), |cx| {
            cx.waker().wake_by_ref();
            // A clone kept by the connection, woken by value.
            let kept = cx.waker().clone();
            kept.wake();
            Poll::Ready(7)
        });
        assert_eq!(polled, Poll::Ready(7));
        assert_eq!(count.0.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_wake_inside_a_poll_that_is_pending_reaches_the_task_once() {
        let (count, waker) = task();
        let wakes = OwnWakes::default();
        let polled: Poll<()> = wakes.poll(&mut Context::from_waker(&waker), |cx| {
            cx.waker().wake_by_ref();
            cx.waker().wake_by_ref();
            Poll::Pending
        });
        assert!(polled.is_pending());
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        // Nothing woke it: nothing to pass on.
        let _ = wakes.poll(&mut Context::from_waker(&waker), |_| Poll::<()>::Pending);
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_wake_after_the_poll_reaches_the_task_that_polled_last() {
        let (first, first_waker) = task();
        let (second, second_waker) = task();
        let wakes = OwnWakes::default();
        let mut kept = None;
        let _ = wakes.poll(&mut Context::from_waker(&first_waker), |cx| {
            kept = Some(cx.waker().clone());
            Poll::<()>::Pending
        });
        let kept = kept.unwrap();
        kept.wake_by_ref();
        assert_eq!(first.0.load(Ordering::SeqCst), 1);
        // The connection moved to another task (the pool hands it on).
        let _ = wakes.poll(&mut Context::from_waker(&second_waker), |_| {
            Poll::<()>::Pending
        });
        kept.wake();
        assert_eq!(first.0.load(Ordering::SeqCst), 1);
        assert_eq!(second.0.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_wake_from_another_thread_during_a_pending_poll_is_not_lost() {
        let (count, waker) = task();
        let wakes = OwnWakes::default();
        for _ in 0..200 {
            let before = count.0.load(Ordering::SeqCst);
            let mut other = None;
            let polled: Poll<()> = wakes.poll(&mut Context::from_waker(&waker), |cx| {
                let w = cx.waker().clone();
                other = Some(std::thread::spawn(move || w.wake()));
                Poll::Pending
            });
            assert!(polled.is_pending());
            other.unwrap().join().unwrap();
            // Held and passed on at the end, or straight to the task after it: once.
            assert_eq!(count.0.load(Ordering::SeqCst), before + 1);
        }
    }
}
