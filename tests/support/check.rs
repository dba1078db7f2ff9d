//! `podproxy check`: the one way the tests run it.

use super::{Podproxy, Ran};
use std::path::Path;

/// `podproxy check --skip-bind [--config <config>]` (the embedded default without one),
/// with the config variables of the parent environment cleared: status, stdout, stderr.
pub fn check(config: Option<&Path>) -> Ran {
    Podproxy::new().check(config)
}

impl Podproxy {
    /// `check --skip-bind [--config <config>]` with this environment (and any arguments
    /// given before).
    pub fn check(self, config: Option<&Path>) -> Ran {
        let cmd = self.args(["check", "--skip-bind"]);
        match config {
            Some(path) => cmd.config(path).run(),
            None => cmd.run(),
        }
    }
}
