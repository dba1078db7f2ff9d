//! Body aliases and a loopback-friendly hyper client shared by the simulators and tests.

use bytes::Bytes;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Empty, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

/// Error type of every body produced by the testkit.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The one body type used by the simulators (responses) and [`HttpClient`] (requests).
/// Unsync so that streaming bodies holding timers or channels need not be `Sync`.
pub type TkBody = UnsyncBoxBody<Bytes, BoxError>;

/// A pooled HTTP/1.1 client with `TCP_NODELAY`, for tests and benchmarks.
pub type HttpClient = Client<HttpConnector, TkBody>;

/// Builds an [`HttpClient`]. Nagle is disabled so small SSE frames are not delayed by the
/// client side when measuring latency.
pub fn http_client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new()).build(connector)
}

/// A complete in-memory body.
pub fn full(data: impl Into<Bytes>) -> TkBody {
    Full::new(data.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// An empty body.
pub fn empty() -> TkBody {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// `now + timeout`, saturating to about 30 years so a huge timeout cannot overflow `Instant`.
pub(crate) fn deadline(timeout: std::time::Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(timeout)
        .unwrap_or_else(|| now + std::time::Duration::from_secs(86_400 * 365 * 30))
}
