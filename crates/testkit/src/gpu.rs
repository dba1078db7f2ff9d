//! The GPU-like engine of the vLLM simulator ([`VllmConfig::gpu`](crate::vllm::VllmConfig)):
//! what makes LLM-aware balancing measurable end to end.
//!
//! - A fixed number of **decode slots** (vLLM's `max_num_seqs`) and a **KV budget** in
//!   tokens, in blocks of `block_tokens`. A request is admitted when a slot is free and its
//!   blocks (prompt + `max_tokens`) fit; otherwise it waits in a FIFO **waiting queue**.
//! - **Prefill** runs one request at a time per engine (the GPU is busy), taking
//!   `prefill_per_token` × the prompt tokens *not* found in the **prefix cache**: an LRU of
//!   token-block hashes, each block hash chained to the one before it (as vLLM's is), so
//!   only a shared prefix hits. Cached blocks live in the KV memory that admitted requests
//!   do not hold: admitting a request evicts least-recently-used blocks down to
//!   `kv_blocks - held` (pessimistic: a running request's own cached blocks count twice).
//! - **Decode** produces one token per request every `token_interval`, whatever the batch.
//! - `GET /metrics` answers in vLLM's exposition format with vLLM's names and a
//!   `model_name` label: `vllm:num_requests_running`, `vllm:num_requests_waiting`,
//!   `vllm:kv_cache_usage_perc`, `vllm:prefix_cache_queries_total`,
//!   `vllm:prefix_cache_hits_total` (tokens) and `vllm:request_success_total`.
//!
//! Tokens are whitespace-separated words (ids from the word), as the simulator's
//! `/tokenize` counts them. A chat prompt is each message's role and content in order.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::Notify;

/// The engine's shape.
#[derive(Clone, Debug)]
pub struct GpuConfig {
    /// Requests decoding at once (default 8).
    pub decode_slots: usize,
    /// KV-cache budget in tokens (default 65,536).
    pub kv_tokens: usize,
    /// Tokens per KV block (default 16, vLLM's).
    pub block_tokens: usize,
    /// Prefill time per uncached prompt token (default 100 µs: 4,000 tokens = 0.4 s).
    pub prefill_per_token: Duration,
}

impl Default for GpuConfig {
    fn default() -> Self {
        GpuConfig {
            decode_slots: 8,
            kv_tokens: 65_536,
            block_tokens: 16,
            prefill_per_token: Duration::from_micros(100),
        }
    }
}

/// A snapshot of the engine, for tests and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GpuStats {
    pub running: usize,
    pub waiting: usize,
    pub held_blocks: usize,
    pub cached_blocks: usize,
    /// Prompt tokens looked up in the prefix cache, and how many were found.
    pub prefix_queries: u64,
    pub prefix_hits: u64,
    /// Requests that finished their generation.
    pub finished: u64,
}

struct Sched {
    running: usize,
    held: usize,
    waiting: VecDeque<u64>,
    /// block hash → last use; `order` is the reverse index (LRU first).
    cache: HashMap<u64, u64>,
    order: BTreeMap<u64, u64>,
    tick: u64,
}

impl Sched {
    fn touch(&mut self, h: u64) {
        self.tick += 1;
        if let Some(old) = self.cache.insert(h, self.tick) {
            self.order.remove(&old);
        }
        self.order.insert(self.tick, h);
    }

    fn trim(&mut self, cap: usize) {
        while self.cache.len() > cap {
            let Some((_, h)) = self.order.pop_first() else {
                break;
            };
            self.cache.remove(&h);
        }
    }
}

/// One simulated GPU engine.
pub struct Engine {
    cfg: GpuConfig,
    model: String,
    total_blocks: usize,
    sched: Mutex<Sched>,
    changed: Notify,
    prefill: tokio::sync::Mutex<()>,
    next_id: AtomicU64,
    queries: AtomicU64,
    hits: AtomicU64,
    finished: AtomicU64,
}

