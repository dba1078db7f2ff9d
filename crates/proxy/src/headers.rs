//! Header rules of a hop: hop-by-hop removal, forwarding headers, request id.

use crate::body::first_non_whitespace;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use prometheus_client::metrics::counter::Counter;
use std::net::IpAddr;

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");

/// Removes the headers that belong to one connection only: `Connection` and every header it
/// names, `Keep-Alive`, `TE`, `Transfer-Encoding`, `Upgrade`, `Trailer` and `Proxy-*`.
/// Every value of a repeated header goes (`HeaderMap::remove` drops them all).
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // One scan over the names decides; most messages carry none of these, and then nothing
    // is hashed or removed (the per-name removals were ~3% of a small request's cost).
    let mut doomed: Vec<HeaderName> = Vec::new();
    for name in headers.keys() {
        if name == header::CONNECTION {
            doomed.extend(
                headers
                    .get_all(header::CONNECTION)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .flat_map(|v| v.split(','))
                    .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok()),
            );
        }
        let hop = [
            &header::CONNECTION,
            &KEEP_ALIVE,
            &header::TE,
            &header::TRANSFER_ENCODING,
            &header::UPGRADE,
            &header::TRAILER,
        ]
        .contains(&name);
        if hop || name.as_str().starts_with("proxy-") {
            doomed.push(name.clone());
        }
    }
    for name in doomed {
        headers.remove(name);
    }
}

/// The client's address as a header value, formatted once per connection.
pub fn client_ip_value(client: IpAddr) -> HeaderValue {
    HeaderValue::from_str(&client.to_string()).unwrap_or_else(|_| HeaderValue::from_static("-"))
}

/// Appends the client (`client_ip_value`) to `X-Forwarded-For` (all existing values kept,
/// in order) and sets `X-Real-IP` and `X-Forwarded-Proto`, as Gonka's nginx does.
pub fn set_forwarded(headers: &mut HeaderMap, client: &HeaderValue, proto: &'static str) {
    let mut xff = String::new();
    for v in headers.get_all(&X_FORWARDED_FOR) {
        if let Ok(s) = v.to_str() {
            if !s.trim().is_empty() {
                xff.push_str(s.trim());
                xff.push_str(", ");
            }
        }
    }
    let xff = if xff.is_empty() {
        // The usual case (the client is the first hop): no formatting, no copy.
        client.clone()
    } else {
        xff.push_str(client.to_str().unwrap_or("-"));
        HeaderValue::from_str(&xff).unwrap_or_else(|_| client.clone())
    };
    headers.insert(X_FORWARDED_FOR.clone(), xff);
    headers.insert(X_REAL_IP.clone(), client.clone());
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
}

/// The client's `x-request-id` when it sent a usable one, else a fresh UUID; set on the
/// upstream request so both sides log the same id.
pub fn request_id(headers: &mut HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get(&X_REQUEST_ID) {
        if !v.is_empty() && v.len() <= 200 && v.to_str().is_ok() {
            return v.clone();
        }
    }
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let id = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf);
    let v = HeaderValue::from_str(id).unwrap_or_else(|_| HeaderValue::from_static("-"));
    headers.insert(X_REQUEST_ID.clone(), v.clone());
    v
}

/// Adds `Content-Type: application/json` when the body starts like JSON (`{` or `[` after
/// blanks), and counts it in `added` (`json_content_type` routes).
pub fn json_content_type(headers: &mut HeaderMap, frames: &[Bytes], added: &Counter) {
    if matches!(first_non_whitespace(frames), Some(b'{' | b'[')) {
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        added.inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        m
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        let mut h = map(&[
            ("connection", "keep-alive, X-Secret"),
            ("connection", "x-other"),
            ("x-secret", "1"),
            ("x-secret", "2"),
            ("x-other", "3"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic x"),
            ("proxy-connection", "keep-alive"),
            ("trailer", "x"),
            ("content-type", "application/json"),
            ("x-keep", "a"),
            ("x-keep", "b"),
        ]);
        remove_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(left, ["content-type", "x-keep"]);
        assert_eq!(h.get_all("x-keep").iter().count(), 2);
    }

    #[test]
    fn forwarded_headers_append_and_set() {
        let mut h = map(&[
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-for", "2.2.2.2"),
            ("x-real-ip", "9.9.9.9"),
        ]);
        set_forwarded(
            &mut h,
            &client_ip_value("10.0.0.1".parse().unwrap()),
            "http",
        );
        assert_eq!(h["x-forwarded-for"], "1.1.1.1, 2.2.2.2, 10.0.0.1");
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(h["x-real-ip"], "10.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        let mut h = HeaderMap::new();
        set_forwarded(&mut h, &client_ip_value("::1".parse().unwrap()), "https");
        assert_eq!(h["x-forwarded-for"], "::1");
    }

    #[test]
    fn request_id_kept_or_generated() {
        let mut h = map(&[("x-request-id", "abc-123")]);
        assert_eq!(request_id(&mut h), "abc-123");
        let mut h = HeaderMap::new();
        let id = request_id(&mut h);
        assert_eq!(id.len(), 36);
        assert_eq!(h["x-request-id"], id);
        assert_ne!(request_id(&mut HeaderMap::new()), id);
    }
}
