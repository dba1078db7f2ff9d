//! `podproxy demo`: the embedded default layout in front of simulated backends (two vLLM
//! servers, the mlnode API, a Network Node callback sink), so a newcomer sees streaming,
//! routing and the PoC callback rewrite work without a GPU.

use proxy::config::{env, Config, LogFormat, EMBEDDED_DEFAULT};
use std::process::ExitCode;
use std::time::Duration;
use testkit::mlnode::{MlnodeConfig, MlnodeSim};
use testkit::sink::CallbackSink;
use testkit::vllm::{VllmConfig, VllmSim};

pub async fn run(log_format: Option<&str>) -> ExitCode {
    match demo(log_format).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("podproxy demo: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn demo(log_format: Option<&str>) -> Result<(), String> {
    let start_err = |what: &str| {
        let what = what.to_string();
        move |e: std::io::Error| format!("cannot start the simulated {what}: {e}")
    };
    // Tokens every 80 ms: slow enough to watch them arrive one by one in a terminal.
    let vllm_cfg = VllmConfig {
        token_interval: Duration::from_millis(80),
        tokens: 24,
        ..VllmConfig::default()
    };
    let vllm = [
        VllmSim::start(vllm_cfg.clone())
            .await
            .map_err(start_err("vLLM"))?,
        VllmSim::start(vllm_cfg).await.map_err(start_err("vLLM"))?,
    ];
    let mlnode = MlnodeSim::start(MlnodeConfig::default())
        .await
        .map_err(start_err("mlnode"))?;
    let sink = CallbackSink::start()
        .await
        .map_err(start_err("Network Node"))?;

    let vllm_urls = format!("{},{}", vllm[0].url(), vllm[1].url());
    let text = env::expand(EMBEDDED_DEFAULT, |name| match name {
        "MLNODE_URL" => Some(mlnode.url()),
        "VLLM_URLS" => Some(vllm_urls.clone()),
        "POC_CALLBACK_URL" => Some(sink.url()),
        other => std::env::var(other).ok(),
    })
    .map_err(|e| e.to_string())?;
    let mut config = Config::from_toml(&text).map_err(|e| e.to_string())?;
    if log_format == Some("json") {
        config.server.log_format = LogFormat::Json;
    }
    proxy::logging::init(config.server.log_format, &config.server.log_level);
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
  curl -N http://127.0.0.1:{inf_port}/v1/chat/completions -d '{{\"model\":\"Qwen/Qwen3-32B-FP8\",\"stream\":true,\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}]}}'
  # the mlnode API through the PoC port, with the DAPI's version prefix stripped
  curl -i http://127.0.0.1:{poc_port}/v3.0.8/api/v1/state
  # a PoC start: watch this terminal print the callback url the mlnode received
  curl -i http://127.0.0.1:{poc_port}/v3.0.8/api/v1/pow/init/generate -d '{{\"url\":\"http://api:9100/v1/poc-batches\",\"block_height\":1,\"r_target\":1.4013564660458173}}'
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
