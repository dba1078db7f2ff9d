//! Starting podproxy: in this process (`Proxy`: the library on loopback, its upstreams and
//! reloader at hand), or as its own process (`Podproxy` → `Process`: the real binary, for
//! what only a process has: signals, exit status, its own RSS, its stderr). Either way the
//! listeners are on loopback and every wait is bounded.

use super::{bounded, eventually, scratch_file, WAIT};
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

// =======================================================================================
// In process
// =======================================================================================

/// A running podproxy in this process. Dropping it aborts the server; `shutdown` drains it
/// first.
pub struct Proxy {
    addrs: Vec<(String, SocketAddr)>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    pub upstreams: Vec<std::sync::Arc<proxy::upstream::Upstream>>,
    /// The admin listener, when the config has `[admin]`.
    pub admin: Option<SocketAddr>,
    pub reloader: proxy::reload::Reloader,
    /// The config file, when started from one (`start_file`): what `POST /reload` and the
    /// reloader read again.
    config_file: Option<PathBuf>,
}

impl Proxy {
    /// Starts podproxy from TOML text (listeners should bind `127.0.0.1:0`). It has no file,
    /// so reloads are refused.
    pub async fn start(toml: &str) -> Proxy {
        let config = proxy::Config::from_toml(toml)
            .unwrap_or_else(|e| panic!("bad test config: {e}\n{toml}"));
        Proxy::bind(config, None).await
    }

    /// Starts podproxy from a config file, as the binary does with `--config`: reloads
    /// (`POST /reload`, the reloader SIGHUP uses) read the file again.
    pub async fn start_file(path: &Path) -> Proxy {
        let config = proxy::Config::load(Some(path)).unwrap_or_else(|e| {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            panic!("bad test config {}: {e}\n{text}", path.display())
        });
        Proxy::bind(config, Some(path.to_path_buf())).await
    }

    /// One listener named `main` with `/` → upstream `u` at `upstream_url`, plus `extra`
    /// TOML lines inside the upstream section.
    pub async fn simple(upstream_url: &str, upstream_extra: &str) -> Proxy {
        Proxy::start(&format!(
            "[listeners.main]\nbind = \"127.0.0.1:0\"\nroutes = [{{ prefix = \"/\", upstream = \"u\" }}]\n\n[upstreams.u]\nurls = \"{upstream_url}\"\n{upstream_extra}\n"
        ))
        .await
    }

    async fn bind(config: proxy::Config, file: Option<PathBuf>) -> Proxy {
        // Quiet unless RUST_LOG asks: failures are reported by the assertions.
        proxy::logging::init(
            proxy::config::LogFormat::Text,
            &proxy::logging::effective_level(None, "off"),
        );
        let mut server = proxy::Server::bind(&config).await.expect("bind");
        if let Some(path) = &file {
            server = server.with_source(proxy::reload::ConfigSource::File(path.clone()));
        }
        let addrs = config
            .listeners
            .iter()
            .map(|l| (l.name.clone(), server.local_addr(&l.name).expect("addr")))
            .collect();
        let upstreams = server.upstreams();
        let admin = server.admin_addr();
        let reloader = server.reloader();
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(server.run(async {
            let _ = rx.await;
        }));
        Proxy {
            addrs,
            stop: Some(tx),
            task: Some(task),
            upstreams,
            admin,
            reloader,
            config_file: file,
        }
    }

    /// A listener of the config it started with.
    pub fn addr(&self, listener: &str) -> SocketAddr {
        self.addrs
            .iter()
            .find(|(n, _)| n == listener)
            .map(|(_, a)| *a)
            .unwrap_or_else(|| panic!("no listener {listener}"))
    }

    pub fn url(&self, listener: &str) -> String {
        format!("http://{}", self.addr(listener))
    }

    /// The config file it was started from (`start_file`).
    pub fn config_file(&self) -> &Path {
        self.config_file
            .as_deref()
            .expect("started from TOML text, not from a file")
    }

