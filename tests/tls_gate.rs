//! The security gate and TLS end to end, through a real podproxy on
//! loopback:
//!
//! - listener mTLS with Gonka's own kind of certificates (made here by `openssl` exactly as
//!   `gen-mlnode-certs.sh` makes them: self-signed, `CA:TRUE`, P-256), pinned by file,
//!   `sha256:` and `spki-sha256:`, over HTTP/1.1 and h2, and what is refused at handshake;
//! - CA-verified client certificates (rcgen CA);
//! - bearer tokens (rotation, token file, exemptions that cannot be dodged, token stripped),
//!   source allowlists (v4 and v6) and blocked paths (encoded and dotted variants);
//! - upstream TLS: custom CA with SNI and `Host`, wrong CA, bundled roots, pins, SNI override,
//!   and a client certificate toward a server that demands one;
//! - `podproxy check` errors for every kind of bad TLS or gate setting;
//! - the shipped `gonka-mtls.toml` and `pod-token.toml` examples, running.
//!
//! The certificates, TLS clients and the TLS backend are in `support::tls`. Every wait is
//! bounded (`support::bounded`, `support::WAIT`); nothing sleeps to synchronise.
mod support;

use http::{StatusCode, Version};
use rustls::SupportedProtocolVersion;
use support::tls::*;
use support::*;
use testkit::echo::EchoServer;

// =======================================================================================
// Config snippets
// =======================================================================================

/// A listener `front` on loopback with `/` → upstream `u` (health checks off), plus `extra`
/// lines inside the listener section.
fn front(listener_extra: &str, upstream_url: &str, upstream_extra: &str) -> String {
    format!(
        "[listeners.front]\nbind = \"127.0.0.1:0\"\nheader_timeout = \"5s\"\nroutes = [{{ prefix = \"/\", upstream = \"u\" }}]\n{listener_extra}\n\n[upstreams.u]\nurls = \"{upstream_url}\"\nhealth = {{ enabled = false }}\n{upstream_extra}\n"
    )
}

fn raw_get(path: &str, extra_headers: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: pod\r\n{extra_headers}Connection: close\r\n\r\n")
        .into_bytes()
}

fn assert_error(resp: &RawResponse, status: u16, kind: &str, what: &str) {
    assert_eq!(resp.status, status, "{what}: {}", resp.body_str());
    assert_eq!(
        resp.header("content-type"),
        Some("application/json"),
        "{what}"
    );
    assert_eq!(
        resp.json()["error"]["type"],
        kind,
        "{what}: {}",
        resp.body_str()
    );
}

