//! Every shipped config (embedded default and config/examples/*.toml) passes `podproxy check`.

use std::process::Command;

fn check(path: Option<&str>) -> (bool, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_podproxy"));
    if let Some(p) = path {
        cmd.args(["check", "--config", p]);
    } else {
        cmd.arg("check");
    }
    let out = cmd
        .env_remove("PODPROXY_CONFIG")
        .env("NETWORK_NODE_CALLBACK", "http://203.0.113.7:9100")
        .output()
        .expect("run podproxy check");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn embedded_default_and_examples_pass_check() {
    let (ok, stdout, stderr) = check(None);
    assert!(ok, "embedded default: {stderr}");
    assert!(
        stdout.contains("0.0.0.0:8080") && stdout.contains("0.0.0.0:5000"),
        "{stdout}"
    );

    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/config/examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(dir).expect("config/examples") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let (ok, stdout, stderr) = check(path.to_str());
        assert!(ok, "{}: {stderr}", path.display());
        assert!(
            stdout.contains("[listeners."),
            "{}: {stdout}",
            path.display()
        );
        checked += 1;
    }
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
        .args(["check", "--config", path])
        .env_remove("NETWORK_NODE_CALLBACK")
        .output()
        .expect("run podproxy check");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("NETWORK_NODE_CALLBACK"), "{stderr}");
}
