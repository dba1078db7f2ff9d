//! Route matching and prefix stripping on arbitrary request-targets: never panics, the
//! forwarded path-and-query starts with `/`, and the normalised path has no empty, `.` or
//! `..` segment.
#![no_main]
use libfuzzer_sys::fuzz_target;
use proxy::route::{normalize_for_match, RouteTable};
use std::sync::OnceLock;

fn table(strip_version: bool) -> RouteTable {
    let toml = format!(
        "[listeners.main]\nbind = \"127.0.0.1:0\"\nstrip_version_prefix = {strip_version}\nroutes = [\n  {{ prefix = \"/v1/\", upstream = \"a\" }},\n  {{ prefix = \"/api/\", upstream = \"b\", strip_prefix = true }},\n  {{ prefix = \"/x\", upstream = \"b\", strip_prefix = true }},\n  {{ prefix = \"/\", upstream = \"a\" }},\n]\n[upstreams.a]\nurls = \"http://127.0.0.1:1\"\n[upstreams.b]\nurls = \"http://127.0.0.1:2\"\n"
    );
    let cfg = proxy::Config::from_toml(&toml).expect("fuzz route config");
    RouteTable::new(&cfg.listeners[0], |n| cfg.upstream_index(n))
}

fuzz_target!(|data: &[u8]| {
    static TABLES: OnceLock<[RouteTable; 2]> = OnceLock::new();
    let tables = TABLES.get_or_init(|| [table(false), table(true)]);
    let Ok(target) = std::str::from_utf8(data) else {
        return;
    };
    for t in tables {
        if let Some(m) = t.resolve(target) {
            assert!(
                m.path_and_query.starts_with('/'),
                "{target:?} -> {:?}",
                m.path_and_query
            );
        }
    }
    // One percent-decoding level, like the backends (so not idempotent: `%2541` -> `%41`);
    // the result is absolute with no empty, `.` or `..` segment left.
    let n = normalize_for_match(target);
    assert!(n.starts_with('/'), "{target:?} -> {n:?}");
    let inner = n[1..].strip_suffix('/').unwrap_or(&n[1..]);
    if !inner.is_empty() {
        assert!(
            inner.split('/').all(|s| !matches!(s, "" | "." | "..")),
            "{target:?} -> {n:?}"
        );
    }
});