// =======================================================================================
// 1. Pinned mTLS with openssl-made Gonka certificates
// =======================================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pin_mode_accepts_exactly_the_dapi_certificate_over_h1_and_h2() {
    let m = material();
    let backend = EchoServer::start().await.unwrap();
    let proxy = Proxy::start(&front(
        &format!(
            "strip_version_prefix = true\n{}",
            pin_tls(&[m.path("dapi.crt")])
        ),
        &backend.url(),
        "",
    ))
    .await;
    let addr = proxy.addr("front");

    // HTTP/1.1 (ALPN http/1.1), the DAPI's versioned URL.
    let (status, version, alpn, body) =
        https(addr, dapi(&[H1]), "GET", "/v3.0.8/api/v1/state", &[], "").await;
    assert_eq!(status, 200, "{body:?}");
    assert_eq!(version, Version::HTTP_11);
    assert_eq!(alpn.as_deref(), Some(H1));
    let rec = last_proxied(&backend.recorder()).expect("forwarded");
    assert_eq!(rec.target, "/api/v1/state");
    assert_eq!(rec.header("x-forwarded-proto").as_deref(), Some("https"));

    // HTTP/2 chosen by ALPN.
    let (status, version, alpn, _) = https(
        addr,
        dapi(&[H2, H1]),
        "POST",
        "/v1/chat/completions",
        &[],
        "{\"stream\":false}",
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(alpn.as_deref(), Some(H2));
    assert_eq!(version, Version::HTTP_2);
    let rec = last_proxied(&backend.recorder()).expect("forwarded");
    assert_eq!(
        (rec.method.as_str(), rec.target.as_str()),
        ("POST", "/v1/chat/completions")
    );
    assert_eq!(rec.body_str(), "{\"stream\":false}");

    // TLS 1.2 too; and a client offering no ALPN at all (HTTP/1.1 detected).
    let tls12 = client_tls("mlnode.crt", Id::Pair("dapi.crt", "dapi.key"), TLS12, &[H1]);
    assert_eq!(https_get(addr, tls12, "/api/v1/pow/status").await.0, 200);
    let (status, version, alpn, _) = https(addr, dapi(&[]), "GET", "/livez", &[], "").await;
    assert_eq!(
        (status, version, alpn),
        (StatusCode::OK, Version::HTTP_11, None)
    );

    // Refused at handshake.
    let refused: [(&str, Id, &[&SupportedProtocolVersion]); 8] = [
        ("no client certificate (TLS 1.3)", Id::Anonymous, TLS13),
        ("no client certificate (TLS 1.2)", Id::Anonymous, TLS12),
        (
            "the mlnode's own certificate",
            Id::Pair("mlnode.crt", "mlnode.key"),
            TLS13,
        ),
        (
            "a third Gonka-style certificate",
            Id::Pair("stranger.crt", "stranger.key"),
            TLS13,
        ),
        (
            "a third certificate over TLS 1.2",
            Id::Pair("stranger.crt", "stranger.key"),
            TLS12,
        ),
        (
            "dapi's subject and SANs on another key",
            Id::Pair("impostor.crt", "impostor.key"),
            TLS13,
        ),
        (
            "a CA-signed certificate (pin mode knows no CA)",
            Id::Pair("client.crt", "client.key"),
            TLS13,
        ),
        (
            "dapi.crt without dapi's private key",
            Id::Forged {
                cert: "dapi.crt",
                key: "impostor.key",
            },
            TLS13,
        ),
    ];
    for (what, id, versions) in refused {
        assert_refused(
            addr,
            client_tls("mlnode.crt", id, versions, &[H2, H1]),
            what,
        )
        .await;
    }
    // The pinned client still gets through on the same listener afterwards.
    assert_eq!(https_get(addr, dapi(&[H2]), "/api/v1/state").await.0, 200);
    let targets: Vec<String> = proxied(&backend.recorder())
        .into_iter()
        .map(|r| r.target)
        .collect();
    assert_eq!(
        targets,
        [
            "/api/v1/state",
            "/v1/chat/completions",
            "/api/v1/pow/status",
            "/livez",
            "/api/v1/state"
        ],
        "only the accepted requests reached the backend"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pin_hash_forms_pin_the_certificate_or_its_public_key() {
    let m = material();
    let backend = EchoServer::start().await.unwrap();
    let der_pin = m.sha256_pin("dapi.der", "sha256");
    let spki_pin = m.sha256_pin("dapi.spki.der", "spki-sha256");
    // The hex may be written in capitals.
    let spki_upper = format!(
        "spki-sha256:{}",
        spki_pin["spki-sha256:".len()..].to_uppercase()
    );

    let dapi_cert = Id::Pair("dapi.crt", "dapi.key");
    let renewed = Id::Pair("dapi-renewed.crt", "dapi.key");
    // (what, pins, accepted, refused)
    type Case = (&'static str, Vec<String>, Vec<Id>, Vec<Id>);
    let cases: [Case; 4] = [
        (
            "sha256 of the certificate",
            vec![der_pin.clone()],
            vec![dapi_cert],
            vec![renewed, Id::Pair("impostor.crt", "impostor.key")],
        ),
        (
            "sha256 of the public key",
            vec![spki_pin.clone()],
            vec![dapi_cert, renewed],
            vec![
                Id::Pair("impostor.crt", "impostor.key"),
                Id::Pair("mlnode.crt", "mlnode.key"),
            ],
        ),
        (
            "spki pin in capitals",
            vec![spki_upper],
            vec![dapi_cert, renewed],
            vec![Id::Pair("stranger.crt", "stranger.key")],
        ),
        (
            "several pins (rotation): a file and a hash",
            vec![m.path("stranger.crt"), der_pin],
            vec![dapi_cert, Id::Pair("stranger.crt", "stranger.key")],
            vec![renewed, Id::Anonymous],
        ),
    ];
    for (what, pins, accepted, refused) in cases {
        let proxy = Proxy::start(&front(&pin_tls(&pins), &backend.url(), "")).await;
        let addr = proxy.addr("front");
        for id in accepted {
            let cfg = client_tls("mlnode.crt", id, TLS13, &[H2]);
            let (status, _) = https_get(addr, cfg, "/api/v1/state").await;
            assert_eq!(status, 200, "{what}: {id:?} must be accepted");
        }
        for id in refused {
            let cfg = client_tls("mlnode.crt", id, TLS13, &[H2, H1]);
            assert_refused(addr, cfg, &format!("{what}: {id:?}")).await;
        }
    }
}

/// `client_pins` (or `client_ca`) written without `client_auth` must not leave the listener
/// open to every client: either the config is refused (like any other silently ignored
/// setting) or the pins are enforced.
#[tokio::test]
async fn client_pins_without_client_auth_are_not_silently_ignored() {
    let m = material();
    let backend = EchoServer::start().await.unwrap();
    for trust in [
        format!("client_pins = [{:?}]", m.path("dapi.crt")),
        format!("client_ca = [{:?}]", m.path("ca.crt")),
    ] {
        let tls = format!(
            "tls = {{ cert = {:?}, key = {:?}, {trust} }}",
            m.path("mlnode.crt"),
            m.path("mlnode.key")
        );
        let cfg = front(&tls, &backend.url(), "");
        if let Err(e) = proxy::Config::from_toml(&cfg) {
            assert!(e.to_string().contains("listeners.front.tls"), "{e}");
            continue;
        }
        let proxy = Proxy::start(&cfg).await;
        let anonymous = client_tls("mlnode.crt", Id::Anonymous, TLS13, &[H2, H1]);
        assert_refused(proxy.addr("front"), anonymous, &trust).await;
    }
    assert!(proxied(&backend.recorder()).is_empty());
}

#[tokio::test]
async fn plain_http_to_a_tls_port_gets_no_http_response() {
    let m = material();
    let backend = EchoServer::start().await.unwrap();
    let proxy = Proxy::start(&front(&pin_tls(&[m.path("dapi.crt")]), &backend.url(), "")).await;
    for request in [
        &b"GET /api/v1/state HTTP/1.1\r\nHost: pod\r\n\r\n"[..],
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    ] {
        let mut conn = RawConn::connect(proxy.addr("front")).await;
        conn.send(request).await;
        let answer = conn.until_closed().await;
        assert!(
            !answer.windows(5).any(|w| w == b"HTTP/"),
            "plain text got an HTTP answer: {:?}",
            String::from_utf8_lossy(&answer)
        );
    }
    assert!(proxied(&backend.recorder()).is_empty());
}

/// The header timeout also bounds the TLS handshake: a client that connects and says
/// nothing, or stops in the middle of its ClientHello, is closed.
#[tokio::test]
async fn a_stalled_tls_handshake_is_closed_by_the_header_timeout() {
    let m = material();
    let backend = EchoServer::start().await.unwrap();
    let cfg = front(&pin_tls(&[m.path("dapi.crt")]), &backend.url(), "")
        .replace("header_timeout = \"5s\"", "header_timeout = \"300ms\"");
    let proxy = Proxy::start(&cfg).await;
    // Nothing at all; a TLS record header announcing a 512-byte handshake, then silence.
    for partial in [&b""[..], &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]] {
        let mut conn = RawConn::connect(proxy.addr("front")).await;
        conn.send(partial).await;
        // Bounded by WAIT inside; a server that never closed would fail it.
        let answer = conn.until_closed().await;
        assert!(!answer.windows(5).any(|w| w == b"HTTP/"), "{answer:?}");
    }
}

// =======================================================================================
// 2. CA mode
// =======================================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_mode_accepts_certificates_the_ca_signed_and_nothing_else() {
    let m = material();
    let backend = EchoServer::start().await.unwrap();
    let tls = format!(
        "tls = {{ cert = {:?}, key = {:?}, client_auth = \"ca\", client_ca = [{:?}] }}",
        m.path("mlnode.crt"),
        m.path("mlnode.key"),
        m.path("ca.crt")
    );
    let proxy = Proxy::start(&front(&tls, &backend.url(), "")).await;
    let addr = proxy.addr("front");

    for versions in [TLS13, TLS12] {
        let cfg = client_tls(
            "mlnode.crt",
            Id::Pair("client.crt", "client.key"),
            versions,
            &[H1],
        );
        assert_eq!(https_get(addr, cfg, "/api/v1/state").await.0, 200);
    }
    for (what, id) in [
        (
            "a client cert from another CA",
            Id::Pair("client2.crt", "client2.key"),
        ),
        ("no client cert", Id::Anonymous),
        ("a self-signed Gonka cert", Id::Pair("dapi.crt", "dapi.key")),
        ("the CA's own certificate", Id::Pair("ca.crt", "ca.key")),
        (
            "the CA-signed cert without its key",
            Id::Forged {
                cert: "client.crt",
                key: "client2.key",
            },
        ),
    ] {
        assert_refused(addr, client_tls("mlnode.crt", id, TLS13, &[H2, H1]), what).await;
    }
    assert_eq!(proxied(&backend.recorder()).len(), 2);
}

// =======================================================================================
// 3. Bearer tokens
// =======================================================================================

const TOKEN_A: &str = "tok-a-7f3c9e21d4b84a0f9c2e5d7a1b3c4d5e";
const TOKEN_B: &str = "tok-b-0a1b2c3d4e5f60718293a4b5c6d7e8f9";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_tokens_rotate_are_stripped_and_exemptions_cannot_be_dodged() {
    let m = material();
    let token_file = m.dir.join("tokens-bearer.txt");
    std::fs::write(
        &token_file,
        format!("# rotated in on Monday\n\n  {TOKEN_B}  \n"),
    )
    .unwrap();
    let backend = EchoServer::start().await.unwrap();
    let proxy = Proxy::start(&front(
        &format!(
            "strip_version_prefix = true\ntokens = [\"{TOKEN_A}\"]\ntoken_file = {:?}\ntoken_exempt = [\"/health\"]",
            token_file.to_string_lossy()
        ),
        &backend.url(),
        "",
    ))
    .await;
    let addr = proxy.addr("front");
    let rec = backend.recorder();

    // Refused: 401, WWW-Authenticate, JSON, nothing forwarded.
    let refused: [(&str, String); 9] = [
        ("no Authorization", String::new()),
        ("wrong token", "Authorization: Bearer nope\r\n".into()),
        (
            "token of another scheme",
            format!("Authorization: Basic {TOKEN_A}\r\n"),
        ),
        ("bare token", format!("Authorization: {TOKEN_A}\r\n")),
        (
            "token prefix",
            format!("Authorization: Bearer {}\r\n", &TOKEN_A[..20]),
        ),
        (
            "token plus suffix",
            format!("Authorization: Bearer {TOKEN_A}x\r\n"),
        ),
        (
            "token in another header",
            format!("X-Api-Key: {TOKEN_A}\r\n"),
        ),
        ("empty bearer", "Authorization: Bearer \r\n".into()),
        (
            "the token file's comment",
            "Authorization: Bearer # rotated in on Monday\r\n".into(),
        ),
    ];
    for (what, header) in &refused {
        let resp = raw_exchange(addr, &raw_get("/v3.0.8/api/v1/state", header)).await;
        assert_error(&resp, 401, "unauthorized", what);
        let challenge = resp.header("www-authenticate").unwrap_or_default();
        assert!(challenge.starts_with("Bearer"), "{what}: {challenge:?}");
    }
    // Exemption is exact, on the normalised path: no dot or encoding tricks.
    for path in [
        "/health/../api/v1/stop",
        "/health/%2e%2e/api/v1/stop",
        "/%2e%2e/api",
        "/healthz",
        "/health/x",
        "/v3.0.8/api/v1/stop",
    ] {
        let resp = raw_exchange(addr, &raw_get(path, "")).await;
        assert_error(&resp, 401, "unauthorized", path);
    }
    assert!(
        proxied(&rec).is_empty(),
        "a refused request reached the backend"
    );

    // Both tokens work (one from `tokens`, one from `token_file`); the scheme is
    // case-insensitive; the backend never sees the header. Also over h2-less HTTP/1.1 with
    // the DAPI's versioned URL.
    for (i, auth) in [
        format!("Bearer {TOKEN_A}"),
        format!("Bearer {TOKEN_B}"),
        format!("bearer {TOKEN_A}"),
    ]
    .iter()
    .enumerate()
    {
        let resp = raw_exchange(
            addr,
            &raw_get(
                &format!("/v3.0.8/api/v1/state?n={i}"),
                &format!("Authorization: {auth}\r\n"),
            ),
        )
        .await;
        assert_eq!(resp.status, 200, "{auth}: {}", resp.body_str());
        let got = last_proxied(&rec).expect("forwarded");
        assert_eq!(got.target, format!("/api/v1/state?n={i}"));
        assert_eq!(
            got.header("authorization"),
            None,
            "{auth}: token leaked upstream"
        );
    }
    // Several Authorization headers, the valid one second: accepted, none forwarded.
    let resp = raw_exchange(
        addr,
        &raw_get(
            "/api/v1/state?n=multi",
            &format!("Authorization: Bearer nope\r\nAuthorization: Bearer {TOKEN_B}\r\n"),
        ),
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.body_str());
    let got = last_proxied(&rec).expect("forwarded");
    assert_eq!(got.target, "/api/v1/state?n=multi");
    assert_eq!(got.header_all("authorization"), Vec::<String>::new());
    // Exempt without a token, also behind the version prefix.
    for (path, upstream_target) in [("/health", "/health"), ("/v3.0.8/health", "/health")] {
        let resp = raw_exchange(addr, &raw_get(path, "")).await;
        assert_eq!(resp.status, 200, "{path}: {}", resp.body_str());
        assert_eq!(last_proxied(&rec).unwrap().target, upstream_target);
    }
    assert_eq!(proxied(&rec).len(), 6);
}

/// Gonka's base-URL mode sends `Authorization: Bearer <token>` on every request, health
/// probes included; the token must not reach the upstream on an exempt path either.
#[tokio::test]
async fn bearer_token_is_stripped_on_exempt_paths_too() {
    let backend = EchoServer::start().await.unwrap();
    let proxy = Proxy::start(&front(
        &format!("tokens = [\"{TOKEN_A}\"]\ntoken_exempt = [\"/health\"]"),
        &backend.url(),
        "",
    ))
    .await;
    let resp = raw_exchange(
        proxy.addr("front"),
        &raw_get("/health", &format!("Authorization: Bearer {TOKEN_A}\r\n")),
    )
    .await;
    assert_eq!(resp.status, 200);
    let got = last_proxied(&backend.recorder()).expect("forwarded");
    assert_eq!(got.header("authorization"), None, "token leaked upstream");
}

// =======================================================================================
// 4. Source allowlist
// =======================================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_ips_refuses_other_sources_v4() {
    let backend = EchoServer::start().await.unwrap();
    let denied = Proxy::start(&front(
        "allow_ips = [\"10.0.0.0/8\", \"203.0.113.7\"]",
        &backend.url(),
        "",
    ))
    .await;
    let resp = raw_exchange(denied.addr("front"), &raw_get("/api/v1/state", "")).await;
    assert_error(&resp, 403, "forbidden", "loopback not in 10.0.0.0/8");
    assert!(resp.body_str().contains("127.0.0.1"), "{}", resp.body_str());
    assert!(proxied(&backend.recorder()).is_empty());

    let allowed = Proxy::start(&front(
        "allow_ips = [\"10.0.0.0/8\", \"127.0.0.1/32\"]",
        &backend.url(),
        "",
    ))
    .await;
    let resp = raw_exchange(allowed.addr("front"), &raw_get("/api/v1/state", "")).await;
    assert_eq!(resp.status, 200, "{}", resp.body_str());
    assert_eq!(proxied(&backend.recorder()).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_ips_v6_loopback() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        println!("note: no IPv6 loopback on this machine; skipping the ::1 allowlist test");
        return;
    }
    let backend = EchoServer::start().await.unwrap();
    let v6 = |allow: &str| {
        front(&format!("allow_ips = [{allow}]"), &backend.url(), "")
            .replace("bind = \"127.0.0.1:0\"", "bind = \"[::1]:0\"")
    };
    let allowed = Proxy::start(&v6("\"::1/128\"")).await;
    assert!(allowed.addr("front").is_ipv6());
    let resp = raw_exchange(allowed.addr("front"), &raw_get("/api/v1/state", "")).await;
    assert_eq!(resp.status, 200, "{}", resp.body_str());
    let got = last_proxied(&backend.recorder()).expect("forwarded");
    assert_eq!(got.header("x-real-ip").as_deref(), Some("::1"));

    for allow in ["\"127.0.0.1/32\"", "\"2001:db8::/32\", \"10.0.0.0/8\""] {
        let denied = Proxy::start(&v6(allow)).await;
        let resp = raw_exchange(denied.addr("front"), &raw_get("/api/v1/state", "")).await;
        assert_error(&resp, 403, "forbidden", allow);
    }
    assert_eq!(proxied(&backend.recorder()).len(), 1);
}

