//! The one body type podproxy relays, in both directions. Frames from hyper's `Incoming`
//! are passed on as they are (`Bytes`, no copy, no re-chunking); the wrapper only adds the
//! idle timeout between frames and a `Meter` that counts bytes and learns how the body ended.

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, Sleep};

/// How a relayed body failed. Returned as the body error, which makes hyper abort the
/// connection (h1) or reset the stream (h2): the peer never mistakes it for a clean end.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("peer stream broke: {0}")]
    Peer(#[from] hyper::Error),
    #[error("no data for {0:?} (idle timeout)")]
    IdleTimeout(Duration),
}

/// Observes a relayed body. `frame` is called for every data frame; `end` once, when the
/// body ends cleanly (`Ok`) or fails (`Err`). Dropping an observer that never saw `end`
/// means the receiving side went away (client disconnect or upstream request abandoned).
pub trait Meter: Send + 'static {
    fn frame(&mut self, len: usize);
    fn end(&mut self, result: Result<(), &BodyError>);
}

enum Source {
    Stream(Incoming),
    Full(Option<Bytes>),
}

pub struct Relay {
    source: Source,
    idle: Option<Idle>,
    meter: Option<Box<dyn Meter>>,
}

struct Idle {
    limit: Duration,
    timer: Pin<Box<Sleep>>,
}

impl Relay {
    /// Relays a streamed body; `idle` bounds the gap between frames.
    pub fn stream(body: Incoming, idle: Duration) -> Self {
        // An empty body (most GETs) needs no timer.
        let idle = (!body.is_end_stream()).then(|| Idle {
            limit: idle,
            timer: Box::pin(tokio::time::sleep(idle)),
        });
        Relay {
            source: Source::Stream(body),
            idle,
            meter: None,
        }
    }

    /// A body held in memory (error responses, rewritten PoC bodies).
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        Relay {
            source: Source::Full((!bytes.is_empty()).then_some(bytes)),
            idle: None,
            meter: None,
        }
    }

    pub fn empty() -> Self {
        Relay::full(Bytes::new())
    }

    pub fn with_meter(mut self, meter: Box<dyn Meter>) -> Self {
        self.meter = Some(meter);
        self
    }

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
        let this = &mut *self;
        let polled = match &mut this.source {
            Source::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Source::Stream(body) => match Pin::new(body).poll_frame(cx) {
                Poll::Ready(r) => Poll::Ready(r.map(|r| r.map_err(BodyError::from))),
                Poll::Pending => {
                    if let Some(idle) = &mut this.idle {
                        ready!(idle.timer.as_mut().poll(cx));
                        Poll::Ready(Some(Err(BodyError::IdleTimeout(idle.limit))))
                    } else {
                        Poll::Pending
                    }
                }
            },
        };
        let out = ready!(polled);
        match &out {
            Some(Ok(frame)) => {
                if let Some(idle) = &mut this.idle {
                    idle.timer.as_mut().reset(Instant::now() + idle.limit);
                }
                if let (Some(m), Some(data)) = (&mut this.meter, frame.data_ref()) {
                    m.frame(data.len());
                }
            }
            Some(Err(e)) => this.finish(Err(e)),
            None => this.finish(Ok(())),
        }
        Poll::Ready(out)
    }

    fn is_end_stream(&self) -> bool {
        match &self.source {
            Source::Stream(b) => b.is_end_stream(),
            Source::Full(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.source {
            Source::Stream(b) => b.size_hint(),
            Source::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        // A full body that was never polled but is empty still ended cleanly.
        if self.meter.is_some() && self.is_end_stream() {
            self.finish(Ok(()));
        }
    }
}
