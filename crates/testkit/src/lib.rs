//! Simulated backends for podproxy's tests, benchmarks and `podproxy demo`.
//!
//! Every server here is a plain hyper 1 HTTP/1.1 server bound to loopback (or a given
//! address) with keep-alive and `TCP_NODELAY`, so that timing measured through the proxy
//! reflects the proxy and not the simulator. Every handle can be [`killed`](vllm::VllmSim::kill)
//! abruptly (listener closed and every open connection dropped without a clean HTTP end),
//! which is how tests simulate a backend dying mid-stream; dropping a handle does the same.
//!
//! Modules:
//! - [`record`]: what each server received, byte for byte, with event-driven waiting.
//! - [`vllm`]: an OpenAI-compatible vLLM server that streams SSE tokens on a schedule and
//!   counts generations abandoned by the peer.
//! - [`gpu`]: the vLLM simulator's GPU-like mode (decode slots, KV budget, waiting queue,
//!   prefix cache, vLLM's `/metrics`), for comparing balancing policies.
//! - [`mlnode`]: Gonka's mlnode management / PoC API, with the inference start API.
//! - [`cfhop`]: a Cloudflare-like hop that answers 524 when no response head comes in time.
//! - [`echo`]: a generic backend (echo, byte generator, sink, status, SSE, hang).
//! - [`sink`]: the Network Node's PoC callback server.
//! - [`data`]: deterministic bulk data and streaming hashes for very large bodies.
//! - [`sse`]: client-side SSE reader that measures framing and arrival times.
//! - [`client`]: body type aliases and a small hyper client for tests.

pub mod cfhop;
pub mod client;
pub mod data;
pub mod echo;
pub mod gpu;
pub mod mlnode;
pub mod record;
mod server;
pub mod sink;
pub mod sse;
pub mod vllm;

pub use client::{BoxError, TkBody};
pub use record::{Recorded, Recorder};
