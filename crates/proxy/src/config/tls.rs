//! TLS settings and the rustls configurations they make: listener TLS (optionally verifying
//! client certificates against a CA or against pinned certificates) and upstream TLS
//! (bundled roots, a CA file, or pins; optionally a client certificate). Validation builds
//! them once, so a missing file, an expired certificate or a key that does not fit is a
//! config error naming its key; the runtime builds them again from the same settings.
//!
//! Pinning exists for Gonka's mTLS certificates: self-signed, `CA:TRUE`, 100-year validity,
//! each side trusting exactly the other's certificate. webpki refuses such a certificate as
//! an end entity (`CaUsedAsEndEntity`), so ordinary verification cannot accept them; a pin
//! accepts exactly the configured certificate(s), and the handshake signature still proves
//! the peer holds the matching private key.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig,
    SignatureScheme,
};
use sha2::{Digest, Sha256};
use std::sync::Arc;

/// The crypto provider everywhere: ring (builds static with musl, no cmake/NASM).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Loads every certificate of a PEM file; refuses an empty file and an expired or not yet
/// valid first certificate (the one presented), so the mistake shows at start, not at the
/// first handshake.
pub fn load_certs(path: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{path}: {e}"))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{path}: not a PEM certificate file: {e}"))?;
    let first = certs
        .first()
        .ok_or_else(|| format!("{path}: no certificate in the file"))?;
    check_validity(first, path)?;
    Ok(certs)
}

/// PKCS#8, SEC1 (EC) and PKCS#1 (RSA) private keys.
pub fn load_key(path: &str) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| format!("{path}: no usable private key: {e}"))
}

fn check_validity(cert: &CertificateDer<'_>, path: &str) -> Result<(), String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| format!("{path}: cannot parse certificate: {e}"))?;
    let validity = parsed.validity();
    let now = x509_parser::time::ASN1Time::now();
    if now > validity.not_after {
        return Err(format!(
            "{path}: certificate expired on {}",
            validity.not_after
        ));
    }
    if now < validity.not_before {
        return Err(format!(
            "{path}: certificate not valid before {}",
            validity.not_before
        ));
    }
    Ok(())
}

/// A certificate and key that belong together.
pub fn certified_key(
    cert: &str,
    key: &str,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
    let certs = load_certs(cert)?;
    let key_der = load_key(key)?;
    CertifiedKey::from_der(certs.clone(), key_der.clone_key(), &provider())
        .map_err(|e| format!("{key} does not fit {cert}: {e}"))?;
    Ok((certs, key_der))
}

/// Accepted peer certificates: exact DER, DER SHA-256, or SubjectPublicKeyInfo SHA-256.
#[derive(Debug, Default, Clone)]
pub struct Pins {
    der_sha256: Vec<[u8; 32]>,
    spki_sha256: Vec<[u8; 32]>,
}

impl Pins {
    /// Each entry is a PEM certificate file (every certificate in it is pinned),
    /// `sha256:<hex>` (of the certificate DER) or `spki-sha256:<hex>` (of its public key).
    pub fn load(entries: &[String]) -> Result<Pins, String> {
        let mut pins = Pins::default();
        for e in entries {
            if let Some(hex) = e.strip_prefix("sha256:") {
                pins.der_sha256
                    .push(parse_hex32(hex).map_err(|r| format!("{e:?}: {r}"))?);
            } else if let Some(hex) = e.strip_prefix("spki-sha256:") {
                pins.spki_sha256
                    .push(parse_hex32(hex).map_err(|r| format!("{e:?}: {r}"))?);
            } else {
                for cert in load_certs(e)? {
                    pins.der_sha256.push(Sha256::digest(cert.as_ref()).into());
                }
            }
        }
        if pins.der_sha256.is_empty() && pins.spki_sha256.is_empty() {
            return Err("no pinned certificate given".into());
        }
        Ok(pins)
    }

    pub fn matches(&self, cert: &CertificateDer<'_>) -> bool {
        let der: [u8; 32] = Sha256::digest(cert.as_ref()).into();
        if self.der_sha256.contains(&der) {
            return true;
        }
        if self.spki_sha256.is_empty() {
            return false;
        }
        match x509_parser::parse_x509_certificate(cert.as_ref()) {
            Ok((_, parsed)) => {
                let spki: [u8; 32] = Sha256::digest(parsed.public_key().raw).into();
                self.spki_sha256.contains(&spki)
            }
            Err(_) => false,
        }
    }
}

