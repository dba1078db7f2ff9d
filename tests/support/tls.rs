//! TLS for the tests: every certificate and key they use (made once per test binary, by
//! openssl exactly as Gonka's `gen-mlnode-certs.sh` and by rcgen), TLS clients that present
//! a chosen identity, and a TLS backend that reports what each request came with.

use super::{bounded, whole, RawBackend};
use bytes::Bytes;
use http::{Request, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme,
    SupportedProtocolVersion,
};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::{TlsAcceptor, TlsConnector};

// =======================================================================================
// Certificates
// =======================================================================================

/// Every certificate and key the tests use, made once per test binary in a fresh folder
/// (`<target>/tmp/certs-<pid>`; those of finished runs are removed):
///
/// | files | made by | what |
/// |---|---|---|
/// | `dapi.*`, `mlnode.*` | openssl, as gen-mlnode-certs.sh | the Gonka pair |
/// | `stranger.*` | openssl, same recipe, CN `gonka-stranger` | a third Gonka-style cert |
/// | `impostor.*` | openssl, same recipe, CN `gonka-dapi` | dapi's subject and SANs, another key |
/// | `dapi-renewed.crt` | openssl, same recipe with `-key dapi.key` | a new cert on dapi's key |
/// | `dapi.der`, `dapi.spki.der` | openssl x509 / pkey | for the `sha256:` / `spki-sha256:` pins |
/// | `ca.crt`, `ca2.crt` | rcgen | two unrelated CAs |
/// | `client.*` / `client2.*` | rcgen, signed by ca / ca2 | client certs (clientAuth) |
/// | `server.*` | rcgen, signed by ca, SAN localhost + 127.0.0.1 | an upstream server cert |
/// | `expired.*`, `future.*` | rcgen, validity 2020-01-01..02 / from 2090 | bad validity |
pub struct Material {
    pub dir: PathBuf,
}

impl Material {
    pub fn path(&self, file: &str) -> String {
        self.dir.join(file).to_string_lossy().into_owned()
    }

    pub fn cert(&self, file: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_file(self.path(file)).unwrap_or_else(|e| panic!("{file}: {e}"))
    }

    pub fn key(&self, file: &str) -> PrivateKeyDer<'static> {
        PrivateKeyDer::from_pem_file(self.path(file)).unwrap_or_else(|e| panic!("{file}: {e}"))
    }

    /// `sha256:<hex>` of a DER file made by openssl.
    pub fn sha256_pin(&self, der_file: &str, prefix: &str) -> String {
        let der = std::fs::read(self.dir.join(der_file)).expect("der file");
        format!("{prefix}:{}", testkit::data::sha256_hex(&der))
    }
}

pub fn material() -> &'static Material {
    static M: OnceLock<Material> = OnceLock::new();
    M.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
        remove_stale_dirs(root);
        let dir = root.join(format!("certs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("cert dir");
        for (name, cn) in [
            ("dapi", "gonka-dapi"),
            ("mlnode", "gonka-mlnode"),
            ("stranger", "gonka-stranger"),
            ("impostor", "gonka-dapi"),
        ] {
            gonka_cert(
                &dir,
                cn,
                &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
                name,
            );
        }
        // Renewed on the same key: a new certificate, the same public key.
        gonka_cert(&dir, "gonka-dapi", &["-key", "dapi.key"], "dapi-renewed");
        openssl(
            &dir,
            &[
                "x509", "-in", "dapi.crt", "-outform", "der", "-out", "dapi.der",
            ],
        );
        openssl(
            &dir,
            &[
                "x509",
                "-in",
                "dapi.crt",
                "-pubkey",
                "-noout",
                "-out",
                "dapi.pub.pem",
            ],
        );
        openssl(
            &dir,
            &[
                "pkey",
                "-pubin",
                "-in",
                "dapi.pub.pem",
                "-outform",
                "der",
                "-out",
                "dapi.spki.der",
            ],
        );
        rcgen_material(&dir);
        Material { dir }
    })
}

