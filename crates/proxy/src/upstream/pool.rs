//! Upstream HTTP/1.1 connections, driven by the task that uses them.
//!
//! hyper-util's pooled client ran every upstream connection as a task of its own, so each
//! request, response head and body frame crossed a channel and a task wake-up, often to the
//! other worker thread. Here the connection future travels with the exchange instead: the
//! client connection's task polls it while it waits for the response head ([`Pool::send`])
//! and while it relays the body ([`Lease`], polled by `Relay`), and the connection is parked
//! on its backend's idle stack when the response has ended and it can take another request.
//!
//! Each backend has one idle stack per connection worker (`workers`) and one for other
//! threads. A connection's socket is in the epoll of the thread that opened it (its home),
//! and it is parked on its home's stack. A request takes a connection from its own
//! worker's stack first, so the socket is in the same thread's epoll as the client's; only
//! when that stack is empty does it take one from another stack (still cheaper than a new
//! connection), and a worker then adopts it ([`Pool::adopt`]): the socket moves into the
//! worker's epoll and the connection becomes the worker's own. Left where it was, the
//! other thread's epoll would report each of its events and wake this one across threads:
//! worst on a quiet node, where the workers' connections expire between requests while the
//! health checks (on the control thread, which otherwise sleeps) keep theirs warm. A thread
//! that is not a worker (the health checks) borrows without adopting, so the connection
//! goes back to its home's stack.
//!
//! Parked connections are not polled. A close by the backend (uvicorn closes after 5 s) is
//! read at checkout, expired ones are swept, and a request that still loses the race with a
//! close before any byte was sent is retried once on a fresh connection.

