//! One request's way, top to bottom: match route → prepare headers → pick backend → send →
//! relay response → (log, when the body is over). Errors from any step become one JSON
//! response through `ProxyError::to_response`.

use crate::access_log::{CountIn, Exchange};
use crate::body::Relay;
use crate::error::ProxyError;
use crate::headers::{self, X_REQUEST_ID};
use crate::poc::Poc;
use crate::route::{split_query, RouteTable};
use crate::upstream::Upstream;
use http::{header, uri, HeaderValue, Method, Request, Response, Uri, Version};
use hyper::body::Incoming;
use std::net::SocketAddr;
use std::sync::Arc;

/// What a listener's connections need to forward requests. Shared by all its connections;
/// a connection keeps the context it started with, so a reload never changes a request
/// mid-flight.
pub struct ListenerCtx {
    pub name: Arc<str>,
    pub routes: RouteTable,
    pub upstreams: Vec<Arc<Upstream>>,
    /// `X-Forwarded-Proto` value: "http" or "https".
    pub proto: &'static str,
    pub poc: Arc<Poc>,
}

/// Serves one request. Never fails: errors are responses. Dropping this future (client gone
/// before the response head) drops the upstream call with it.
pub async fn handle(
    ctx: Arc<ListenerCtx>,
    peer: SocketAddr,
    mut req: Request<Incoming>,
) -> Response<Relay> {
    let request_id = headers::request_id(req.headers_mut());
    let mut ex = Exchange::start(
        ctx.name.clone(),
        req.method().clone(),
        req.uri().path(),
        request_id.clone(),
    );
    let mut resp = match forward(&ctx, peer, req, &mut ex).await {
        Ok(resp) => resp,
        Err(e) => {
            tracing::warn!(
                listener = &*ctx.name,
                request_id = request_id.to_str().unwrap_or("-"),
                kind = e.kind(),
                "{e}"
            );
            ex.error = Some(e.to_string());
            ex.refused = true;
            e.to_response()
        }
    };
    resp.headers_mut().insert(X_REQUEST_ID.clone(), request_id);
    ex.status = resp.status().as_u16();
    resp.map(|body| body.with_meter(Box::new(ex)))
}

async fn forward(
    ctx: &ListenerCtx,
    peer: SocketAddr,
    req: Request<Incoming>,
    ex: &mut Exchange,
) -> Result<Response<Relay>, ProxyError> {
    if req.method() == Method::CONNECT {
        return Err(ProxyError::BadRequest("CONNECT is not supported".into()));
    }
    let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let matched = ctx.routes.resolve(target).ok_or(ProxyError::NoRoute)?;
    let upstream = &ctx.upstreams[matched.route.upstream];
    ex.upstream = Some(upstream.name.clone());
    let poc_body = matched.route.poc
        && ctx
            .poc
            .applies(req.method(), split_query(&matched.path_and_query).0);
    let path_and_query = uri::PathAndQuery::try_from(matched.path_and_query)
        .map_err(|_| ProxyError::BadRequest("request target cannot be forwarded".into()))?;

    let (mut parts, body) = req.into_parts();
    prepare_request_headers(&mut parts, peer, ctx.proto);
    let idle = upstream.cfg.idle_timeout;
    let body = if poc_body {
        let body = ctx
            .poc
            .guard_body(body, &mut parts.headers, idle, path_and_query.path())
            .await?;
        ex.bytes_in.store(
            http_body::Body::size_hint(&body).lower(),
            std::sync::atomic::Ordering::Relaxed,
        );
        body
    } else {
        Relay::stream(body, idle).with_meter(Box::new(CountIn(ex.bytes_in.clone())))
    };

    let slot = upstream.pick()?;
    let backend = slot.backend().clone();
    ex.backend = Some(backend.label.clone());
    ex.slot = Some(slot);

    let mut uri_parts = uri::Parts::default();
    uri_parts.scheme = Some(backend.addr.scheme.clone());
    uri_parts.authority = Some(backend.addr.authority.clone());
    uri_parts.path_and_query = Some(path_and_query);
    parts.uri = Uri::from_parts(uri_parts)
        .map_err(|_| ProxyError::BadRequest("request target cannot be forwarded".into()))?;
    parts.version = Version::HTTP_11;
    if upstream.cfg.rewrite_host {
        if let Ok(host) = HeaderValue::from_str(backend.addr.authority.as_str()) {
            parts.headers.insert(header::HOST, host);
        }
    }

    let resp = upstream
        .send(&backend, Request::from_parts(parts, body))
        .await?;
    ex.ttfb = Some(ex.started.elapsed());

    let (mut parts, body) = resp.into_parts();
    headers::remove_hop_by_hop(&mut parts.headers);
    // hyper writes the response in the client's protocol; an HTTP/1.0 upstream (or an h2
    // client) must not leak its version into the status line.
    parts.version = Version::HTTP_11;
    Ok(Response::from_parts(
        parts,
        Relay::stream(body, upstream.cfg.idle_timeout),
    ))
}

/// Header rules for the upstream request (design §3). `Host` is kept as the client sent it;
/// an HTTP/2 client sends `:authority` instead, which becomes `Host` for the HTTP/1.1 hop.
fn prepare_request_headers(
    parts: &mut http::request::Parts,
    peer: SocketAddr,
    proto: &'static str,
) {
    if !parts.headers.contains_key(header::HOST) {
        if let Some(auth) = parts.uri.authority() {
            if let Ok(v) = HeaderValue::from_str(auth.as_str()) {
                parts.headers.insert(header::HOST, v);
            }
        }
    }
    headers::remove_hop_by_hop(&mut parts.headers);
    // hyper already answered `Expect: 100-continue` towards the client; the upstream gets
    // the body straight away.
    parts.headers.remove(header::EXPECT);
    headers::set_forwarded(&mut parts.headers, peer.ip(), proto);
}
