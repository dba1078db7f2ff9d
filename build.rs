//! Stamps the git commit into the binary for `podproxy --version`. Builds without a git
//! checkout (e.g. a Docker context) pass it in `PODPROXY_GIT_COMMIT`.
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=PODPROXY_GIT_COMMIT");
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
    let commit = std::env::var("PODPROXY_GIT_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| {
            let out = Command::new("git")
                .args(["rev-parse", "--short=12", "HEAD"])
                .output()
                .ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=PODPROXY_GIT_COMMIT={commit}");
}