use super::backend::InFlight;
use super::io::{self, Io};
use super::own_wakes::OwnWakes;
use super::resolve::CachingResolver;
use crate::body::Relay;
use crate::config::BackendAddr;
use crate::lazy_timer::LazyTimer;
use http::{header, HeaderValue, Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use std::future::{poll_fn, Future};
use std::os::fd::AsFd;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::time::Instant as TokioInstant;
use tokio_util::either::Either;
use tower_service::Service;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why an exchange produced no response head.
#[derive(Debug)]
pub enum SendError {
    /// No connection: resolve, TCP connect or TLS handshake failed (nothing was sent).
    Connect(BoxError),
    /// The connection failed or broke the protocol before the response head.
    Http(hyper::Error),
    /// The connection ended without an answer and without an error.
    Closed,
    /// No response head by the deadline the caller gave.
    TimedOut,
}

impl SendError {
    /// The reason, for log lines, health state and error bodies.
    pub fn detail(&self) -> String {
        match self {
            SendError::Connect(e) => super::error_chain(&**e),
            SendError::Http(e) => super::error_chain(e),
            SendError::Closed => "connection closed before the response".into(),
            SendError::TimedOut => "no response head in time".into(),
        }
    }
}

/// One upstream connection: the sending half and the future that does its I/O.
struct Conn {
    tx: http1::SendRequest<Relay>,
    driver: http1::Connection<Io, Relay>,
    /// The driver finished (closed or failed); it must not be polled again.
    done: bool,
    /// What the connection and its response bodies are polled with (see `own_wakes`).
    wakes: OwnWakes,
    /// The worker whose epoll has the socket (`None`: a thread that is not a worker).
    home: Option<usize>,
    /// The response-head deadlines' timer, kept from one request to the next.
    head_timer: LazyTimer,
}

impl Conn {
    /// Lets the connection do whatever I/O is ready. Returns its result once it has ended.
    fn poll_drive(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), hyper::Error>> {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        let polled = Pin::new(&mut self.driver).poll(cx);
        if polled.is_ready() {
            self.done = true;
        }
        polled
    }

    /// Whether the connection can take another request right now.
    fn reusable(&mut self, cx: &mut Context<'_>) -> bool {
        self.poll_drive(cx).is_pending() && self.tx.is_ready()
    }
}

struct Parked {
    conn: Box<Conn>,
    since: Instant,
}

/// One backend's parked connections: a stack per worker, the last for other threads.
struct Idle {
    stacks: Vec<Mutex<Vec<Parked>>>,
    /// Parked connections over all stacks, held to `max_idle`.
    count: AtomicUsize,
}

impl Idle {
    fn new() -> Idle {
        // One stack per default worker (one per CPU; more workers share stacks) + one.
        let workers = crate::workers::count(None);
        Idle {
            stacks: (0..=workers).map(|_| Mutex::new(Vec::new())).collect(),
            count: AtomicUsize::new(0),
        }
    }

    /// The stack of the current thread.
    fn own(&self) -> usize {
        self.stack_of(crate::workers::current())
    }

    /// The stack of `worker`'s connections (`None`: threads that are not workers).
    fn stack_of(&self, worker: Option<usize>) -> usize {
        let workers = self.stacks.len() - 1;
        worker.map_or(workers, |w| w % workers)
    }

    /// Takes the most recently parked connection, from `stack` only.
    fn pop(&self, stack: usize) -> Option<Parked> {
        let parked = self.stacks.get(stack)?.lock().ok()?.pop()?;
        self.count.fetch_sub(1, Ordering::Relaxed);
        Some(parked)
    }
}

/// The idle connections of one upstream, per backend, and how new ones are made.
pub struct Pool {
    connector: HttpsConnector<HttpConnector<CachingResolver>>,
    /// The connector's resolver, told to forget a name whose address did not connect.
    resolver: CachingResolver,
    /// `scheme://authority` per backend (same order as the upstream's backends): what the
    /// connector resolves and connects to.
    targets: Vec<Uri>,
    /// `Host` per backend, for requests that come without one (HTTP/1.0 clients, health
    /// checks): the upstream hop is HTTP/1.1, which requires it.
    hosts: Vec<HeaderValue>,
    /// `rewrite_host`: every request gets its backend's `Host`, not only one without.
    rewrite_host: bool,
    idle: Vec<Idle>,
    idle_timeout: Duration,
    max_idle: usize,
    h1: http1::Builder,
}

impl Pool {
    pub fn new(
        connector: HttpsConnector<HttpConnector<CachingResolver>>,
        resolver: CachingResolver,
        backends: &[BackendAddr],
        rewrite_host: bool,
        idle_timeout: Duration,
        max_idle: usize,
    ) -> Result<Arc<Self>, String> {
        let targets = backends
            .iter()
            .map(|b| {
                Uri::builder()
                    .scheme(b.scheme.clone())
                    .authority(b.authority.clone())
                    .path_and_query("/")
                    .build()
                    .map_err(|e| format!("backend {b}: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let hosts = backends
            .iter()
            .map(|b| {
                HeaderValue::from_str(b.authority.as_str()).map_err(|e| format!("backend {b}: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut h1 = http1::Builder::new();
        // Bounds the response bytes read ahead of a slow client (see config::defaults::MAX_BUF_SIZE).
        h1.max_buf_size(crate::config::defaults::MAX_BUF_SIZE);
        let pool = Arc::new(Pool {
            connector,
            resolver,
            idle: targets.iter().map(|_| Idle::new()).collect(),
            targets,
            hosts,
            rewrite_host,
            idle_timeout,
            max_idle,
            h1,
        });
        // Without a runtime (config checks) nothing is ever parked that needs sweeping.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(sweep(Arc::downgrade(&pool)));
        }
        Ok(pool)
    }

    /// Sends `req` (origin-form URI) to backend `backend` on a parked connection or a new
    /// one, driving the connection until the response head arrives, or until `deadline`
    /// (`SendError::TimedOut`; `None`: the caller bounds the wait). A request without
    /// `Host`, and with `rewrite_host` every request, gets the backend's authority. The
    /// returned lease must travel with the response body: it keeps the connection going.
    pub async fn send(
        self: &Arc<Self>,
        backend: usize,
        mut req: Request<Relay>,
        deadline: Option<TokioInstant>,
    ) -> Result<(Response<Incoming>, Lease), SendError> {
        if self.rewrite_host || !req.headers().contains_key(header::HOST) {
            if let Some(host) = self.hosts.get(backend) {
                req.headers_mut().insert(header::HOST, host.clone());
            }
        }
        let parked = poll_fn(|cx| Poll::Ready(self.checkout(backend, cx))).await;
        let (conn, reused) = match self.adopt(parked).await {
            Some(conn) => (conn, true),
            None => (self.connect_by(backend, deadline).await?, false),
        };
        let mut lease = Lease {
            conn: Some(conn),
            pool: self.clone(),
            backend,
            in_flight: None,
        };
        match lease.exchange(req, deadline).await {
            Ok(resp) => Ok((resp, lease)),
            // The parked connection was closed under us before the request went out: the
            // request never reached the backend, so one fresh connection may take it.
            Err(Failed::NotSent(req, _)) if reused => {
                lease.conn = Some(self.connect_by(backend, deadline).await?);
                match lease.exchange(*req, deadline).await {
                    Ok(resp) => Ok((resp, lease)),
                    Err(failed) => Err(failed.into_error()),
                }
            }
            Err(failed) => Err(failed.into_error()),
        }
    }

    /// Takes the most recently parked connection of `backend` that is still open, from
    /// this thread's stack first.
    fn checkout(&self, backend: usize, cx: &mut Context<'_>) -> Option<Box<Conn>> {
        let idle = self.idle.get(backend)?;
        if idle.count.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let own = idle.own();
        let others = (0..idle.stacks.len()).filter(|&s| s != own);
        for stack in std::iter::once(own).chain(others) {
            // Dropped outside the lock (`pop` returns it): closing a socket is a syscall.
            while let Some(parked) = idle.pop(stack) {
                if parked.since.elapsed() >= self.idle_timeout {
                    continue;
                }
                let mut conn = parked.conn;
                // One poll reads a close the backend sent while the connection was parked.
                if conn.reusable(cx) {
                    return Some(conn);
                }
            }
        }
        None
    }

    /// `connect`, given up at `deadline`.
    async fn connect_by(
        &self,
        backend: usize,
        deadline: Option<TokioInstant>,
    ) -> Result<Box<Conn>, SendError> {
        match deadline {
            Some(at) => tokio::time::timeout_at(at, self.connect(backend))
                .await
                .unwrap_or(Err(SendError::TimedOut)),
            None => self.connect(backend).await,
        }
    }

    async fn connect(&self, backend: usize) -> Result<Box<Conn>, SendError> {
        let target = self
            .targets
            .get(backend)
            .ok_or_else(|| SendError::Connect("no such backend".into()))?
            .clone();
        let mut connector = self.connector.clone();
        poll_fn(|cx| connector.poll_ready(cx))
            .await
            .map_err(SendError::Connect)?;
        let io = match connector.call(target.clone()).await {
            Ok(io) => io::from_connector(io),
            Err(e) => {
                if let Some(host) = target.host() {
                    self.resolver.forget(host);
                }
                return Err(SendError::Connect(e));
            }
        };
        self.wrap(io).await.map_err(SendError::Http)
    }

    /// A hyper client connection over `io`, at home on this thread.
    async fn wrap(&self, io: Io) -> Result<Box<Conn>, hyper::Error> {
        let (tx, driver) = self.h1.handshake(io).await?;
        // Boxed once per connection: it moves between pool and lease as one pointer, and a
        // response body that carries it stays small.
        Ok(Box::new(Conn {
            tx,
            driver,
            done: false,
            wakes: OwnWakes::default(),
            home: crate::workers::current(),
            head_timer: LazyTimer::default(),
        }))
    }

    /// Makes a parked connection borrowed from another thread this worker's own: the
    /// socket leaves the other thread's epoll for this one's (a few system calls, far
    /// cheaper than a connect, and after them every event wakes only this thread) under a
    /// fresh hyper connection (HTTP/1 keeps no state between requests; a TLS session keeps
    /// its own). `None`: the connection could not be moved and is closed (the caller
    /// connects anew).
    async fn adopt(&self, conn: Option<Box<Conn>>) -> Option<Box<Conn>> {
        let conn = conn?;
        let here = crate::workers::current();
        if here.is_none() || conn.home == here {
            return Some(conn);
        }
        let parts = conn.driver.into_parts();
        // Bytes the backend sent unasked: not a connection to send a request on.
        if !parts.read_buf.is_empty() {
            return None;
        }
        let io = TokioIo::new(match parts.io.into_inner() {
            Either::Left(tcp) => Either::Left(TcpStream::from_std(tcp.into_std().ok()?).ok()?),
            Either::Right(mut tls) => {
                // The socket sits inside the TLS stream, which cannot be taken apart: a
                // duplicate of its descriptor, registered here, takes its place, and the
                // old one leaves the other epoll and is closed (the socket stays open).
                let tcp = tls.get_mut().0.inner_mut();
                let dup = tcp.inner().as_fd().try_clone_to_owned().ok()?;
                let moved = TcpStream::from_std(std::net::TcpStream::from(dup)).ok()?;
                *tcp = TokioIo::new(moved);
                Either::Right(tls)
            }
        });
        self.wrap(io).await.ok()
    }

    fn park(&self, backend: usize, conn: Box<Conn>) {
        let Some(idle) = self.idle.get(backend) else {
            return;
        };
        if idle.count.fetch_add(1, Ordering::Relaxed) >= self.max_idle {
            idle.count.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        let rejected = match idle.stacks.get(idle.stack_of(conn.home)).map(|s| s.lock()) {
            Some(Ok(mut stack)) => {
                stack.push(Parked {
                    conn,
                    since: Instant::now(),
                });
                None
            }
            _ => Some(conn),
        };
        if rejected.is_some() {
            idle.count.fetch_sub(1, Ordering::Relaxed);
        }
        drop(rejected);
    }

    /// Parked connections of backend `backend` (metrics, `/backends`).
    pub fn idle_count_of(&self, backend: usize) -> usize {
        self.idle
            .get(backend)
            .map_or(0, |i| i.count.load(Ordering::Relaxed))
    }

    /// Parked connections of `backend` per stack (workers' stacks, then the others').
    #[cfg(test)]
    fn parked_per_stack(&self, backend: usize) -> Vec<usize> {
        self.idle[backend]
            .stacks
            .iter()
            .map(|s| s.lock().map_or(0, |s| s.len()))
            .collect()
    }

    /// Parked connections, all backends.
    pub fn idle_count(&self) -> usize {
        (0..self.idle.len()).map(|b| self.idle_count_of(b)).sum()
    }

    /// Closes connections parked longer than the idle timeout.
    fn sweep_expired(&self) {
        for idle in &self.idle {
            for stack in &idle.stacks {
                let expired: Vec<Parked> = match stack.lock() {
                    Ok(mut stack) => {
                        let keep = stack
                            .iter()
                            .position(|p| p.since.elapsed() < self.idle_timeout)
                            .unwrap_or(stack.len());
                        // The stack is in parking order: the expired ones are at the bottom.
                        stack.drain(..keep).collect()
                    }
                    Err(_) => Vec::new(),
                };
                idle.count.fetch_sub(expired.len(), Ordering::Relaxed);
                drop(expired);
            }
        }
    }
}

/// Closes expired parked connections until the pool is gone, so a backend's close does not
/// leave sockets in CLOSE_WAIT for longer than the idle timeout.
async fn sweep(pool: Weak<Pool>) {
    let every = match pool.upgrade() {
        Some(p) => (p.idle_timeout / 2).clamp(Duration::from_millis(100), Duration::from_secs(1)),
        None => return,
    };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match pool.upgrade() {
            Some(p) => p.sweep_expired(),
            None => return,
        }
    }
}

enum Failed {
    /// Never written to the connection: the request comes back.
    NotSent(Box<Request<Relay>>, SendError),
    Sent(SendError),
}

impl Failed {
    fn into_error(self) -> SendError {
        match self {
            Failed::NotSent(_, e) | Failed::Sent(e) => e,
        }
    }
}

/// An upstream connection in use by one exchange. The response body polls it (`drive`) so
/// the connection keeps reading; when the body has ended cleanly, `release` parks it for the
/// next request. Dropped any other way, it closes the connection, which is how an abandoned
/// request is cancelled upstream. It also carries the request's in-flight slot on the
/// backend (`hold`), so a 5-minute stream counts against the backend for 5 minutes.
pub struct Lease {
    conn: Option<Box<Conn>>,
    pool: Arc<Pool>,
    backend: usize,
    in_flight: Option<InFlight>,
}

impl Lease {
    /// Sends `req` and drives the connection until the response head (or the end, or
    /// `deadline`).
    async fn exchange(
        &mut self,
        req: Request<Relay>,
        deadline: Option<TokioInstant>,
    ) -> Result<Response<Incoming>, Failed> {
        let Some(conn) = self.conn.as_mut() else {
            return Err(Failed::Sent(SendError::Closed));
        };
        let wakes = conn.wakes.clone();
        let mut response = pin!(conn.tx.try_send_request(req));
        let mut ended: Option<Result<(), hyper::Error>> = None;
        let mut timed_out = false;
        let polled = poll_fn(|cx| {
            wakes.poll(cx, |cx| {
                if ended.is_none() {
                    if let Poll::Ready(r) = conn.poll_drive(cx) {
                        ended = Some(r);
                    }
                }
                match response.as_mut().poll(cx) {
                    Poll::Ready(r) => Poll::Ready(Some(r)),
                    // The connection is over and answered nothing: nothing more can come.
                    Poll::Pending if ended.is_some() => Poll::Ready(None),
                    Poll::Pending => match deadline {
                        Some(at) if conn.head_timer.poll_due(at, cx).is_ready() => {
                            timed_out = true;
                            Poll::Ready(None)
                        }
                        _ => Poll::Pending,
                    },
                }
            })
        })
        .await;
        match polled {
            Some(Ok(resp)) => Ok(resp),
            Some(Err(mut e)) => match e.take_message() {
                Some(req) => Err(Failed::NotSent(
                    Box::new(req),
                    SendError::Http(e.into_error()),
                )),
                None => Err(Failed::Sent(SendError::Http(e.into_error()))),
            },
            None if timed_out => Err(Failed::Sent(SendError::TimedOut)),
            None => Err(Failed::Sent(match ended {
                Some(Err(e)) => SendError::Http(e),
                _ => SendError::Closed,
            })),
        }
    }

    /// What the connection is polled with: the body it feeds polls through it too.
    pub fn wakes(&self) -> OwnWakes {
        self.conn
            .as_ref()
            .map_or_else(OwnWakes::default, |c| c.wakes.clone())
    }

    /// Lets the connection read and write; called before every poll of the body it feeds.
    pub fn drive(&mut self, cx: &mut Context<'_>) {
        if let Some(conn) = &mut self.conn {
            // An ended connection has handed the body everything it will get.
            let _ = conn.poll_drive(cx);
        }
    }

    /// Keeps the request's in-flight slot until the response body is over.
    pub fn hold(&mut self, slot: InFlight) {
        self.in_flight = Some(slot);
    }

    /// The response body ended cleanly: the slot is free, and the connection is parked if
    /// it can take another request.
    pub fn release(&mut self, cx: Option<&mut Context<'_>>) {
        self.in_flight = None;
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        let mut noop = Context::from_waker(Waker::noop());
        if conn.reusable(cx.unwrap_or(&mut noop)) {
            self.pool.park(self.backend, conn);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workers::Workers;
    use http_body_util::BodyExt;

    fn pool(backend: &str) -> Arc<Pool> {
        pool_with(backend, &Default::default())
    }

    fn pool_with(backend: &str, tls: &crate::config::tls::UpstreamTls) -> Arc<Pool> {
        let resolver = CachingResolver::new();
        let mut http = HttpConnector::new_with_resolver(resolver.clone());
        http.enforce_http(false);
        let tls = crate::config::tls::client_config(tls).unwrap();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let backends = [crate::config::parse_backend(backend).unwrap()];
        Pool::new(
            connector,
            resolver,
            &backends,
            false,
            Duration::from_secs(60),
            8,
        )
        .unwrap()
    }

    /// One request through `pool` on `worker`, its body read to the end (which parks the
    /// connection).
    async fn one_request(pool: &Arc<Pool>, worker: &tokio::runtime::Handle) {
        let pool = pool.clone();
        let (done, result) = tokio::sync::oneshot::channel();
        worker.spawn(async move {
            let req = Request::get("/bytes/10").body(Relay::empty()).unwrap();
            let (resp, lease) = pool.send(0, req, None).await.unwrap();
            let body = Relay::upstream(resp.into_body(), lease, Duration::from_secs(10));
            let bytes = body.collect().await.unwrap().to_bytes();
            let _ = done.send(bytes.len());
        });
        let got = tokio::time::timeout(Duration::from_secs(10), result).await;
        assert!(matches!(got, Ok(Ok(10))), "{got:?}");
    }

    /// A worker that borrows another worker's plain connection adopts it: the same
    /// connection, parked on the borrower's stack after.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_borrowed_connection_is_adopted() {
        let (addr, accepted) = counting_server(None).await;
        let pool = pool(&format!("http://{addr}"));
        let workers = Workers::start(2).unwrap();
        let (first, second) = (workers.pick().clone(), workers.pick().clone());
        let stacks = pool.idle[0].stacks.len();
        let on = |worker| {
            let mut expected = vec![0; stacks];
            expected[pool.idle[0].stack_of(Some(worker))] = 1;
            expected
        };

        one_request(&pool, &first).await; // opens a connection on worker 0, parks it there
        assert_eq!(pool.parked_per_stack(0), on(0));
        one_request(&pool, &second).await; // worker 1's stack is empty: it borrows
        assert_eq!(pool.parked_per_stack(0), on(1));
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "one connection throughout"
        );
    }

    /// On a kept-alive connection one timer serves every request's response-head deadline
    /// (`LazyTimer`): each request still times out by its own deadline, whether an
    /// earlier request left the timer sooner than that or later.
    #[tokio::test]
    async fn each_request_on_a_kept_alive_connection_times_out_by_its_own_deadline() {
        let (addr, accepted) = counting_server(None).await;
        let pool = pool(&format!("http://{addr}"));
        let send = |path: &'static str, within: Duration| {
            let pool = pool.clone();
            async move {
                let req = Request::get(path).body(Relay::empty()).unwrap();
                let deadline = TokioInstant::now() + within;
                let sent = tokio::time::timeout(
                    Duration::from_secs(20),
                    pool.send(0, req, Some(deadline)),
                )
                .await
                .expect("the deadline was not kept");
                match sent {
                    Ok((resp, lease)) => {
                        let body = Relay::upstream(resp.into_body(), lease, within);
                        body.collect().await.map(|_| ()).map_err(|e| e.to_string())
                    }
                    Err(e) => Err(e.detail()),
                }
            }
        };
        let timed_out = Err(SendError::TimedOut.detail());

        // A quick request leaves the timer at its deadline; the next request hangs. Left
        // 100 ms out, the timer fires before the next request's 600 ms and must be moved,
        // not obeyed; left 60 s out, the next request's 300 ms must still hold.
        let ms = Duration::from_millis;
        for (left_at, own) in [(ms(100), ms(600)), (Duration::from_secs(60), ms(300))] {
            assert_eq!(send("/fast", left_at).await, Ok(()));
            let started = Instant::now();
            assert_eq!(send("/hang", own).await, timed_out);
            let waited = started.elapsed();
            assert!(waited >= own, "timed out after {waited:?}, before {own:?}");
        }

        // Each pair shared a connection; a timed-out request closes its connection.
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    /// An HTTP/1 server on 127.0.0.1:0 (over TLS with `tls`) that answers every request
    /// with 10 bytes (`/hang`: never) and counts the connections it accepted.
    async fn counting_server(
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        async fn serve<T>(io: T)
        where
            T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        {
            let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
                if req.uri().path() == "/hang" {
                    std::future::pending::<()>().await;
                }
                Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(
                    bytes::Bytes::from_static(b"0123456789"),
                )))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(io), service)
                .await;
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let tls = tls.clone();
                tokio::spawn(async move {
                    match tls {
                        None => serve(socket).await,
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(socket).await {
                                serve(stream).await;
                            }
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    /// A worker that borrows a plain connection the control thread opened (the health
    /// checks') adopts it: the same connection, parked on the worker's own stack after.
    /// The control thread does not adopt what it borrows from a worker.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_worker_adopts_the_control_threads_connection() {
        let (addr, accepted) = counting_server(None).await;
        adopts_the_control_threads_connection(pool(&format!("http://{addr}")), accepted).await;
    }

    /// The same over TLS: the socket moves under a TLS session that goes on unchanged.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_worker_adopts_the_control_threads_tls_connection() {
        use sha2::{Digest, Sha256};
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let (addr, accepted) = counting_server(Some(acceptor)).await;
        let pin: String = Sha256::digest(cert.der().as_ref())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let tls = crate::config::tls::UpstreamTls {
            pins: vec![format!("sha256:{pin}")],
            server_name: Some("localhost".into()),
            ..Default::default()
        };
        let pool = pool_with(&format!("https://localhost:{}", addr.port()), &tls);
        adopts_the_control_threads_connection(pool, accepted).await;
    }

    async fn adopts_the_control_threads_connection(pool: Arc<Pool>, accepted: Arc<AtomicUsize>) {
        let workers = Workers::start(1).unwrap();
        let worker = workers.pick().clone();
        let control = tokio::runtime::Handle::current();
        let (home, others) = (pool.idle[0].stack_of(Some(0)), pool.idle[0].stack_of(None));
        let mut expected = vec![0; pool.idle[0].stacks.len()];

        one_request(&pool, &control).await; // opens one, parks it on the others' stack
        expected[others] = 1;
        assert_eq!(pool.parked_per_stack(0), expected);
        one_request(&pool, &worker).await; // takes it and makes it its own
        expected[others] = 0;
        expected[home] = 1;
        assert_eq!(pool.parked_per_stack(0), expected);
        one_request(&pool, &control).await; // borrows it back, leaves it the worker's
        assert_eq!(pool.parked_per_stack(0), expected);
        one_request(&pool, &worker).await;
        assert_eq!(pool.parked_per_stack(0), expected);
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "one connection throughout"
        );
    }
}
