//! Every shipped config (embedded default, config/examples/*.toml and the compose deployment's
//! deploy/compose/*.toml) passes `podproxy check`.

mod support;

use std::path::Path;
use support::*;

/// `podproxy check` with the variables the examples read set (certificate files: the
/// Gonka-style ones of `support::tls`, made by openssl as gen-mlnode-certs.sh makes them).
fn check_example(path: Option<&Path>) -> Ran {
    Podproxy::new()
        .env("NETWORK_NODE_CALLBACK", "http://203.0.113.7:9100")
        .env("NETWORK_NODE", "203.0.113.7")
        .env("NETWORK_NODE_CIDR", "203.0.113.7/32")
        .env("PODPROXY_TOKEN", "0123456789abcdef0123456789abcdef")
        .env("RUNPOD_ID", "e6rbg7z3qyr7a4")
        .env("CERT_DIR", &support::tls::material().dir)
        .check(path)
}

/// Runs `check` on every `.toml` in `dir` (relative to the repository): each must pass and
/// print `needle`. Returns the files checked.
fn check_every_toml_in(dir: &str, needle: &str) -> Vec<std::path::PathBuf> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut checked = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let out = check_example(Some(&path));
        assert!(out.success(), "{}: {}", path.display(), out.stderr);
        assert!(
            out.stdout.contains(needle),
            "{}: {}",
            path.display(),
            out.stdout
        );
        checked.push(path);
    }
    checked
}

#[test]
fn embedded_default_and_examples_pass_check() {
    let (status, stdout, stderr) = check_example(None).parts();
    assert!(status.success(), "embedded default: {stderr}");
    assert!(
        stdout.contains("0.0.0.0:8080") && stdout.contains("0.0.0.0:5050"),
        "{stdout}"
    );

    let checked = check_every_toml_in("config/examples", "[listeners.").len();
    assert!(
        checked >= 3,
        "expected the shipped examples, found {checked}"
    );
}

#[test]
fn example_needing_a_variable_names_it_when_unset() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/examples/pod-front-8gpu.toml");
    let out = Podproxy::new()
        .env_remove("NETWORK_NODE_CALLBACK")
        .check(Some(&path));
    assert!(!out.success());
    assert!(
        out.stderr.contains("NETWORK_NODE_CALLBACK"),
        "{}",
        out.stderr
    );
}

#[test]
fn compose_deployment_configs_pass_check() {
    let checked = check_every_toml_in("deploy/compose", "mlnode-308:8080");
    assert_eq!(
        checked.len(),
        2,
        "podproxy.toml and podproxy-mtls.toml: {checked:?}"
    );
}
