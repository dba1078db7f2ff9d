//! Criterion micro-benchmarks of podproxy's per-request hot path (issue #8):
//! route match + header rewrite, the PoC callback body check (10 KB and 30 MB bodies) and
//! SSE event scanning for metrics.
//!
//!   cargo bench --bench hot_path                 # all
//!   cargo bench --bench hot_path -- sse_scan     # a subset (criterion filter)
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use http::{HeaderMap, HeaderValue};
use proxy::config::Config;
use proxy::headers::{client_ip_value, remove_hop_by_hop, set_forwarded};
use proxy::metrics::SseScan;
use proxy::poc::{Poc, PocConfig};
use proxy::route::RouteTable;

const CONFIG: &str = r#"
[listeners.poc]
bind = "127.0.0.1:18080"
strip_version_prefix = true
routes = [
  { prefix = "/v1/", upstream = "vllm" },
  { prefix = "/api/v1/inference/", upstream = "mlnode" },
  { prefix = "/api/", upstream = "mlnode", strip_prefix = true },
  { prefix = "/", upstream = "mlnode", poc = true },
]
[upstreams.mlnode]
urls = "http://127.0.0.1:8081"
[upstreams.vllm]
urls = "http://127.0.0.1:5001"
"#;

fn request_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in [
        ("host", "203.0.113.7:5050"),
        ("user-agent", "python-httpx/0.27.0"),
        ("accept", "text/event-stream"),
        ("accept-encoding", "gzip, deflate"),
        ("connection", "keep-alive, x-hop"),
        ("x-hop", "1"),
        ("keep-alive", "timeout=5"),
        ("content-type", "application/json"),
        ("content-length", "412"),
        ("authorization", "Bearer 0123456789abcdef"),
        ("x-forwarded-for", "198.51.100.4"),
        ("x-request-id", "5f0c6c1e-8a55-4d8e-b3c2-1f6a4c2d9e10"),
    ] {
        h.append(k, HeaderValue::from_static(v));
    }
    h
}

fn route_and_headers(c: &mut Criterion) {
    let cfg = Config::from_toml(CONFIG).expect("bench config");
    let listener = &cfg.listeners[0];
    let table = RouteTable::new(listener, |n| cfg.upstream_index(n));
    let mut g = c.benchmark_group("route_headers");
    for target in [
        "/v1/chat/completions",
        "/v3.0.8/api/v1/inference/pow/init/generate",
        "/v2/poc-batches/Qwen%252FQwen3-32B-FP8//generated?a=%2F",
    ] {
        g.bench_function(format!("resolve {target}"), |b| {
            b.iter(|| {
                black_box(
                    table
                        .resolve(black_box(target))
                        .map(|m| m.path_and_query.len()),
                )
            })
        });
    }
    let base = request_headers();
    let client = client_ip_value(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10)));
    g.bench_function("remove_hop_by_hop + set_forwarded (12 headers)", |b| {
        b.iter_batched(
            || base.clone(),
            |mut h| {
                remove_hop_by_hop(&mut h);
                set_forwarded(&mut h, &client, "http");
                h
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("resolve + header rewrite", |b| {
        b.iter_batched(
            || base.clone(),
            |mut h| {
                let m = table
                    .resolve("/v1/chat/completions")
                    .map(|m| m.path_and_query);
                remove_hop_by_hop(&mut h);
                set_forwarded(&mut h, &client, "http");
                (m, h)
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

/// A PoC init/generate body about `size` bytes long: the callback `url` first, then a
/// large numeric array (the shape of real validate bodies).
fn poc_body(size: usize) -> Bytes {
    let mut s = String::with_capacity(size + 256);
    s.push_str(r#"{"block_hash":"0x4f2a9c","block_height":812345,"public_key":"Ah3x","node_id":3,"node_count":8,"#);
    s.push_str(r#""url":"http://api:9100/v2/poc-batches/Qwen%252FQwen3-32B-FP8","params":{"dim":1024,"n_layers":32,"r_target":1.4013564660458173,"eps":1e-07},"nonces":["#);
    let mut i = 0u64;
    while s.len() < size {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&(i * 7919 % 1_000_003).to_string());
        i += 1;
    }
    s.push_str("]}");
    Bytes::from(s)
}

fn poc_check(c: &mut Criterion) {
    let poc = Poc::new(PocConfig {
        callback_origin: Some("http://203.0.113.7:9100".into()),
        ..PocConfig::default()
    });
    let mut g = c.benchmark_group("poc_check");
    for (name, size, samples) in [("10KB", 10 * 1024, 100), ("30MB", 30 << 20, 10)] {
        let body = poc_body(size);
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.sample_size(samples);
        // Bytes clones are a refcount bump: the check itself is measured.
        g.bench_function(name, |b| b.iter(|| black_box(poc.check(body.clone()))));
    }
    g.finish();
}

fn sse_scan(c: &mut Criterion) {
    let event = format!(
        "data: {}\n\n",
        r#"{"id":"chatcmpl-sim1","object":"chat.completion.chunk","created":1764201600,"model":"Qwen/Qwen3-32B-FP8","choices":[{"index":0,"delta":{"content":" tok17"},"logprobs":null,"finish_reason":null}]}"#
    );
    let one = Bytes::from(event.clone());
    let many = Bytes::from(event.repeat(64 * 1024 / event.len()));
    let mut g = c.benchmark_group("sse_scan");
    g.throughput(Throughput::Bytes(one.len() as u64));
    g.bench_function("one event frame", |b| {
        let mut s = SseScan::default();
        b.iter(|| black_box(s.scan(black_box(&one))))
    });
    g.throughput(Throughput::Bytes(many.len() as u64));
    g.bench_function("64 KB frame of events", |b| {
        let mut s = SseScan::default();
        b.iter(|| black_box(s.scan(black_box(&many))))
    });
    g.finish();
}

criterion_group!(benches, route_and_headers, poc_check, sse_scan);
criterion_main!(benches);