// =======================================================================================
// 5. Blocked paths
// =======================================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_paths_cannot_be_dodged_by_encoding_or_dots() {
    let backend = EchoServer::start().await.unwrap();
    let proxy = Proxy::start(&front(
        &format!(
            "strip_version_prefix = true\nblock_paths = [\"/api/v1/train/\"]\ntokens = [\"{TOKEN_A}\"]"
        ),
        &backend.url(),
        "",
    ))
    .await;
    let addr = proxy.addr("front");
    let auth = format!("Authorization: Bearer {TOKEN_A}\r\n");
    for path in [
        "/api/v1/train/start",
        "/api/v1/train",
        "/api/v1/train/",
        "/v3.0.8/api/v1/train/x",
        "/api/v1/%74rain/x",
        "/api/v1/train%2Fstart",
        "//api/v1/./train/x",
        "/api/v1//train/x",
        "/api/v1/x/../train/start",
        "/api/v1/train/start?force=1",
    ] {
        let resp = raw_exchange(addr, &raw_get(path, &auth)).await;
        assert_error(&resp, 403, "forbidden", path);
        // Blocked before authentication: no token needed to learn it is blocked, and a
        // valid token does not unblock it.
        let resp = raw_exchange(addr, &raw_get(path, "")).await;
        assert_eq!(resp.status, 403, "{path} without token");
    }
    assert!(
        proxied(&backend.recorder()).is_empty(),
        "a blocked path was forwarded"
    );
    for path in [
        "/api/v1/training",
        "/api/v1/state",
        "/v3.0.8/api/v1/trainer/x",
    ] {
        let resp = raw_exchange(addr, &raw_get(path, &auth)).await;
        assert_eq!(resp.status, 200, "{path}: {}", resp.body_str());
    }
    let targets: Vec<String> = proxied(&backend.recorder())
        .into_iter()
        .map(|r| r.target)
        .collect();
    assert_eq!(
        targets,
        ["/api/v1/training", "/api/v1/state", "/api/v1/trainer/x"]
    );
}

