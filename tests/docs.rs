//! The documentation agrees with the code: every default shown in the configuration
//! reference (docs/configuration.md, "Every key") is the default `podproxy check` prints,
//! and every key `check` prints is documented there.

use std::collections::BTreeMap;

const REFERENCE: &str = include_str!("../docs/configuration.md");

/// Keys whose value in the reference is an example, not a default.
const EXAMPLES: &[&str] = &[
    "bind",
    "routes",
    "urls",
    "tokens",
    "token_file",
    "token_exempt",
    "allow_ips",
    "block_paths",
    "tls",
    "callback_origin",
    "token",
];

/// Drops a `#` comment that is outside a quoted string.
fn strip_comment(line: &str) -> &str {
    let mut quoted = false;
    for (i, c) in line.char_indices() {
        match c {
            '"' => quoted = !quoted,
            '#' if !quoted => return &line[..i],
            _ => {}
        }
    }
    line
}

/// `section → key → value` of the reference's TOML block, values parsed as TOML.
fn reference() -> BTreeMap<String, BTreeMap<String, toml::Value>> {
    let start = REFERENCE
        .find("## Every key")
        .expect("docs/configuration.md has an \"Every key\" section");
    let block = &REFERENCE[start..];
    let block = &block[block.find("```toml\n").expect("a toml block") + 8..];
    let block = &block[..block.find("\n```").expect("the block ends")];
    let mut out: BTreeMap<String, BTreeMap<String, toml::Value>> = BTreeMap::new();
    let mut section = String::new();
    let mut lines = block.lines();
    while let Some(raw) = lines.next() {
        let line = strip_comment(raw).trim();
        if line.is_empty() {
            continue;
        }
        if line.starts_with('[') {
            section = line.trim_matches(|c| c == '[' || c == ']').to_string();
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let mut value = value.trim().to_string();
        // A value continues while its brackets are open.
        while value.matches(['[', '{']).count() > value.matches([']', '}']).count() {
            let next = lines.next().expect("an unclosed value in the reference");
            value.push(' ');
            value.push_str(strip_comment(next).trim());
        }
        let parsed: toml::Table = format!("v = {value}")
            .parse()
            .unwrap_or_else(|e| panic!("[{section}] {key} = {value}: {e}"));
        out.entry(section.clone())
            .or_default()
            .insert(key.trim().to_string(), parsed["v"].clone());
    }
    out
}

/// What `check` prints for a minimal config, by the reference's section names.
fn printed_defaults() -> BTreeMap<String, toml::Table> {
    let cfg = proxy::Config::from_toml(
        "[listeners.main]\nbind = \"127.0.0.1:0\"\nroutes = [{ prefix = \"/\", upstream = \"u\" }]\n\
         [upstreams.u]\nurls = \"http://127.0.0.1:9\"\n[admin]\n",
    )
    .unwrap();
    let printed: toml::Table = cfg.to_toml().parse().unwrap();
    let table = |path: &[&str]| {
        let mut v = &printed;
        for p in path {
            v = v[*p]
                .as_table()
                .unwrap_or_else(|| panic!("printed config lacks {p}"));
        }
        v.clone()
    };
    BTreeMap::from([
        ("server".to_string(), table(&["server"])),
        (
            "listeners.<name>".to_string(),
            table(&["listeners", "main"]),
        ),
        ("upstreams.<name>".to_string(), table(&["upstreams", "u"])),
        ("admin".to_string(), table(&["admin"])),
        ("poc".to_string(), table(&["poc"])),
    ])
}

/// Durations compared as durations ("60s" is "1m"), tables key by key.
fn normalized(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => humantime::parse_duration(s)
            .map(|d| format!("{d:?}"))
            .unwrap_or_else(|_| s.clone()),
        toml::Value::Table(t) => t
            .iter()
            .map(|(k, v)| format!("{k}={}", normalized(v)))
            .collect::<Vec<_>>()
            .join(","),
        other => other.to_string(),
    }
}

#[test]
fn the_configuration_reference_shows_the_code_defaults() {
    let documented = reference();
    let printed = printed_defaults();
    for (section, keys) in &printed {
        let doc = documented
            .get(section)
            .unwrap_or_else(|| panic!("[{section}] is not in the reference"));
        for (key, value) in keys {
            match doc.get(key) {
                None => panic!("[{section}] {key} is printed by check but not documented"),
                Some(_) if EXAMPLES.contains(&key.as_str()) => {}
                Some(shown) => assert_eq!(
                    normalized(shown),
                    normalized(value),
                    "[{section}] {key}: the reference shows {shown}, the code's default is {value}"
                ),
            }
        }
    }
}
