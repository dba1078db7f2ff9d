//! `podproxy-pod-sim`: a simulated RunPod pod behind RunPod's HTTP proxy, for trying the
//! network-node bridge by hand. The mlnode and a vLLM server, each behind a Cloudflare-like
//! hop that answers 524 when no response head comes within the limit.
//!
//! Usage: podproxy-pod-sim [--poc ADDR] [--inference ADDR] [--limit-secs N]
//!                         [--start-secs N] [--prefill-secs N] [--start-error TEXT]
//! Defaults: poc 127.0.0.1:18080, inference 127.0.0.1:15000, limit 100 s (Cloudflare's),
//! start 120 s, prefill 0. Prints one line per server, then runs until SIGTERM/SIGINT.

use std::net::SocketAddr;
use std::time::Duration;
use testkit::cfhop::HeadTimeoutHop;
use testkit::mlnode::{MlnodeConfig, MlnodeSim};
use testkit::vllm::{VllmConfig, VllmSim};

fn usage(msg: &str) -> ! {
    eprintln!(
        "podproxy-pod-sim: {msg}\nusage: podproxy-pod-sim [--poc ADDR] [--inference ADDR] \
         [--limit-secs N] [--start-secs N] [--prefill-secs N] [--start-error TEXT]"
    );
    std::process::exit(2)
}

#[tokio::main]
async fn main() {
    let mut poc: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 18080));
    let mut inference: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 15000));
    let mut limit = Duration::from_secs(100);
    let mut mlnode = MlnodeConfig {
        inference_up_delay: Duration::from_secs(120),
        // After a failed start the real process exits within seconds.
        exit_after_failure: Some(Duration::from_secs(5)),
        ..Default::default()
    };
    let mut vllm = VllmConfig::default();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .unwrap_or_else(|| usage(&format!("{flag} needs a value")));
        let addr = || -> SocketAddr {
            value
                .parse()
                .unwrap_or_else(|_| usage(&format!("{flag}: bad address {value:?}")))
        };
        let secs = || -> Duration {
            Duration::from_secs_f64(
                value
                    .parse()
                    .unwrap_or_else(|_| usage(&format!("{flag}: bad number {value:?}"))),
            )
        };
        match flag.as_str() {
            "--poc" => poc = addr(),
            "--inference" => inference = addr(),
            "--limit-secs" => limit = secs(),
            "--start-secs" => mlnode.inference_up_delay = secs(),
            "--prefill-secs" => vllm.prefill = secs(),
            "--start-error" => mlnode.start_error = Some(value.clone()),
            other => usage(&format!("unknown flag {other}")),
        }
    }
    let fail = |what: &str, e: std::io::Error| -> ! {
        eprintln!("podproxy-pod-sim: cannot start {what}: {e}");
        std::process::exit(1)
    };
    let ml = MlnodeSim::start(mlnode)
        .await
        .unwrap_or_else(|e| fail("mlnode", e));
    let vl = VllmSim::start(vllm)
        .await
        .unwrap_or_else(|e| fail("vllm", e));
    let poc_hop = HeadTimeoutHop::start_on(poc, ml.addr(), limit)
        .await
        .unwrap_or_else(|e| fail("poc hop", e));
    let inf_hop = HeadTimeoutHop::start_on(inference, vl.addr(), limit)
        .await
        .unwrap_or_else(|e| fail("inference hop", e));
    println!("mlnode {}", ml.url());
    println!("vllm {}", vl.url());
    println!(
        "poc-hop {} -> {} (524 after {limit:?})",
        poc_hop.url(),
        ml.url()
    );
    println!(
        "inference-hop {} -> {} (524 after {limit:?})",
        inf_hop.url(),
        vl.url()
    );
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => fail("signal handler", e),
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    eprintln!(
        "podproxy-pod-sim: stopping; hops cut {} / {} requests with 524",
        poc_hop.cut(),
        inf_hop.cut()
    );
}
