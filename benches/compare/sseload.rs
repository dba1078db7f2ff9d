// SSE load client for benches/compare (no dependencies: `rustc -O --edition 2021 sseload.rs`).
//
// Opens N concurrent HTTP/1.1 streams (one thread each, blocking sockets) to
// POST /v1/chat/completions on podproxy-sim (directly or through a proxy), asks for
// `--tokens` events every `--interval-ms` (x-sim-* headers), de-chunks the body and, for
// every event, records arrival_us - sent_us (both wall clock on this machine, sent_us is
// stamped by the simulator when it writes the event). A socket read that completes more
// than one token event counts as a batched read ([DONE] is not counted: the simulator
// writes it immediately after the last token). Per stream it also records the connect time
// (connect() call to established), the time to the response head (`ttfb`) and the time to
// the first token (`ttft`: from just before the request is written to the read that
// completes the first token event). All threads wait on one barrier and then connect
// together, so STREAMS new streams open as one burst. Prints one JSON object on stdout.
//
// usage: sseload ADDR STREAMS TOKENS INTERVAL_MS TIMEOUT_S
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

#[derive(Default)]
struct StreamResult {
    ok: bool,
    error: Option<String>,
    status: u16,
    events: usize,
    reads: usize,
    multi_reads: usize,
    max_per_read: usize,
    delays: Vec<i64>,
    ttfb_us: Option<u64>,
    ttft_us: Option<u64>,
    connect_us: Option<u64>,
}

enum Chunk {
    Size(Vec<u8>),
    Data(usize),
    DataEnd(usize), // bytes of CRLF still to skip after a chunk
    Trailer,
    Done,
}

struct Decoder {
    chunked: bool,
    st: Chunk,
}

impl Decoder {
    // Appends the payload bytes of `inp` to `out`.
    fn feed(&mut self, mut inp: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        if !self.chunked {
            out.extend_from_slice(inp);
            return Ok(());
        }
        while !inp.is_empty() {
            match &mut self.st {
                Chunk::Size(line) => {
                    let b = inp[0];
                    inp = &inp[1..];
                    if b == b'\n' {
                        let s = String::from_utf8_lossy(line).to_string();
                        let hex = s.trim().split(';').next().unwrap_or("").trim().to_string();
                        let n = usize::from_str_radix(&hex, 16).map_err(|_| format!("bad chunk size {s:?}"))?;
                        self.st = if n == 0 { Chunk::Trailer } else { Chunk::Data(n) };
                    } else {
                        line.push(b);
                        if line.len() > 1024 {
                            return Err("chunk size line too long".into());
                        }
                    }
                }
                Chunk::Data(n) => {
                    let k = (*n).min(inp.len());
                    out.extend_from_slice(&inp[..k]);
                    inp = &inp[k..];
                    *n -= k;
                    if *n == 0 {
                        self.st = Chunk::DataEnd(2);
                    }
                }
                Chunk::DataEnd(n) => {
                    inp = &inp[1..];
                    *n -= 1;
                    if *n == 0 {
                        self.st = Chunk::Size(Vec::new());
                    }
                }
                Chunk::Trailer => {
                    // "\r\n" after the last chunk (no trailers expected)
                    if inp.contains(&b'\n') {
                        self.st = Chunk::Done;
                    }
                    inp = &[];
                }
                Chunk::Done => return Ok(()),
            }
        }
        Ok(())
    }
    fn done(&self) -> bool {
        matches!(self.st, Chunk::Done | Chunk::Trailer)
    }
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

fn sent_us(ev: &[u8]) -> Option<u64> {
    let p = find(ev, b"\"sent_us\":")? + 10;
    let digits: Vec<u8> = ev[p..].iter().copied().take_while(|c| c.is_ascii_digit()).collect();
    std::str::from_utf8(&digits).ok()?.parse().ok()
}

fn one(addr: &str, tokens: usize, interval: u64, deadline: Instant) -> StreamResult {
    let mut r = StreamResult::default();
    let fail = |mut r: StreamResult, e: String| {
        r.error = Some(e);
        r
    };
    let sa: std::net::SocketAddr = addr.parse().unwrap();
    let c0 = Instant::now();
    let mut s = match TcpStream::connect_timeout(&sa, Duration::from_secs(5)) {
        Ok(s) => s,
        Err(e) => return fail(r, format!("connect: {e}")),
    };
    r.connect_us = Some(c0.elapsed().as_micros() as u64);
    let _ = s.set_nodelay(true);
    let body = format!(
        "{{\"model\":\"m\",\"stream\":true,\"max_tokens\":{tokens},\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}]}}"
    );
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nAccept: text/event-stream\r\nx-sim-tokens: {tokens}\r\nx-sim-interval-ms: {interval}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let t0 = Instant::now();
    if let Err(e) = s.write_all(req.as_bytes()) {
        return fail(r, format!("write: {e}"));
    }
    let mut head: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut dec: Option<Decoder> = None;
    let mut payload: Vec<u8> = Vec::new();
    let mut done_seen = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return fail(r, "timeout".into());
        }
        let _ = s.set_read_timeout(Some(left));
        let n = match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => return fail(r, format!("read: {e}")),
        };
        let arrived = now_us();
        let since_write = t0.elapsed().as_micros() as u64;
        let mut data = &buf[..n];
        if dec.is_none() {
            head.extend_from_slice(data);
            let Some(p) = find(&head, b"\r\n\r\n") else {
                if head.len() > 64 * 1024 {
                    return fail(r, "head too long".into());
                }
                continue;
            };
            r.ttfb_us = Some(t0.elapsed().as_micros() as u64);
            let h = String::from_utf8_lossy(&head[..p]).to_ascii_lowercase();
            r.status = h.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
            if r.status != 200 {
                let st = r.status; return fail(r, format!("status {st}"));
            }
            dec = Some(Decoder { chunked: h.contains("transfer-encoding: chunked"), st: Chunk::Size(Vec::new()) });
            let rest = head[p + 4..].to_vec();
            head.clear();
            head.extend_from_slice(&rest);
            data = &head[..];
            if data.is_empty() {
                continue;
            }
        }
        let d = dec.as_mut().unwrap();
        let before = payload.len();
        if let Err(e) = d.feed(data, &mut payload) {
            return fail(r, e);
        }
        if payload.len() > before {
            r.reads += 1;
        }
        let mut completed = 0;
        let mut start = 0;
        while let Some(p) = find(&payload[start..], b"\n\n") {
            let ev = &payload[start..start + p];
            start += p + 2;
            if find(ev, b"[DONE]").is_some() {
                done_seen = true; // the simulator writes it right after the last token
            } else {
                completed += 1;
                r.events += 1;
                if r.ttft_us.is_none() {
                    r.ttft_us = Some(since_write);
                }
                if let Some(sent) = sent_us(ev) {
                    r.delays.push(arrived as i64 - sent as i64);
                }
            }
        }
        payload.drain(..start);
        if completed > 1 {
            r.multi_reads += 1;
        }
        r.max_per_read = r.max_per_read.max(completed);
        if d.done() || done_seen && !d.chunked {
            if !d.chunked {
                // identity body: read until close
                continue;
            }
            break;
        }
    }
    let clean = dec.as_ref().map(|d| !d.chunked || d.done()).unwrap_or(false);
    r.ok = done_seen && r.events == tokens && clean;
    if !r.ok && r.error.is_none() {
        r.error = Some(format!("incomplete: events {} done {} clean {}", r.events, done_seen, clean));
    }
    r
}

