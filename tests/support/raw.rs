//! A raw HTTP/1.1 client that sees exactly what went over the wire, and a raw TCP backend
//! for behaviour the testkit simulators do not have.

use super::bounded;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

// ---------------------------------------------------------------------------------------
// Raw HTTP/1.1 client
// ---------------------------------------------------------------------------------------

/// A response as it came over the wire: header names lowercased, repeats kept in order,
/// the body de-chunked when it was chunked.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub chunked: bool,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    pub fn body_str(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.body_str()))
    }
}

/// One client connection that writes raw bytes and reads framed HTTP/1.1 responses.
pub struct RawConn {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl RawConn {
    pub async fn connect(addr: SocketAddr) -> RawConn {
        let stream = bounded("connect", TcpStream::connect(addr))
            .await
            .expect("connect");
        stream.set_nodelay(true).unwrap();
        RawConn {
            stream,
            buf: Vec::new(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write request");
    }

    /// Reads more bytes into the buffer; false at EOF.
    async fn fill(&mut self) -> std::io::Result<bool> {
        let mut chunk = [0u8; 8192];
        let n = self.stream.read(&mut chunk).await?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n > 0)
    }

    async fn line(&mut self) -> std::io::Result<Vec<u8>> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = self.buf[..i].to_vec();
                self.buf.drain(..i + 2);
                return Ok(line);
            }
            if !self.fill().await? {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "EOF inside a line",
                ));
            }
        }
    }

    async fn exact(&mut self, n: usize) -> std::io::Result<Vec<u8>> {
        while self.buf.len() < n {
            if !self.fill().await? {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "EOF inside a body",
                ));
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    /// Reads one response (head + framed body). An `Err` means the connection broke or
    /// closed before the response was complete.
    pub async fn try_response(&mut self) -> std::io::Result<RawResponse> {
        let status_line = String::from_utf8_lossy(&self.line().await?).into_owned();
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let mut headers = Vec::new();
        loop {
            let line = self.line().await?;
            if line.is_empty() {
                break;
            }
            let line = String::from_utf8_lossy(&line).into_owned();
            let (k, v) = line.split_once(':').expect("header line");
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
        let chunked = headers
            .iter()
            .any(|(k, v)| k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked"));
        let length = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .map(|(_, v)| v.parse::<usize>().expect("content-length"));
        let mut body = Vec::new();
        if status == 204 || status == 304 || (100..200).contains(&status) {
        } else if chunked {
            loop {
                let size_line = String::from_utf8_lossy(&self.line().await?).into_owned();
                let size = usize::from_str_radix(size_line.split(';').next().unwrap().trim(), 16)
                    .unwrap_or_else(|_| panic!("bad chunk size {size_line:?}"));
                if size == 0 {
                    while !self.line().await?.is_empty() {}
                    break;
                }
                body.extend(self.exact(size).await?);
                let crlf = self.exact(2).await?;
                assert_eq!(crlf, b"\r\n", "chunk not followed by CRLF");
            }
        } else if let Some(n) = length {
            body = self.exact(n).await?;
        } else {
            while self.fill().await? {}
            body = std::mem::take(&mut self.buf);
        }
        Ok(RawResponse {
            status,
            headers,
            body,
            chunked,
        })
    }

    /// Reads one complete response, bounded by `WAIT`.
    pub async fn response(&mut self) -> RawResponse {
        bounded("raw response", self.try_response())
            .await
            .expect("read raw response")
    }

    /// Waits (bounded) until the peer closes the connection; returns what it sent before.
    pub async fn until_closed(&mut self) -> Vec<u8> {
        bounded("peer close", async {
            loop {
                match self.fill().await {
                    Ok(true) => {}
                    Ok(false) | Err(_) => return std::mem::take(&mut self.buf),
                }
            }
        })
        .await
    }
}

/// Sends `request` on a fresh connection and reads the response.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> RawResponse {
    let mut conn = RawConn::connect(addr).await;
    conn.send(request).await;
    conn.response().await
}

// ---------------------------------------------------------------------------------------
// Raw TCP backend
// ---------------------------------------------------------------------------------------

type ConnFn = Arc<dyn Fn(TcpStream) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// A loopback TCP server running `on_conn` for every connection. Dropping it stops
/// accepting and aborts every connection task.
pub struct RawBackend {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl RawBackend {
    pub async fn start<F, Fut>(on_conn: F) -> RawBackend
    where
        F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let on_conn: ConnFn = Arc::new(move |s| Box::pin(on_conn(s)));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    r = listener.accept() => {
                        let Ok((s, _)) = r else { continue };
                        let _ = s.set_nodelay(true);
                        conns.spawn(on_conn(s));
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        RawBackend { addr, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A request head as read by a raw backend, plus its Content-Length body.
#[derive(Debug, Clone)]
pub struct RawRequest {
    pub head: String,
    pub body: Vec<u8>,
}

impl RawRequest {
    /// Every value of header `name` (any case), trimmed, in order.
    pub fn header_all(&self, name: &str) -> Vec<String> {
        self.head
            .lines()
            .filter_map(|l| l.split_once(':'))
            .filter(|(k, _)| k.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_string())
            .collect()
    }

    /// The first value of header `name` (any case), trimmed.
    pub fn header(&self, name: &str) -> Option<String> {
        self.header_all(name).into_iter().next()
    }
}

/// Reads one request (head and Content-Length body; chunked request bodies are not
/// supported here) from `stream`. `None` when the peer closed before a request.
pub async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<RawRequest> {
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 8192];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    buf.drain(..end);
    let len = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .map_or(0, |(_, v)| v.trim().parse::<usize>().unwrap_or(0));
    while buf.len() < len {
        let mut chunk = [0u8; 8192];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let body = buf.drain(..len).collect();
    Some(RawRequest { head, body })
}