// =======================================================================================
// 6. Upstream TLS
// =======================================================================================

fn upstream_tls(kv: &[(&str, String)]) -> String {
    let fields: Vec<String> = kv.iter().map(|(k, v)| format!("{k} = {v}")).collect();
    format!("tls = {{ {} }}", fields.join(", "))
}

fn q(s: &str) -> String {
    format!("{s:?}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_tls_with_a_custom_ca_sends_sni_and_the_upstream_host() {
    let m = material();
    let mut server = TlsBackend::start("server.crt", "server.key", false).await;
    let port = server.port();

    // CA file, name from the URL, Host rewritten to the upstream's authority.
    let proxy = Proxy::start(&front(
        "",
        &format!("https://localhost:{port}"),
        &format!(
            "rewrite_host = true\n{}",
            upstream_tls(&[("ca", q(&m.path("ca.crt")))])
        ),
    ))
    .await;
    let resp = raw_exchange(proxy.addr("front"), &raw_get("/v1/models?x=1", "")).await;
    assert_eq!(resp.status, 200, "{}", resp.body_str());
    assert_eq!(resp.json()["tls_backend"], true);
    let seen = server.next().await;
    assert_eq!(seen.sni.as_deref(), Some("localhost"));
    assert_eq!(seen.host, Some(format!("localhost:{port}")));
    assert_eq!(seen.target, "/v1/models?x=1");
    assert_eq!(seen.client_cert, None);

    // Without rewrite_host the client's Host is kept; SNI still names the upstream.
    let proxy = Proxy::start(&front(
        "",
        &format!("https://localhost:{port}"),
        &upstream_tls(&[("ca", q(&m.path("ca.crt")))]),
    ))
    .await;
    let resp = raw_exchange(proxy.addr("front"), &raw_get("/x", "")).await;
    assert_eq!(resp.status, 200, "{}", resp.body_str());
    let seen = server.next().await;
    assert_eq!(seen.sni.as_deref(), Some("localhost"));
    assert_eq!(seen.host.as_deref(), Some("pod"));

    // An IP URL with `server_name`: SNI and verification use the configured name.
    let proxy = Proxy::start(&front(
        "",
        &format!("https://127.0.0.1:{port}"),
        &format!(
            "rewrite_host = true\n{}",
            upstream_tls(&[
                ("ca", q(&m.path("ca.crt"))),
                ("server_name", q("localhost"))
            ])
        ),
    ))
    .await;
    let resp = raw_exchange(proxy.addr("front"), &raw_get("/y", "")).await;
    assert_eq!(resp.status, 200, "{}", resp.body_str());
    let seen = server.next().await;
    assert_eq!(seen.sni.as_deref(), Some("localhost"));
    assert_eq!(seen.host, Some(format!("127.0.0.1:{port}")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_tls_refuses_a_server_it_cannot_verify() {
    let m = material();
    let mut server = TlsBackend::start("server.crt", "server.key", false).await;
    let url = format!("https://localhost:{}", server.port());
    let cases = [
        ("another CA", upstream_tls(&[("ca", q(&m.path("ca2.crt")))])),
        ("bundled roots (no tls section)", String::new()),
        (
            "a pin of another certificate",
            upstream_tls(&[("pins", format!("[{}]", q(&m.path("dapi.crt"))))]),
        ),
        (
            "a name the certificate does not carry",
            upstream_tls(&[
                ("ca", q(&m.path("ca.crt"))),
                ("server_name", q("mlnode.example")),
            ]),
        ),
    ];
    for (what, tls) in cases {
        let proxy = Proxy::start(&front("", &url, &tls)).await;
        let resp = raw_exchange(proxy.addr("front"), &raw_get("/v1/models", "")).await;
        assert_error(&resp, 502, "upstream_connect", what);
        let msg = resp.json()["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_lowercase();
        assert!(
            msg.contains("certificate"),
            "{what}: the message should name the certificate problem: {msg}"
        );
        server.assert_nothing(what);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_pins_accept_a_gonka_style_server_and_client_cert_reaches_it() {
    let m = material();
    // The Network Node's callback port in Gonka's mTLS mode: presents dapi.crt (self-signed,
    // CA:TRUE), demands a client certificate.
    let mut nn = TlsBackend::start("dapi.crt", "dapi.key", true).await;
    let url = format!("https://127.0.0.1:{}", nn.port());
    let pin_file = format!("[{}]", q(&m.path("dapi.crt")));

    // Pinned by file and by hash, presenting mlnode.crt.
    let spki = m.sha256_pin("dapi.spki.der", "spki-sha256");
    for pins in [pin_file.clone(), format!("[{}]", q(&spki))] {
        let proxy = Proxy::start(&front(
            "",
            &url,
            &upstream_tls(&[
                ("pins", pins.clone()),
                ("client_cert", q(&m.path("mlnode.crt"))),
                ("client_key", q(&m.path("mlnode.key"))),
            ]),
        ))
        .await;
        let resp = raw_exchange(
            proxy.addr("front"),
            &b"POST /v1/poc-batches/generated HTTP/1.1\r\nHost: pod\r\nContent-Length: 11\r\nConnection: close\r\n\r\n{\"nonce\":1}"[..],
        )
        .await;
        assert_eq!(resp.status, 200, "{pins}: {}", resp.body_str());
        let seen = nn.next().await;
        assert_eq!(
            seen.client_cert.as_deref(),
            Some(m.cert("mlnode.crt").as_ref()),
            "{pins}: the server must see mlnode.crt"
        );
        assert_eq!(
            (seen.method.as_str(), seen.target.as_str()),
            ("POST", "/v1/poc-batches/generated")
        );
        assert_eq!(&seen.body[..], b"{\"nonce\":1}");
    }

    // Pinned but no client certificate configured: the server refuses, nothing arrives.
    let proxy = Proxy::start(&front("", &url, &upstream_tls(&[("pins", pin_file)]))).await;
    let resp = raw_exchange(proxy.addr("front"), &raw_get("/v1/poc-batches/x", "")).await;
    assert_eq!(resp.status, 502, "{}", resp.body_str());
    nn.assert_nothing("no client certificate");
}

// =======================================================================================
// 7. `podproxy check` errors
// =======================================================================================

#[test]
fn check_reports_bad_tls_and_gate_settings_by_key_without_panicking() {
    let m = material();
    let listener = |extra: &str| front(extra, "http://127.0.0.1:9", "");
    let ltls = |cert: &str, key: &str, rest: &str| {
        listener(&format!(
            "tls = {{ cert = {:?}, key = {:?}{rest} }}",
            m.path(cert),
            m.path(key)
        ))
    };
    let empty_tokens = m.dir.join("tokens-empty.txt");
    std::fs::write(&empty_tokens, "# nothing yet\n\n").unwrap();
    let nn = |tls: &str| {
        format!(
            "{}\n[upstreams.nn]\nurls = \"https://127.0.0.1:9100\"\n{tls}\n",
            listener("")
        )
    };
    let missing = m.path("missing.crt");
    let cases: Vec<(&str, String, &str, Vec<String>)> = vec![
        (
            "missing cert file",
            ltls("missing.crt", "mlnode.key", ""),
            "listeners.front.tls",
            vec![missing.clone()],
        ),
        (
            "missing key file",
            ltls("mlnode.crt", "missing.key", ""),
            "listeners.front.tls",
            vec![m.path("missing.key")],
        ),
        (
            "expired cert",
            ltls("expired.crt", "expired.key", ""),
            "listeners.front.tls",
            vec![m.path("expired.crt"), "expired".into()],
        ),
        (
            "not yet valid cert",
            ltls("future.crt", "future.key", ""),
            "listeners.front.tls",
            vec![m.path("future.crt"), "not valid before".into()],
        ),
        (
            "key of another cert",
            ltls("mlnode.crt", "dapi.key", ""),
            "listeners.front.tls",
            vec![m.path("dapi.key"), m.path("mlnode.crt")],
        ),
        (
            "a key file given as cert",
            ltls("mlnode.key", "mlnode.key", ""),
            "listeners.front.tls",
            vec![m.path("mlnode.key")],
        ),
        (
            "pin file missing",
            ltls(
                "mlnode.crt",
                "mlnode.key",
                &format!(", client_auth = \"pin\", client_pins = [{missing:?}]"),
            ),
            "listeners.front.tls",
            vec![missing.clone()],
        ),
        (
            "pin hash malformed",
            ltls(
                "mlnode.crt",
                "mlnode.key",
                ", client_auth = \"pin\", client_pins = [\"sha256:abcd\"]",
            ),
            "listeners.front.tls",
            vec!["sha256:abcd".into(), "64 hex digits".into()],
        ),
        (
            "pin mode without pins",
            ltls("mlnode.crt", "mlnode.key", ", client_auth = \"pin\""),
            "listeners.front.tls.client_pins",
            vec!["pin".into()],
        ),
        (
            "ca mode without CA",
            ltls("mlnode.crt", "mlnode.key", ", client_auth = \"ca\""),
            "listeners.front.tls.client_ca",
            vec!["CA".into()],
        ),
        (
            "ca file missing",
            ltls(
                "mlnode.crt",
                "mlnode.key",
                &format!(", client_auth = \"ca\", client_ca = [{missing:?}]"),
            ),
            "listeners.front.tls",
            vec![missing.clone()],
        ),
        (
            "unknown client_auth",
            ltls("mlnode.crt", "mlnode.key", ", client_auth = \"optional\""),
            "listeners.front.tls.client_auth",
            vec!["optional".into()],
        ),
        (
            "empty token",
            listener("tokens = [\"\"]"),
            "listeners.front.tokens[0]",
            vec!["empty token".into()],
        ),
        (
            "token file missing",
            listener(&format!("token_file = {:?}", m.path("missing-tokens.txt"))),
            "listeners.front.token_file",
            vec![m.path("missing-tokens.txt")],
        ),
        (
            "token file without a token",
            listener(&format!(
                "token_file = {:?}",
                empty_tokens.to_string_lossy()
            )),
            "listeners.front.token_file",
            vec!["no token".into()],
        ),
        (
            "bad CIDR",
            listener("allow_ips = [\"127.0.0.1/32\", \"10.0.0.0/33\"]"),
            "listeners.front.allow_ips[1]",
            vec!["10.0.0.0/33".into()],
        ),
        (
            "host name as allow_ips",
            listener("allow_ips = [\"networknode.example\"]"),
            "listeners.front.allow_ips[0]",
            vec!["networknode.example".into()],
        ),
        (
            "relative block path",
            listener("block_paths = [\"api/v1/train/\"]"),
            "listeners.front.block_paths",
            vec!["api/v1/train/".into()],
        ),
        (
            "upstream CA file missing",
            nn(&format!("tls = {{ ca = {missing:?} }}")),
            "upstreams.nn.tls",
            vec![missing.clone()],
        ),
        (
            "upstream pin file missing",
            nn(&format!("tls = {{ pins = [{missing:?}] }}")),
            "upstreams.nn.tls",
            vec![missing.clone()],
        ),
        (
            "upstream client cert without key",
            nn(&format!(
                "tls = {{ pins = [{:?}], client_cert = {:?} }}",
                m.path("dapi.crt"),
                m.path("mlnode.crt")
            )),
            "upstreams.nn.tls",
            vec!["client_key".into()],
        ),
        (
            "upstream client key of another cert",
            nn(&format!(
                "tls = {{ pins = [{:?}], client_cert = {:?}, client_key = {:?} }}",
                m.path("dapi.crt"),
                m.path("mlnode.crt"),
                m.path("dapi.key")
            )),
            "upstreams.nn.tls",
            vec![m.path("mlnode.crt")],
        ),
        (
            "upstream client cert expired",
            nn(&format!(
                "tls = {{ pins = [{:?}], client_cert = {:?}, client_key = {:?} }}",
                m.path("dapi.crt"),
                m.path("expired.crt"),
                m.path("expired.key")
            )),
            "upstreams.nn.tls",
            vec!["expired".into()],
        ),
        (
            "upstream tls on an http URL",
            front(
                "",
                "http://127.0.0.1:9",
                &format!("tls = {{ ca = {:?} }}", m.path("ca.crt")),
            ),
            "upstreams.u.tls",
            vec!["https".into()],
        ),
        (
            "unknown upstream tls key",
            nn("tls = { verify = false }"),
            "upstreams.nn.tls.verify",
            vec!["verify".into()],
        ),
    ];
    let mut failures = Vec::new();
    for (i, (what, text, key, reasons)) in cases.iter().enumerate() {
        let Ran { status, stderr, .. } = check(Some(&scratch_file(&format!("{i}.toml"), text)));
        let code = status.code();
        let mut problems = Vec::new();
        if code != Some(2) {
            problems.push(format!("exit code {code:?}, expected 2"));
        }
        if stderr.contains("panicked") {
            problems.push("panicked".into());
        }
        if !stderr.contains(&format!("{key}: ")) {
            problems.push(format!("stderr does not name `{key}`"));
        }
        for r in reasons {
            if !stderr.contains(r.as_str()) {
                problems.push(format!("stderr does not mention {r:?}"));
            }
        }
        if !problems.is_empty() {
            failures.push(format!(
                "{what}: {}\n  stderr: {}",
                problems.join("; "),
                stderr.trim()
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));

    // The good twin of the TLS cases passes, and `check` never prints a token.
    let good = ltls(
        "mlnode.crt",
        "mlnode.key",
        &format!(
            ", client_auth = \"pin\", client_pins = [{:?}]",
            m.path("dapi.crt")
        ),
    )
    .replace(
        "header_timeout",
        &format!("tokens = [\"{TOKEN_A}\"]\nheader_timeout"),
    );
    let out = check(Some(&scratch_file("good.toml", &good)));
    let stdout = &out.stdout;
    assert!(out.success(), "{}", out.stderr);
    assert!(
        !stdout.contains(TOKEN_A),
        "check printed a token:\n{stdout}"
    );
    assert!(stdout.contains("client_auth = \"pin\""), "{stdout}");
}

// =======================================================================================
// 8. The shipped examples, running
// =======================================================================================

/// An example file expanded with `vars` (anything else: its default, or an error).
fn example(name: &str, vars: &[(&str, String)]) -> String {
    let path = format!("{}/config/examples/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).expect("example file");
    proxy::config::env::expand(&text, |k| {
        vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone())
    })
    .unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Replaces `from` by `to`, insisting it occurs exactly `n` times (so a changed example
/// fails here loudly instead of binding a real port).
fn replace_n(text: &str, from: &str, to: &str, n: usize) -> String {
    assert_eq!(
        text.matches(from).count(),
        n,
        "expected {n}× {from:?} in:\n{text}"
    );
    text.replace(from, to)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gonka_mtls_example_end_to_end() {
    let m = material();
    let mlnode = EchoServer::start().await.unwrap();
    let vllm = EchoServer::start().await.unwrap();
    // The Network Node's PoC callback port: presents dapi.crt, demands a client cert.
    let mut network_node = TlsBackend::start("dapi.crt", "dapi.key", true).await;

    let text = example(
        "gonka-mtls.toml",
        &[
            ("CERT_DIR", m.dir.to_string_lossy().into_owned()),
            ("NETWORK_NODE", "127.0.0.1".into()),
            ("POC_PORT", "0".into()),
            ("INFERENCE_PORT", "0".into()),
            ("MLNODE_URL", mlnode.url()),
            ("VLLM_URLS", vllm.url()),
        ],
    );
    let text = replace_n(&text, "bind = \"0.0.0.0:0\"", "bind = \"127.0.0.1:0\"", 2);
    let text = replace_n(
        &text,
        "bind = \"127.0.0.1:9100\"",
        "bind = \"127.0.0.1:0\"",
        1,
    );
    let text = replace_n(
        &text,
        "\"https://127.0.0.1:9100\"",
        &format!("\"https://127.0.0.1:{}\"", network_node.port()),
        1,
    );
    let proxy = Proxy::start(&text).await;
    let (poc, inference, relay) = (
        proxy.addr("poc"),
        proxy.addr("inference"),
        proxy.addr("callback_relay"),
    );

    // DAPI → PoC port, pinned mTLS, HTTP/1.1: version prefix stripped.
    let (status, _) = https_get(poc, dapi(&[H1]), "/v3.0.8/api/v1/state").await;
    assert_eq!(status, 200);
    assert_eq!(
        last_proxied(&mlnode.recorder()).unwrap().target,
        "/api/v1/state"
    );

    // PoC init: the callback `url` is pointed at the local relay, nothing else changes.
    let body = r#"{"block_hash":"0x8f","r_target":1.4013564660458173,"url":"http://api:9100/v1/poc-batches","node_id":3}"#;
    let (status, _, _, resp) = https(
        poc,
        dapi(&[H2]),
        "POST",
        "/v3.0.8/api/v1/pow/init/generate",
        &[],
        body,
    )
    .await;
    assert_eq!(status, 200, "{resp:?}");
    let got = last_proxied(&mlnode.recorder()).unwrap();
    assert_eq!(got.target, "/api/v1/pow/init/generate");
    assert_eq!(
        got.body_str(),
        body.replace("http://api:9100/", "http://127.0.0.1:9100/")
    );

    // Training is blocked even for the DAPI; strangers do not get in at all.
    let (status, _) = https_get(poc, dapi(&[H1]), "/v3.0.8/api/v1/train/start").await;
    assert_eq!(status, 403);
    for (addr, port) in [(poc, "poc"), (inference, "inference")] {
        for id in [Id::Anonymous, Id::Pair("stranger.crt", "stranger.key")] {
            let cfg = client_tls("mlnode.crt", id, TLS13, &[H2, H1]);
            assert_refused(addr, cfg, &format!("{port}: {id:?}")).await;
        }
    }

    // DAPI → inference port over h2.
    let (status, version, _, _) = https(
        inference,
        dapi(&[H2, H1]),
        "POST",
        "/v1/chat/completions",
        &[],
        "{\"stream\":false}",
    )
    .await;
    assert_eq!((status, version), (StatusCode::OK, Version::HTTP_2));
    assert_eq!(
        last_proxied(&vllm.recorder()).unwrap().target,
        "/v1/chat/completions"
    );
    assert_eq!(
        proxied(&mlnode.recorder()).len(),
        2,
        "nothing else reached the mlnode"
    );

    // podproxy's health checks of the Network Node go over the same mTLS.
    let mlnode_der = m.cert("mlnode.crt").to_vec();
    let probe = network_node.health_check().await;
    assert_eq!(probe.target, "/");
    assert_eq!(probe.client_cert.as_ref(), Some(&mlnode_der));

    // The mlnode posts its batch to the relay in plain HTTP on loopback; it reaches the
    // Network Node over mTLS with mlnode.crt, path byte for byte (v2: model escaped twice).
    network_node.assert_nothing("before any callback");
    let batch = r#"{"public_key":"pk","nonces":[1,2,3],"dist":[0.1,1e-07]}"#;
    for path in [
        "/v1/poc-batches/generated",
        "/v2/poc-batches/Qwen%252FQwen3-32B-FP8/validated",
    ] {
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1:9100\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{batch}",
            batch.len()
        );
        let resp = raw_exchange(relay, req.as_bytes()).await;
        assert_eq!(resp.status, 200, "{path}: {}", resp.body_str());
        let seen = network_node.next().await;
        assert_eq!(seen.target, path);
        assert_eq!(&seen.body[..], batch.as_bytes());
        assert_eq!(
            seen.client_cert.as_deref(),
            Some(m.cert("mlnode.crt").as_ref()),
            "the Network Node must see mlnode.crt"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_token_example_end_to_end() {
    let mlnode = EchoServer::start().await.unwrap();
    let vllm = EchoServer::start().await.unwrap();
    let text = example(
        "pod-token.toml",
        &[
            ("PODPROXY_TOKEN", TOKEN_A.into()),
            ("NETWORK_NODE_CIDR", "203.0.113.7/32".into()),
            ("NETWORK_NODE_CALLBACK", "http://203.0.113.7:9100".into()),
            ("POC_PORT", "0".into()),
            ("INFERENCE_PORT", "0".into()),
            ("MLNODE_URL", mlnode.url()),
            ("VLLM_URLS", vllm.url()),
        ],
    );
    let text = replace_n(&text, "bind = \"0.0.0.0:0\"", "bind = \"127.0.0.1:0\"", 2);
    let proxy = Proxy::start(&text).await;
    let (poc, inference) = (proxy.addr("poc"), proxy.addr("inference"));
    let auth = format!("Authorization: Bearer {TOKEN_A}\r\n");

    // The DAPI's health probe needs no token; everything else does.
    for addr in [poc, inference] {
        assert_eq!(
            raw_exchange(addr, &raw_get("/v3.0.8/health", ""))
                .await
                .status,
            200
        );
        let resp = raw_exchange(addr, &raw_get("/v3.0.8/api/v1/state", "")).await;
        assert_error(&resp, 401, "unauthorized", "no token");
    }
    let resp = raw_exchange(poc, &raw_get("/v3.0.8/api/v1/state", &auth)).await;
    assert_eq!(resp.status, 200);
    let got = last_proxied(&mlnode.recorder()).unwrap();
    assert_eq!(got.target, "/api/v1/state");
    assert_eq!(got.header("authorization"), None);
    let resp = raw_exchange(poc, &raw_get("/v3.0.8/api/v1/train/start", &auth)).await;
    assert_error(&resp, 403, "forbidden", "training");

    // mode = "reject": a foreign callback is refused, the Network Node's passes untouched.
    let post = |url: &str| {
        let body = format!("{{\"url\":\"{url}/v1/poc-batches\",\"node_id\":0}}");
        format!(
            "POST /v3.0.8/api/v1/pow/init/generate HTTP/1.1\r\nHost: pod\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    let resp = raw_exchange(poc, post("http://attacker.example:9100").as_bytes()).await;
    assert_eq!(resp.status, 403, "{}", resp.body_str());
    let resp = raw_exchange(poc, post("http://203.0.113.7:9100").as_bytes()).await;
    assert_eq!(resp.status, 200, "{}", resp.body_str());
    let got = last_proxied(&mlnode.recorder()).unwrap();
    assert_eq!(
        got.body_str(),
        "{\"url\":\"http://203.0.113.7:9100/v1/poc-batches\",\"node_id\":0}"
    );
    assert_eq!(
        proxied(&mlnode.recorder()).len(),
        3,
        "health + state + accepted PoC"
    );
}
