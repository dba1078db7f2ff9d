//! The module graph keeps its direction (docs/architecture.md, "Module map"): `config` is a
//! leaf, and `admin` and `signals` never reach into `server`. Read from the sources, so a new
//! import that breaks a rule fails here rather than in review.

use std::path::{Path, PathBuf};

const SRC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/crates/proxy/src");

/// The code of a source file: comment lines dropped, and everything from the first
/// `#[cfg(test)]` on (unit tests may use whatever they test).
fn code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let text = match text.find("#[cfg(test)]") {
        Some(i) => &text[..i],
        None => &text[..],
    };
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs")
            && path.file_name().is_some_and(|n| n != "tests.rs")
        {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// Every `crate::<module>` a piece of code names.
fn crate_modules(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '{')
            .collect();
        out.push(name);
    }
    out
}

#[test]
fn config_imports_nothing_from_the_rest_of_the_crate() {
    let files = rust_files(&Path::new(SRC).join("config"));
    assert!(files.len() >= 5, "config/ has its modules: {files:?}");
    let mut found = Vec::new();
    for f in &files {
        for m in crate_modules(&code(f)) {
            if m != "config" {
                found.push(format!("{}: crate::{m}", f.display()));
            }
        }
    }
    assert!(
        found.is_empty(),
        "config must stay a leaf:\n{}",
        found.join("\n")
    );
}

#[test]
fn admin_and_signals_do_not_depend_on_the_server() {
    for name in ["admin.rs", "signals.rs", "reload.rs", "listener.rs"] {
        let path = Path::new(SRC).join(name);
        let uses: Vec<String> = crate_modules(&code(&path))
            .into_iter()
            .filter(|m| m == "server")
            .collect();
        assert!(uses.is_empty(), "{name} uses crate::server");
    }
}

#[test]
fn the_checker_sees_an_import_when_there_is_one() {
    // The rules above pass because the imports are absent, not because the scan is blind.
    let found = crate_modules("use crate::poc::Mode;\nlet x = crate::tls::provider();");
    assert_eq!(found, ["poc", "tls"]);
    assert!(code(&Path::new(SRC).join("admin.rs")).contains("crate::reload"));
}
