//! `podproxy-sim`: the testkit backends as a process, for scripts and benchmarks that run
//! podproxy as a separate binary (scratch check, load comparison).
//!
//! Usage: podproxy-sim [--vllm ADDR]... [--mlnode ADDR]... [--sink ADDR] [--echo ADDR]
//!                     [--token-interval-ms N] [--tokens N]
//!                     [--gpu-slots N] [--kv-tokens N] [--prefill-us-per-token N]
//! Any `--gpu-*`/`--kv-tokens`/`--prefill-us-per-token` flag puts the vLLM simulators in
//! their GPU-like mode (testkit::gpu), with defaults for the others.
//! Prints one line per server, `<kind> http://<addr>`, then runs until SIGTERM/SIGINT.

use std::net::SocketAddr;
use std::time::Duration;
use testkit::vllm::{VllmConfig, VllmSim};

fn usage(msg: &str) -> ! {
    eprintln!("podproxy-sim: {msg}\nusage: podproxy-sim [--vllm ADDR]... [--mlnode ADDR] [--sink ADDR] [--echo ADDR] [--token-interval-ms N] [--tokens N] [--gpu-slots N] [--kv-tokens N] [--prefill-us-per-token N]");
    std::process::exit(2)
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let (mut vllm, mut mlnode, mut sink, mut echo) = (Vec::new(), Vec::new(), None, None);
    let mut cfg = VllmConfig::default();
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .unwrap_or_else(|| usage(&format!("{flag} needs a value")));
        let addr = || -> SocketAddr {
            value
                .parse()
                .unwrap_or_else(|_| usage(&format!("{flag}: bad address {value:?}")))
        };
        let num = || -> u64 {
            value
                .parse()
                .unwrap_or_else(|_| usage(&format!("{flag}: bad number {value:?}")))
        };
        match flag.as_str() {
            "--vllm" => vllm.push(addr()),
            "--mlnode" => mlnode.push(addr()),
            "--sink" => sink = Some(addr()),
            "--echo" => echo = Some(addr()),
            "--token-interval-ms" => cfg.token_interval = Duration::from_millis(num()),
            "--tokens" => cfg.tokens = num() as usize,
            "--gpu-slots" => {
                cfg.gpu.get_or_insert_with(Default::default).decode_slots = num() as usize
            }
            "--kv-tokens" => {
                cfg.gpu.get_or_insert_with(Default::default).kv_tokens = num() as usize
            }
            "--prefill-us-per-token" => {
                cfg.gpu
                    .get_or_insert_with(Default::default)
                    .prefill_per_token = Duration::from_micros(num())
            }
            other => usage(&format!("unknown flag {other}")),
        }
    }
    let fail = |what: &str, e: std::io::Error| -> ! {
        eprintln!("podproxy-sim: cannot start {what}: {e}");
        std::process::exit(1)
    };
    let mut vllm_sims = Vec::new();
    for a in vllm {
        let s = VllmSim::start_on(a, cfg.clone())
            .await
            .unwrap_or_else(|e| fail("vllm", e));
        println!("vllm {}", s.url());
        vllm_sims.push(s);
    }
    let mut mlnode_sims = Vec::new();
    for a in mlnode {
        let s = testkit::mlnode::MlnodeSim::start_on(a, Default::default())
            .await
            .unwrap_or_else(|e| fail("mlnode", e));
        println!("mlnode {}", s.url());
        mlnode_sims.push(s);
    }
    let _sink = match sink {
        Some(a) => {
            let s = testkit::sink::CallbackSink::start_on(a)
                .await
                .unwrap_or_else(|e| fail("sink", e));
            println!("sink {}", s.url());
            Some(s)
        }
        None => None,
    };
    let _echo = match echo {
        Some(a) => {
            let s = testkit::echo::EchoServer::start_on(a)
                .await
                .unwrap_or_else(|e| fail("echo", e));
            println!("echo {}", s.url());
            Some(s)
        }
        None => None,
    };
    println!("ready");
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(t) => t,
        Err(e) => fail("signal handler", e),
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