fn pct(v: &[i64], p: f64) -> i64 {
    if v.is_empty() {
        return -1;
    }
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    if a.len() != 6 {
        eprintln!("usage: sseload ADDR STREAMS TOKENS INTERVAL_MS TIMEOUT_S");
        std::process::exit(2);
    }
    let addr = a[1].clone();
    let streams: usize = a[2].parse().unwrap();
    let tokens: usize = a[3].parse().unwrap();
    let interval: u64 = a[4].parse().unwrap();
    let timeout: u64 = a[5].parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(timeout);
    let barrier = Arc::new(Barrier::new(streams));
    let t0 = Instant::now();
    let mut hs = Vec::new();
    for _ in 0..streams {
        let addr = addr.clone();
        let b = barrier.clone();
        let h = std::thread::Builder::new().stack_size(256 * 1024).spawn(move || {
            b.wait();
            one(&addr, tokens, interval, deadline)
        });
        match h {
            Ok(h) => hs.push(h),
            Err(e) => {
                eprintln!("sseload: cannot spawn thread: {e}");
                std::process::exit(1);
            }
        }
    }
    let mut all = Vec::new();
    let (mut ok, mut events, mut reads, mut multi, mut maxper) = (0, 0, 0, 0, 0);
    let mut errors: std::collections::BTreeMap<String, usize> = Default::default();
    let mut ttfb: Vec<i64> = Vec::new();
    let mut ttft: Vec<i64> = Vec::new();
    let mut conn: Vec<i64> = Vec::new();
    for h in hs {
        let r = h.join().unwrap();
        if r.ok {
            ok += 1;
        }
        if let Some(e) = r.error {
            let key: String = e.chars().take(60).collect();
            *errors.entry(key).or_default() += 1;
        }
        events += r.events;
        reads += r.reads;
        multi += r.multi_reads;
        maxper = maxper.max(r.max_per_read);
        if let Some(t) = r.ttfb_us {
            ttfb.push(t as i64);
        }
        if let Some(t) = r.ttft_us {
            ttft.push(t as i64);
        }
        if let Some(t) = r.connect_us {
            conn.push(t as i64);
        }
        all.extend(r.delays);
    }
    all.sort_unstable();
    ttfb.sort_unstable();
    ttft.sort_unstable();
    conn.sort_unstable();
    let errs: Vec<String> = errors.iter().map(|(k, v)| format!("{:?}:{}", k, v)).collect();
    println!(
        "{{\"streams\":{streams},\"ok\":{ok},\"failed\":{},\"events\":{events},\"reads\":{reads},\"multi_event_reads\":{multi},\"max_events_per_read\":{maxper},\"lat_p50_us\":{},\"lat_p99_us\":{},\"lat_p999_us\":{},\"lat_max_us\":{},\"ttfb_p50_us\":{},\"ttfb_p99_us\":{},\"ttft_p50_us\":{},\"ttft_p99_us\":{},\"ttft_max_us\":{},\"connect_p50_us\":{},\"connect_p99_us\":{},\"connect_max_us\":{},\"wall_s\":{:.3},\"errors\":{{{}}}}}",
        streams - ok,
        pct(&all, 0.5),
        pct(&all, 0.99),
        pct(&all, 0.999),
        all.last().copied().unwrap_or(-1),
        pct(&ttfb, 0.5),
        pct(&ttfb, 0.99),
        pct(&ttft, 0.5),
        pct(&ttft, 0.99),
        ttft.last().copied().unwrap_or(-1),
        pct(&conn, 0.5),
        pct(&conn, 0.99),
        conn.last().copied().unwrap_or(-1),
        t0.elapsed().as_secs_f64(),
        errs.join(",")
    );
}
