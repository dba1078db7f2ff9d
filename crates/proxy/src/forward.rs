//! One request's way, top to bottom: source check → match route → gate (blocked paths,
//! token) → headers → (PoC body check) → pick backend → send (retry on connect failure) →
//! relay response → (log and metrics, when the body is over). Errors from any step become
//! one JSON response through `ProxyError::to_response`.

use crate::access_log::Exchange;
use crate::body::{first_non_whitespace, Prefetched, Relay, Replayable};
use crate::error::ProxyError;
use crate::headers::{self, X_REQUEST_ID};
use crate::route::split_query;
use crate::runtime::ListenerCtx;
use crate::upstream::Upstream;
use bytes::Bytes;
use http::{header, uri, HeaderValue, Method, Request, Response, Uri, Version};
use http_body::Body as _;
use hyper::body::Incoming;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// The client end of a connection, with its address already formatted for the forwarding
/// headers (once per connection, not per request).
#[derive(Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    pub ip_header: HeaderValue,
}

impl Peer {
    pub fn new(addr: SocketAddr) -> Self {
        Peer {
            addr,
            ip_header: headers::client_ip_value(addr.ip()),
        }
    }
}

/// Serves one request. Never fails: errors are responses. Dropping this future (client gone
/// before the response head) drops the upstream call with it.
pub async fn handle(
    ctx: Arc<ListenerCtx>,
    peer: Peer,
    mut req: Request<Incoming>,
) -> Response<Relay> {
    let request_id = headers::request_id(req.headers_mut());
    let mut ex = Exchange::start(
        ctx.name.clone(),
        peer.ip_header.clone(),
        req.method().clone(),
        req.uri().path(),
        request_id.clone(),
        ctx.series.clone(),
    );
    if crate::poc::is_callback(req.method(), req.uri().path()) {
        ctx.series.callbacks_relayed().inc();
    }
    // An HTTP/1 request refused with its body maybe unread: the connection closes after the
    // answer (the rest of the body cannot be told from a next request), and the client is
    // told so; `conn` lingers so the unread bytes do not reset the answer away.
    let close_if_refused = req.version() < Version::HTTP_2 && !req.body().is_end_stream();
    let mut resp = match forward(&ctx, &peer, req, &mut ex).await {
        Ok(resp) => resp,
        Err(e) => {
            ex.refused(&e);
            let mut resp = e.to_response();
            if close_if_refused {
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            resp
        }
    };
    resp.headers_mut().insert(X_REQUEST_ID.clone(), request_id);
    ex.responded(resp.status().as_u16());
    resp.map(|body| body.with_meter(Box::new(ex)))
}

async fn forward(
    ctx: &ListenerCtx,
    peer: &Peer,
    req: Request<Incoming>,
    ex: &mut Exchange,
) -> Result<Response<Relay>, ProxyError> {
    ctx.gate.check_source(peer.addr.ip())?;
    if req.method() == Method::CONNECT {
        return Err(ProxyError::BadRequest("CONNECT is not supported".into()));
    }
    // Route on the raw request-target: nothing decoded, nothing normalised.
    let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let matched = ctx.routes.resolve(target).ok_or(ProxyError::NoRoute)?;
    let route = matched.route;
    let upstream = &ctx.upstreams[route.upstream];
    ex.routed(
        upstream.name.clone(),
        ctx.upstream_series.get(route.upstream).cloned(),
        route.label.clone(),
    );
    let poc_body = route.poc
        && ctx
            .poc
            .applies(req.method(), split_query(&matched.path_and_query).0);
    let path_and_query = uri::PathAndQuery::try_from(matched.path_and_query)
        .map_err(|_| ProxyError::BadRequest("request target cannot be forwarded".into()))?;

    let (mut parts, body) = req.into_parts();
    ctx.gate
        .check_request(path_and_query.path(), &mut parts.headers)?;
    prepare_request_headers(&mut parts, peer, ctx.proto)?;
    // Only a route that asks for it, and only a request without any Content-Type: every
    // other request goes on without looking at its body.
    let add_type = route.json_content_type && !parts.headers.contains_key(header::CONTENT_TYPE);
    if let Some(cfg) =
        crate::longcall::applies(route.long_call, &parts.method, path_and_query.path())
    {
        let call = crate::longcall::Call {
            upstream,
            cfg,
            query: path_and_query.query(),
            json_content_type: add_type,
            series: &ctx.series,
        };
        return crate::longcall::inference_up(call, parts, body, ex).await;
    }
    let sse_keepalive = route.sse_keepalive.filter(|_| !poc_body);
    let step = BodyStep {
        ctx,
        upstream,
        poc_path: poc_body.then(|| path_and_query.path()),
        add_type,
        sse_keepalive,
    };
    let Prepared {
        body,
        prompt_key,
        keepalive,
    } = step.run(&mut parts, body, ex).await?;

    // Pick → send; a connect failure (nothing sent, body untouched) moves on to another
    // backend. Once an attempt may have reached the upstream, nothing is retried.
    let idle = upstream.cfg.idle_timeout;
    let mut tried: Vec<usize> = Vec::new();
    let (resp, lease) = loop {
        let (index, slot) = upstream.acquire_for(&tried, prompt_key).await?;
        ex.attempt(slot.backend().label.clone());
        let last_chance = tried.len() + 1 >= upstream.backends().len();
        let headers = if last_chance {
            std::mem::take(&mut parts.headers)
        } else {
            parts.headers.clone()
        };
        let mut attempt = Request::new(body.for_attempt(idle, ex));
        *attempt.method_mut() = parts.method.clone();
        *attempt.uri_mut() = Uri::from(path_and_query.clone());
        *attempt.headers_mut() = headers;
        let sent = match keepalive {
            Some(every) => {
                let counters = crate::sse_keepalive::Counters::new(ctx.series.metrics(), ex);
                let sent =
                    crate::sse_keepalive::send(upstream, index, slot, attempt, every, counters);
                match sent.await {
                    crate::sse_keepalive::Sent::Head(r) => r,
                    crate::sse_keepalive::Sent::KeepAlive(resp) => {
                        ex.own_head();
                        ex.start_sse();
                        return Ok(resp);
                    }
                }
            }
            None => upstream.send_holding(index, slot, attempt).await,
        };
        match sent {
            Ok(resp) => break resp,
            Err(e @ ProxyError::Connect { .. }) if !last_chance && body.replayable() => {
                tracing::info!(upstream = &*upstream.name, "{e}; trying another backend");
                tried.push(index);
            }
            Err(e) => return Err(e),
        }
    };
    ex.first_byte();

    let (mut parts, body) = resp.into_parts();
    headers::remove_hop_by_hop(&mut parts.headers);
    let is_sse = parts
        .headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    if is_sse {
        ex.start_sse();
    }
    // hyper writes the response in the client's protocol; an HTTP/1.0 upstream (or an h2
    // client) must not leak its version into the status line.
    parts.version = Version::HTTP_11;
    Ok(Response::from_parts(
        parts,
        Relay::upstream(body, lease, idle),
    ))
}

/// What a request needs from its body before the first attempt, decided in `BodyStep::run`.
struct BodyStep<'a> {
    ctx: &'a ListenerCtx,
    upstream: &'a Upstream,
    /// The upstream path when the body goes through the PoC callback guard.
    poc_path: Option<&'a str>,
    /// `json_content_type` applies: the body decides whether the header is added.
    add_type: bool,
    /// The route's SSE keep-alive interval (never for a PoC body).
    sse_keepalive: Option<Duration>,
}