/// A request's prompt as the engine sees it.
pub struct Prompt {
    pub tokens: usize,
    /// Chained hashes of the full blocks, in order.
    blocks: Vec<u64>,
}

fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn word_id(w: &str) -> u64 {
    w.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The prompt of a completions or chat request body.
pub fn prompt_of(req: &Value, block_tokens: usize) -> Prompt {
    let mut words: Vec<u64> = Vec::new();
    if let Some(p) = req.get("prompt").and_then(Value::as_str) {
        words.extend(p.split_whitespace().map(word_id));
    }
    if let Some(msgs) = req.get("messages").and_then(Value::as_array) {
        for m in msgs {
            if let Some(r) = m.get("role").and_then(Value::as_str) {
                words.push(word_id(r));
            }
            if let Some(c) = m.get("content").and_then(Value::as_str) {
                words.extend(c.split_whitespace().map(word_id));
            }
        }
    }
    let block_tokens = block_tokens.max(1);
    let mut blocks = Vec::with_capacity(words.len() / block_tokens);
    let mut h = 0u64;
    for chunk in words.chunks_exact(block_tokens) {
        for w in chunk {
            h = mix(h ^ w);
        }
        blocks.push(h);
    }
    Prompt {
        tokens: words.len().max(1),
        blocks,
    }
}

impl Engine {
    pub fn new(cfg: GpuConfig, model: String) -> Arc<Engine> {
        let block = cfg.block_tokens.max(1);
        let total_blocks = (cfg.kv_tokens / block).max(1);
        Arc::new(Engine {
            total_blocks,
            cfg: GpuConfig {
                block_tokens: block,
                decode_slots: cfg.decode_slots.max(1),
                ..cfg
            },
            model,
            sched: Mutex::new(Sched {
                running: 0,
                held: 0,
                waiting: VecDeque::new(),
                cache: HashMap::new(),
                order: BTreeMap::new(),
                tick: 0,
            }),
            changed: Notify::new(),
            prefill: tokio::sync::Mutex::new(()),
            next_id: AtomicU64::new(1),
            queries: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            finished: AtomicU64::new(0),
        })
    }

    pub fn block_tokens(&self) -> usize {
        self.cfg.block_tokens
    }

    pub fn stats(&self) -> GpuStats {
        let (running, waiting, held, cached) = match self.sched.lock() {
            Ok(s) => (s.running, s.waiting.len(), s.held, s.cache.len()),
            Err(_) => (0, 0, 0, 0),
        };
        GpuStats {
            running,
            waiting,
            held_blocks: held,
            cached_blocks: cached,
            prefix_queries: self.queries.load(Ordering::Relaxed),
            prefix_hits: self.hits.load(Ordering::Relaxed),
            finished: self.finished.load(Ordering::Relaxed),
        }
    }

    /// Waits in the FIFO queue for a slot and the KV blocks of `prompt` + `max_tokens`.
    /// Dropping the future leaves the queue (a client that gave up).
    pub async fn admit(self: &Arc<Self>, prompt: &Prompt, max_tokens: usize) -> Slot {
        let need = prompt
            .tokens
            .saturating_add(max_tokens)
            .div_ceil(self.cfg.block_tokens)
            .clamp(1, self.total_blocks);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut s) = self.sched.lock() {
            s.waiting.push_back(id);
        }
        let mut queued = Queued {
            engine: self.clone(),
            id,
            admitted: false,
        };
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Ok(mut s) = self.sched.lock() {
                let fits = s.running < self.cfg.decode_slots && s.held + need <= self.total_blocks;
                if s.waiting.front() == Some(&id) && fits {
                    s.waiting.pop_front();
                    s.running += 1;
                    s.held += need;
                    let cap = self.total_blocks.saturating_sub(s.held);
                    s.trim(cap);
                    queued.admitted = true;
                    // The next in line may fit too.
                    self.changed.notify_waiters();
                    return Slot {
                        engine: self.clone(),
                        blocks: need,
                        done: false,
                    };
                }
            }
            notified.await;
        }
    }

    /// Prefill: one request at a time, for the uncached part of the prompt. Returns the
    /// prompt tokens found in the prefix cache.
    pub async fn prefill(&self, prompt: &Prompt) -> usize {
        let _gpu = self.prefill.lock().await;
        let cached_blocks = match self.sched.lock() {
            Ok(mut s) => {
                let n = prompt
                    .blocks
                    .iter()
                    .take_while(|h| s.cache.contains_key(h))
                    .count();
                for &h in &prompt.blocks[..n] {
                    s.touch(h);
                }
                n
            }
            Err(_) => 0,
        };
        let hit = (cached_blocks * self.cfg.block_tokens).min(prompt.tokens);
        self.queries
            .fetch_add(prompt.tokens as u64, Ordering::Relaxed);
        self.hits.fetch_add(hit as u64, Ordering::Relaxed);
        let uncached = u32::try_from(prompt.tokens - hit).unwrap_or(u32::MAX);
        let time = self.cfg.prefill_per_token.saturating_mul(uncached);
        if !time.is_zero() {
            tokio::time::sleep(time).await;
        }
        if let Ok(mut s) = self.sched.lock() {
            for &h in &prompt.blocks[cached_blocks..] {
                s.touch(h);
            }
            let cap = self.total_blocks.saturating_sub(s.held);
            s.trim(cap);
        }
        hit
    }

    /// `/metrics` in vLLM's Prometheus format.
    pub fn metrics_text(&self) -> String {
        let st = self.stats();
        let m = self.model.replace('\\', "\\\\").replace('"', "\\\"");
        let l = format!("{{engine=\"0\",model_name=\"{m}\"}}");
        let kv = st.held_blocks as f64 / self.total_blocks as f64;
        format!(
            "# HELP vllm:num_requests_running Number of requests in model execution batches.\n\
             # TYPE vllm:num_requests_running gauge\n\
             vllm:num_requests_running{l} {running:.1}\n\
             # HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n\
             # TYPE vllm:num_requests_waiting gauge\n\
             vllm:num_requests_waiting{l} {waiting:.1}\n\
             # HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.\n\
             # TYPE vllm:kv_cache_usage_perc gauge\n\
             vllm:kv_cache_usage_perc{l} {kv}\n\
             # HELP vllm:prefix_cache_queries Prefix cache queries, in terms of number of queried tokens.\n\
             # TYPE vllm:prefix_cache_queries counter\n\
             vllm:prefix_cache_queries_total{l} {q:.1}\n\
             # HELP vllm:prefix_cache_hits Prefix cache hits, in terms of number of cached tokens.\n\
             # TYPE vllm:prefix_cache_hits counter\n\
             vllm:prefix_cache_hits_total{l} {h:.1}\n\
             # HELP vllm:request_success Count of successfully processed requests.\n\
             # TYPE vllm:request_success counter\n\
             vllm:request_success_total{{engine=\"0\",finished_reason=\"length\",model_name=\"{m}\"}} {f:.1}\n",
            running = st.running as f64,
            waiting = st.waiting as f64,
            q = st.prefix_queries as f64,
            h = st.prefix_hits as f64,
            f = st.finished as f64,
        )
    }
}