/// Folders of earlier runs whose process is gone (Linux: no `/proc/<pid>`).
fn remove_stale_dirs(root: &Path) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(pid) = name.strip_prefix("certs-") {
            if !Path::new("/proc").join(pid).exists() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl (is it installed?)");
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// gen-mlnode-certs.sh's recipe; `key_args` is `-newkey ec ...` or `-key <file>`.
fn gonka_cert(dir: &Path, cn: &str, key_args: &[&str], out: &str) {
    let subj = format!("/CN={cn}");
    let key_out = format!("{out}.key");
    let crt_out = format!("{out}.crt");
    let mut args = vec!["req", "-x509"];
    args.extend_from_slice(key_args);
    args.extend_from_slice(&["-nodes", "-days", "36500", "-subj", &subj]);
    args.extend_from_slice(&[
        "-addext",
        "subjectAltName=DNS:api,DNS:localhost,IP:127.0.0.1",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,digitalSignature,keyCertSign",
        "-addext",
        "extendedKeyUsage=serverAuth,clientAuth",
    ]);
    if key_args[0] == "-newkey" {
        args.extend_from_slice(&["-keyout", &key_out]);
    }
    args.extend_from_slice(&["-out", &crt_out]);
    openssl(dir, &args);
}

fn rcgen_material(dir: &Path) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let write = |name: &str, cert: &rcgen::Certificate, key: &KeyPair| {
        std::fs::write(dir.join(format!("{name}.crt")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    };
    let ca = |name: &str| {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name
            .push(DnType::CommonName, format!("podproxy test {name}"));
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        write(name, &cert, &key);
        Issuer::new(p, key)
    };
    let ca1 = ca("ca");
    let ca2 = ca("ca2");
    let leaf = |name: &str,
                sans: Vec<String>,
                eku: ExtendedKeyUsagePurpose,
                issuer: &Issuer<'static, KeyPair>| {
        let mut p = CertificateParams::new(sans).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![eku];
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, issuer).unwrap();
        write(name, &cert, &key);
    };
    leaf("client", vec![], ExtendedKeyUsagePurpose::ClientAuth, &ca1);
    leaf("client2", vec![], ExtendedKeyUsagePurpose::ClientAuth, &ca2);
    leaf(
        "server",
        vec!["localhost".into(), "127.0.0.1".into()],
        ExtendedKeyUsagePurpose::ServerAuth,
        &ca1,
    );
    // openssl 3.0's `req` cannot back-date; rcgen can.
    for (name, from, to) in [
        ("expired", (2020, 1, 1), (2020, 1, 2)),
        ("future", (2090, 1, 1), (2190, 1, 1)),
    ] {
        let mut p = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.not_before = rcgen::date_time_ymd(from.0, from.1, from.2);
        p.not_after = rcgen::date_time_ymd(to.0, to.1, to.2);
        let key = KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        write(name, &cert, &key);
    }
}

// =======================================================================================
// Test-side TLS: verifiers, client configs, handshakes
// =======================================================================================

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The handshake-signature checks of a verifier (server or client side alike): by the
/// algorithms of the `CryptoProvider` in field `$provider`. The trait methods have the
/// names of the rustls functions that do the work.
macro_rules! handshake_signatures_by {
    ($provider:tt) => {
        handshake_signatures_by!($provider: verify_tls12_signature, verify_tls13_signature);

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            let algorithms = &self.$provider.signature_verification_algorithms;
            algorithms.supported_schemes()
        }
    };
    ($provider:tt: $($verify:ident),+) => {
        $(
            fn $verify(
                &self,
                message: &[u8],
                cert: &CertificateDer<'_>,
                dss: &DigitallySignedStruct,
            ) -> Result<HandshakeSignatureValid, rustls::Error> {
                let algorithms = &self.$provider.signature_verification_algorithms;
                $verify(message, cert, dss, algorithms)
            }
        )+
    };
}

/// Trusts exactly one server certificate (as the DAPI trusts mlnode.crt); the handshake
/// signature is still checked.
#[derive(Debug)]
struct TrustExactly {
    der: Vec<u8>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for TrustExactly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.der.as_slice() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "not the expected server certificate".into(),
            ))
        }
    }

    handshake_signatures_by!(provider);
}

/// A test server's client-certificate check: any certificate is accepted (the test asserts
/// which one arrived) but one is required, and its handshake signature must verify.
#[derive(Debug)]
struct RequireAnyClientCert(Arc<CryptoProvider>);

impl ClientCertVerifier for RequireAnyClientCert {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    handshake_signatures_by!(0);
}

/// Presents a certificate with a private key that is not its own: the pinned certificate
/// without possession of its key.
#[derive(Debug)]
struct Forged(Arc<CertifiedKey>);

