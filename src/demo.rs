//! `podproxy demo`: the embedded default layout in front of simulated backends (two vLLM
//! servers, the mlnode API, a Network Node callback sink), so a newcomer sees streaming,
//! routing and the PoC callback rewrite work without a GPU.

use crate::LogFlags;
use proxy::config::{env, Config, EMBEDDED_DEFAULT};
use std::process::ExitCode;
use std::time::Duration;
use testkit::mlnode::{MlnodeConfig, MlnodeSim};
use testkit::sink::CallbackSink;
use testkit::vllm::{VllmConfig, VllmSim};

pub async fn run(logs: &LogFlags, listen_all: bool) -> ExitCode {
    match demo(logs, listen_all).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("podproxy demo: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn demo(logs: &LogFlags, listen_all: bool) -> Result<(), String> {
    let start_err = |what: &str| {
        let what = what.to_string();
        move |e: std::io::Error| format!("cannot start the simulated {what}: {e}")
    };
    // Tokens every 80 ms: slow enough to watch them arrive one by one in a terminal. The
    // simulators answer a JSON body without Content-Type 422, as vLLM >= 0.20 and newer
    // mlnode images do; the embedded default's `json_content_type` routes fix that.
    let vllm_cfg = VllmConfig {
        token_interval: Duration::from_millis(80),
        tokens: 24,
        strict_content_type: true,
        ..VllmConfig::default()
    };
    let vllm = [
        VllmSim::start(vllm_cfg.clone())
            .await
            .map_err(start_err("vLLM"))?,
        VllmSim::start(vllm_cfg).await.map_err(start_err("vLLM"))?,
    ];
    let mlnode = MlnodeSim::start(MlnodeConfig {
        strict_content_type: true,
        ..MlnodeConfig::default()
    })
    .await
    .map_err(start_err("mlnode"))?;
    let sink = CallbackSink::start()
        .await
        .map_err(start_err("Network Node"))?;

    let vllm_urls = format!("{},{}", vllm[0].url(), vllm[1].url());
    // Loopback only unless asked: the demo's backends are toys, not something to expose.
    let layout = if listen_all {
        EMBEDDED_DEFAULT.to_string()
    } else {
        EMBEDDED_DEFAULT.replace("bind = \"0.0.0.0:", "bind = \"127.0.0.1:")
    };
    let text = env::expand(&layout, |name| match name {
        "MLNODE_URL" => Some(mlnode.url()),
        "VLLM_URLS" => Some(vllm_urls.clone()),
        "POC_CALLBACK_URL" => Some(sink.url()),
        other => std::env::var(other).ok(),
    })
    .map_err(|e| e.to_string())?;
    let mut config = Config::from_toml(&text).map_err(|e| e.to_string())?;
    logs.apply(&mut config)?;
    let _log_guard =
        proxy::logging::init_background(config.server.log_format, &config.server.log_level);
    let server = proxy::Server::bind(&config)
        .await
        .map_err(|e| format!("{e} (set POC_PORT / INFERENCE_PORT to use other ports)"))?;
    let poc = server.local_addr("poc").ok_or("no poc listener")?;
    let inference = server
        .local_addr("inference")
        .ok_or("no inference listener")?;
    let (poc_port, inf_port) = (poc.port(), inference.port());
    let admin = server
        .admin_addr()
        .map_or_else(|| "off".to_string(), |a| format!("http://{a}"));

    println!(
        "\npodproxy demo: embedded default config in front of simulated backends
  poc listener        :{poc_port}  ->  mlnode sim {mlnode}  (/v1/ -> vLLM)
  inference listener  :{inf_port}  ->  vLLM sims {vllm_urls}
  PoC callbacks are rewritten toward the Network Node sim {sink}
  admin API           {admin}  (/metrics /readyz /backends /config)

Try in another terminal:
  # a streaming chat completion: tokens arrive one by one, every 80 ms
  curl -N http://127.0.0.1:{inf_port}/v1/chat/completions -H 'Content-Type: application/json' -d '{{\"model\":\"Qwen/Qwen3-32B-FP8\",\"stream\":true,\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}]}}'
  # the mlnode API through the PoC port, with the DAPI's version prefix stripped
  curl -i http://127.0.0.1:{poc_port}/v3.0.8/api/v1/state
  # a PoC start as the DAPI sends it (no Content-Type: podproxy adds it, or FastAPI says 422);
  # watch this terminal print the callback url the mlnode received
  curl -i http://127.0.0.1:{poc_port}/v3.0.8/api/v1/inference/pow/init/generate -H 'Content-Type:' -d '{{\"url\":\"http://api:9100/v2/poc-batches/Qwen%252FQwen3-32B-FP8\",\"block_height\":1,\"r_target\":1.4013564660458173}}'
  # what the proxy saw: requests, time to first token, inter-token latency, backends
  curl -s {admin}/metrics | grep -E 'podproxy_(requests|sse_event_gap_seconds_count|upstream_ttfb_seconds_count)'
Ctrl-C stops the demo.\n",
        mlnode = mlnode.url(),
        sink = sink.url(),
    );

    let recorder = mlnode.recorder();
    let watch_poc = tokio::spawn(async move {
        // Bounded: one line per PoC body the mlnode sim receives, for as long as the demo runs.
        let mut seen = 0;
        loop {
            if !recorder.wait_for(seen + 1, Duration::from_secs(3600)).await {
                continue;
            }
            seen = recorder.count();
            if let Some(r) = recorder.last() {
                if r.target.contains("/pow/") && r.method == "POST" {
                    println!(
                        "mlnode sim received {} {}: {}",
                        r.method,
                        r.target,
                        r.body_str()
                    );
                }
            }
        }
    });
    server.run(proxy::signals::shutdown()).await;
    watch_poc.abort();
    Ok(())
}
