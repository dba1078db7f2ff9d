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
    assert_eq!(inf.bind.port(), 5050);
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
        (
            MINIMAL.replace(
                "[listeners.main]",
                "[server]\nworker_threads = 0\n[listeners.main]",
            ),
            "server.worker_threads",
        ),
    ];
    for (text, key) in cases {
        let e = err_of(&text);
        assert!(e.starts_with(key), "expected key {key} in: {e}");
    }
}

#[test]
fn worker_threads_default_to_the_cpus_and_can_be_set() {
    let cfg = Config::from_toml(MINIMAL).unwrap();
    assert_eq!(cfg.server.worker_threads, None);
    // Printed as a comment: this machine's CPU count is not a setting for another box.
    let printed = cfg.to_toml();
    assert!(!printed.contains("\nworker_threads"), "{printed}");
    assert!(
        printed.contains("# worker_threads: one per CPU"),
        "{printed}"
    );
    let cfg = Config::from_toml(&MINIMAL.replace(
        "[listeners.main]",
        "[server]\nworker_threads = 3\n[listeners.main]",
    ))
    .unwrap();
    assert_eq!(cfg.server.worker_threads, Some(3));
    assert!(cfg.to_toml().contains("\nworker_threads = 3\n"));
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

#[test]
fn port_ranges_expand() {
    let cfg = Config::from_toml(&MINIMAL.replace(
        "http://127.0.0.1:9",
        "http://127.0.0.1:5001-5008, http://10.0.0.2:7000",
    ))
    .unwrap();
    let b: Vec<String> = cfg.upstreams[0]
        .backends
        .iter()
        .map(|b| b.to_string())
        .collect();
    assert_eq!(b.len(), 9);
    assert_eq!(b[0], "http://127.0.0.1:5001");
    assert_eq!(b[7], "http://127.0.0.1:5008");
    for bad in [
        "http://h:5008-5001",
        "http://h:1-9999",
        "http://h:0-3",
        "http://h:50x-51",
    ] {
        let e = err_of(&MINIMAL.replace("http://127.0.0.1:9", bad));
        assert!(e.starts_with("upstreams.u.urls"), "{bad}: {e}");
    }
}

#[test]
fn pool_settings_validate() {
    let cfg = Config::from_toml(&MINIMAL.replace(
        "urls =",
        "max_concurrent = 500\nfirst_byte_timeout = \"20s\"\nhealth = { path = \"/ready\", failures = 2 }\nurls =",
    ))
    .unwrap();
    let u = &cfg.upstreams[0];
    assert_eq!(u.max_concurrent, Some(500));
    assert_eq!(u.health.path, "/ready");
    assert_eq!(u.health.failures, 2);
    assert_eq!(u.health.interval, defaults::HEALTH_INTERVAL);
    let e = err_of(&MINIMAL.replace("urls =", "max_concurrent = 0\nurls ="));
    assert!(e.starts_with("upstreams.u.max_concurrent"), "{e}");
    let e = err_of(&MINIMAL.replace("urls =", "health = { path = \"health\" }\nurls ="));
    assert!(e.starts_with("upstreams.u.health.path"), "{e}");
    let e = err_of(&MINIMAL.replace("urls =", "health = { bogus = 1 }\nurls ="));
    assert!(e.starts_with("upstreams.u.health"), "{e}");
}

#[test]
fn printed_config_loads_again_unchanged() {
    let text = env::expand(EMBEDDED_DEFAULT, |k| {
        (k == "POC_CALLBACK_URL").then(|| "http://203.0.113.7:9100".into())
    })
    .unwrap();
    let cfg = Config::from_toml(&text).unwrap();
    let printed = cfg.to_toml();
    let again = Config::from_toml(&printed).unwrap_or_else(|e| panic!("{e}\n{printed}"));
    assert_eq!(again.to_toml(), printed);
    assert!(printed.contains("[listeners.poc]"), "{printed}");
    assert!(
        printed.contains("callback_origin = \"http://203.0.113.7:9100\""),
        "{printed}"
    );
}

#[test]
fn every_problem_is_reported_in_one_run() {
    let text = r#"
[listeners.a]
bind = "localhost"
routes = [{ prefix = "/", upstream = "nope" }]

[listeners.b]
bind = "127.0.0.1:0"
max_connections = "many"
routes = [{ prefix = "/", upstream = "u" }]

[upstreams.u]
urls = 8081

[upstreams.v]
urls = "http://127.0.0.1:9"
response_timeout = "5"
"#;
    let e = Config::from_toml(text).unwrap_err();
    let problems = e.problems();
    let keys: Vec<&str> = problems
        .iter()
        .map(|p| p.split(':').next().unwrap())
        .collect();
    for key in [
        "listeners.a.bind",
        "listeners.a.routes[0].upstream",
        "listeners.b.max_connections",
        "upstreams.u.urls",
        "upstreams.v.response_timeout",
    ] {
        assert!(keys.contains(&key), "{key} missing in:\n{e}");
    }
    let text = e.to_string();
    assert!(
        text.starts_with(&format!("{} problems:", problems.len())),
        "{text}"
    );
    // Each one says what to write, with an example.
    assert!(text.contains("like 0.0.0.0:8080"), "{text}");
    assert!(
        text.contains("a whole number without quotes, like 500"),
        "{text}"
    );
    assert!(text.contains("a string or an array of strings"), "{text}");
    assert!(!text.contains("untagged enum"), "{text}");
    assert!(text.contains("like \"500ms\", \"10s\""), "{text}");
}

#[test]
fn a_printed_secret_refuses_to_load() {
    let with_token = MINIMAL.replace(
        "routes =",
        "tokens = [\"a-long-random-token-0123456789\"]\nroutes =",
    );
    let printed = Config::from_toml(&with_token).unwrap().to_toml();
    assert!(printed.contains("\"<redacted>\""), "{printed}");
    assert!(!printed.contains("a-long-random-token"), "{printed}");
    let e = err_of(&printed);
    assert!(e.starts_with("listeners.main.tokens[0]"), "{e}");
    assert!(e.contains("put the real one back"), "{e}");
    // The admin token too.
    let admin = format!("{MINIMAL}\n[admin]\nbind = \"127.0.0.1:0\"\ntoken = \"<redacted>\"\n");
    assert!(err_of(&admin).starts_with("admin.token"));
}

#[test]
fn tokens_and_allowlists_take_one_comma_string_that_may_be_empty() {
    let cfg = Config::from_toml(
        &MINIMAL.replace("routes =", "tokens = \"\"\nallow_ips = \"\"\nroutes ="),
    )
    .unwrap();
    assert!(cfg.listeners[0].gate.tokens.is_empty());
    assert!(cfg.listeners[0].gate.allow_ips.is_empty());
    let cfg = Config::from_toml(&MINIMAL.replace(
        "routes =",
        "tokens = \"one-long-token-0123456789, two-long-token-0123456789\"\nallow_ips = \"10.0.0.0/8,203.0.113.7\"\nroutes =",
    ))
    .unwrap();
    assert_eq!(cfg.listeners[0].gate.tokens.len(), 2);
    assert_eq!(cfg.listeners[0].gate.allow_ips.len(), 2);
    // The array form names each token: an empty one is an unset variable, not "none".
    let e = err_of(&MINIMAL.replace("routes =", "tokens = [\"\"]\nroutes ="));
    assert!(e.starts_with("listeners.main.tokens[0]"), "{e}");
}

#[test]
fn a_public_admin_needs_a_token_or_an_explicit_opt_out() {
    let public = format!("{MINIMAL}\n[admin]\nbind = \"0.0.0.0:19901\"\n");
    let e = err_of(&public);
    assert!(e.starts_with("admin.bind"), "{e}");
    assert!(e.contains("admin.token"), "{e}");
    let empty_token = format!("{public}token = \"\"\n");
    assert!(err_of(&empty_token).starts_with("admin.bind"));
    let cfg = Config::from_toml(&format!("{public}token = \"admin-token-0123456789\"\n")).unwrap();
    assert!(cfg.admin.unwrap().token.is_some());
    let cfg = Config::from_toml(&format!("{public}allow_unauthenticated = true\n")).unwrap();
    assert!(cfg.admin.unwrap().token.is_none());
    // Loopback needs nothing; an empty token there means none.
    let cfg = Config::from_toml(&format!(
        "{MINIMAL}\n[admin]\nbind = \"127.0.0.1:0\"\ntoken = \"\"\n"
    ))
    .unwrap();
    assert!(cfg.admin.unwrap().token.is_none());
}

#[test]
fn an_open_public_listener_is_warned_about_by_name() {
    let public = MINIMAL.replace("bind = \"127.0.0.1:0\"", "bind = \"0.0.0.0:0\"");
    let cfg =
        Config::from_toml(&public.replace("upstream = \"u\"", "upstream = \"u\", poc = true"))
            .unwrap();
    assert_eq!(cfg.warnings.len(), 1, "{:?}", cfg.warnings);
    assert!(
        cfg.warnings[0].contains("listener main"),
        "{:?}",
        cfg.warnings
    );
    assert!(cfg.warnings[0].contains("start PoC"), "{:?}", cfg.warnings);
    for gated in [
        "tokens = [\"a-long-random-token-0123456789\"]\nroutes =",
        "allow_ips = [\"203.0.113.7\"]\nroutes =",
    ] {
        let cfg = Config::from_toml(&public.replace("routes =", gated)).unwrap();
        assert!(cfg.warnings.is_empty(), "{gated}: {:?}", cfg.warnings);
    }
    // Loopback is not public.
    assert!(Config::from_toml(MINIMAL).unwrap().warnings.is_empty());
}

#[test]
fn training_is_blocked_by_default_and_printed() {
    let cfg = Config::from_toml(MINIMAL).unwrap();
    assert!(!cfg.listeners[0].gate.allow_training);
    assert!(cfg.to_toml().contains("allow_training = false"));
    let cfg =
        Config::from_toml(&MINIMAL.replace("routes =", "allow_training = true\nroutes =")).unwrap();
    assert!(cfg.listeners[0].gate.allow_training);
}

#[test]
fn the_summary_names_listeners_upstreams_and_admin() {
    let cfg =
        Config::from_toml(&MINIMAL.replace("http://127.0.0.1:9", "http://127.0.0.1:5001-5004"))
            .unwrap();
    let s = cfg.summary();
    assert!(s.contains("main 127.0.0.1:0 [/->u]"), "{s}");
    assert!(
        s.contains("u http://127.0.0.1:5001 .. http://127.0.0.1:5004 (4 backends)"),
        "{s}"
    );
    assert!(s.contains("admin: off"), "{s}");
}

#[test]
fn balance_is_off_by_default_and_validates_with_key_paths() {
    let cfg = Config::from_toml(MINIMAL).unwrap();
    let b = &cfg.upstreams[0].balance;
    assert!(!b.signals && !b.affinity && !b.enabled());
    assert_eq!(b.scrape_interval, Duration::from_millis(250));
    assert_eq!(b.scrape_timeout, b.scrape_interval);
    assert_eq!(b.affinity_prefix_bytes, 16 * 1024);
    let printed = cfg.to_toml();
    assert!(printed.contains("[upstreams.u.balance]"), "{printed}");

    let on = format!(
        "{MINIMAL}balance = {{ signals = true, affinity = true, scrape_interval = \"100ms\", affinity_margin = 2 }}\n"
    );
    let cfg = Config::from_toml(&on).unwrap();
    let b = &cfg.upstreams[0].balance;
    assert!(b.signals && b.affinity);
    assert_eq!(b.scrape_timeout, Duration::from_millis(100));
    assert_eq!(b.affinity_margin, 2.0);
    let again = Config::from_toml(&cfg.to_toml()).unwrap();
    assert_eq!(again.to_toml(), cfg.to_toml());

    for (setting, key, reason) in [
        (
            "scrape_interval = \"0s\"",
            "upstreams.u.balance.scrape_interval",
            "above zero",
        ),
        (
            "scrape_timeout = \"2s\"",
            "upstreams.u.balance.scrape_timeout",
            "longer than scrape_interval",
        ),
        (
            "metrics_path = \"metrics\"",
            "upstreams.u.balance.metrics_path",
            "must start with /",
        ),
        (
            "max_scrape_bytes = 10",
            "upstreams.u.balance.max_scrape_bytes",
            "at least 1024",
        ),
        (
            "affinity_prefix_bytes = 2",
            "upstreams.u.balance.affinity_prefix_bytes",
            "between 64",
        ),
        (
            "affinity_margin = -1.0",
            "upstreams.u.balance.affinity_margin",
            "at least 0",
        ),
        ("sigals = true", "upstreams.u.balance", "unknown field"),
    ] {
        let e = err_of(&format!("{MINIMAL}balance = {{ {setting} }}\n"));
        assert!(e.starts_with(key) && e.contains(reason), "{setting}: {e}");
    }
}
