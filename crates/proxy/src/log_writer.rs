//! The background log writer: request threads append finished lines to one shared buffer;
//! a writer thread takes the whole buffer and writes it to stderr.
//!
//! Why not a channel of lines (tracing-appender, which this replaced): each line there was
//! its own allocation, freed on the other thread, and the writer thread spun and yielded
//! on the empty channel before sleeping, which on a small box takes CPU from the workers.
//! Here a line is one copy into a buffer under a short lock; the writer is woken only when
//! it sleeps on an empty buffer, and after each write it lingers a moment so a busy
//! proxy's lines go out hundreds per `write` while a quiet proxy's line goes out at once.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// Bytes the buffer may hold before new lines are dropped (and counted) instead of making
/// a request wait for stderr: some 16,000 access lines.
pub const MAX_BUFFERED: usize = 4 << 20;

/// How long the writer waits after a write before taking the next batch. Lines written in
/// that time are not delayed further than this; nothing is waited for on an idle proxy.
const LINGER: Duration = Duration::from_millis(10);

struct State {
    buf: Vec<u8>,
    /// The writer sleeps on `wake` until a line arrives (only then is it notified).
    writer_waiting: bool,
    closed: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    dropped: AtomicU64,
    max: usize,
}

impl Shared {
    /// The state, also after a thread panicked holding the lock (it holds only bytes).
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The request side: `Write` appends one formatted line (tracing-subscriber hands each
/// event's line over in one `write_all`). Cheap to clone.
#[derive(Clone)]
pub struct LogWriter {
    shared: Arc<Shared>,
}

/// Stops the writer thread when dropped, after it has written everything buffered.
pub struct FlushGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// Starts the writer thread in front of `out`; keep the guard until exit.
pub fn start<W: Write + Send + 'static>(out: W, max: usize) -> (LogWriter, FlushGuard) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            buf: Vec::new(),
            writer_waiting: false,
            closed: false,
        }),
        wake: Condvar::new(),
        dropped: AtomicU64::new(0),
        max,
    });
    let thread = {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("podproxy-log".into())
            .spawn(move || write_loop(&shared, out))
            .ok()
    };
    if thread.is_none() {
        // No writer thread: lines would pile up unwritten, so every one counts as dropped.
        shared.lock().closed = true;
    }
    (
        LogWriter {
            shared: shared.clone(),
        },
        FlushGuard { shared, thread },
    )
}

fn write_loop<W: Write>(shared: &Shared, mut out: W) {
    let mut batch = Vec::new();
    loop {
        let closed = {
            let mut st = shared.lock();
            while st.buf.is_empty() && !st.closed {
                st.writer_waiting = true;
                st = shared.wake.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            st.writer_waiting = false;
            std::mem::swap(&mut st.buf, &mut batch);
            st.closed
        };
        // A failed write (stderr closed) loses this batch; there is nowhere to report it.
        let _ = out.write_all(&batch).and_then(|()| out.flush());
        batch.clear();
        if closed {
            return;
        }
        std::thread::sleep(LINGER);
    }
}

impl LogWriter {
    /// Lines dropped so far because the buffer was full.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }
}

impl LogWriter {
    /// Appends one whole line, or drops and counts it when the buffer is full.
    pub fn append(&self, line: &[u8]) {
        let mut st = self.shared.lock();
        if st.closed || st.buf.len() + line.len() > self.shared.max {
            drop(st);
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        st.buf.extend_from_slice(line);
        if st.writer_waiting {
            st.writer_waiting = false;
            drop(st);
            self.shared.wake.notify_one();
        }
    }
}

impl Write for LogWriter {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        self.append(line);
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Drop for FlushGuard {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `Write` the test can read back after the writer thread is done.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn every_line_is_written_in_order_and_flushed_on_drop() {
        let sink = Sink::default();
        let (w, guard) = start(sink.clone(), MAX_BUFFERED);
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let mut w = w.clone();
                std::thread::spawn(move || {
                    for i in 0..1000 {
                        w.write_all(format!("{t} {i}\n").as_bytes()).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(guard);
        let out = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        for t in 0..4 {
            let mine: Vec<usize> = out
                .lines()
                .filter_map(|l| l.strip_prefix(&format!("{t} ")))
                .map(|n| n.parse().unwrap())
                .collect();
            assert_eq!(mine, (0..1000).collect::<Vec<_>>(), "thread {t}");
        }
        assert_eq!(w.dropped(), 0);
    }

    #[test]
    fn a_full_buffer_drops_and_counts_whole_lines() {
        // A writer that blocks until released: the buffer fills behind it.
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        struct Blocked(Arc<(Mutex<bool>, Condvar)>, Sink);
        impl Write for Blocked {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                let (m, c) = &*self.0;
                let mut open = m.lock().unwrap();
                while !*open {
                    open = c.wait(open).unwrap();
                }
                self.1.write(b)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sink = Sink::default();
        let (mut w, guard) = start(Blocked(gate.clone(), sink.clone()), 100);
        // 12 lines of 8 bytes fit in 100; the blocked writer may have taken up to 12 more
        // before it blocked, so between 16 and 28 of 40 are dropped.
        for i in 0..40 {
            w.write_all(format!("line {i:02}\n").as_bytes()).unwrap();
        }
        let dropped = w.dropped();
        assert!((16..=28).contains(&dropped), "dropped {dropped}");
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        drop(guard);
        let out = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        // Whole lines only, and as many as were not dropped.
        assert!(out.lines().all(|l| l.len() == 7 && l.starts_with("line ")));
        assert_eq!(out.lines().count() as u64, 40 - dropped);
    }
}