impl ResolvesClientCert for Forged {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Who the test client claims to be (file names in the material folder).
#[derive(Clone, Copy, Debug)]
pub enum Id {
    Anonymous,
    Pair(&'static str, &'static str),
    /// `cert` presented, handshake signed with `key` (which does not belong to it).
    Forged {
        cert: &'static str,
        key: &'static str,
    },
}

pub const H2: &[u8] = b"h2";
pub const H1: &[u8] = b"http/1.1";

/// A client config trusting exactly `server_cert`, presenting `id`, offering `alpn`.
pub fn client_tls(
    server_cert: &str,
    id: Id,
    versions: &[&'static SupportedProtocolVersion],
    alpn: &[&[u8]],
) -> Arc<ClientConfig> {
    let m = material();
    let p = provider();
    let builder = ClientConfig::builder_with_provider(p.clone())
        .with_protocol_versions(versions)
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(TrustExactly {
            der: m.cert(server_cert).to_vec(),
            provider: p.clone(),
        }));
    let mut cfg = match id {
        Id::Anonymous => builder.with_no_client_auth(),
        Id::Pair(cert, key) => builder
            .with_client_auth_cert(vec![m.cert(cert)], m.key(key))
            .unwrap(),
        Id::Forged { cert, key } => {
            let signer = rustls::crypto::ring::sign::any_supported_type(&m.key(key)).unwrap();
            let ck = CertifiedKey::new(vec![m.cert(cert)], signer);
            builder.with_client_cert_resolver(Arc::new(Forged(Arc::new(ck))))
        }
    };
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Arc::new(cfg)
}

pub const TLS13: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13];
pub const TLS12: &[&SupportedProtocolVersion] = &[&rustls::version::TLS12];

/// The DAPI as Gonka's mTLS mode has it: presents dapi.crt, trusts exactly mlnode.crt.
pub fn dapi(alpn: &[&[u8]]) -> Arc<ClientConfig> {
    client_tls("mlnode.crt", Id::Pair("dapi.crt", "dapi.key"), TLS13, alpn)
}

async fn tls_connect(
    addr: SocketAddr,
    cfg: Arc<ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = bounded("tcp connect", TcpStream::connect(addr)).await?;
    tcp.set_nodelay(true)?;
    bounded(
        "tls handshake",
        TlsConnector::from(cfg).connect(ServerName::try_from("localhost").unwrap(), tcp),
    )
    .await
}

/// One request over a fresh TLS connection, HTTP/2 when ALPN chose it, else HTTP/1.1.
/// Returns status, response version, negotiated ALPN and the body.
pub async fn https(
    addr: SocketAddr,
    cfg: Arc<ClientConfig>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (StatusCode, Version, Option<Vec<u8>>, Bytes) {
    let tls = tls_connect(addr, cfg)
        .await
        .expect("TLS handshake accepted");
    let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    let h2 = alpn.as_deref() == Some(H2);
    let mut req = Request::builder().method(method);
    req = if h2 {
        req.uri(format!("https://localhost{path}"))
    } else {
        req.uri(path).header("host", "localhost")
    };
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::from(body.to_string()))).unwrap();
    let io = TokioIo::new(tls);
    let resp = if h2 {
        let (mut send, conn) = bounded(
            "h2 handshake",
            hyper::client::conn::http2::handshake(TokioExecutor::new(), io),
        )
        .await
        .expect("h2 handshake");
        tokio::spawn(conn);
        bounded("h2 response", send.send_request(req)).await
    } else {
        let (mut send, conn) = bounded("h1 handshake", hyper::client::conn::http1::handshake(io))
            .await
            .expect("h1 handshake");
        tokio::spawn(conn);
        bounded("h1 response", send.send_request(req)).await
    }
    .expect("response");
    let (parts, body) = whole("body", resp).await;
    (parts.status, parts.version, alpn, body)
}

pub async fn https_get(
    addr: SocketAddr,
    cfg: Arc<ClientConfig>,
    path: &str,
) -> (StatusCode, Bytes) {
    let (status, _, _, body) = https(addr, cfg, "GET", path, &[], "").await;
    (status, body)
}

/// Asserts the listener refuses this client during the handshake: either the handshake
/// fails, or (TLS 1.3, where the client is done before the server has judged its
/// certificate) the first read fails with the server's alert. `cfg` must offer h2, so a
/// server that accepted would send its SETTINGS at once and the test would see them.
pub async fn assert_refused(addr: SocketAddr, cfg: Arc<ClientConfig>, what: &str) {
    assert!(cfg.alpn_protocols.iter().any(|p| p == H2), "offer h2");
    let tcp = bounded("tcp connect", TcpStream::connect(addr))
        .await
        .expect("tcp connect");
    let outcome = bounded(what, async {
        let mut tls = match TlsConnector::from(cfg)
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
        {
            Err(_) => return Ok(()),
            Ok(t) => t,
        };
        let mut buf = [0u8; 512];
        match tls.read(&mut buf).await {
            Err(e) if e.to_string().contains("alert") => Ok(()),
            Err(e) => Err(format!("the connection failed without a TLS alert: {e}")),
            Ok(0) => Err("the server closed the connection without an alert".to_string()),
            Ok(n) => Err(format!(
                "the server ACCEPTED the connection and sent {n} bytes (ALPN {:?})",
                tls.get_ref().1.alpn_protocol().map(String::from_utf8_lossy)
            )),
        }
    })
    .await;
    if let Err(e) = outcome {
        panic!("{what}: expected a refused handshake, but {e}");
    }
}

