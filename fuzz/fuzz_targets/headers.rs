//! Hop-by-hop removal and forwarding headers on arbitrary header maps: never panics; after
//! `remove_hop_by_hop` no hop-by-hop header (nor one named by `Connection`) is left; after
//! `set_forwarded` exactly one X-Forwarded-For / X-Real-IP / X-Forwarded-Proto.
#![no_main]
use http::header::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Input: lines `name: value` separated by `\n`; the first byte picks the client address.
fn build(data: &[u8]) -> (HeaderMap, IpAddr) {
    let mut map = HeaderMap::new();
    let (first, rest) = data.split_first().unwrap_or((&0, &[]));
    let ip = if first & 1 == 0 {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, *first))
    } else {
        IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, *first as u16))
    };
    for line in rest.split(|b| *b == b'\n') {
        let Some(i) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..i]),
            HeaderValue::from_bytes(line[i + 1..].trim_ascii()),
        ) else {
            continue;
        };
        map.append(name, value);
    }
    (map, ip)
}

fuzz_target!(|data: &[u8]| {
    let (mut map, ip) = build(data);
    let named: Vec<HeaderName> = map
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    proxy::headers::remove_hop_by_hop(&mut map);
    for h in [
        "connection",
        "keep-alive",
        "te",
        "transfer-encoding",
        "upgrade",
        "trailer",
    ] {
        assert!(!map.contains_key(h), "{h} left");
    }
    for n in named {
        assert!(!map.contains_key(&n), "{n} named by Connection left");
    }
    assert!(map.keys().all(|k| !k.as_str().starts_with("proxy-")));
    proxy::headers::set_forwarded(&mut map, &proxy::headers::client_ip_value(ip), "https");
    assert_eq!(map.get_all("x-real-ip").iter().count(), 1);
    assert_eq!(map.get_all("x-forwarded-proto").iter().count(), 1);
    let xff: Vec<_> = map.get_all("x-forwarded-for").iter().collect();
    assert!(xff.len() <= 1);
    if let Some(v) = xff.first() {
        assert!(v.to_str().unwrap().ends_with(&ip.to_string()));
    }
});
