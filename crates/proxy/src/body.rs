//! The one body type podproxy relays, in both directions. Frames from hyper's `Incoming`
//! are passed on as they are (`Bytes`, no copy, no re-chunking); the wrapper only adds the
//! idle timeout between frames and a `Meter` that counts bytes and learns how the body ended.

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::time::Instant;

use crate::lazy_timer::LazyTimer;
use crate::upstream::own_wakes::OwnWakes;
use crate::upstream::pool::Lease;

/// How a relayed body failed. Returned as the body error, which makes hyper abort the
/// connection (h1) or reset the stream (h2): the peer never mistakes it for a clean end.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("peer stream broke: {0}")]
    Peer(#[from] hyper::Error),
    #[error("no data for {0:?} (idle timeout)")]
    IdleTimeout(Duration),
    #[error("request body was already handed to an earlier attempt")]
    AlreadyTaken,
    /// The upstream failed after podproxy had started the response itself (SSE keep-alive).
    #[error("upstream failed after the response had started: {0}")]
    Upstream(String),
}

/// Observes a relayed body. `frame` is called for every data frame; `end` once, when the
/// body ends cleanly (`Ok`) or fails (`Err`). Dropping an observer that never saw `end`
/// means the receiving side went away (client disconnect or upstream request abandoned).
pub trait Meter: Send + 'static {
    fn frame(&mut self, data: &Bytes);
    fn end(&mut self, result: Result<(), &BodyError>);
}

enum Source {
    Stream(Incoming),
    /// A response body and the upstream connection that feeds it (driven by our polls).
    Upstream {
        body: Incoming,
        lease: Lease,
        /// The connection's waker: wakes it raises for this poll are not a second poll.
        wakes: OwnWakes,
    },
    Full(Option<Bytes>),
    /// A `Replayable` body: taken out of the shared holder on first poll.
    Shared {
        held: Arc<Mutex<Option<Pending>>>,
        taken: Option<Pending>,
    },
    /// A body made by another module (the SSE keep-alive stream), polled as it is.
    Boxed(Pin<Box<dyn Body<Data = Bytes, Error = BodyError> + Send>>),
}

/// A request body not yet relayed: frames already read (by `Prefetched::read`), then the
/// rest, still in hyper's hands.
struct Pending {
    frames: std::collections::VecDeque<Bytes>,
    trailers: Option<http::HeaderMap>,
    /// `None` once the client's body has ended (everything is in `frames`/`trailers`).
    rest: Option<Incoming>,
}

impl Pending {
    fn poll(
        &mut self,
        idle: &mut Option<Idle>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if let Some(b) = self.frames.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(b))));
        }
        if let Some(t) = self.trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(t))));
        }
        match &mut self.rest {
            Some(body) => poll_stream(body, idle, cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty()
            && self.trailers.is_none()
            && self.rest.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let held: u64 = self.frames.iter().map(|b| b.len() as u64).sum();
        let rest = self
            .rest
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint);
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + held);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + held);
        }
        hint
    }
}

/// The first bytes of a streamed request body, read before the upstream request is sent so
/// that a decision can look at them (is it JSON? which prompt?), with the rest of the body
/// still unread. Whole frames are kept as they came (no copy); `Replayable::prefetched`
/// relays them first and then the rest, so the upstream gets the body byte for byte.
pub struct Prefetched {
    pending: Pending,
}

impl Prefetched {
    /// Reads frames until `enough` says so (it sees every frame held so far), at least
    /// `limit` bytes are held, or the body ends; `idle` bounds the wait for each frame.
    pub async fn read(
        body: Incoming,
        limit: usize,
        idle: Duration,
        mut enough: impl FnMut(&[Bytes]) -> bool,
    ) -> Result<Prefetched, BodyError> {
        let mut pending = Pending {
            frames: std::collections::VecDeque::new(),
            trailers: None,
            rest: Some(body),
        };
        let mut held = 0usize;
        let mut idle = Some(Idle::new(idle));
        while held < limit
            && pending.trailers.is_none()
            && !enough(pending.frames.make_contiguous())
        {
            let Some(body) = pending.rest.as_mut() else {
                break;
            };
            let next = std::future::poll_fn(|cx| poll_stream(body, &mut idle, cx)).await;
            if let Some(i) = &mut idle {
                i.stop();
            }
            match next {
                None => pending.rest = None,
                Some(Err(e)) => return Err(e),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        held += data.len();
                        if !data.is_empty() {
                            pending.frames.push_back(data);
                        }
                    }
                    Err(frame) => pending.trailers = frame.into_trailers().ok(),
                },
            }
            if pending.rest.as_ref().is_some_and(Body::is_end_stream) {
                pending.rest = None;
            }
        }
        Ok(Prefetched { pending })
    }

    /// The frames held, in order.
    pub fn frames(&mut self) -> &[Bytes] {
        self.pending.frames.make_contiguous()
    }

    /// Bytes held.
    pub fn len(&self) -> usize {
        self.pending.frames.iter().map(Bytes::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.frames.is_empty()
    }
}

