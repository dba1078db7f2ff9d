//! The one error type for responses podproxy generates itself, and its mapping to HTTP.
//! Upstream statuses never pass through here: a 404 from the mlnode is meaningful to the
//! DAPI and reaches the client untouched.

use crate::body::Relay;
use http::{header, HeaderValue, Response, StatusCode};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route matches this path")]
    NoRoute,
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The client's request body broke off, stalled or was malformed while it was relayed.
    #[error("bad request: the request body could not be read: {0}")]
    RequestBody(String),
    #[error("request body larger than {limit} bytes")]
    PayloadTooLarge { limit: u64 },
    #[error("missing or invalid bearer token")]
    Unauthorized,
    #[error("forbidden: {0}")]
    Forbidden(String),
    #[error("upstream {upstream} has no healthy backend")]
    NoHealthyBackend { upstream: String },
    #[error("upstream {upstream}: every backend is at its concurrency limit")]
    Overloaded { upstream: String },
    #[error("cannot connect to upstream {upstream} ({backend}): {detail}")]
    Connect {
        upstream: String,
        backend: String,
        detail: String,
    },
    #[error("upstream {upstream} ({backend}) failed: {detail}")]
    UpstreamBroken {
        upstream: String,
        backend: String,
        detail: String,
    },
    #[error("upstream {upstream} ({backend}) sent no response headers within {}", humantime::format_duration(*.timeout))]
    UpstreamTimeout {
        upstream: String,
        backend: String,
        timeout: Duration,
    },
    /// Long-call mode: the mlnode's start ended without `completed` (restart, unreachable,
    /// cancelled).
    #[error("inference start on upstream {upstream} ({backend}) did not complete: {detail}")]
    StartInterrupted {
        upstream: String,
        backend: String,
        detail: String,
    },
    /// Long-call mode: the start was still not `completed` when the budget ran out.
    #[error("inference start on upstream {upstream} ({backend}) not completed within {}", humantime::format_duration(*.budget))]
    StartTimeout {
        upstream: String,
        backend: String,
        budget: Duration,
    },
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::BadRequest(_) | ProxyError::RequestBody(_) => StatusCode::BAD_REQUEST,
            ProxyError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::Unauthorized => StatusCode::UNAUTHORIZED,
            ProxyError::Forbidden(_) => StatusCode::FORBIDDEN,
            ProxyError::NoHealthyBackend { .. } | ProxyError::Overloaded { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::Connect { .. }
            | ProxyError::UpstreamBroken { .. }
            | ProxyError::StartInterrupted { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamTimeout { .. } | ProxyError::StartTimeout { .. } => {
                StatusCode::GATEWAY_TIMEOUT
            }
        }
    }

    /// Stable machine-readable name, used in the JSON body and in logs.
    pub fn kind(&self) -> &'static str {
        match self {
            ProxyError::NoRoute => "no_route",
            ProxyError::BadRequest(_) | ProxyError::RequestBody(_) => "bad_request",
            ProxyError::PayloadTooLarge { .. } => "payload_too_large",
            ProxyError::Unauthorized => "unauthorized",
            ProxyError::Forbidden(_) => "forbidden",
            ProxyError::NoHealthyBackend { .. } => "no_healthy_backend",
            ProxyError::Overloaded { .. } => "overloaded",
            ProxyError::Connect { .. } => "upstream_connect",
            ProxyError::UpstreamBroken { .. } => "upstream_broken",
            ProxyError::UpstreamTimeout { .. } => "upstream_timeout",
            ProxyError::StartInterrupted { .. } => "inference_start_interrupted",
            ProxyError::StartTimeout { .. } => "inference_start_timeout",
        }
    }

    /// A failure of the upstream itself (not of the client's request, and not a policy
    /// answer): counted per upstream and logged as a warning.
    pub fn is_upstream_failure(&self) -> bool {
        matches!(
            self,
            ProxyError::Connect { .. }
                | ProxyError::UpstreamBroken { .. }
                | ProxyError::UpstreamTimeout { .. }
        )
    }

    /// The message a client gets: which upstream (by its config name) and what failed,
    /// never a backend address or a resolver/socket detail. `Display` (logs) has those.
    pub fn public_message(&self) -> String {
        match self {
            ProxyError::Connect {
                upstream, detail, ..
            } => format!(
                "cannot connect to upstream {upstream}: {}",
                failure_class(detail)
            ),
            ProxyError::UpstreamBroken {
                upstream, detail, ..
            } => format!(
                "upstream {upstream} failed before sending a response: {}",
                failure_class(detail)
            ),
            ProxyError::UpstreamTimeout {
                upstream, timeout, ..
            } => format!(
                "upstream {upstream} sent no response headers within {}",
                humantime::format_duration(*timeout)
            ),
            // The detail is podproxy's own wording (no address, no socket error).
            ProxyError::StartInterrupted {
                upstream, detail, ..
            } => format!("inference start on upstream {upstream} did not complete: {detail}"),
            ProxyError::StartTimeout {
                upstream, budget, ..
            } => format!(
                "inference start on upstream {upstream} not completed within {}",
                humantime::format_duration(*budget)
            ),
            other => other.to_string(),
        }
    }

    /// The response sent to the client: `{"error":{"type":..,"message":..}}`.
    pub fn to_response(&self) -> Response<Relay> {
        let body = serde_json::json!({
            "error": { "type": self.kind(), "message": self.public_message() }
        });
        let mut resp = Response::new(Relay::full(body.to_string()));
        *resp.status_mut() = self.status();
        let headers = resp.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        match self {
            ProxyError::NoHealthyBackend { .. } | ProxyError::Overloaded { .. } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            ProxyError::Unauthorized => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"podproxy\""),
                );
            }
            // The rest of the body is still unread (or its framing is broken): nothing on
            // this connection can be trusted to start a next request.
            ProxyError::RequestBody(_) => {
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        resp
    }
}