    /// Writes `toml` over its config file, for the next reload to read.
    pub fn write_config(&self, toml: &str) {
        let path = self.config_file();
        std::fs::write(path, toml).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }

    /// Total in-flight requests over every backend of every upstream.
    pub fn in_flight(&self) -> usize {
        self.upstreams
            .iter()
            .flat_map(|u| u.backends().iter().map(|b| b.in_flight()))
            .sum()
    }

    /// Signals shutdown and waits (bounded) for the drain to finish.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(WAIT, task)
                .await
                .expect("drain bounded")
                .expect("server task");
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

// =======================================================================================
// As its own process
// =======================================================================================

/// Environment variables podproxy reads (the embedded default's and the logging ones);
/// cleared for every process the tests start, so the parent environment cannot leak in.
pub const CONFIG_VARS: &[&str] = &[
    "PODPROXY_CONFIG",
    "POC_PORT",
    "INFERENCE_PORT",
    "MLNODE_URL",
    "VLLM_URLS",
    "POC_CALLBACK_URL",
    "PODPROXY_LOG_FORMAT",
    "PODPROXY_LOG_LEVEL",
    "RUST_LOG",
    "NO_COLOR",
    "PODPROXY_TOKEN",
    "PODPROXY_ALLOW_IPS",
    "PODPROXY_ALLOW_TRAINING",
    "PODPROXY_ADMIN_BIND",
    "PODPROXY_ADMIN_TOKEN",
];

/// The real binary.
pub const BIN: &str = env!("CARGO_BIN_EXE_podproxy");

/// How to run the real binary: arguments, environment (`CONFIG_VARS` cleared first), and
/// for `start` the addresses that mean it is up. Then either `run` it to its end (`Ran`) or
/// `start` it and keep it running (`Process`).
#[derive(Clone, Default)]
pub struct Podproxy {
    args: Vec<OsString>,
    env: Vec<(OsString, Option<OsString>)>,
    listening: Vec<SocketAddr>,
    config: Option<PathBuf>,
    stderr_file: Option<PathBuf>,
}

/// A finished run: exit status and all it wrote.
#[derive(Debug)]
pub struct Ran {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// `(status, stdout, stderr)`.
    pub fn parts(self) -> (ExitStatus, String, String) {
        (self.status, self.stdout, self.stderr)
    }
}

impl Podproxy {
    pub fn new() -> Podproxy {
        Podproxy::default()
    }

