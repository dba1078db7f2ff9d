use super::*;

const MINIMAL: &str = r#"
[listeners.main]
bind = "127.0.0.1:0"
routes = [{ prefix = "/", upstream = "u" }]

[upstreams.u]
urls = "http://127.0.0.1:9"
"#;

fn err_of(text: &str) -> String {
    match Config::from_toml(text) {
        Ok(_) => panic!("config should have been rejected:\n{text}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn embedded_default_is_the_pod_front_layout() {
    let text = env::expand(EMBEDDED_DEFAULT, |_| None).unwrap();
    let cfg = Config::from_toml(&text).unwrap();
    let poc = cfg.listeners.iter().find(|l| l.name == "poc").unwrap();
    assert_eq!(poc.bind.port(), 8080);
    assert!(poc.strip_version_prefix);
    let prefixes: Vec<(&str, &str)> = poc
        .routes
        .iter()
        .map(|r| (r.prefix.as_str(), r.upstream.as_str()))
        .collect();
    assert_eq!(prefixes, [("/v1/", "vllm"), ("/", "mlnode")]);
    let inf = cfg
        .listeners
        .iter()
        .find(|l| l.name == "inference")
        .unwrap();
    assert_eq!(inf.bind.port(), 5000);
    let mlnode = &cfg.upstreams[cfg.upstream_index("mlnode").unwrap()];
    assert_eq!(mlnode.backends[0].to_string(), "http://127.0.0.1:8081");
    let vllm = &cfg.upstreams[cfg.upstream_index("vllm").unwrap()];
    assert_eq!(vllm.backends[0].to_string(), "http://127.0.0.1:5001");
    assert!(vllm.pool_idle_timeout < std::time::Duration::from_secs(5));
}

#[test]
fn embedded_default_follows_env() {
    let text = env::expand(EMBEDDED_DEFAULT, |k| match k {
        "POC_PORT" => Some("9080".into()),
        "VLLM_URLS" => Some("http://127.0.0.1:5001, http://127.0.0.1:5002".into()),
        _ => None,
    })
    .unwrap();
    let cfg = Config::from_toml(&text).unwrap();
    assert_eq!(
        cfg.listeners
            .iter()
            .find(|l| l.name == "poc")
            .unwrap()
            .bind
            .port(),
        9080
    );
    let vllm = &cfg.upstreams[cfg.upstream_index("vllm").unwrap()];
    assert_eq!(vllm.backends.len(), 2);
}

#[test]
fn minimal_config_gets_defaults_and_prints() {
    let cfg = Config::from_toml(MINIMAL).unwrap();
    assert_eq!(cfg.listeners[0].max_connections, defaults::MAX_CONNECTIONS);
    assert_eq!(
        cfg.upstreams[0].response_timeout,
        defaults::RESPONSE_TIMEOUT
    );
    let printed = cfg.to_toml();
    assert!(printed.contains("response_timeout = \"30m\""), "{printed}");
    assert!(printed.contains("http://127.0.0.1:9"), "{printed}");
}

#[test]
fn unknown_keys_name_their_path() {
    let e = err_of(&MINIMAL.replace("[upstreams.u]", "[upstreams.u]\nurl = \"x\""));
    assert!(e.starts_with("upstreams.u"), "{e}");
    assert!(e.contains("unknown field `url`"), "{e}");
    let e = err_of(&format!("{MINIMAL}\n[bogus]\nx = 1\n"));
    assert!(e.contains("unknown field `bogus`"), "{e}");
    let e = err_of(&MINIMAL.replace(
        "routes = [{ prefix = \"/\", upstream = \"u\" }]",
        "routes = [{ prefix = \"/\", upstream = \"u\", strip = true }]",
    ));
    assert!(e.starts_with("listeners.main.routes[0]"), "{e}");
}

#[test]
fn semantic_errors_name_key_and_reason() {
    let cases = [
        (
            MINIMAL.replace("127.0.0.1:0", "localhost"),
            "listeners.main.bind",
        ),
        (
            MINIMAL.replace("upstream = \"u\"", "upstream = \"v\""),
            "listeners.main.routes[0].upstream",
        ),
        (
            MINIMAL.replace("prefix = \"/\"", "prefix = \"api\""),
            "listeners.main.routes[0].prefix",
        ),
        (
            MINIMAL.replace("http://127.0.0.1:9", "ftp://x"),
            "upstreams.u.urls",
        ),
        (
            MINIMAL.replace("http://127.0.0.1:9", "http://h/base"),
            "upstreams.u.urls",
        ),
        (
            MINIMAL.replace("http://127.0.0.1:9", " , "),
            "upstreams.u.urls",
        ),
        (
            MINIMAL.replace("urls =", "connect_timeout = \"0s\"\nurls ="),
            "upstreams.u.connect_timeout",
        ),
        (
            MINIMAL.replace("urls =", "connect_timeout = \"soon\"\nurls ="),
            "upstreams.u.connect_timeout",
        ),
        (
            MINIMAL.replace(
                "[listeners.main]",
                "[server]\nlog_format = \"xml\"\n[listeners.main]",
            ),
            "server.log_format",
        ),
    ];
    for (text, key) in cases {
        let e = err_of(&text);
        assert!(e.starts_with(key), "expected key {key} in: {e}");
    }
}

#[test]
fn url_lists_accept_arrays_and_commas() {
    let cfg = Config::from_toml(&MINIMAL.replace(
        "urls = \"http://127.0.0.1:9\"",
        "urls = [\"http://127.0.0.1:9\", \"http://127.0.0.1:10/\"]",
    ))
    .unwrap();
    assert_eq!(cfg.upstreams[0].backends.len(), 2);
}
