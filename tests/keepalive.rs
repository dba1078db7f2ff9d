//! podproxy's own upstream pool (`upstream::pool`): one kept-alive connection serves
//! request after request whatever the response framing, parked connections are closed at
//! `pool_idle_timeout` and capped at `max_idle_per_backend`, and a connection is never
//! parked when it cannot take another request (`Connection: close`, abandoned body).
//! The backends are raw TCP servers that count their connections and report each close.

mod support;

use http::Request;
use http_body_util::BodyExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use support::*;
use testkit::client::{empty, full, http_client};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, Barrier};

/// Connections a raw backend accepted, and a message for each one that ended.
struct Counted {
    backend: RawBackend,
    accepted: Arc<AtomicUsize>,
    closed: mpsc::UnboundedReceiver<()>,
}

impl Counted {
    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Waits (bounded) until `n` connections have ended on the backend's side.
    async fn closes(&mut self, n: usize) {
        for i in 0..n {
            bounded("backend connection close", self.closed.recv())
                .await
                .unwrap_or_else(|| panic!("backend stopped after {i} of {n} closes"));
        }
    }
}

/// A raw backend that answers each request with `respond(request)` (the whole response,
/// head and body) until the proxy closes the connection.
async fn counted_backend<F>(respond: F) -> Counted
where
    F: Fn(&RawRequest) -> Vec<Vec<u8>> + Send + Sync + 'static,
{
    let accepted = Arc::new(AtomicUsize::new(0));
    let (tx, closed) = mpsc::unbounded_channel();
    let respond = Arc::new(respond);
    let counter = accepted.clone();
    let backend = RawBackend::start(move |mut s| {
        counter.fetch_add(1, Ordering::SeqCst);
        let (respond, tx) = (respond.clone(), tx.clone());
        async move {
            let mut buf = Vec::new();
            while let Some(req) = read_request(&mut s, &mut buf).await {
                // Written piece by piece: a streamed body arrives in several reads.
                for piece in respond(&req) {
                    if s.write_all(&piece).await.is_err() {
                        break;
                    }
                }
            }
            let _ = tx.send(());
        }
    })
    .await;
    Counted {
        backend,
        accepted,
        closed,
    }
}

fn proxy_config(url: &str, extra: &str) -> String {
    format!(
        "[listeners.main]\nbind = \"127.0.0.1:0\"\nroutes = [{{ prefix = \"/\", upstream = \"u\" }}]\n\n\
         [upstreams.u]\nurls = \"{url}\"\nhealth = {{ enabled = false }}\n{extra}\n"
    )
}

/// The response a backend sends for each test path.
fn by_path(req: &RawRequest) -> Vec<Vec<u8>> {
    let target = req.head.split(' ').nth(1).unwrap_or("/");
    let text = |s: &str| s.as_bytes().to_vec();
    match target {
        "/length" => vec![text("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")],
        "/chunked" => vec![
            text("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
            text("3\r\nabc\r\n"),
            text("2\r\nde\r\n"),
            text("0\r\n\r\n"),
        ],
        "/sse" => {
            let mut pieces =
                vec![text("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")];
            for i in 0..5 {
                let event = format!("data: {i}\n\n");
                pieces.push(text(&format!("{:x}\r\n{event}\r\n", event.len())));
            }
            pieces.push(text("0\r\n\r\n"));
            pieces
        }
        "/empty" => vec![text("HTTP/1.1 204 No Content\r\n\r\n")],
        "/head" => vec![text("HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")],
        "/echo" => {
            let mut r = text(&format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                req.body.len()
            ));
            r.extend_from_slice(&req.body);
            vec![r]
        }
        "/close" => vec![text(
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
        )],
        _ => vec![text("HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")],
    }
}

