//! `podproxy-sim`: the testkit backends as a process, for scripts and benchmarks that run
//! podproxy as a separate binary (scratch check, load comparison).
//!
//! Usage: podproxy-sim [--vllm ADDR]... [--mlnode ADDR]... [--sink ADDR] [--echo ADDR]
//!                     [--token-interval-ms N] [--tokens N] [--strict-content-type]
//!                     [--print-requests] [--gpu-slots N] [--kv-tokens N]
//!                     [--prefill-us-per-token N]
//! Any `--gpu-*`/`--kv-tokens`/`--prefill-us-per-token` flag puts the vLLM simulators in
//! their GPU-like mode (testkit::gpu), with defaults for the others.
//! Prints one line per server, `<kind> http://<addr>`, then `ready`, then runs until
//! SIGTERM/SIGINT. `--strict-content-type` makes the mlnode and vLLM simulators answer a
//! JSON body without `Content-Type` 422, as current FastAPI does. `--print-requests` prints
//! one line per request an mlnode or vLLM simulator received, `request {"kind":..,
//! "method":..,"target":..,"content_type":..,"body":..}` (body decoded as UTF-8, lossily),
//! so a script can read what a proxy forwarded from the process output (e.g. `podman logs`).

use std::net::SocketAddr;
use std::time::Duration;
use testkit::mlnode::MlnodeConfig;
use testkit::vllm::{VllmConfig, VllmSim};
use testkit::Recorder;

fn usage(msg: &str) -> ! {
    eprintln!("podproxy-sim: {msg}\nusage: podproxy-sim [--vllm ADDR]... [--mlnode ADDR] [--sink ADDR] [--echo ADDR] [--token-interval-ms N] [--tokens N] [--strict-content-type] [--print-requests] [--gpu-slots N] [--kv-tokens N] [--prefill-us-per-token N]");
    std::process::exit(2)
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let (mut vllm, mut mlnode, mut sink, mut echo) = (Vec::new(), Vec::new(), None, None);
    let mut cfg = VllmConfig::default();
    let mut mlnode_cfg = MlnodeConfig::default();
    let mut print_requests = false;
    while let Some(flag) = args.next() {
        match flag.as_str() {
            "--strict-content-type" => {
                cfg.strict_content_type = true;
                mlnode_cfg.strict_content_type = true;
                continue;
            }
            "--print-requests" => {
                print_requests = true;
                continue;
            }
            _ => {}
        }
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
        if print_requests {
            tokio::spawn(print_recorded("vllm", s.recorder()));
        }
        vllm_sims.push(s);
    }
    let mut mlnode_sims = Vec::new();
    for a in mlnode {
        let s = testkit::mlnode::MlnodeSim::start_on(a, mlnode_cfg.clone())
            .await
            .unwrap_or_else(|e| fail("mlnode", e));
        println!("mlnode {}", s.url());
        if print_requests {
            tokio::spawn(print_recorded("mlnode", s.recorder()));
        }
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

/// Prints every request `recorder` records, in order, as one `request {json}` line each.
async fn print_recorded(kind: &'static str, recorder: Recorder) {
    let mut printed = 0;
    loop {
        // Wakes on every push; the long timeout only bounds one wait, not the loop's life.
        if !recorder
            .wait_for(printed + 1, Duration::from_secs(3600))
            .await
        {
            continue;
        }
        let total = recorder.count();
        let kept = recorder.all();
        // The recorder keeps a bounded window; print what is still there of the new ones.
        let new = total - printed;
        for rec in kept.iter().skip(kept.len().saturating_sub(new)) {
            let line = serde_json::json!({
                "kind": kind,
                "method": rec.method,
                "target": rec.target,
                "content_type": rec.header("content-type"),
                "body": rec.body_str(),
            });
            println!("request {line}");
        }
        printed = total;
    }
}