/// What a connection failure was, in a fixed vocabulary: enough for a client to tell a
/// refused port from a certificate problem, nothing of the resolver's or socket's own text
/// (which can carry host names and addresses).
fn failure_class(detail: &str) -> &'static str {
    let d = detail.to_ascii_lowercase();
    if d.contains("certificate") {
        "TLS certificate not accepted"
    } else if d.contains("tls") || d.contains("handshake") || d.contains("alert") {
        "TLS handshake failed"
    } else if d.contains("dns") || d.contains("lookup") || d.contains("resolve") {
        "host name not resolved"
    } else if d.contains("refused") {
        "connection refused"
    } else if d.contains("timed out") || d.contains("timeout") {
        "timed out"
    } else if d.contains("reset") || d.contains("closed") || d.contains("broken pipe") {
        "connection closed"
    } else if d.contains("parse") || d.contains("invalid") {
        "invalid HTTP response"
    } else {
        "connection failed"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    /// Pins the status mapping: changing it changes what the DAPI and clients see.
    #[test]
    fn mapping_is_pinned() {
        let (u, b) = ("vllm".to_string(), "http://127.0.0.1:5001".to_string());
        let cases = [
            (ProxyError::NoRoute, 404, "no_route"),
            (ProxyError::BadRequest("x".into()), 400, "bad_request"),
            (ProxyError::RequestBody("x".into()), 400, "bad_request"),
            (
                ProxyError::PayloadTooLarge { limit: 1 },
                413,
                "payload_too_large",
            ),
            (ProxyError::Unauthorized, 401, "unauthorized"),
            (ProxyError::Forbidden("x".into()), 403, "forbidden"),
            (
                ProxyError::NoHealthyBackend {
                    upstream: u.clone(),
                },
                503,
                "no_healthy_backend",
            ),
            (
                ProxyError::Overloaded {
                    upstream: u.clone(),
                },
                503,
                "overloaded",
            ),
            (
                ProxyError::Connect {
                    upstream: u.clone(),
                    backend: b.clone(),
                    detail: "x".into(),
                },
                502,
                "upstream_connect",
            ),
            (
                ProxyError::UpstreamBroken {
                    upstream: u.clone(),
                    backend: b.clone(),
                    detail: "x".into(),
                },
                502,
                "upstream_broken",
            ),
            (
                ProxyError::UpstreamTimeout {
                    upstream: u.clone(),
                    backend: b.clone(),
                    timeout: Duration::from_secs(1),
                },
                504,
                "upstream_timeout",
            ),
            (
                ProxyError::StartInterrupted {
                    upstream: u.clone(),
                    backend: b.clone(),
                    detail: "x".into(),
                },
                502,
                "inference_start_interrupted",
            ),
            (
                ProxyError::StartTimeout {
                    upstream: u,
                    backend: b,
                    budget: Duration::from_secs(1),
                },
                504,
                "inference_start_timeout",
            ),
        ];
        for (err, status, kind) in cases {
            assert_eq!(err.status().as_u16(), status, "{err}");
            assert_eq!(err.kind(), kind);
            assert_eq!(err.is_upstream_failure(), kind.starts_with("upstream_"));
            // Clients never see a backend address; logs (Display) do.
            let public = err.public_message();
            assert!(!public.contains("127.0.0.1"), "{public}");
            if err.is_upstream_failure() {
                assert!(err.to_string().contains("127.0.0.1:5001"), "{err}");
                assert!(public.contains("vllm"), "{public}");
            }
        }
    }

    #[test]
    fn public_messages_classify_without_quoting_the_detail() {
        let connect = |detail: &str| ProxyError::Connect {
            upstream: "mlnode".into(),
            backend: "http://mlnode-308:8080".into(),
            detail: detail.into(),
        };
        for (detail, class) in [
            (
                "dns error: failed to lookup address information: mlnode-308",
                "host name not resolved",
            ),
            (
                "tcp connect error: Connection refused (os error 111)",
                "connection refused",
            ),
            (
                "invalid peer certificate: UnknownIssuer",
                "TLS certificate not accepted",
            ),
            ("something odd at 10.0.0.7", "connection failed"),
        ] {
            let m = connect(detail).public_message();
            assert_eq!(m, format!("cannot connect to upstream mlnode: {class}"));
            assert!(!m.contains("mlnode-308") && !m.contains("10.0.0.7"), "{m}");
        }
    }

    #[tokio::test]
    async fn body_is_json_and_503_has_retry_after() {
        let resp = ProxyError::NoHealthyBackend {
            upstream: "vllm".into(),
        }
        .to_response();
        assert_eq!(resp.headers()[header::RETRY_AFTER], "1");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["type"], "no_healthy_backend");
        assert!(v["error"]["message"].as_str().unwrap().contains("vllm"));
    }
}