fn parse_hex32(hex: &str) -> Result<[u8; 32], String> {
    let hex = hex.trim();
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("expected 64 hex digits (a SHA-256)".into());
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
    }
    Ok(out)
}

/// The pinning verifier, for both sides: client certificates on a listener with
/// `client_auth = "pin"`, and server certificates of pinned upstreams (the Network Node's
/// callback port in Gonka's mTLS mode). Host names and validity dates are not checked: the
/// pin is the identity. Handshake signatures are verified as usual, which proves the peer
/// holds the pinned certificate's key.
#[derive(Debug)]
struct Pinned {
    pins: Pins,
    provider: Arc<CryptoProvider>,
}

impl Pinned {
    fn check(&self, cert: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        if self.pins.matches(cert) {
            Ok(())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn tls12(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(m, c, d, &self.provider.signature_verification_algorithms)
    }

    fn tls13(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(m, c, d, &self.provider.signature_verification_algorithms)
    }

    fn schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl ClientCertVerifier for Pinned {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls12(m, c, d)
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(m, c, d)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls12(m, c, d)
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(m, c, d)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

/// How a TLS listener treats client certificates.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    None,
    Ca,
    Pin,
}

/// Listener TLS settings (validated paths and mode).
#[derive(Debug, Clone)]
pub struct ListenerTls {
    pub cert: String,
    pub key: String,
    pub client_auth: ClientAuth,
    pub client_ca: Vec<String>,
    pub client_pins: Vec<String>,
}

/// Builds the listener's rustls config: TLS 1.2 and 1.3, ALPN h2 + http/1.1.
pub fn server_config(t: &ListenerTls) -> Result<Arc<ServerConfig>, String> {
    let provider = provider();
    let (certs, key) = certified_key(&t.cert, &t.key)?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match t.client_auth {
        ClientAuth::None => builder.with_no_client_auth(),
        ClientAuth::Ca => {
            let mut roots = RootCertStore::empty();
            for path in &t.client_ca {
                for c in load_certs(path)? {
                    roots.add(c).map_err(|e| format!("{path}: {e}"))?;
                }
            }
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| format!("client_ca: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        }
        ClientAuth::Pin => builder.with_client_cert_verifier(Arc::new(Pinned {
            pins: Pins::load(&t.client_pins)?,
            provider: provider.clone(),
        })),
    };
    let mut cfg = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("{}: {e}", t.cert))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Upstream TLS settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpstreamTls {
    /// PEM file of CA certificates replacing the bundled roots.
    pub ca: Option<String>,
    /// Pinned server certificates (files or hashes, see `Pins::load`); replaces CA checks.
    pub pins: Vec<String>,
    pub client_cert: Option<String>,
    pub client_key: Option<String>,
    /// SNI / verification name when it differs from the URL's host.
    pub server_name: Option<String>,
}

/// Builds the upstream client config: HTTP/1.1 over TLS, bundled webpki roots unless a CA
/// file or pins are given (a scratch container has no /etc/ssl).
pub fn client_config(t: &UpstreamTls) -> Result<ClientConfig, String> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = if !t.pins.is_empty() {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Pinned {
                pins: Pins::load(&t.pins)?,
                provider: provider.clone(),
            }))
    } else {
        let mut roots = RootCertStore::empty();
        match &t.ca {
            Some(path) => {
                for c in load_certs(path)? {
                    roots.add(c).map_err(|e| format!("{path}: {e}"))?;
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        builder.with_root_certificates(roots)
    };
    // ALPN (http/1.1) is set by hyper-rustls's connector builder, which refuses a preset.
    let cfg = match (&t.client_cert, &t.client_key) {
        (Some(cert), Some(key)) => {
            let (certs, key) = certified_key(cert, key)?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| format!("{cert}: {e}"))?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => return Err("client_cert and client_key go together".into()),
    };
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_pins_parse_and_reject_garbage() {
        let h = "ab".repeat(32);
        assert_eq!(parse_hex32(&h).unwrap(), [0xab; 32]);
        assert!(parse_hex32("abc").is_err());
        assert!(parse_hex32(&"zz".repeat(32)).is_err());
        assert!(Pins::load(&[format!("sha256:{h}")]).is_ok());
        assert!(Pins::load(&["sha256:12".into()]).is_err());
        assert!(Pins::load(&[]).is_err());
        assert!(Pins::load(&["/nonexistent/dapi.crt".into()])
            .unwrap_err()
            .contains("/nonexistent/dapi.crt"));
    }
}
