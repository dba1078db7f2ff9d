//! Parsers of single values a config names: token files, networks, version path segments.
//! The runtime uses them too (a token file is read again when the gate is built).

use ipnet::IpNet;
use std::net::IpAddr;

/// Tokens from a file: one per line, blank lines and `#` comments ignored.
pub fn read_token_file(path: &str) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect())
}

/// `10.0.0.0/8`, `2001:db8::/32`, or a single address (`203.0.113.7` = /32).
pub fn parse_net(text: &str) -> Result<IpNet, String> {
    let t = text.trim();
    t.parse::<IpNet>()
        .or_else(|_| t.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| format!("{text:?} is not an address or CIDR range"))
}

/// Length of a leading `/v<major>.<minor>.<patch>[suffix]` segment, if there is one.
/// `/v1/` is not a version segment (it is the OpenAI API), only three dotted numbers are.
pub fn version_segment_len(path: &str) -> Option<usize> {
    let rest = path.strip_prefix("/v")?;
    let seg_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let seg = &rest[..seg_end];
    let mut parts = seg.splitn(3, '.');
    let major = parts.next()?;
    let minor = parts.next()?;
    let patch_and_suffix = parts.next()?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let patch_len = patch_and_suffix
        .bytes()
        .take_while(u8::is_ascii_digit)
        .count();
    if digits(major) && digits(minor) && patch_len > 0 {
        Some(2 + seg_end)
    } else {
        None
    }
}