// =======================================================================================
// Test-side TLS server (upstream / Network Node)
// =======================================================================================

/// What a TLS test server saw of one request.
#[derive(Debug)]
pub struct Seen {
    pub sni: Option<String>,
    pub client_cert: Option<Vec<u8>>,
    pub method: String,
    pub target: String,
    pub host: Option<String>,
    pub user_agent: Option<String>,
    pub body: Bytes,
}

/// An HTTPS/1.1 server on loopback that reports every request (with the TLS facts of its
/// connection) on a channel. Dropping it stops it and its connections.
pub struct TlsBackend {
    pub addr: SocketAddr,
    rx: mpsc::UnboundedReceiver<Seen>,
    /// podproxy's health checks, set aside by `next` and `assert_nothing`.
    health: Vec<Seen>,
    /// The TCP server under it: accepts, and runs each connection's TLS and HTTP.
    _server: RawBackend,
}

impl TlsBackend {
    pub async fn start(cert: &str, key: &str, require_client_cert: bool) -> TlsBackend {
        let m = material();
        let p = provider();
        let builder = ServerConfig::builder_with_provider(p.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = if require_client_cert {
            builder.with_client_cert_verifier(Arc::new(RequireAnyClientCert(p)))
        } else {
            builder.with_no_client_auth()
        };
        let mut cfg = builder
            .with_single_cert(vec![m.cert(cert)], m.key(key))
            .unwrap();
        cfg.alpn_protocols = vec![H1.to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(cfg));
        let (tx, rx) = mpsc::unbounded_channel();
        let server = RawBackend::start(move |tcp| {
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let conn = tls.get_ref().1;
                let sni = conn.server_name().map(str::to_string);
                let client_cert = conn
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| c.to_vec());
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let (tx, sni, client_cert) = (tx.clone(), sni.clone(), client_cert.clone());
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body.collect().await?.to_bytes();
                        let h = |n: &str| {
                            parts
                                .headers
                                .get(n)
                                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                        };
                        let target = parts.uri.to_string();
                        let _ = tx.send(Seen {
                            sni,
                            client_cert,
                            method: parts.method.to_string(),
                            target: target.clone(),
                            host: h("host"),
                            user_agent: h("user-agent"),
                            body,
                        });
                        let out = serde_json::json!({"tls_backend": true, "target": target});
                        Ok::<_, hyper::Error>(
                            http::Response::builder()
                                .header("content-type", "application/json")
                                .body(Full::new(Bytes::from(out.to_string())))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            }
        })
        .await;
        TlsBackend {
            addr: server.addr,
            rx,
            health: Vec::new(),
            _server: server,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The next client request (podproxy's health checks skipped), bounded.
    pub async fn next(&mut self) -> Seen {
        loop {
            let seen = bounded("TLS backend request", self.rx.recv())
                .await
                .expect("TLS backend channel open");
            if seen.user_agent.as_deref() != Some("podproxy-health") {
                return seen;
            }
            self.health.push(seen);
        }
    }

    /// The first health check podproxy sent (waiting for it if none came yet), bounded.
    pub async fn health_check(&mut self) -> &Seen {
        while self.health.is_empty() {
            let seen = bounded("TLS backend health check", self.rx.recv())
                .await
                .expect("TLS backend channel open");
            assert_eq!(
                seen.user_agent.as_deref(),
                Some("podproxy-health"),
                "unexpected request {seen:?}"
            );
            self.health.push(seen);
        }
        &self.health[0]
    }

    /// Asserts no client request has arrived (health checks set aside).
    pub fn assert_nothing(&mut self, what: &str) {
        while let Ok(seen) = self.rx.try_recv() {
            assert!(
                seen.user_agent.as_deref() == Some("podproxy-health"),
                "{what}: the TLS backend received {seen:?}"
            );
            self.health.push(seen);
        }
    }
}

// =======================================================================================
// Config snippets
// =======================================================================================

/// `tls = { ... }` for a listener presenting mlnode.crt with client pins.
pub fn pin_tls(pins: &[String]) -> String {
    let m = material();
    let pins: Vec<String> = pins.iter().map(|p| format!("{p:?}")).collect();
    format!(
        "tls = {{ cert = {:?}, key = {:?}, client_auth = \"pin\", client_pins = [{}] }}",
        m.path("mlnode.crt"),
        m.path("mlnode.key"),
        pins.join(", ")
    )
}
