//! Integrity: random-content bodies from 0 B to 16 MiB (256 MiB in the ignored
//! `huge_bodies_256_mib`) in both directions through podproxy, many at once, compared by SHA-256
//! end to end without ever holding a big body in memory. Zero mismatches.
//!
//! - upload: `POST /sink` — the backend hashes what it received and answers `{len, sha256}`;
//! - round trip: `POST /echo` — the backend streams the body back; both the backend's
//!   record and the client's received bytes are hashed;
//! - download: `GET /bytes/N` — the client hashes what arrives and compares with
//!   `pattern_sha256(BYTES_SEED, N)`.

mod support;

use http::Request;
use http_body_util::BodyExt;
use std::time::Duration;
use support::*;
use testkit::client::{empty, http_client, HttpClient, TkBody};
use testkit::data::{pattern_sha256, PatternStream, StreamDigest};
use testkit::echo::{EchoServer, BYTES_SEED};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

/// Per-exchange bound: generous for 256 MiB in a debug build on a loaded machine.
const EXCHANGE: Duration = Duration::from_secs(120);

fn pattern_body(seed: u64, len: u64) -> TkBody {
    PatternStream::new(seed, len)
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Streams a response body into a digest, frame by frame.
async fn digest_body(resp: http::Response<hyper::body::Incoming>) -> StreamDigest {
    let mut body = resp.into_body();
    let mut d = StreamDigest::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.expect("response body failed");
        if let Some(data) = frame.data_ref() {
            d.update(data);
        }
    }
    d
}

async fn upload_sink(client: &HttpClient, base: &str, seed: u64, len: u64) {
    let req = Request::post(format!("{base}/sink"))
        .body(pattern_body(seed, len))
        .unwrap();
    let resp = tokio::time::timeout(EXCHANGE, async {
        let resp = client.request(req).await.expect("sink request");
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.unwrap().to_bytes()
    })
    .await
    .unwrap_or_else(|_| panic!("sink {len} B timed out"));
    let v: serde_json::Value = serde_json::from_slice(&resp).expect("sink JSON");
    assert_eq!(v["len"], len, "sink length, seed {seed}");
    assert_eq!(
        v["sha256"].as_str().unwrap(),
        pattern_sha256(seed, len),
        "sink hash mismatch, {len} B seed {seed}"
    );
}

async fn round_trip_echo(client: &HttpClient, base: &str, seed: u64, len: u64) {
    let req = Request::post(format!("{base}/echo"))
        .body(pattern_body(seed, len))
        .unwrap();
    let d = tokio::time::timeout(EXCHANGE, async {
        let resp = client.request(req).await.expect("echo request");
        assert_eq!(resp.status(), 200);
        digest_body(resp).await
    })
    .await
    .unwrap_or_else(|_| panic!("echo {len} B timed out"));
    assert_eq!(d.len(), len, "echo length, seed {seed}");
    assert_eq!(
        d.hex(),
        pattern_sha256(seed, len),
        "echo hash mismatch, {len} B seed {seed}"
    );
}

async fn download_bytes(client: &HttpClient, base: &str, len: u64) {
    let req = Request::get(format!("{base}/bytes/{len}"))
        .body(empty())
        .unwrap();
    let d = tokio::time::timeout(EXCHANGE, async {
        let resp = client.request(req).await.expect("bytes request");
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-length"], len.to_string().as_str());
        digest_body(resp).await
    })
    .await
    .unwrap_or_else(|_| panic!("download {len} B timed out"));
    assert_eq!(d.len(), len);
    assert_eq!(
        d.hex(),
        pattern_sha256(BYTES_SEED, len),
        "download hash mismatch, {len} B"
    );
}

async fn setup() -> (EchoServer, Proxy) {
    let echo = EchoServer::start().await.unwrap();
    let proxy = Proxy::simple(&echo.url(), "").await;
    (echo, proxy)
}

const SIZES: [u64; 9] = [
    0,
    1,
    KIB,
    64 * KIB - 1,
    64 * KIB + 1,
    256 * KIB + 7,
    MIB,
    4 * MIB + 3,
    16 * MIB,
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_size_every_direction_sequential() {
    let (echo, proxy) = setup().await;
    let base = proxy.url("main");
    let client = http_client();
    for (i, &len) in SIZES.iter().enumerate() {
        let seed = 1000 + i as u64;
        upload_sink(&client, &base, seed, len).await;
        round_trip_echo(&client, &base, seed, len).await;
        download_bytes(&client, &base, len).await;
    }
    // The backend's own record of each `/echo` body matches too.
    let echoed: Vec<_> = proxied(&echo.recorder())
        .into_iter()
        .filter(|r| r.target == "/echo")
        .collect();
    assert_eq!(echoed.len(), SIZES.len());
    for (i, r) in echoed.iter().enumerate() {
        assert_eq!(r.body_len, SIZES[i]);
        assert_eq!(r.body_sha256_hex, pattern_sha256(1000 + i as u64, SIZES[i]));
    }
    eventually("in-flight back to 0", || proxy.in_flight() == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_mixed_bodies() {
    let (_echo, proxy) = setup().await;
    let base = proxy.url("main");
    let client = http_client();
    // 48 exchanges, 16 at a time, sizes cycling through 0 B .. 4 MiB.
    let sizes = [0, 1, KIB, 64 * KIB + 1, 300 * KIB, MIB, 4 * MIB + 5, 17];
    let mut set = tokio::task::JoinSet::new();
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(16));
    for i in 0..48u64 {
        let client = client.clone();
        let base = base.clone();
        let sem = sem.clone();
        let len = sizes[(i as usize) % sizes.len()];
        set.spawn(async move {
            let _permit = sem.acquire_owned().await.unwrap();
            match i % 3 {
                0 => upload_sink(&client, &base, 5000 + i, len).await,
                1 => round_trip_echo(&client, &base, 5000 + i, len).await,
                _ => download_bytes(&client, &base, len).await,
            }
        });
    }
    let mut done = 0;
    bounded("concurrent exchanges", async {
        while let Some(r) = set.join_next().await {
            r.expect("exchange task");
            done += 1;
        }
    })
    .await;
    assert_eq!(done, 48);
    eventually("in-flight back to 0", || proxy.in_flight() == 0).await;
}

/// 256 MiB up and 256 MiB down (and round trip). Slow in a debug build: run it with
/// `cargo test --release --test integrity -- --ignored` (scripts/soak.sh does).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "256 MiB each way: minutes in a debug build; run with --ignored (scripts/soak.sh does)"]
async fn huge_bodies_256_mib() {
    let (_echo, proxy) = setup().await;
    let base = proxy.url("main");
    let client = http_client();
    let len = 256 * MIB;
    let (a, b) = tokio::join!(
        upload_sink(&client, &base, 77, len),
        download_bytes(&client, &base, len)
    );
    let ((), ()) = (a, b);
    round_trip_echo(&client, &base, 78, len + 1).await;
    eventually("in-flight back to 0", || proxy.in_flight() == 0).await;
}
