//! The security gate of a listener: source-address allowlist, bearer tokens, blocked paths.
//! Path decisions use the normalised path (`route::normalize_for_match`) so an encoded or
//! dotted variant cannot slip past a rule that the application behind would still route.

use crate::config::values::read_token_file;
use crate::config::GateConfig;
use crate::error::ProxyError;
use crate::route::{normalize_for_match, normalize_keep_dot_dot};
use http::{header, HeaderMap};
use ipnet::IpNet;
use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::net::IpAddr;
use subtle::ConstantTimeEq;

/// The mlnode's training API (`/api/v1/train/start` takes environment variables for the
/// GPU worker). The DAPI no longer calls it, so it is blocked unless a listener sets
/// `allow_training = true`. Other destructive endpoints (`/api/v1/stop`, `DELETE
/// /api/v1/models`, `/api/v1/inference/down`) stay open: the DAPI calls the first two, and
/// `down` does nothing `stop` does not; a gate (token, allowlist, mTLS) protects them.
pub const TRAINING_PREFIX: &str = "/api/v1/train/";

#[derive(Debug, Default)]
pub struct Gate {
    /// SHA-256 of each accepted token: comparing fixed-size digests in constant time leaks
    /// neither the token nor its length.
    tokens: Vec<[u8; 32]>,
    exempt: Vec<String>,
    allow: Vec<IpNet>,
    block: Vec<String>,
}

impl Gate {
    pub fn new(cfg: &GateConfig) -> Result<Gate, String> {
        let mut tokens: Vec<String> = cfg.tokens.clone();
        if let Some(path) = &cfg.token_file {
            tokens.extend(read_token_file(path)?);
        }
        Ok(Gate {
            tokens: tokens
                .iter()
                .map(|t| Sha256::digest(t.as_bytes()).into())
                .collect(),
            exempt: cfg
                .token_exempt
                .iter()
                .map(|p| normalize_for_match(p).into_owned())
                .collect(),
            allow: cfg.allow_ips.clone(),
            block: cfg
                .block_paths
                .iter()
                .map(String::as_str)
                .chain((!cfg.allow_training).then_some(TRAINING_PREFIX))
                .map(|p| normalize_for_match(p).into_owned())
                .collect(),
        })
    }

    /// Source allowlist, checked before anything else.
    pub fn check_source(&self, ip: IpAddr) -> Result<(), ProxyError> {
        if self.allow.is_empty() {
            return Ok(());
        }
        let ip = ip.to_canonical(); // ::ffff:1.2.3.4 on a dual-stack socket is 1.2.3.4
        if self.allow.iter().any(|n| n.contains(&ip)) {
            Ok(())
        } else {
            Err(ProxyError::Forbidden(format!(
                "source address {ip} is not allowed"
            )))
        }
    }

