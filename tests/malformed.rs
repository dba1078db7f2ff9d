//! Malformed and ambiguous HTTP/1 from a hostile client. Each case sends
//! raw bytes to podproxy in front of an `EchoServer`, records podproxy's answer (a status,
//! or a closed connection), and proves from the backend's recorder that nothing ambiguous
//! reached it: no smuggled second request, bodies exactly as podproxy framed them. After
//! every case a normal request on a new connection still works.

mod support;

use support::*;
use testkit::echo::EchoServer;
use testkit::Recorded;

/// What podproxy did with one raw request.
#[derive(Debug)]
struct Outcome {
    /// Status of the first response, `None` when the connection closed without one.
    status: Option<u16>,
    /// Statuses of any further responses on the same connection (pipelined requests).
    more: Vec<u16>,
    /// Client requests the backend received for this case (health checks skipped).
    seen: Vec<Recorded>,
}

struct Bench {
    echo: EchoServer,
    proxy: Proxy,
}

impl Bench {
    async fn start() -> Bench {
        let echo = EchoServer::start().await.unwrap();
        let proxy = Proxy::simple(&echo.url(), "[upstreams.u.health]\nenabled = false").await;
        Bench { echo, proxy }
    }

    /// Sends `raw` on a fresh connection, half-closes nothing, reads every response until
    /// podproxy closes the connection (or sends `expect_responses` and we stop reading),
    /// then sends a marker request on a new connection and waits for the backend to record
    /// it, so everything podproxy forwarded for `raw` has been recorded by then.
    async fn run(&self, raw: &[u8], expect_responses: usize) -> Outcome {
        let rec = self.echo.recorder();
        rec.clear();
        let mut conn = RawConn::connect(self.proxy.addr("main")).await;
        conn.send(raw).await;
        let mut statuses = Vec::new();
        for _ in 0..expect_responses.max(1) {
            match bounded("malformed response", conn.try_response()).await {
                Ok(r) => statuses.push(r.status),
                Err(_) => break,
            }
        }
        if statuses.len() < expect_responses.max(1) || statuses.first() != Some(&200) {
            // Refused (or cut): podproxy must also close the connection, bounded.
            let rest = conn.until_closed().await;
            assert!(
                rest.is_empty() || statuses.is_empty(),
                "bytes after a refusal: {:?}",
                String::from_utf8_lossy(&rest)
            );
        }
        drop(conn);
        let seen = self.marker_then_collect().await;
        // Shown with `--nocapture`: the source of the malformed-input table in docs/hardening.md.
        eprintln!(
            "case {:?}: status {:?}, more {:?}, backend saw {:?}",
            String::from_utf8_lossy(&raw[..raw.len().min(60)]),
            statuses.first(),
            &statuses[statuses.len().min(1)..],
            seen.iter()
                .map(|r| (format!("{} {}", r.method, r.target), r.body_len))
                .collect::<Vec<_>>()
        );
        Outcome {
            status: statuses.first().copied(),
            more: statuses.into_iter().skip(1).collect(),
            seen,
        }
    }

