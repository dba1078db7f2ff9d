//! Active health checks: `GET <path>` on every backend each interval. A response below 500
//! proves the server is up and answering (so an upstream without a /health endpoint is not
//! marked down by its 404); a 5xx, an error or no answer within the timeout is a failure.

use super::backend::Backend;
use super::Upstream;
use crate::body::Relay;
use http::{header, HeaderValue, Request};
use http_body_util::{BodyExt, Limited};
use std::sync::Arc;
use tokio::task::JoinSet;

/// Runs the checks of one upstream until the task is aborted (with the server).
pub async fn run(up: Arc<Upstream>) {
    let cfg = up.cfg.health.clone();
    let mut tick = tokio::time::interval(cfg.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut first = true;
    loop {
        tick.tick().await;
        let mut round = JoinSet::new();
        for (i, b) in up.backends().iter().enumerate() {
            round.spawn(check(up.clone(), i, b.clone()));
        }
        while round.join_next().await.is_some() {}
        if first {
            first = false;
            // After the first round every backend's state is its own probe's answer.
            let healthy = up.backends().iter().filter(|b| b.is_healthy()).count();
            let total = up.backends().len();
            if healthy == 0 {
                tracing::warn!(
                    upstream = &*up.name,
                    "no healthy backend yet (0/{total}); requests get 503 until one answers"
                );
            } else {
                tracing::info!(upstream = &*up.name, "{healthy}/{total} backends healthy");
            }
        }
    }
}

async fn check(up: Arc<Upstream>, index: usize, b: Arc<Backend>) {
    let cfg = &up.cfg.health;
    let result = tokio::time::timeout(cfg.timeout, probe(&up, index)).await;
    let outcome = match result {
        Ok(r) => r,
        Err(_) => Err(format!(
            "no answer within {}",
            humantime::format_duration(cfg.timeout)
        )),
    };
    b.health_result(&up.name, outcome, cfg.failures, cfg.successes);
}

async fn probe(up: &Upstream, index: usize) -> Result<(), String> {
    let mut req = Request::get(up.cfg.health.path.as_str())
        .body(Relay::empty())
        .map_err(|e| format!("bad health-check request: {e}"))?;
    req.headers_mut().insert(
        header::USER_AGENT,
        HeaderValue::from_static("podproxy-health"),
    );
    let (resp, lease) = up
        .pool
        .send(index, req, None)
        .await
        .map_err(|e| e.detail())?;
    let status = resp.status();
    // Read the (small) body so the connection goes back to the pool.
    let body = Relay::upstream(resp.into_body(), lease, up.cfg.health.timeout);
    let _ = Limited::new(body, 64 * 1024).collect().await;
    if status.as_u16() < 500 {
        Ok(())
    } else {
        Err(format!("status {status}"))
    }
}
