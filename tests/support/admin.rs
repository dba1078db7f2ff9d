//! The admin API: one request on a fresh connection, JSON endpoints, polling one until it
//! says what a test waits for.

use super::{send, WAIT};
use http::{HeaderMap, Method, Request, StatusCode};
use serde_json::Value;
use std::net::SocketAddr;
use std::time::Duration;
use testkit::client::{empty, http_client};

/// One admin request on a fresh connection (with `Authorization: Bearer <token>` when
/// given): status, headers and body text.
pub async fn admin(
    addr: SocketAddr,
    method: Method,
    path: &str,
    token: Option<&str>,
) -> (StatusCode, HeaderMap, String) {
    let mut req = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let (parts, body) = send(&http_client(), req.body(empty()).unwrap()).await;
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

/// `GET path` on the admin API, answered 200; the body as text.
pub async fn admin_get(addr: SocketAddr, path: &str) -> String {
    let (status, _, body) = admin(addr, Method::GET, path, None).await;
    assert_eq!(status, StatusCode::OK, "{path}: {body}");
    body
}

/// GET an admin endpoint that answers JSON.
pub async fn admin_json(addr: SocketAddr, path: &str, token: Option<&str>) -> (StatusCode, Value) {
    let (status, _, body) = admin(addr, Method::GET, path, token).await;
    let v =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path} is not JSON ({e}): {body}"));
    (status, v)
}

/// Polls a JSON admin endpoint (bounded by `WAIT`) until `pred` holds; returns the last answer.
pub async fn admin_until(
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
    what: &str,
    pred: impl Fn(StatusCode, &Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, v) = admin_json(addr, path, token).await;
        if pred(status, &v) {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}: {path} answers {status} {v}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