    /// A normal request on a new connection (the process still serves), then the backend's
    /// records before that marker.
    async fn marker_then_collect(&self) -> Vec<Recorded> {
        let rec = self.echo.recorder();
        let r = raw_exchange(
            self.proxy.addr("main"),
            b"GET /marker HTTP/1.1\r\nHost: ok\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(r.status, 200, "normal request after the case");
        let all = proxied(&rec);
        let i = all
            .iter()
            .position(|r| r.target == "/marker")
            .expect("marker recorded (it was answered 200)");
        all[..i].to_vec()
    }
}

fn targets(seen: &[Recorded]) -> Vec<String> {
    seen.iter()
        .map(|r| format!("{} {}", r.method, r.target))
        .collect()
}

/// Asserts podproxy refused with `status` (or closed when `status` is None) and forwarded
/// nothing.
fn refused(o: &Outcome, status: Option<u16>, case: &str) {
    assert_eq!(o.status, status, "{case}: {o:?}");
    assert!(o.more.is_empty(), "{case}: more responses {:?}", o.more);
    assert!(
        o.seen.is_empty(),
        "{case}: reached the backend: {:?}",
        targets(&o.seen)
    );
}

/// A request smuggled inside a body: must never reach the backend as its own request.
const SMUGGLED: &str = "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";

fn no_smuggled(o: &Outcome, case: &str) {
    assert!(
        o.seen.iter().all(|r| !r.target.contains("smuggled")),
        "{case}: smuggled request reached the backend: {:?}",
        targets(&o.seen)
    );
}

/// hyper's resolution of a Content-Length + chunked conflict (RFC 9112 §6.3 item 3):
/// chunked wins, Content-Length is ignored, and the connection is closed after the response
/// so nothing after the chunked body is ever read as a request. The backend gets exactly
/// the chunked body, re-framed by podproxy.
fn chunked_wins(o: &Outcome, body: &str, case: &str) {
    assert_eq!(o.status, Some(200), "{case}: {o:?}");
    assert!(
        o.more.is_empty(),
        "{case}: connection kept serving: {:?}",
        o.more
    );
    assert_eq!(targets(&o.seen), ["POST /x"], "{case}");
    assert_eq!(o.seen[0].body_str(), body, "{case}");
    assert!(
        o.seen[0].header_all("content-length").len() <= 1,
        "{case}: {:?}",
        o.seen[0].headers
    );
}

// ---------------------------------------------------------------------------------------
// Content-Length and Transfer-Encoding conflicts
// ---------------------------------------------------------------------------------------

/// CL.TE: a front end using Content-Length would forward the whole thing as one body; one
/// using chunked would see an empty body and then `GET /smuggled`.
#[tokio::test]
async fn cl_te_conflict() {
    let b = Bench::start().await;
    let body = format!("0\r\n\r\n{SMUGGLED}");
    let raw = format!(
        "POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n{body}",
        body.len()
    );
    let o = b.run(raw.as_bytes(), 2).await;
    no_smuggled(&o, "CL.TE");
    chunked_wins(&o, "", "CL.TE");
}

/// TE.CL: Content-Length says 4 (`5c\r\n`), chunked says a 0x5c-byte chunk that contains a
/// request.
#[tokio::test]
async fn te_cl_conflict() {
    let b = Bench::start().await;
    let inner = "POST /smuggled HTTP/1.1\r\nHost: x\r\nContent-Length: 15\r\n\r\nx=".to_string();
    let raw = format!(
        "POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{inner}\r\n0\r\n\r\n",
        inner.len()
    );
    let o = b.run(raw.as_bytes(), 2).await;
    no_smuggled(&o, "TE.CL");
    chunked_wins(&o, &inner, "TE.CL");
}

/// Runs a request with an obfuscated Transfer-Encoding header and a Content-Length that
/// covers a chunked terminator plus a smuggled request. Whatever podproxy decides, the
/// smuggled request must not reach the backend as a request.
async fn obfuscated_te(te_lines: &str, case: &str) -> Outcome {
    let b = Bench::start().await;
    let body = format!("0\r\n\r\n{SMUGGLED}");
    let raw = format!(
        "POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n{te_lines}\r\n{body}",
        body.len()
    );
    let o = b.run(raw.as_bytes(), 2).await;
    no_smuggled(&o, case);
    o
}

#[tokio::test]
async fn te_chunked_identity() {
    let o = obfuscated_te(
        "Transfer-Encoding: chunked, identity\r\n",
        "chunked, identity",
    )
    .await;
    refused(&o, Some(400), "chunked, identity");
}

#[tokio::test]
async fn te_leading_space() {
    // Leading whitespace is optional whitespace (RFC 9110 §5.5): this is plain chunked.
    let o = obfuscated_te("Transfer-Encoding:  chunked\r\n", "' chunked'").await;
    chunked_wins(&o, "", "' chunked'");
}

#[tokio::test]
async fn te_xchunked() {
    let o = obfuscated_te("Transfer-Encoding: xchunked\r\n", "xchunked").await;
    refused(&o, Some(400), "xchunked");
}

#[tokio::test]
async fn te_tab_before_value() {
    let o = obfuscated_te("Transfer-Encoding: \tchunked\r\n", "tab chunked").await;
    chunked_wins(&o, "", "tab chunked");
}

#[tokio::test]
async fn te_two_headers() {
    let o = obfuscated_te(
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
        "two TE headers",
    )
    .await;
    refused(&o, Some(400), "two TE headers");
}

#[tokio::test]
async fn te_space_before_colon() {
    let o = obfuscated_te("Transfer-Encoding : chunked\r\n", "space before colon").await;
    refused(&o, Some(400), "space before colon");
}

/// Transfer-Encoding without Content-Length but not ending in chunked: the body length is
/// unknowable for a request (RFC 9112 §6.3), so it must be refused.
#[tokio::test]
async fn te_identity_only() {
    let b = Bench::start().await;
    let raw =
        format!("POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity\r\n\r\n{SMUGGLED}");
    let o = b.run(raw.as_bytes(), 2).await;
    no_smuggled(&o, "TE identity");
    refused(&o, Some(400), "TE identity");
}

#[tokio::test]
async fn two_different_content_lengths() {
    let b = Bench::start().await;
    let raw = format!(
        "POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: {}\r\n\r\nhello{SMUGGLED}",
        5 + SMUGGLED.len()
    );
    let o = b.run(raw.as_bytes(), 2).await;
    no_smuggled(&o, "two CL");
    refused(&o, Some(400), "two different Content-Length");
}

#[tokio::test]
async fn content_length_list_of_different_values() {
    let b = Bench::start().await;
    let raw = "POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 6\r\n\r\nhello!";
    let o = b.run(raw.as_bytes(), 2).await;
    refused(&o, Some(400), "Content-Length: 5, 6");
}

/// Two equal Content-Length headers are unambiguous; podproxy may accept (RFC 9110 §8.6)
/// but the backend must then get exactly one Content-Length and exactly those bytes.
#[tokio::test]
async fn two_equal_content_lengths() {
    let b = Bench::start().await;
    let raw = "POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello";
    let o = b.run(raw.as_bytes(), 1).await;
    match o.status {
        Some(200) => {
            assert_eq!(o.seen.len(), 1, "{:?}", targets(&o.seen));
            assert_eq!(o.seen[0].body_str(), "hello");
            assert!(o.seen[0].header_all("content-length").len() <= 1);
        }
        _ => refused(&o, Some(400), "two equal CL"),
    }
}

#[tokio::test]
async fn negative_and_signed_content_length() {
    for cl in ["-1", "+5", "0x5", "5 5", "99999999999999999999999"] {
        let b = Bench::start().await;
        let raw = format!("POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: {cl}\r\n\r\nhello");
        let o = b.run(raw.as_bytes(), 1).await;
        refused(&o, Some(400), &format!("Content-Length: {cl}"));
    }
}

// ---------------------------------------------------------------------------------------
// Chunked framing
// ---------------------------------------------------------------------------------------

async fn chunked_case(chunks: &str) -> Outcome {
    let b = Bench::start().await;
    let raw = format!("POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n{chunks}");
    b.run(raw.as_bytes(), 1).await
}

/// A chunk-size podproxy cannot parse: the request head was already forwarded (bodies are
/// streamed), so the backend sees the request with a body that fails; never a complete
/// body, never a second request. The client gets a 4xx/5xx or a closed connection.
fn broken_body(o: &Outcome, case: &str) {
    assert_ne!(o.status, Some(200), "{case}: {o:?}");
    assert!(o.more.is_empty(), "{case}");
    assert!(o.seen.len() <= 1, "{case}: {:?}", targets(&o.seen));
    no_smuggled(o, case);
}

#[tokio::test]
async fn chunk_size_not_hex() {
    let o = chunked_case("zz\r\nhello\r\n0\r\n\r\n").await;
    broken_body(&o, "chunk size zz");
}

#[tokio::test]
async fn chunk_size_overflow() {
    let o = chunked_case("fffffffffffffffffff1\r\nhello\r\n0\r\n\r\n").await;
    broken_body(&o, "chunk size overflow");
}

#[tokio::test]
async fn chunk_size_negative() {
    let o = chunked_case("-5\r\nhello\r\n0\r\n\r\n").await;
    broken_body(&o, "chunk size -5");
}

#[tokio::test]
async fn chunk_size_with_0x_prefix() {
    let o = chunked_case("0x5\r\nhello\r\n0\r\n\r\n").await;
    broken_body(&o, "chunk size 0x5");
}

#[tokio::test]
async fn chunk_data_longer_than_size() {
    let o = chunked_case(&format!("2\r\nhello\r\n0\r\n\r\n{SMUGGLED}")).await;
    broken_body(&o, "chunk longer than size");
}

/// Chunk extensions are legal; the body must arrive exactly as framed.
#[tokio::test]
async fn chunk_extensions_are_stripped_body_exact() {
    let b = Bench::start().await;
    let raw = "POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5;name=value;x=\"q\"\r\nhello\r\n6;ext\r\n world\r\n0;last\r\n\r\n";
    let o = b.run(raw.as_bytes(), 1).await;
    assert_eq!(o.status, Some(200), "{o:?}");
    assert_eq!(o.seen.len(), 1);
    assert_eq!(o.seen[0].body_str(), "hello world");
}

/// An extension with a bare LF inside (request smuggling via chunk-ext parsing differences).
#[tokio::test]
async fn chunk_extension_with_bare_lf() {
    let o = chunked_case(&format!("5;a\nb\r\nhello\r\n0\r\n\r\n{SMUGGLED}")).await;
    no_smuggled(&o, "chunk ext bare LF");
    if o.status == Some(200) {
        assert_eq!(o.seen.len(), 1);
    } else {
        broken_body(&o, "chunk ext bare LF");
    }
}

/// A huge chunk extension must be bounded, not buffered forever.
#[tokio::test]
async fn chunk_extension_oversized() {
    let ext = "a".repeat(64 * 1024);
    let o = chunked_case(&format!("5;{ext}\r\nhello\r\n0\r\n\r\n")).await;
    broken_body(&o, "64 KiB chunk extension");
}

/// Chunk-size line ended by LF only, then smuggled data after the last chunk.
#[tokio::test]
async fn chunked_then_pipelined_request() {
    let b = Bench::start().await;
    let raw = "POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET /second HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
    let o = b.run(raw.as_bytes(), 2).await;
    // Legitimate pipelining: podproxy framed both requests itself.
    assert_eq!(o.status, Some(200), "{o:?}");
    assert_eq!(o.more, vec![200]);
    assert_eq!(targets(&o.seen), ["POST /x", "GET /second"]);
    assert_eq!(o.seen[0].body_str(), "hello");
    assert!(o.seen[1].body.is_empty());
}

// ---------------------------------------------------------------------------------------
// Headers
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn oversized_header_is_431() {
    let b = Bench::start().await;
    let raw = format!(
        "GET /x HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
        "a".repeat(512 * 1024)
    );
    let o = b.run(raw.as_bytes(), 1).await;
    refused(&o, Some(431), "512 KiB header");
}

#[tokio::test]
async fn too_many_headers() {
    let b = Bench::start().await;
    let mut raw = String::from("GET /x HTTP/1.1\r\nHost: a\r\n");
    for i in 0..500 {
        raw.push_str(&format!("X-H{i}: v\r\n"));
    }
    raw.push_str("\r\n");
    let o = b.run(raw.as_bytes(), 1).await;
    assert!(
        matches!(o.status, Some(431) | Some(400)),
        "too many headers: {o:?}"
    );
    refused(&o, o.status, "500 headers");
}

#[tokio::test]
async fn multiple_host_headers() {
    let b = Bench::start().await;
    let raw = "GET /x HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n";
    let o = b.run(raw.as_bytes(), 1).await;
    // RFC 9112 §3.2: a server MUST respond 400 to more than one Host header.
    refused(&o, Some(400), "two Host headers");
}

#[tokio::test]
async fn missing_host_header() {
    let b = Bench::start().await;
    let raw = "GET /x HTTP/1.1\r\nConnection: close\r\n\r\n";
    let o = b.run(raw.as_bytes(), 1).await;
    // RFC 9112 §3.2: an HTTP/1.1 request without Host MUST get 400.
    refused(&o, Some(400), "no Host header");
}

#[tokio::test]
async fn bare_lf_line_endings() {
    let b = Bench::start().await;
    let raw = "GET /x HTTP/1.1\nHost: a\nConnection: close\n\n";
    let o = b.run(raw.as_bytes(), 1).await;
    // Accepting bare LF is allowed (RFC 9112 §2.2) when podproxy frames the result itself:
    // then the backend gets exactly one well-formed request.
    match o.status {
        Some(200) => {
            assert_eq!(targets(&o.seen), ["GET /x"]);
        }
        _ => refused(&o, Some(400), "bare LF"),
    }
}

#[tokio::test]
async fn bare_cr_in_header_value() {
    let b = Bench::start().await;
    let raw = "GET /x HTTP/1.1\r\nHost: a\r\nX-A: 1\rX-Injected: yes\r\nConnection: close\r\n\r\n";
    let o = b.run(raw.as_bytes(), 1).await;
    refused(&o, Some(400), "CR in header value");
}

#[tokio::test]
async fn nul_in_header_value() {
    let b = Bench::start().await;
    let raw = b"GET /x HTTP/1.1\r\nHost: a\r\nX-A: 1\x002\r\nConnection: close\r\n\r\n";
    let o = b.run(raw, 1).await;
    refused(&o, Some(400), "NUL in header value");
}

#[tokio::test]
async fn space_in_header_name() {
    let b = Bench::start().await;
    let raw = "GET /x HTTP/1.1\r\nHost: a\r\nX A: 1\r\nConnection: close\r\n\r\n";
    let o = b.run(raw.as_bytes(), 1).await;
    refused(&o, Some(400), "space in header name");
}

#[tokio::test]
async fn obs_fold_header() {
    let b = Bench::start().await;
    let raw =
        "GET /x HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
    let o = b.run(raw.as_bytes(), 1).await;
    refused(&o, Some(400), "obs-fold");
}

// ---------------------------------------------------------------------------------------
// Request line and versions
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn http09_request() {
    let b = Bench::start().await;
    let o = b.run(b"GET /\r\n", 1).await;
    assert_ne!(o.status, Some(200), "{o:?}");
    assert!(o.seen.is_empty(), "{:?}", targets(&o.seen));
}

#[tokio::test]
async fn http10_without_keepalive() {
    let b = Bench::start().await;
    let mut conn = RawConn::connect(b.proxy.addr("main")).await;
    conn.send(b"GET /ten HTTP/1.0\r\nHost: a\r\n\r\n").await;
    let r = conn.response().await;
    assert_eq!(r.status, 200);
    // HTTP/1.0 without keep-alive: podproxy closes after the response.
    conn.until_closed().await;
    let seen = b.marker_then_collect().await;
    assert_eq!(targets(&seen), ["GET /ten"]);
}

#[tokio::test]
async fn http10_with_keepalive() {
    let b = Bench::start().await;
    let mut conn = RawConn::connect(b.proxy.addr("main")).await;
    conn.send(b"GET /ten1 HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n")
        .await;
    let r = conn.response().await;
    assert_eq!(r.status, 200);
    assert!(r.header("content-length").is_some() || !r.chunked);
    conn.send(b"GET /ten2 HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n")
        .await;
    let r = conn.response().await;
    assert_eq!(r.status, 200);
    let seen = b.marker_then_collect().await;
    assert_eq!(targets(&seen), ["GET /ten1", "GET /ten2"]);
    // The client's Connection header is hop-by-hop: not forwarded.
    assert!(seen.iter().all(|r| r.header("keep-alive").is_none()));
}

#[tokio::test]
async fn http10_with_transfer_encoding() {
    let b = Bench::start().await;
    let raw = format!(
        "POST /x HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{SMUGGLED}"
    );
    let o = b.run(raw.as_bytes(), 2).await;
    no_smuggled(&o, "HTTP/1.0 + chunked");
    refused(&o, Some(400), "HTTP/1.0 + chunked");
}

#[tokio::test]
async fn unknown_http_version() {
    let b = Bench::start().await;
    let o = b.run(b"GET /x HTTP/1.2\r\nHost: a\r\n\r\n", 1).await;
    assert_ne!(o.status, Some(200), "{o:?}");
    assert!(o.seen.is_empty());
}

/// An absolute-form target is routed on its path and always goes to the configured backend
/// (never to the URI's authority: no open proxy); the backend gets origin-form, and Host is
/// the target's authority, as RFC 9112 §3.2.2 requires of the receiving server.
#[tokio::test]
async fn absolute_form_target() {
    let b = Bench::start().await;
    let raw =
        "GET http://evil.example:1234/abs?q=1 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
    let o = b.run(raw.as_bytes(), 1).await;
    match o.status {
        Some(200) => {
            assert_eq!(o.seen.len(), 1);
            assert_eq!(o.seen[0].target, "/abs?q=1");
            assert_eq!(o.seen[0].header_all("host"), ["evil.example:1234"]);
        }
        _ => refused(&o, Some(400), "absolute form"),
    }
}

#[tokio::test]
async fn asterisk_and_authority_form_targets() {
    let b = Bench::start().await;
    let o = b
        .run(
            b"OPTIONS * HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            1,
        )
        .await;
    assert!(
        o.seen.iter().all(|r| r.target != "*"),
        "{:?}",
        targets(&o.seen)
    );
    let o = b
        .run(
            b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\nConnection: close\r\n\r\n",
            1,
        )
        .await;
    refused(&o, Some(400), "CONNECT");
}

#[tokio::test]
async fn target_with_space_or_control() {
    let b = Bench::start().await;
    let o = b
        .run(
            b"GET /a b HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            1,
        )
        .await;
    refused(&o, Some(400), "space in target");
    let o = b
        .run(
            b"GET /a\x01b HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            1,
        )
        .await;
    refused(&o, Some(400), "control char in target");
}

// ---------------------------------------------------------------------------------------
// Bodies that stop early
// ---------------------------------------------------------------------------------------

/// Content-Length 100, 10 bytes sent, then the client closes its write side: the backend
/// must never see a complete request body of 100 bytes (nor a 10-byte one passed off as
/// complete), and podproxy keeps serving.
#[tokio::test]
async fn body_shorter_than_content_length_then_close() {
    use tokio::io::AsyncWriteExt;
    let b = Bench::start().await;
    let rec = b.echo.recorder();
    rec.clear();
    let mut conn = RawConn::connect(b.proxy.addr("main")).await;
    conn.send(b"POST /sink HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n0123456789")
        .await;
    conn.stream.shutdown().await.unwrap();
    let got = conn.until_closed().await;
    let text = String::from_utf8_lossy(&got);
    assert!(
        !text.starts_with("HTTP/1.1 200"),
        "an incomplete upload answered 200: {text}"
    );
    let seen = b.marker_then_collect().await;
    assert!(seen.len() <= 1, "{:?}", targets(&seen));
    for r in &seen {
        assert!(
            r.body_len < 100,
            "backend got a complete body: {}",
            r.body_len
        );
    }
    eventually("in-flight back to 0", || b.proxy.in_flight() == 0).await;
}

/// Same with a chunked body cut inside a chunk.
#[tokio::test]
async fn chunked_body_cut_then_close() {
    use tokio::io::AsyncWriteExt;
    let b = Bench::start().await;
    let rec = b.echo.recorder();
    rec.clear();
    let mut conn = RawConn::connect(b.proxy.addr("main")).await;
    conn.send(b"POST /sink HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n01234")
        .await;
    conn.stream.shutdown().await.unwrap();
    let got = conn.until_closed().await;
    let text = String::from_utf8_lossy(&got);
    assert!(
        !text.starts_with("HTTP/1.1 200"),
        "cut upload answered 200: {text}"
    );
    let seen = b.marker_then_collect().await;
    assert!(seen.len() <= 1, "{:?}", targets(&seen));
    for r in &seen {
        assert!(
            r.body_len < 16,
            "backend got a complete body: {}",
            r.body_len
        );
    }
    eventually("in-flight back to 0", || b.proxy.in_flight() == 0).await;
}

/// The request body's framing is the client's fault: podproxy should say so (400), not
/// blame the backend with 502 `upstream_broken` (which also counts in
/// `upstream_errors_total` and pages whoever watches the backends).
#[tokio::test]
async fn invalid_chunk_size_is_a_client_error() {
    let o = chunked_case("zz\r\nhello\r\n0\r\n\r\n").await;
    assert_eq!(o.status, Some(400), "{o:?}");
}