/// The request body as the attempts will send it, and what reading it decided.
struct Prepared {
    body: RequestBody,
    /// Prefix-affinity key of the prompt (docs/balancing.md), when read.
    prompt_key: Option<u64>,
    /// SSE keep-alive interval, set once the body says `"stream": true`.
    keepalive: Option<Duration>,
}

impl BodyStep<'_> {
    /// Reads as much of the body as the route's features need, and no more: a PoC body
    /// whole (it is checked), a keep-alive candidate whole (bounded, its length known), an
    /// affinity prefix, or up to the first non-blank byte for the Content-Type sniff. Any
    /// other body streams untouched.
    async fn run(
        self,
        parts: &mut http::request::Parts,
        body: Incoming,
        ex: &Exchange,
    ) -> Result<Prepared, ProxyError> {
        let idle = self.upstream.cfg.idle_timeout;
        let balance = &self.upstream.cfg.balance;
        let affinity = balance.affinity
            && crate::upstream::affinity::may_have_prompt(&parts.method, &parts.headers);
        let series = &self.ctx.series;
        let mut prepared = Prepared {
            body: RequestBody::Full(Bytes::new()),
            prompt_key: None,
            keepalive: None,
        };
        if let Some(path) = self.poc_path {
            let (bytes, received) = self
                .ctx
                .poc
                .guard_body(body, &mut parts.headers, idle, path)
                .await?;
            ex.received(received);
            if self.add_type {
                headers::json_content_type(
                    &mut parts.headers,
                    std::slice::from_ref(&bytes),
                    series.content_type_added(),
                );
            }
            prepared.body = RequestBody::Full(bytes);
        } else if body.is_end_stream() {
            // Nothing to read: the empty body set above goes to every attempt.
        } else if let Some(every) =
            crate::sse_keepalive::candidate(self.sse_keepalive, &parts.method, &parts.headers)
        {
            let bytes = crate::sse_keepalive::read_body(body, idle).await?;
            ex.received(bytes.len() as u64);
            prepared.keepalive = crate::sse_keepalive::is_stream_request(&bytes).then_some(every);
            if self.add_type {
                headers::json_content_type(
                    &mut parts.headers,
                    std::slice::from_ref(&bytes),
                    series.content_type_added(),
                );
            }
            // Prefix affinity keys on the same bytes (docs/balancing.md).
            if affinity {
                let limit = balance.affinity_prefix_bytes;
                prepared.prompt_key =
                    crate::upstream::affinity::prompt_key(&bytes[..bytes.len().min(limit)]);
            }
            prepared.body = RequestBody::Full(bytes);
        } else if affinity {
            // Prefix affinity (docs/balancing.md): the prompt's opening picks the backend.
            // The same read serves the Content-Type sniff.
            let limit = balance.affinity_prefix_bytes;
            let (mut pre, key) = crate::upstream::affinity::prefetch_key(body, limit, idle)
                .await
                .map_err(|e| ProxyError::RequestBody(e.to_string()))?;
            prepared.prompt_key = key;
            if self.add_type {
                headers::json_content_type(
                    &mut parts.headers,
                    pre.frames(),
                    series.content_type_added(),
                );
            }
            prepared.body = RequestBody::Stream(Replayable::prefetched(pre));
        } else if self.add_type {
            // The header must be in the head, and the head goes before any body byte: wait
            // for the body's first non-blank byte (bounded). The DAPI writes a small body
            // together with its head, so this costs no round trip in practice.
            let mut pre = Prefetched::read(body, SNIFF_LIMIT, idle, |f| {
                first_non_whitespace(f).is_some()
            })
            .await
            .map_err(|e| ProxyError::RequestBody(e.to_string()))?;
            headers::json_content_type(
                &mut parts.headers,
                pre.frames(),
                series.content_type_added(),
            );
            prepared.body = RequestBody::Stream(Replayable::prefetched(pre));
        } else {
            prepared.body = RequestBody::Stream(Replayable::new(body));
        }
        Ok(prepared)
    }
}