    /// Blocked paths (403), then the bearer token (401) unless the path is exempt. A valid
    /// token's `Authorization` header is removed: the upstream never sees it.
    pub fn check_request(
        &self,
        upstream_path: &str,
        headers: &mut HeaderMap,
    ) -> Result<(), ProxyError> {
        if self.block.is_empty() && self.tokens.is_empty() {
            return Ok(());
        }
        let path = normalize_for_match(upstream_path);
        // A path already in normal form (borrowed) is its own undotted form too.
        let undotted = match &path {
            Cow::Borrowed(_) => None,
            Cow::Owned(_) => Some(normalize_keep_dot_dot(upstream_path)),
        };
        if self.block.iter().any(|b| {
            segment_prefix(&path, b) || undotted.as_ref().is_some_and(|u| segment_prefix(u, b))
        }) {
            return Err(ProxyError::Forbidden(
                "this path is blocked on this listener".into(),
            ));
        }
        if self.tokens.is_empty() {
            return Ok(());
        }
        let presented = headers
            .get_all(header::AUTHORIZATION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(bearer)
            .any(|t| self.accepts(t));
        if presented {
            // Our token never travels further, exempt path or not.
            headers.remove(header::AUTHORIZATION);
            Ok(())
        } else if self.exempt.iter().any(|e| *e == *path) {
            Ok(())
        } else {
            Err(ProxyError::Unauthorized)
        }
    }

    fn accepts(&self, token: &str) -> bool {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut ok = subtle::Choice::from(0);
        for t in &self.tokens {
            ok |= t.ct_eq(&digest);
        }
        ok.into()
    }
}

/// `Bearer <token>` (scheme case-insensitive).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// `/api/v1/train/` blocks `/api/v1/train`, `/api/v1/train/x`, not `/api/v1/training`.
fn segment_prefix(path: &str, prefix: &str) -> bool {
    let p = prefix.trim_end_matches('/');
    if p.is_empty() {
        return true;
    }
    path == p
        || path
            .strip_prefix(p)
            .is_some_and(|rest| rest.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::values::parse_net;
    use http::HeaderValue;

    fn gate(tokens: &[&str], exempt: &[&str], allow: &[&str], block: &[&str]) -> Gate {
        Gate::new(&GateConfig {
            tokens: tokens.iter().map(|s| s.to_string()).collect(),
            token_file: None,
            token_exempt: exempt.iter().map(|s| s.to_string()).collect(),
            allow_ips: allow.iter().map(|s| parse_net(s).unwrap()).collect(),
            block_paths: block.iter().map(|s| s.to_string()).collect(),
            allow_training: true,
        })
        .unwrap()
    }

    fn auth(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn tokens_accept_rotate_and_strip() {
        let g = gate(
            &["old-token-0123456789", "new-token-0123456789"],
            &["/health"],
            &[],
            &[],
        );
        for t in ["Bearer old-token-0123456789", "bearer new-token-0123456789"] {
            let mut h = auth(t);
            assert!(g.check_request("/api/v1/state", &mut h).is_ok(), "{t}");
            assert!(
                h.get(header::AUTHORIZATION).is_none(),
                "token must not reach the upstream"
            );
        }
        for t in [
            "Bearer wrong",
            "Basic b2xkLXRva2Vu",
            "Bearer",
            "old-token-0123456789",
        ] {
            assert!(
                matches!(
                    g.check_request("/x", &mut auth(t)),
                    Err(ProxyError::Unauthorized)
                ),
                "{t}"
            );
        }
        assert!(matches!(
            g.check_request("/x", &mut HeaderMap::new()),
            Err(ProxyError::Unauthorized)
        ));
        // exempt exactly, also when encoded; no prefix tricks; our token stripped there too
        assert!(g.check_request("/health", &mut HeaderMap::new()).is_ok());
        let mut h = auth("Bearer new-token-0123456789");
        assert!(g.check_request("/health", &mut h).is_ok());
        assert!(h.get(header::AUTHORIZATION).is_none());
        assert!(g.check_request("/%68ealth", &mut HeaderMap::new()).is_ok());
        assert!(g
            .check_request("/health/../api/v1/stop", &mut HeaderMap::new())
            .is_err());
        assert!(g.check_request("/healthz", &mut HeaderMap::new()).is_err());
    }

    #[test]
    fn blocked_paths_cannot_be_dodged() {
        let g = gate(&[], &[], &[], &["/api/v1/train/"]);
        for p in [
            "/api/v1/train",
            "/api/v1/train/",
            "/api/v1/train/start",
            "/api/v1/%74rain/start",
            "//api/v1/./train/x",
            "/api/v1/x/../train/",
        ] {
            assert!(
                matches!(
                    g.check_request(p, &mut HeaderMap::new()),
                    Err(ProxyError::Forbidden(_))
                ),
                "{p}"
            );
        }
        assert!(
            g.check_request("/api/v1/train/../x", &mut HeaderMap::new())
                .is_err(),
            "uvicorn keeps '..'"
        );
        for p in ["/api/v1/training", "/api/v1/state", "/"] {
            assert!(g.check_request(p, &mut HeaderMap::new()).is_ok(), "{p}");
        }
    }

    #[test]
    fn training_is_blocked_unless_allowed() {
        let blocked = Gate::new(&GateConfig::default()).unwrap();
        for p in [
            "/api/v1/train/start",
            "/api/v1/%74rain/start",
            "/api/v1/train",
        ] {
            assert!(
                matches!(
                    blocked.check_request(p, &mut HeaderMap::new()),
                    Err(ProxyError::Forbidden(_))
                ),
                "{p}"
            );
        }
        assert!(blocked
            .check_request("/api/v1/state", &mut HeaderMap::new())
            .is_ok());
        let open = gate(&[], &[], &[], &[]);
        assert!(open
            .check_request("/api/v1/train/start", &mut HeaderMap::new())
            .is_ok());
    }

    #[test]
    fn source_allowlist_v4_v6_and_mapped() {
        let g = gate(
            &[],
            &[],
            &["10.0.0.0/8", "203.0.113.7", "2001:db8::/32"],
            &[],
        );
        for ok in ["10.1.2.3", "203.0.113.7", "2001:db8::1", "::ffff:10.9.9.9"] {
            assert!(g.check_source(ok.parse().unwrap()).is_ok(), "{ok}");
        }
        for bad in ["11.0.0.1", "203.0.113.8", "2001:db9::1", "127.0.0.1"] {
            assert!(
                matches!(
                    g.check_source(bad.parse().unwrap()),
                    Err(ProxyError::Forbidden(_))
                ),
                "{bad}"
            );
        }
        assert!(gate(&[], &[], &[], &[])
            .check_source("1.2.3.4".parse().unwrap())
            .is_ok());
        assert!(parse_net("10.0.0.0/33").is_err());
        assert!(parse_net("example.com").is_err());
    }
}
