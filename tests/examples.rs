//! Every shipped config (embedded default, config/examples/*.toml and the compose deployment's
//! deploy/compose/*.toml) passes `podproxy check`.

use std::process::Command;

/// Gonka-style certificates made by openssl exactly as gen-mlnode-certs.sh makes them, once
/// per test run, for the examples that reference certificate files.
fn cert_dir() -> &'static str {
    static DIR: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir =
            std::env::temp_dir().join(format!("podproxy-example-certs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("cert dir");
        for name in ["dapi", "mlnode"] {
            let status = Command::new("openssl")
                .args([
                    "req",
                    "-x509",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-nodes",
                    "-days",
                    "36500",
                ])
                .arg("-subj")
                .arg(format!("/CN=gonka-{name}"))
                .args([
                    "-addext",
                    "subjectAltName=DNS:api,DNS:localhost,IP:127.0.0.1",
                ])
                .args(["-addext", "basicConstraints=critical,CA:TRUE"])
                .args(["-addext", "keyUsage=critical,digitalSignature,keyCertSign"])
                .args(["-addext", "extendedKeyUsage=serverAuth,clientAuth"])
                .arg("-keyout")
                .arg(dir.join(format!("{name}.key")))
                .arg("-out")
                .arg(dir.join(format!("{name}.crt")))
                .stderr(std::process::Stdio::null())
                .status()
                .expect("openssl");
            assert!(status.success(), "openssl req failed");
        }
        dir.to_string_lossy().into_owned()
    })
}

fn check(path: Option<&str>) -> (bool, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_podproxy"));
    if let Some(p) = path {
        cmd.args(["check", "--skip-bind", "--config", p]);
    } else {
        cmd.args(["check", "--skip-bind"]);
    }
    let out = cmd
        .env_remove("PODPROXY_CONFIG")
        .env("NETWORK_NODE_CALLBACK", "http://203.0.113.7:9100")
        .env("NETWORK_NODE", "203.0.113.7")
        .env("NETWORK_NODE_CIDR", "203.0.113.7/32")
        .env("PODPROXY_TOKEN", "0123456789abcdef0123456789abcdef")
        .env("RUNPOD_ID", "e6rbg7z3qyr7a4")
        .env("CERT_DIR", cert_dir())
        .output()
        .expect("run podproxy check");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
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
        let (ok, stdout, stderr) = check(path.to_str());
        assert!(ok, "{}: {stderr}", path.display());
        assert!(stdout.contains(needle), "{}: {stdout}", path.display());
        checked.push(path);
    }
    checked
}

#[test]
fn embedded_default_and_examples_pass_check() {
    let (ok, stdout, stderr) = check(None);
    assert!(ok, "embedded default: {stderr}");
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
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/examples/pod-front-8gpu.toml"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_podproxy"))
        .args(["check", "--skip-bind", "--config", path])
        .env_remove("NETWORK_NODE_CALLBACK")
        .output()
        .expect("run podproxy check");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("NETWORK_NODE_CALLBACK"), "{stderr}");
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