/// How far `json_content_type` reads into a body looking for its first non-blank byte.
const SNIFF_LIMIT: usize = 4096;

/// The request body as the attempts see it.
enum RequestBody {
    /// In memory (empty, or a checked PoC body): any attempt can send it.
    Full(Bytes),
    /// Streamed from the client: only an attempt that starts before anyone read it.
    Stream(Replayable),
}

impl RequestBody {
    fn for_attempt(&self, idle: Duration, ex: &Exchange) -> Relay {
        match self {
            RequestBody::Full(bytes) => Relay::full(bytes.clone()),
            RequestBody::Stream(r) => r.body(idle).with_meter(Box::new(ex.count_in())),
        }
    }

    fn replayable(&self) -> bool {
        match self {
            RequestBody::Full(_) => true,
            RequestBody::Stream(r) => r.untouched(),
        }
    }
}

/// Header rules for the upstream request. `Host` is kept as the client sent it;
/// an HTTP/2 client sends `:authority` instead, which becomes `Host` for the HTTP/1.1 hop.
fn prepare_request_headers(
    parts: &mut http::request::Parts,
    peer: &Peer,
    proto: &'static str,
) -> Result<(), ProxyError> {
    // RFC 9112 §3.2: an HTTP/1.1 request needs exactly one Host; two are ambiguous (which
    // one did the client mean, which one will the upstream use?).
    let hosts = parts.headers.get_all(header::HOST).iter().count();
    if hosts > 1 {
        return Err(ProxyError::BadRequest("more than one Host header".into()));
    }
    let h1 = parts.version <= Version::HTTP_11;
    if hosts == 0 && parts.version == Version::HTTP_11 {
        return Err(ProxyError::BadRequest(
            "HTTP/1.1 request without Host".into(),
        ));
    }
    // An absolute-form target's authority wins over Host (RFC 9112 §3.2.2); an HTTP/2
    // client's `:authority` becomes Host for the HTTP/1.1 hop.
    if let Some(auth) = parts.uri.authority() {
        if h1 || hosts == 0 {
            if let Ok(v) = HeaderValue::from_str(auth.as_str()) {
                parts.headers.insert(header::HOST, v);
            }
        }
    }
    headers::remove_hop_by_hop(&mut parts.headers);
    // hyper already answered `Expect: 100-continue` towards the client; the upstream gets
    // the body straight away.
    parts.headers.remove(header::EXPECT);
    headers::set_forwarded(&mut parts.headers, &peer.ip_header, proto);
    Ok(())
}
