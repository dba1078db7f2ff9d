//! A timer for a deadline that is set again and again: the response head's, once per
//! request on a kept-alive upstream connection; a body's idle limit, once per wait for a
//! frame. It is moved lazily, as nginx moves its timers: a new deadline later than the
//! timer's leaves the timer where it is, and it is moved only when it fires. Setting a
//! fresh tokio timer for each deadline put it into the worker's timer wheel and took it out
//! again every time (once per small request, once per SSE event).

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::time::{Instant, Sleep};

#[derive(Default)]
pub struct LazyTimer(Option<Pin<Box<Sleep>>>);

impl LazyTimer {
    /// Whether `deadline` has passed; if not, the task behind `cx` is woken by then.
    pub fn poll_due(&mut self, deadline: Instant, cx: &mut Context<'_>) -> Poll<()> {
        let timer = self
            .0
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        // Never later than asked (deadlines normally only grow).
        if timer.deadline() > deadline {
            timer.as_mut().reset(deadline);
        }
        // Twice at most: a timer left at an earlier deadline fires, is moved to this one,
        // and is polled once more.
        for _ in 0..2 {
            ready!(timer.as_mut().poll(cx));
            if timer.deadline() >= deadline {
                return Poll::Ready(());
            }
            timer.as_mut().reset(deadline);
        }
        Poll::Pending
    }
}