/// The first byte of a body that is not JSON whitespace, if the frames hold one.
pub fn first_non_whitespace(frames: &[Bytes]) -> Option<u8> {
    frames
        .iter()
        .flat_map(|f| f.iter())
        .copied()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
}

/// A request body that a second attempt can still use as long as the first attempt never
/// started reading it (hyper polls a request body only once the connection is up, so a
/// connect failure leaves it untouched). This is what makes retry-on-connect-failure safe
/// for POST bodies without buffering them.
pub struct Replayable {
    held: Arc<Mutex<Option<Pending>>>,
}

impl Replayable {
    pub fn new(body: Incoming) -> Self {
        Self::from_pending(Pending {
            frames: Default::default(),
            trailers: None,
            rest: Some(body),
        })
    }

    /// A body whose first frames were already read: they are relayed first, then the rest.
    pub fn prefetched(p: Prefetched) -> Self {
        Self::from_pending(p.pending)
    }

    fn from_pending(p: Pending) -> Self {
        Replayable {
            held: Arc::new(Mutex::new(Some(p))),
        }
    }

    /// A body for one attempt.
    pub fn body(&self, idle: Duration) -> Relay {
        Relay(Box::new(Parts {
            source: Source::Shared {
                held: self.held.clone(),
                taken: None,
            },
            idle: Some(Idle::new(idle)),
            meter: None,
        }))
    }

    /// Whether no attempt has read (or taken) the body yet.
    pub fn untouched(&self) -> bool {
        self.held.lock().map(|s| s.is_some()).unwrap_or(false)
    }
}

/// Boxed: a body waits in hyper's per-connection queues (the client's request channel
/// keeps room for 32 requests per upstream connection), so its inline size is paid many times
/// per stream; boxed it is one pointer.
pub struct Relay(Box<Parts>);

struct Parts {
    source: Source,
    idle: Option<Idle>,
    meter: Option<Box<dyn Meter>>,
}

/// The idle clock runs only while the body is being waited for: it starts when a poll
/// finds no frame and stops at the next frame. Not at creation (a request body may wait for
/// a connection or a queue before anyone reads it), and not while the reader does not
/// poll (a client that is slow to take the response is `send_timeout`'s business). A body
/// whose frames are ready when polled (most small ones) never touches the timer wheel.
///
/// The timer is moved lazily (`LazyTimer`): a stream of SSE events waits once per event,
/// and re-arming a timer each time took it out of tokio's timer wheel and put it back per
/// event.
struct Idle {
    limit: Duration,
    /// When the current wait began; `None` while frames are coming.
    since: Option<Instant>,
    /// Its deadline may be an earlier wait's.
    timer: LazyTimer,
}

impl Idle {
    fn new(limit: Duration) -> Self {
        Idle {
            limit,
            since: None,
            timer: LazyTimer::default(),
        }
    }

    /// Nothing is ready: start the clock if this wait is new, then see if it ran out.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let deadline = *self.since.get_or_insert_with(Instant::now) + self.limit;
        self.timer.poll_due(deadline, cx)
    }

    /// A frame came: the wait is over.
    fn stop(&mut self) {
        self.since = None;
    }
}

impl Relay {
    /// Relays a streamed body; `idle` bounds the gap between frames.
    pub fn stream(body: Incoming, idle: Duration) -> Self {
        // An empty body (most GETs) needs no timer.
        let idle = (!body.is_end_stream()).then(|| Idle::new(idle));
        Relay(Box::new(Parts {
            source: Source::Stream(body),
            idle,
            meter: None,
        }))
    }

    /// Relays an upstream response body, driving its connection; `idle` bounds the gap
    /// between frames. The connection is parked for reuse when the body ends cleanly.
    pub fn upstream(body: Incoming, lease: Lease, idle: Duration) -> Self {
        let idle = (!body.is_end_stream()).then(|| Idle::new(idle));
        Relay(Box::new(Parts {
            source: Source::Upstream {
                body,
                wakes: lease.wakes(),
                lease,
            },
            idle,
            meter: None,
        }))
    }

    /// A body held in memory (error responses, rewritten PoC bodies).
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        Relay(Box::new(Parts {
            source: Source::Full((!bytes.is_empty()).then_some(bytes)),
            idle: None,
            meter: None,
        }))
    }

    pub fn empty() -> Self {
        Relay::full(Bytes::new())
    }

    /// Relays a body made elsewhere; it keeps its own timers.
    pub fn boxed(body: impl Body<Data = Bytes, Error = BodyError> + Send + 'static) -> Self {
        Relay(Box::new(Parts {
            source: Source::Boxed(Box::pin(body)),
            idle: None,
            meter: None,
        }))
    }

    pub fn with_meter(mut self, meter: Box<dyn Meter>) -> Self {
        self.0.meter = Some(meter);
        self
    }
}

impl Parts {
    fn finish(&mut self, result: Result<(), &BodyError>) {
        if let Some(mut m) = self.meter.take() {
            m.end(result);
        }
    }
}

