//! Config parsing + env expansion: `${VAR}` / `${VAR:-default}` expansion with a fixed
//! environment, then `Config::from_toml`. Neither may panic; a valid config must round-trip
//! through `to_toml`, except that printed secrets (`<redacted>`) must refuse to load.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let expanded = proxy::config::env::expand(text, |name| match name {
        "PORT" => Some("8080".into()),
        "URLS" => Some("http://127.0.0.1:1, http://[::1]:2".into()),
        "EMPTY" => Some(String::new()),
        _ => None,
    });
    let Ok(expanded) = expanded else { return };
    if let Ok(cfg) = proxy::Config::from_toml(&expanded) {
        let again = cfg.to_toml();
        let secrets = cfg.listeners.iter().any(|l| !l.gate.tokens.is_empty())
            || cfg.admin.as_ref().is_some_and(|a| a.token.is_some());
        match proxy::Config::from_toml(&again) {
            Ok(_) => assert!(!secrets, "a redacted secret loaded:\n{again}"),
            Err(e) => assert!(secrets, "to_toml output must parse again: {e}\n{again}"),
        }
    }
});