/// A place in the waiting queue; leaves it when dropped before admission.
struct Queued {
    engine: Arc<Engine>,
    id: u64,
    admitted: bool,
}

impl Drop for Queued {
    fn drop(&mut self) {
        if self.admitted {
            return;
        }
        if let Ok(mut s) = self.engine.sched.lock() {
            s.waiting.retain(|&i| i != self.id);
        }
        self.engine.changed.notify_waiters();
    }
}

/// A decode slot and the request's KV blocks, held until the generation ends or is
/// abandoned.
pub struct Slot {
    engine: Arc<Engine>,
    blocks: usize,
    done: bool,
}

impl Slot {
    /// The generation ran to its end (counted in `request_success`).
    pub fn finished(&mut self) {
        self.done = true;
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.done {
            self.engine.finished.fetch_add(1, Ordering::Relaxed);
        }
        if let Ok(mut s) = self.engine.sched.lock() {
            s.running = s.running.saturating_sub(1);
            s.held = s.held.saturating_sub(self.blocks);
        }
        self.engine.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn chat(system: &str, user: &str) -> Value {
        json!({"messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]})
    }

    fn words(n: usize, tag: &str) -> String {
        (0..n).map(|i| format!("{tag}{i} ")).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_shared_prefix_hits_the_cache_and_prefills_faster() {
        let e = Engine::new(GpuConfig::default(), "m".into());
        let sys = words(320, "s");
        let a = prompt_of(&chat(&sys, "first question"), 16);
        let b = prompt_of(&chat(&sys, "another one here"), 16);
        let slot = e.admit(&a, 4).await;
        let t = tokio::time::Instant::now();
        assert_eq!(e.prefill(&a).await, 0);
        let cold = t.elapsed();
        drop(slot);
        let _slot = e.admit(&b, 4).await;
        let t = tokio::time::Instant::now();
        let hit = e.prefill(&b).await;
        let warm = t.elapsed();
        // "system" + 320 words = 321 tokens: 20 full blocks shared.
        assert_eq!(hit, 320);
        assert!(warm * 10 < cold, "warm {warm:?} cold {cold:?}");
        let st = e.stats();
        assert_eq!(st.prefix_hits, 320);
        assert_eq!(st.prefix_queries as usize, a.tokens + b.tokens);
    }

    #[tokio::test(start_paused = true)]
    async fn requests_beyond_the_slots_wait_in_order() {
        let e = Engine::new(
            GpuConfig {
                decode_slots: 1,
                ..Default::default()
            },
            "m".into(),
        );
        let p = prompt_of(&json!({"prompt": "a b c"}), 16);
        let first = e.admit(&p, 4).await;
        let e2 = e.clone();
        let p2 = prompt_of(&json!({"prompt": "a b c"}), 16);
        let second = tokio::spawn(async move { e2.admit(&p2, 4).await.blocks });
        tokio::task::yield_now().await;
        assert_eq!(e.stats().waiting, 1);
        assert!(e
            .metrics_text()
            .contains("vllm:num_requests_waiting{engine=\"0\",model_name=\"m\"} 1.0"));
        drop(first);
        assert_eq!(second.await.ok(), Some(1));
        assert_eq!(e.stats().waiting, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_kv_budget_limits_admission_and_evicts_the_cache() {
        let e = Engine::new(
            GpuConfig {
                kv_tokens: 160,
                ..Default::default()
            },
            "m".into(),
        );
        let big = prompt_of(&json!({"prompt": words(128, "x")}), 16);
        let slot = e.admit(&big, 16).await; // 144 tokens = 9 of 10 blocks
        e.prefill(&big).await;
        assert_eq!(
            e.stats().cached_blocks,
            1,
            "cache trimmed to the free block"
        );
        assert!(e
            .metrics_text()
            .contains("vllm:kv_cache_usage_perc{engine=\"0\",model_name=\"m\"} 0.9"));
        let e2 = e.clone();
        let other = prompt_of(&json!({"prompt": words(40, "y")}), 16);
        let waiting = tokio::spawn(async move {
            let _s = e2.admit(&other, 0).await;
        });
        tokio::task::yield_now().await;
        assert_eq!(e.stats().waiting, 1, "3 blocks do not fit in 1");
        drop(slot);
        assert!(waiting.await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_gives_up_leaves_the_queue() {
        let e = Engine::new(
            GpuConfig {
                decode_slots: 1,
                ..Default::default()
            },
            "m".into(),
        );
        let p = prompt_of(&json!({"prompt": "a"}), 16);
        let _held = e.admit(&p, 1).await;
        let e2 = e.clone();
        let p2 = prompt_of(&json!({"prompt": "a"}), 16);
        let gave_up = tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_millis(10), e2.admit(&p2, 1)).await;
        });
        assert!(gave_up.await.is_ok());
        assert_eq!(e.stats().waiting, 0);
    }
}