impl Body for Relay {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this: &mut Parts = &mut self.0;
        let polled = match &mut this.source {
            Source::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Source::Stream(body) => poll_stream(body, &mut this.idle, cx),
            Source::Upstream { body, lease, wakes } => wakes.poll(cx, |cx| {
                lease.drive(cx);
                let polled = poll_stream(body, &mut this.idle, cx);
                if let Poll::Ready(None) = polled {
                    lease.release(Some(cx));
                }
                polled
            }),
            Source::Shared { held, taken } => {
                if taken.is_none() {
                    *taken = held.lock().ok().and_then(|mut s| s.take());
                }
                match taken {
                    Some(pending) => pending.poll(&mut this.idle, cx),
                    None => Poll::Ready(Some(Err(BodyError::AlreadyTaken))),
                }
            }
            Source::Boxed(body) => body.as_mut().poll_frame(cx),
        };
        let out = ready!(polled);
        match &out {
            Some(Ok(frame)) => {
                if let Some(idle) = &mut this.idle {
                    idle.stop();
                }
                if let (Some(m), Some(data)) = (&mut this.meter, frame.data_ref()) {
                    m.frame(data);
                }
            }
            Some(Err(e)) => this.finish(Err(e)),
            None => this.finish(Ok(())),
        }
        Poll::Ready(out)
    }

    fn is_end_stream(&self) -> bool {
        match &self.0.source {
            Source::Stream(b) | Source::Upstream { body: b, .. } => b.is_end_stream(),
            Source::Full(b) => b.is_none(),
            Source::Boxed(b) => b.is_end_stream(),
            Source::Shared { taken: Some(p), .. } => p.is_end_stream(),
            Source::Shared { held, .. } => held
                .lock()
                .map(|s| s.as_ref().is_none_or(Pending::is_end_stream))
                .unwrap_or(true),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0.source {
            Source::Stream(b) | Source::Upstream { body: b, .. } => b.size_hint(),
            Source::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Source::Boxed(b) => b.size_hint(),
            Source::Shared { taken: Some(p), .. } => p.size_hint(),
            Source::Shared { held, .. } => held
                .lock()
                .ok()
                .and_then(|s| s.as_ref().map(Pending::size_hint))
                .unwrap_or_default(),
        }
    }
}

/// Polls a streamed source; when it has nothing yet, the idle timer decides whether waiting
/// has lasted too long.
fn poll_stream(
    body: &mut Incoming,
    idle: &mut Option<Idle>,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
    match Pin::new(body).poll_frame(cx) {
        Poll::Ready(r) => Poll::Ready(r.map(|r| r.map_err(BodyError::from))),
        Poll::Pending => match idle {
            Some(idle) => {
                ready!(idle.poll_expired(cx));
                Poll::Ready(Some(Err(BodyError::IdleTimeout(idle.limit))))
            }
            None => Poll::Pending,
        },
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        // hyper stops polling a body once its length is reached (and never polls a 204 or
        // HEAD body): such a body has ended cleanly, and its connection is free.
        if let Source::Upstream { body, lease, .. } = &mut self.0.source {
            if body.is_end_stream() {
                lease.release(None);
            }
        }
        // A full body that was never polled but is empty still ended cleanly.
        if self.0.meter.is_some() && self.is_end_stream() {
            self.0.finish(Ok(()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Idle;
    use std::task::{Context, Poll, Waker};
    use std::time::Duration;
    use tokio::time::advance;

    const LIMIT: Duration = Duration::from_secs(10);

    fn poll(idle: &mut Idle) -> Poll<()> {
        idle.poll_expired(&mut Context::from_waker(Waker::noop()))
    }

    /// The timer stays at the first wait's deadline and moves only when it fires: every
    /// wait still gets its full `limit`, counted from its own start.
    #[tokio::test(start_paused = true)]
    async fn a_wait_gets_its_full_limit_though_the_timer_moves_late() {
        let mut idle = Idle::new(LIMIT);
        assert!(poll(&mut idle).is_pending()); // wait 1 from t = 0
        advance(Duration::from_secs(6)).await;
        idle.stop(); // a frame at t = 6
        assert!(poll(&mut idle).is_pending()); // wait 2 from t = 6: deadline t = 16
        advance(Duration::from_secs(5)).await; // t = 11: wait 1's deadline has passed
        assert!(poll(&mut idle).is_pending());
        advance(Duration::from_secs(4)).await; // t = 15
        assert!(poll(&mut idle).is_pending());
        advance(Duration::from_secs(1)).await; // t = 16
        assert!(poll(&mut idle).is_ready());
    }

    #[tokio::test(start_paused = true)]
    async fn a_first_wait_runs_out_at_its_limit() {
        let mut idle = Idle::new(LIMIT);
        assert!(poll(&mut idle).is_pending());
        advance(LIMIT - Duration::from_millis(1)).await;
        assert!(poll(&mut idle).is_pending());
        advance(Duration::from_millis(1)).await;
        assert!(poll(&mut idle).is_ready());
    }
}