/// Content-Length, chunked, SSE, 204, a HEAD and a POST with a body, 5 rounds in a row:
/// every one is answered correctly on the same single upstream connection, which ends up
/// parked.
#[tokio::test]
async fn one_connection_serves_every_kind_of_response_in_turn() {
    let backend = counted_backend(by_path).await;
    let proxy = Proxy::start(&proxy_config(&backend.backend.url(), "")).await;
    let client = http_client();
    let base = proxy.url("main");
    for round in 0..5 {
        let cases: [(&str, &str, &[u8]); 6] = [
            ("GET", "/length", b"hello"),
            ("GET", "/chunked", b"abcde"),
            (
                "GET",
                "/sse",
                b"data: 0\n\ndata: 1\n\ndata: 2\n\ndata: 3\n\ndata: 4\n\n",
            ),
            ("GET", "/empty", b""),
            ("HEAD", "/head", b""),
            ("POST", "/echo", b"a posted body"),
        ];
        for (method, path, expected) in cases {
            let body = if method == "POST" {
                full(expected)
            } else {
                empty()
            };
            let req = Request::builder()
                .method(method)
                .uri(format!("{base}{path}"))
                .body(body)
                .unwrap();
            let (parts, got) = send(&client, req).await;
            assert!(
                parts.status.is_success(),
                "round {round} {method} {path}: {}",
                parts.status
            );
            assert_eq!(&got[..], expected, "round {round} {method} {path}");
        }
    }
    assert_eq!(
        backend.accepted(),
        1,
        "every request should reuse the one connection"
    );
    eventually("the connection parked", || {
        proxy.upstreams[0].idle_connections() == 1
    })
    .await;
    proxy.shutdown().await;
}

/// A parked connection is closed by podproxy once it has been idle `pool_idle_timeout`,
/// so it never meets the backend's own keepalive close; the next request opens a new one.
#[tokio::test]
async fn parked_connection_is_closed_at_the_pool_idle_timeout() {
    let mut backend = counted_backend(by_path).await;
    let proxy = Proxy::start(&proxy_config(
        &backend.backend.url(),
        "pool_idle_timeout = \"200ms\"",
    ))
    .await;
    let client = http_client();
    let url = format!("{}/length", proxy.url("main"));
    let (parts, _) = send(&client, Request::get(&url).body(empty()).unwrap()).await;
    assert_eq!(parts.status, 200);
    // No request follows: the close comes from the pool's sweep.
    backend.closes(1).await;
    assert_eq!(proxy.upstreams[0].idle_connections(), 0);
    let (parts, body) = send(&client, Request::get(&url).body(empty()).unwrap()).await;
    assert_eq!((parts.status.as_u16(), &body[..]), (200, &b"hello"[..]));
    assert_eq!(backend.accepted(), 2);
    proxy.shutdown().await;
}

/// Five concurrent requests need five connections; afterwards only
/// `max_idle_per_backend` (2) stay parked and the other three are closed.
#[tokio::test]
async fn parked_connections_are_capped_per_backend() {
    const N: usize = 5;
    // The backend holds every answer until all N requests have arrived, so they cannot
    // share connections.
    let all_in = Arc::new(Barrier::new(N));
    let accepted = Arc::new(AtomicUsize::new(0));
    let (tx, mut closed) = mpsc::unbounded_channel::<()>();
    let counter = accepted.clone();
    let backend = RawBackend::start(move |mut s| {
        counter.fetch_add(1, Ordering::SeqCst);
        let (all_in, tx) = (all_in.clone(), tx.clone());
        async move {
            let mut buf = Vec::new();
            while read_request(&mut s, &mut buf).await.is_some() {
                all_in.wait().await;
                let r = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                if s.write_all(r.as_bytes()).await.is_err() {
                    break;
                }
            }
            let _ = tx.send(());
        }
    })
    .await;
    let proxy = Proxy::start(&proxy_config(&backend.url(), "max_idle_per_backend = 2")).await;
    let client = http_client();
    let url = format!("{}/x", proxy.url("main"));
    let mut all = tokio::task::JoinSet::new();
    for _ in 0..N {
        let (client, url) = (client.clone(), url.clone());
        all.spawn(async move { send(&client, Request::get(url).body(empty()).unwrap()).await });
    }
    while let Some(done) = bounded("concurrent requests", all.join_next()).await {
        let (parts, body) = done.unwrap();
        assert_eq!((parts.status.as_u16(), &body[..]), (200, &b"ok"[..]));
    }
    assert_eq!(accepted.load(Ordering::SeqCst), N);
    for _ in 0..N - 2 {
        bounded("surplus connection closed", closed.recv())
            .await
            .unwrap();
    }
    eventually("two connections parked", || {
        proxy.upstreams[0].idle_connections() == 2
    })
    .await;
    proxy.shutdown().await;
}

