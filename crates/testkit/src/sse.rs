//! Client-side SSE reader for tests and benchmarks.
//!
//! It records how events were *framed* on arrival (one body frame ≈ one read from the
//! socket), so a test can tell whether a proxy delivered each token as soon as it was sent
//! or batched several into one write, and how late each event arrived (`arrived_us -
//! sent_us`, both wall-clock microseconds on the same machine).

use std::fmt::Display;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body::Body;

/// Largest incomplete event kept while scanning for its end; beyond it the reader gives up.
pub const MAX_EVENT_BYTES: usize = 16 * 1024 * 1024;

/// Wall-clock microseconds since the UNIX epoch (0 if the clock is before the epoch).
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// One parsed SSE event (the terminating `[DONE]` is not included; see [`SseReport::done`]).
#[derive(Clone, Debug)]
pub struct SseEvent {
    /// The `"seq"` field of the JSON payload, if any.
    pub seq: Option<u64>,
    /// The `"sent_us"` field of the JSON payload, if any.
    pub sent_us: Option<u64>,
    /// [`now_us`] right after the read that completed this event.
    pub arrived_us: u64,
    /// The event's `data:` lines joined with `\n`.
    pub data: String,
}

impl SseEvent {
    /// `arrived_us - sent_us` when the event carries `sent_us`.
    pub fn delay_us(&self) -> Option<i64> {
        self.sent_us.map(|s| self.arrived_us as i64 - s as i64)
    }
}

/// What [`read_events`] saw.
#[derive(Clone, Debug, Default)]
pub struct SseReport {
    /// Events in arrival order.
    pub events: Vec<SseEvent>,
    /// Non-empty data frames read from the body.
    pub reads: usize,
    /// Reads that completed more than one event (including `[DONE]`): a sign of batching.
    pub multi_event_reads: usize,
    /// Whether `data: [DONE]` was seen.
    pub done: bool,
    /// Whether the body ended with an error (connection aborted / incomplete chunked body).
    pub aborted: bool,
    /// The error message when `aborted`.
    pub error: Option<String>,
    /// Bytes left after the last complete event.
    pub trailing_bytes: usize,
}

impl SseReport {
    /// The `seq` values of all events.
    pub fn seqs(&self) -> Vec<Option<u64>> {
        self.events.iter().map(|e| e.seq).collect()
    }

    /// True when events carry seq 0..n in order, `[DONE]` was seen and nothing aborted.
    pub fn is_clean(&self, n: usize) -> bool {
        self.done
            && !self.aborted
            && self.events.len() == n
            && self
                .events
                .iter()
                .enumerate()
                .all(|(i, e)| e.seq == Some(i as u64))
    }
}

fn find_boundary(buf: &[u8], from: usize) -> Option<usize> {
    buf.get(from..)?
        .windows(2)
        .position(|w| w == b"\n\n")
        .map(|p| p + from)
}

/// Parses one raw event (without the blank line); `None` for events with no data lines.
fn parse_event(raw: &[u8], arrived_us: u64) -> Result<Option<SseEvent>, String> {
    let text = std::str::from_utf8(raw).map_err(|e| format!("SSE event is not UTF-8: {e}"))?;
    let mut data: Option<String> = None;
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if let Some(rest) = line.strip_prefix("data:") {
            let rest = rest.strip_prefix(' ').unwrap_or(rest);
            match data.as_mut() {
                Some(d) => {
                    d.push('\n');
                    d.push_str(rest);
                }
                None => data = Some(rest.to_owned()),
            }
        }
    }
    let Some(data) = data else { return Ok(None) };
    let json: Option<serde_json::Value> = serde_json::from_str(&data).ok();
    let field = |name: &str| {
        json.as_ref()
            .and_then(|v| v.get(name))
            .and_then(|v| v.as_u64())
    };
    Ok(Some(SseEvent {
        seq: field("seq"),
        sent_us: field("sent_us"),
        arrived_us,
        data,
    }))
}

/// Reads an SSE body to its end, splitting events on `\n\n` across frames.
///
/// A body error is not an `Err`: it sets [`SseReport::aborted`], since tests want to
/// distinguish an aborted stream from a clean one. `Err` means the stream was not SSE
/// (non-UTF-8 event, or an event larger than [`MAX_EVENT_BYTES`]).
pub async fn read_events<B>(body: B) -> Result<SseReport, String>
where
    B: Body<Data = Bytes>,
    B::Error: Display,
{
    let mut body = std::pin::pin!(body);
    let mut report = SseReport::default();
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let frame = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await;
        let frame = match frame {
            None => break,
            Some(Err(e)) => {
                report.aborted = true;
                report.error = Some(e.to_string());
                break;
            }
            Some(Ok(frame)) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if data.is_empty() {
            continue;
        }
        report.reads += 1;
        let arrived_us = now_us();
        // Only the tail can contain a new boundary (a "\n" may end the previous frame).
        let mut scan_from = buf.len().saturating_sub(1);
        buf.extend_from_slice(&data);
        let mut completed = 0;
        let mut start = 0;
        while let Some(pos) = find_boundary(&buf, scan_from.max(start)) {
            let raw = &buf[start..pos];
            start = pos + 2;
            scan_from = start;
            if let Some(ev) = parse_event(raw, arrived_us)? {
                completed += 1;
                if ev.data == "[DONE]" {
                    report.done = true;
                } else {
                    report.events.push(ev);
                }
            }
        }
        buf.drain(..start);
        if completed > 1 {
            report.multi_event_reads += 1;
        }
        if buf.len() > MAX_EVENT_BYTES {
            return Err(format!("SSE event exceeds {MAX_EVENT_BYTES} bytes"));
        }
    }
    report.trailing_bytes = buf.len();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Frame;
    use std::collections::VecDeque;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    struct VecBody(VecDeque<Result<Frame<Bytes>, String>>);

    impl Body for VecBody {
        type Data = Bytes;
        type Error = String;
        fn poll_frame(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, String>>> {
            Poll::Ready(self.get_mut().0.pop_front())
        }
    }

    fn body_of(chunks: Vec<Result<&'static str, &'static str>>) -> VecBody {
        VecBody(
            chunks
                .into_iter()
                .map(|c| {
                    c.map(|s| Frame::data(Bytes::from_static(s.as_bytes())))
                        .map_err(str::to_owned)
                })
                .collect(),
        )
    }

    #[tokio::test]
    async fn splits_across_frames_and_counts_batching() {
        let body = body_of(vec![
            Ok("data: {\"seq\":0,\"sent_us\":5}\n"),
            Ok("\ndata: {\"seq\":1}\n\ndata: {\"se"),
            Ok("q\":2}\n\n: comment\n\n"),
            Ok("data: [DONE]\n\n"),
        ]);
        let r = read_events(body).await.unwrap();
        assert_eq!(r.seqs(), vec![Some(0), Some(1), Some(2)]);
        assert_eq!(r.events[0].sent_us, Some(5));
        assert_eq!(r.reads, 4);
        assert_eq!(r.multi_event_reads, 1);
        assert!(r.done && !r.aborted);
        assert!(r.is_clean(3));
    }

    #[tokio::test]
    async fn error_marks_aborted() {
        let body = body_of(vec![Ok("data: {\"seq\":0}\n\n"), Err("boom")]);
        let r = read_events(body).await.unwrap();
        assert!(r.aborted && !r.done);
        assert_eq!(r.events.len(), 1);
    }
}
