//! The admin API (loopback by default, optional bearer token): liveness, readiness,
//! Prometheus metrics, backend state, the effective config (secrets redacted) and reload.
//! Its own listener, so these paths never collide with proxied ones (`/health` on the
//! inference port stays vLLM's).

use crate::body::Relay;
use crate::config::GateConfig;
use crate::gate::Gate;
use crate::reload::Shared;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// Serves the admin API until aborted.
pub async fn serve(tcp: TcpListener, token: Option<String>, shared: Arc<Shared>) {
    let gate = match Gate::new(&GateConfig {
        tokens: token.into_iter().collect(),
        ..Default::default()
    }) {
        Ok(g) => Arc::new(g),
        Err(e) => {
            tracing::error!("admin API disabled: {e}");
            return;
        }
    };
    if let Ok(addr) = tcp.local_addr() {
        tracing::info!(%addr, "admin API listening");
    }
    loop {
        let Ok((stream, _)) = tcp.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let (shared, gate) = (shared.clone(), gate.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let (shared, gate) = (shared.clone(), gate.clone());
                async move { Ok::<_, Infallible>(handle(req, &shared, &gate).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn handle(mut req: Request<Incoming>, shared: &Shared, gate: &Gate) -> Response<Relay> {
    if let Err(e) = gate.check_request("/", req.headers_mut()) {
        return e.to_response();
    }
    let runtime = shared.runtime.load();
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => json_response(StatusCode::OK, json!({"status": "ok"})),
        (&Method::GET, "/readyz") => {
            let not_ready = runtime.not_ready();
            let status = if not_ready.is_empty() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            json_response(
                status,
                json!({"ready": not_ready.is_empty(), "not_ready": not_ready}),
            )
        }
        (&Method::GET, "/metrics") => {
            let text = shared.metrics.render(&runtime.upstreams);
            text_response(
                text,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
        }
        (&Method::GET, "/backends") => {
            let upstreams: Vec<_> = runtime
                .upstreams
                .iter()
                .map(|u| {
                    let backends: Vec<_> = u
                        .backends()
                        .iter()
                        .enumerate()
                        .map(|(i, b)| {
                            let mut v = json!({
                                "url": &*b.label,
                                "healthy": b.is_healthy(),
                                "in_flight": b.in_flight(),
                                "requests": b.requests(),
                                "idle_connections": u.idle_connections_of(i),
                                "last_error": b.last_error(),
                            });
                            if let Some(extra) = u.signals_view(i) {
                                v["signals"] = extra;
                            }
                            v
                        })
                        .collect();
                    let mut v = json!({"name": &*u.name, "ready": u.is_ready(), "queued": u.queued(), "backends": backends});
                    if let Some(a) = u.affinity_view() {
                        v["affinity"] = a;
                    }
                    v
                })
                .collect();
            json_response(StatusCode::OK, json!({"upstreams": upstreams}))
        }
        (&Method::GET, "/config") => {
            text_response(runtime.config.to_toml(), "text/plain; charset=utf-8")
        }
        (&Method::POST, "/reload") => {
            drop(runtime);
            match shared.reloader.reload().await {
                Ok(()) => json_response(StatusCode::OK, json!({"reloaded": true})),
                Err(e) => json_response(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    json!({"reloaded": false, "error": e}),
                ),
            }
        }
        _ => json_response(
            StatusCode::NOT_FOUND,
            json!({"error": {"type": "no_route", "message": "admin endpoints: GET /healthz /readyz /metrics /backends /config, POST /reload"}}),
        ),
    }
}

fn json_response(status: StatusCode, body: serde_json::Value) -> Response<Relay> {
    let mut resp = Response::new(Relay::full(body.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn text_response(body: String, content_type: &'static str) -> Response<Relay> {
    let mut resp = Response::new(Relay::full(body));
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}