/// `Connection: close` from the backend: the connection is not parked, and each request
/// gets a fresh one.
#[tokio::test]
async fn connection_close_response_is_never_reused() {
    let mut backend = counted_backend(by_path).await;
    let proxy = Proxy::start(&proxy_config(&backend.backend.url(), "")).await;
    let client = http_client();
    let url = format!("{}/close", proxy.url("main"));
    for i in 1..=3 {
        let (parts, body) = send(&client, Request::get(&url).body(empty()).unwrap()).await;
        assert_eq!((parts.status.as_u16(), &body[..]), (200, &b"ok"[..]));
        backend.closes(1).await;
        assert_eq!(backend.accepted(), i);
    }
    assert_eq!(proxy.upstreams[0].idle_connections(), 0);
    proxy.shutdown().await;
}

/// A client that leaves in the middle of a streamed body: the upstream connection carrying
/// it is closed (that is how the backend learns to abort), never parked for reuse.
#[tokio::test]
async fn abandoned_stream_closes_its_upstream_connection() {
    let mut backend = counted_backend(|_| {
        // A head and one event, then nothing: the stream stays open until the proxy hangs up.
        vec![
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec(),
            b"9\r\ndata: 0\n\n\r\n".to_vec(),
        ]
    })
    .await;
    let proxy = Proxy::start(&proxy_config(&backend.backend.url(), "")).await;
    let client = http_client();
    let resp = bounded(
        "response head",
        client.request(
            Request::get(format!("{}/sse", proxy.url("main")))
                .body(empty())
                .unwrap(),
        ),
    )
    .await
    .unwrap();
    let mut body = resp.into_body();
    let first = bounded("first event", body.frame()).await.unwrap().unwrap();
    assert_eq!(first.into_data().unwrap(), "data: 0\n\n");
    drop(body);
    backend.closes(1).await;
    assert_eq!(proxy.upstreams[0].idle_connections(), 0);
    eventually("in-flight back to 0", || proxy.in_flight() == 0).await;
    proxy.shutdown().await;
}

/// An HTTP/1.0 client may leave out `Host`; the upstream hop is HTTP/1.1, which needs one,
/// so the request goes out with the backend's authority (as hyper-util's client did).
#[tokio::test]
async fn request_without_host_gets_the_backends_authority() {
    let backend = counted_backend(|req| {
        let host = req.header_all("host").join("|");
        vec![format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{host}",
            host.len()
        )
        .into_bytes()]
    })
    .await;
    let proxy = Proxy::start(&proxy_config(&backend.backend.url(), "")).await;
    let r = raw_exchange(proxy.addr("main"), b"GET /whoami HTTP/1.0\r\n\r\n").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body_str(), backend.backend.addr.to_string());
    let r = raw_exchange(
        proxy.addr("main"),
        b"GET /whoami HTTP/1.0\r\nHost: client.example\r\n\r\n",
    )
    .await;
    assert_eq!(
        r.body_str(),
        "client.example",
        "a Host the client sent is kept"
    );
    proxy.shutdown().await;
}