    pub fn arg(mut self, arg: impl Into<OsString>) -> Podproxy {
        self.args.push(arg.into());
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: Into<OsString>>(mut self, args: I) -> Podproxy {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// `--config <path>`.
    pub fn config(mut self, path: &Path) -> Podproxy {
        self.config = Some(path.to_path_buf());
        self.arg("--config").arg(path)
    }

    /// `--config` with a file `name` in the test's scratch folder holding `text`.
    pub fn config_text(self, name: &str, text: &str) -> Podproxy {
        let path = scratch_file(name, text);
        self.config(&path)
    }

    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Podproxy {
        self.env.push((key.into(), Some(value.into())));
        self
    }

    pub fn env_remove(mut self, key: impl Into<OsString>) -> Podproxy {
        self.env.push((key.into(), None));
        self
    }

    /// For `run`: its stderr into the file `path` instead of a pipe (`Ran::stderr` is then
    /// that file's content).
    pub fn stderr_to_file(mut self, path: &Path) -> Podproxy {
        self.stderr_file = Some(path.to_path_buf());
        self
    }

    /// `start` returns once `addr` accepts connections (every such address).
    pub fn listening(mut self, addr: SocketAddr) -> Podproxy {
        self.listening.push(addr);
        self
    }

    /// `listening` on `127.0.0.1:port`.
    pub fn listening_on(self, port: u16) -> Podproxy {
        self.listening(SocketAddr::from(([127, 0, 0, 1], port)))
    }

    fn apply_env(&self, cmd: &mut std::process::Command) {
        for v in CONFIG_VARS {
            cmd.env_remove(v);
        }
        for (k, v) in &self.env {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
    }

    fn command(&self) -> std::process::Command {
        let mut cmd = std::process::Command::new(BIN);
        cmd.args(&self.args);
        self.apply_env(&mut cmd);
        cmd
    }

    /// Runs it to its end (bounded by `WAIT`) and returns what it wrote.
    pub fn run(&self) -> Ran {
        run_bounded(self.command(), self.stderr_file.as_deref())
    }

    /// Runs it on a terminal (a pty from util-linux's `script`), stdin and stderr both the
    /// terminal: what it wrote arrives on `stdout`.
    pub fn run_on_a_terminal(&self) -> Ran {
        let mut line = shell_quote(BIN);
        for a in &self.args {
            line.push(' ');
            line.push_str(&shell_quote(&a.to_string_lossy()));
        }
        let mut cmd = std::process::Command::new("script");
        cmd.args(["-qec", &line, "/dev/null"]);
        self.apply_env(&mut cmd);
        run_bounded(cmd, None)
    }

    /// Starts it and returns once every `listening` address accepts connections (bounded).
    /// Its stderr is read line by line while it runs (`Process::stderr`,
    /// `Process::wait_for_line`).
    pub async fn start(self) -> Process {
        let mut cmd = tokio::process::Command::from(self.command());
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("spawn podproxy");
        let (tx, _) = watch::channel(0usize);
        let stderr = Arc::new(Stderr {
            lines: Mutex::new(Vec::new()),
            count: tx,
        });
        let reader = tokio::spawn(read_lines(
            child.stderr.take().expect("piped stderr"),
            stderr.clone(),
        ));
        let pid = child.id().expect("running");
        let mut process = Process {
            child,
            pid,
            stderr,
            reader: Some(reader),
            addrs: self.listening,
            config: self.config,
        };
        process.wait_listening().await;
        process
    }
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Runs `cmd` (stdin null, stdout and stderr captured, stderr into `stderr_file` if given)
/// to its end, bounded by `WAIT`: killed and a panic past that.
fn run_bounded(mut cmd: std::process::Command, stderr_file: Option<&Path>) -> Ran {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped());
    match stderr_file {
        Some(path) => cmd.stderr(
            std::fs::File::create(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
        ),
        None => cmd.stderr(Stdio::piped()),
    };
    let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(WAIT) {
        Ok(out) => out.expect("wait for podproxy"),
        Err(_) => {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("{cmd:?} still running after {WAIT:?}");
        }
    };
    let stderr = match stderr_file {
        Some(path) => std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
        None => out.stderr,
    };
    Ran {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

/// The stderr lines of a running process, and how many there are so far (to await more).
struct Stderr {
    lines: Mutex<Vec<String>>,
    count: watch::Sender<usize>,
}

async fn read_lines(pipe: impl AsyncRead + Unpin, into: Arc<Stderr>) {
    let mut pipe = BufReader::new(pipe);
    let mut line = Vec::new();
    loop {
        line.clear();
        match pipe.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let text = String::from_utf8_lossy(&line);
                let text = text.trim_end_matches(['\n', '\r']).to_string();
                into.lines.lock().unwrap().push(text);
                into.count.send_modify(|n| *n += 1);
            }
        }
    }
}

/// podproxy as its own process (`Podproxy::start`). Killed on drop; its stderr is printed
/// then if the test is failing.
pub struct Process {
    child: tokio::process::Child,
    pid: u32,
    stderr: Arc<Stderr>,
    reader: Option<JoinHandle<()>>,
    addrs: Vec<SocketAddr>,
    config: Option<PathBuf>,
}

impl Process {
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The first `listening` address.
    pub fn addr(&self) -> SocketAddr {
        *self
            .addrs
            .first()
            .expect("started without a listening address")
    }

    /// `http://` the first `listening` address.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// The file given with `config` / `config_text`.
    pub fn config_file(&self) -> &Path {
        self.config.as_deref().expect("started without --config")
    }

    /// Everything it wrote to stderr so far, line by line.
    pub fn stderr(&self) -> String {
        self.stderr.lines.lock().unwrap().join("\n")
    }

    /// The first stderr line containing `needle`, waiting for it (bounded) if it has not
    /// been written yet. Log lines are written by podproxy's log thread, a moment after the
    /// event they tell of.
    pub async fn wait_for_line(&self, needle: &str) -> String {
        let mut count = self.stderr.count.subscribe();
        let found = tokio::time::timeout(WAIT, async {
            loop {
                if let Some(l) = self
                    .stderr
                    .lines
                    .lock()
                    .unwrap()
                    .iter()
                    .find(|l| l.contains(needle))
                {
                    return Some(l.clone());
                }
                if count.changed().await.is_err() {
                    return None; // stderr closed: no more lines will come
                }
            }
        })
        .await;
        match found {
            Ok(Some(line)) => line,
            Ok(None) => panic!(
                "podproxy's stderr ended, never with {needle:?}:\n{}",
                self.stderr()
            ),
            Err(_) => panic!("never logged {needle:?}:\n{}", self.stderr()),
        }
    }

    /// Sends SIGTERM, once podproxy has its handler installed (before that the signal would
    /// simply kill it).
    pub async fn sigterm(&self) {
        self.signal("TERM", 15).await;
    }

    /// Sends SIGHUP, once podproxy has its handler installed (before that the signal would
    /// kill it).
    pub async fn sighup(&self) {
        self.signal("HUP", 1).await;
    }

    async fn signal(&self, name: &str, number: u32) {
        // The process offers no event to await but its signal mask in /proc (Linux).
        if Path::new("/proc/self/status").exists() {
            let pid = self.pid;
            eventually(&format!("podproxy catches SIG{name}"), || {
                catches(pid, number)
            })
            .await;
        }
        let status = std::process::Command::new("kill")
            .args([format!("-{name}"), self.pid.to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{name} {}", self.pid);
    }

    /// Its exit status if it has exited, without waiting.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// Waits up to `bound` for it to exit, then (bounded) for the last of its stderr.
    pub async fn wait_exit(&mut self, bound: Duration) -> ExitStatus {
        let status = match tokio::time::timeout(bound, self.child.wait()).await {
            Ok(status) => status.expect("wait"),
            Err(_) => panic!("podproxy still running after {bound:?}:\n{}", self.stderr()),
        };
        if let Some(reader) = self.reader.take() {
            bounded("the end of podproxy's stderr", reader)
                .await
                .expect("stderr reader");
        }
        status
    }

    /// A field of /proc/<pid>/status in KiB (VmRSS, VmHWM).
    pub fn status_kib(&self, field: &str) -> u64 {
        let pid = self.pid;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().strip_suffix("kB")?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
    }

    /// Bounded retry loop: the process offers no event to await but its ports.
    async fn wait_listening(&mut self) {
        let deadline = tokio::time::Instant::now() + WAIT;
        for addr in self.addrs.clone() {
            while tokio::net::TcpStream::connect(addr).await.is_err() {
                if let Some(status) = self.exited() {
                    panic!("podproxy exited at start ({status}):\n{}", self.stderr());
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "podproxy never listened on {addr}:\n{}",
                    self.stderr()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Whether process `pid` has a handler installed for signal `number` (`SigCgt` in
/// /proc/<pid>/status).
fn catches(pid: u32, number: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("SigCgt:"))
                .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        })
        .is_some_and(|mask| mask & (1 << (number - 1)) != 0)
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        if let Some(reader) = &self.reader {
            reader.abort();
        }
        if std::thread::panicking() {
            eprintln!("podproxy (pid {}) stderr:\n{}", self.pid, self.stderr());
        }
    }
}
