//! The real binary: `check` (embedded default, env, broken files), `PODPROXY_CONFIG`,
//! `--version`, and SIGTERM drain as PID-1-style process.

mod common;
mod support;

use common::*;
use http::Request;
use http_body_util::BodyExt;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use support::*;
use testkit::client::{full, http_client};
use testkit::vllm::{VllmConfig, VllmSim};

const BIN: &str = env!("CARGO_BIN_EXE_podproxy");

/// Env vars the embedded default reads; cleared so the parent environment cannot leak in.
const CONFIG_VARS: &[&str] = &[
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

fn podproxy() -> Command {
    let mut cmd = Command::new(BIN);
    for v in CONFIG_VARS {
        cmd.env_remove(v);
    }
    cmd.stdin(Stdio::null());
    cmd
}

fn run(cmd: &mut Command) -> (Output, String, String) {
    let out = cmd.output().expect("run podproxy");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stdout, stderr)
}

/// A file in a scratch directory of its own test (overwritten by the next run).
fn scratch_file(name: &str, content: &str) -> PathBuf {
    let test = std::thread::current()
        .name()
        .unwrap_or("t")
        .replace("::", "-");
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("cli-{test}"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, content).unwrap();
    path
}

#[test]
fn version_flag_prints_the_version() {
    let (out, stdout, _) = run(podproxy().arg("--version"));
    assert!(out.status.success());
    // `podproxy 0.1.0`, possibly followed by build details such as the commit.
    let words: Vec<&str> = stdout.split_whitespace().collect();
    assert_eq!(
        words[..2],
        ["podproxy", env!("CARGO_PKG_VERSION")],
        "{stdout}"
    );
}

#[test]
fn check_without_config_prints_the_embedded_default() {
    let (out, stdout, stderr) = run(podproxy().args(["check", "--skip-bind"]));
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("embedded default"), "{stdout}");
    for needle in [
        "bind = \"0.0.0.0:8080\"",
        "bind = \"0.0.0.0:5050\"",
        "\"http://127.0.0.1:8081\"",
        "\"http://127.0.0.1:5001\"",
        "strip_version_prefix = true",
    ] {
        assert!(stdout.contains(needle), "missing {needle}:\n{stdout}");
    }

    let (out, stdout, stderr) = run(podproxy()
        .args(["check", "--skip-bind"])
        .env("POC_PORT", "9999"));
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("bind = \"0.0.0.0:9999\""), "{stdout}");
    assert!(!stdout.contains("0.0.0.0:8080"), "{stdout}");
    assert!(stdout.contains("bind = \"0.0.0.0:5050\""), "{stdout}");
}

const GOOD: &str = r#"
[listeners.poc]
bind = "127.0.0.1:18080"
routes = [{ prefix = "/", upstream = "mlnode" }]

[upstreams.mlnode]
urls = "http://127.0.0.1:18081"
"#;

#[test]
fn broken_configs_fail_and_name_the_culprit() {
    let cases: &[(&str, String, &[&str])] = &[
        (
            "unknown_key",
            GOOD.replace(
                "[upstreams.mlnode]",
                "max_conections = 5\n[upstreams.mlnode]",
            ),
            &["listeners.poc.max_conections"],
        ),
        (
            "unknown_route_key",
            GOOD.replace(
                "upstream = \"mlnode\" }",
                "upstream = \"mlnode\", strip = true }",
            ),
            &["listeners.poc.routes[0].strip"],
        ),
        (
            "bad_bind",
            GOOD.replace("127.0.0.1:18080", "localhost:eighty"),
            &["listeners.poc.bind", "localhost:eighty"],
        ),
        (
            "unknown_upstream",
            GOOD.replace("upstream = \"mlnode\"", "upstream = \"vllm\""),
            &["listeners.poc.routes[0].upstream", "vllm"],
        ),
        (
            "unset_var",
            GOOD.replace(
                "http://127.0.0.1:18081",
                "${PODPROXY_TEST_SURELY_UNSET_VAR}",
            ),
            &["PODPROXY_TEST_SURELY_UNSET_VAR"],
        ),
        (
            "bad_duration",
            GOOD.replace(
                "urls = \"http://127.0.0.1:18081\"",
                "urls = \"http://127.0.0.1:18081\"\nresponse_timeout = \"soon\"",
            ),
            &["upstreams.mlnode.response_timeout"],
        ),
        (
            "url_with_path",
            GOOD.replace("http://127.0.0.1:18081", "http://127.0.0.1:18081/api"),
            &["upstreams.mlnode.urls"],
        ),
    ];
    for (name, text, needles) in cases {
        assert_ne!(text, GOOD, "{name}: the replacement did not apply");
        let path = scratch_file(&format!("{name}.toml"), text);
        let (out, stdout, stderr) = run(podproxy()
            .args(["check", "--skip-bind"])
            .arg("--config")
            .arg(&path));
        assert!(
            !out.status.success(),
            "{name}: accepted a broken config:\n{stdout}"
        );
        for needle in *needles {
            assert!(
                stderr.contains(needle),
                "{name}: stderr does not name {needle:?}:\n{stderr}"
            );
        }
    }

    // The good one passes, so the failures above are the edits'.
    let path = scratch_file("good.toml", GOOD);
    let (out, _, stderr) = run(podproxy()
        .args(["check", "--skip-bind"])
        .arg("--config")
        .arg(&path));
    assert!(out.status.success(), "{stderr}");

    let missing = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("no-such-dir/podproxy.toml");
    let (out, _, stderr) = run(podproxy()
        .args(["check", "--skip-bind"])
        .arg("--config")
        .arg(&missing));
    assert!(!out.status.success());
    assert!(
        stderr.contains(&missing.display().to_string()),
        "missing file not named:\n{stderr}"
    );
}

#[test]
fn podproxy_config_env_selects_the_file() {
    let path = scratch_file("from_env.toml", GOOD);
    let (out, stdout, stderr) = run(podproxy()
        .args(["check", "--skip-bind"])
        .env("PODPROXY_CONFIG", &path));
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains(&path.display().to_string()), "{stdout}");
    assert!(stdout.contains("bind = \"127.0.0.1:18080\""), "{stdout}");
    assert!(!stdout.contains("0.0.0.0:8080"), "{stdout}");
}

// ---------------------------------------------------------------------------------------
// What an operator sees first: check, start lines, log format
// ---------------------------------------------------------------------------------------

fn one_listener(port: u16, extra: &str) -> String {
    format!(
        "{extra}\n[listeners.poc]\nbind = \"127.0.0.1:{port}\"\n\
         routes = [{{ prefix = \"/\", upstream = \"mlnode\" }}]\n\n\
         [upstreams.mlnode]\nurls = \"http://127.0.0.1:9\"\n"
    )
}

#[test]
fn check_names_every_address_it_cannot_bind() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let path = scratch_file("busy.toml", &one_listener(port, ""));
    let (out, stdout, stderr) = run(podproxy().args(["check", "--config"]).arg(&path));
    assert_eq!(out.status.code(), Some(2), "{stdout}{stderr}");
    assert!(
        stderr.contains(&format!("listeners.poc.bind: 127.0.0.1:{port}: ")),
        "{stderr}"
    );
    assert!(stderr.contains("--skip-bind"), "{stderr}");
    let (out, _, stderr) = run(podproxy()
        .args(["check", "--skip-bind", "--config"])
        .arg(&path));
    assert!(out.status.success(), "{stderr}");
    drop(taken);
}

#[test]
fn check_reports_every_problem_and_every_unset_variable_in_one_run() {
    let path = scratch_file(
        "many.toml",
        "[listeners.poc]\nbind = \"${NOPE_ONE}\"\nroutes = [{ prefix = \"/\", upstream = \"${NOPE_TWO}\" }]\n\
         [upstreams.mlnode]\nurls = \"${NOPE_THREE}\"\n",
    );
    let (out, _, stderr) = run(podproxy().args(["check", "--config"]).arg(&path));
    assert_eq!(out.status.code(), Some(2));
    for name in ["NOPE_ONE", "NOPE_TWO", "NOPE_THREE"] {
        assert!(stderr.contains(name), "{name}: {stderr}");
    }
    let path = scratch_file(
        "types.toml",
        "[listeners.poc]\nbind = \"127.0.0.1:0\"\nmax_connections = \"lots\"\nroutes = [{ prefix = \"/\", upstream = \"mlnode\" }]\n\
         [upstreams.mlnode]\nurls = 8081\nresponse_timeout = \"5\"\n",
    );
    let (out, _, stderr) = run(podproxy().args(["check", "--config"]).arg(&path));
    assert_eq!(out.status.code(), Some(2));
    for needle in [
        "listeners.poc.max_connections",
        "like 500",
        "upstreams.mlnode.urls",
        "a string or an array of strings",
    ] {
        assert!(stderr.contains(needle), "{needle}: {stderr}");
    }
}

#[test]
fn check_warns_about_an_open_public_listener() {
    let path = scratch_file(
        "open.toml",
        &one_listener(0, "").replace("127.0.0.1:0", "0.0.0.0:0"),
    );
    let (out, _, stderr) = run(podproxy().args(["check", "--config"]).arg(&path));
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning: listener poc on 0.0.0.0:0 has no gate"),
        "{stderr}"
    );
}

#[test]
fn a_public_admin_without_a_token_does_not_start() {
    let path = scratch_file(
        "admin.toml",
        &one_listener(0, "[admin]\nbind = \"0.0.0.0:0\"\n"),
    );
    let (out, _, stderr) = run(podproxy().arg("--config").arg(&path));
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("admin.bind"), "{stderr}");
    assert!(stderr.contains("allow_unauthenticated"), "{stderr}");
}

#[test]
fn a_port_in_use_is_reported_once_in_the_format_the_environment_asks_for() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    // A file config: the environment still chooses the log format.
    let path = scratch_file("busy-json.toml", &one_listener(port, ""));
    let (out, _, stderr) = run(podproxy()
        .env("PODPROXY_LOG_FORMAT", "json")
        .arg("--config")
        .arg(&path));
    assert!(!out.status.success());
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("cannot bind"))
        .collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    let v: serde_json::Value =
        serde_json::from_str(lines[0]).unwrap_or_else(|e| panic!("{e}: {stderr}"));
    assert_eq!(v["level"], "ERROR");
    // The flag wins over the environment; no colour codes into a file or pipe.
    let (_, _, stderr) = run(podproxy()
        .env("PODPROXY_LOG_FORMAT", "json")
        .args(["--log-format", "text", "--config"])
        .arg(&path));
    assert!(stderr.contains("ERROR"), "{stderr}");
    assert!(!stderr.contains('{'), "{stderr}");
    assert!(
        !stderr.contains('\x1b'),
        "colour codes in a pipe: {stderr:?}"
    );
    drop(taken);
}

#[tokio::test]
async fn the_first_lines_say_which_config_runs_and_what_it_serves() {
    let vllm = VllmSim::start(VllmConfig::default()).await.unwrap();
    let dead = format!("http://127.0.0.1:{}", free_port());
    let running = Running::start("summary", "5s", &format!("{}, {dead}", vllm.url())).await;
    // The first health round counts only backends that answered.
    let logs = eventually_logged(&running, "backends healthy").await;
    assert!(logs.contains("1/2 backends healthy"), "{logs}");
    let line = logs.lines().find(|l| l.contains("starting:")).unwrap();
    assert!(line.contains("summary.toml"), "{line}");
    assert!(
        line.contains(&format!(
            "listeners: inference 127.0.0.1:{} [/->vllm]",
            running.port
        )),
        "{line}"
    );
    assert!(
        line.contains(&format!(
            "upstreams: vllm {} .. {dead} (2 backends)",
            vllm.url()
        )),
        "{line}"
    );
    assert!(!logs.contains('\x1b'), "colour codes in a file: {logs:?}");
}

/// On a terminal (a pty from util-linux's `script`) text logs are coloured, unless
/// `NO_COLOR` is set.
#[test]
fn colour_only_on_a_terminal_and_never_with_no_color() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let path = scratch_file("tty.toml", &one_listener(port, ""));
    let on_a_pty = |no_color: Option<&str>| {
        let mut cmd = Command::new("script");
        for v in CONFIG_VARS {
            cmd.env_remove(v);
        }
        if let Some(v) = no_color {
            cmd.env("NO_COLOR", v);
        }
        let line = format!("{BIN} --config {}", path.display());
        let (out, stdout, stderr) =
            run(cmd.args(["-qec", &line, "/dev/null"]).stdin(Stdio::null()));
        assert!(
            stdout.contains("cannot bind"),
            "{stdout}{stderr} ({:?})",
            out.status
        );
        stdout
    };
    assert!(on_a_pty(None).contains('\x1b'), "no colour on a terminal");
    assert!(
        !on_a_pty(Some("1")).contains('\x1b'),
        "colour despite NO_COLOR"
    );
    drop(taken);
}

#[tokio::test]
async fn the_poc_rewrite_is_logged_as_old_and_new_url() {
    let mlnode = testkit::mlnode::MlnodeSim::start(Default::default())
        .await
        .unwrap();
    let port = free_port();
    let running = Running::start_file(
        "poc-log",
        port,
        &format!(
            "[listeners.poc]\nbind = \"127.0.0.1:{port}\"\n\
             routes = [{{ prefix = \"/\", upstream = \"mlnode\", poc = true }}]\n\n\
             [upstreams.mlnode]\nurls = \"{}\"\n\n\
             [poc]\ncallback_origin = \"http://203.0.113.7:9100\"\n",
            mlnode.url()
        ),
    )
    .await;
    let body =
        r#"{"url":"http://api:9100/v2/poc-batches/Qwen%252FQwen3-32B-FP8","block_height":1}"#;
    let (parts, _) = send(
        &http_client(),
        Request::post(format!(
            "{}/api/v1/inference/pow/init/generate",
            running.url()
        ))
        .body(full(body))
        .unwrap(),
    )
    .await;
    assert_eq!(parts.status, 200);
    let logs = eventually_logged(&running, "PoC callback url rewritten").await;
    let line = logs
        .lines()
        .find(|l| l.contains("PoC callback url rewritten"))
        .unwrap();
    // Both sides are whole URLs, written the same way.
    assert!(
        line.contains("from=http://api:9100/v2/poc-batches/Qwen%252FQwen3-32B-FP8"),
        "{line}"
    );
    assert!(
        line.contains("to=http://203.0.113.7:9100/v2/poc-batches/Qwen%252FQwen3-32B-FP8"),
        "{line}"
    );
    drop(running);
}

/// The log file once it holds `needle` (the writer thread flushes soon after a line).
async fn eventually_logged(running: &Running, needle: &str) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let logs = running.logs();
        if logs.contains(needle) {
            return logs;
        }
        assert!(
            Instant::now() < deadline,
            "never logged {needle:?}:\n{logs}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------
// SIGTERM drain
// ---------------------------------------------------------------------------------------

/// A podproxy process on a free loopback port in front of `upstream_url`.
struct Running {
    child: tokio::process::Child,
    port: u16,
    log: PathBuf,
}

impl Running {
    async fn start(name: &str, grace: &str, upstream_url: &str) -> Running {
        let port = free_port();
        Running::start_file(
            name,
            port,
            &format!(
                "[server]\nshutdown_grace = \"{grace}\"\n\n\
                 [listeners.inference]\nbind = \"127.0.0.1:{port}\"\n\
                 routes = [{{ prefix = \"/\", upstream = \"vllm\" }}]\n\n\
                 [upstreams.vllm]\nurls = \"{upstream_url}\"\n"
            ),
        )
        .await
    }

    /// podproxy from config text whose first listener binds 127.0.0.1:`port`.
    async fn start_file(name: &str, port: u16, text: &str) -> Running {
        let config = scratch_file(&format!("{name}.toml"), text);
        let log = config.with_extension("log");
        let child = tokio::process::Command::from({
            let mut c = podproxy();
            c.arg("--config")
                .arg(&config)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap());
            c
        })
        .kill_on_drop(true)
        .spawn()
        .expect("spawn podproxy");
        let mut running = Running { child, port, log };
        running.wait_listening().await;
        running
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Bounded retry loop: the process offers no event to await but its port.
    async fn wait_listening(&mut self) {
        let deadline = Instant::now() + WAIT;
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("podproxy exited early ({status}):\n{}", self.logs());
            }
            assert!(
                Instant::now() < deadline,
                "podproxy never listened:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn sigterm(&self) {
        let pid = self.child.id().expect("running");
        let status = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Bounded wait for a connection attempt to be refused (the listener is closed).
    async fn wait_refusing(&self) {
        let deadline = Instant::now() + WAIT;
        loop {
            match tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return,
                _ => {}
            }
            assert!(
                Instant::now() < deadline,
                "still accepting connections after SIGTERM:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn wait_exit(&mut self, bound: Duration) -> std::process::ExitStatus {
        match tokio::time::timeout(bound, self.child.wait()).await {
            Ok(status) => status.unwrap(),
            Err(_) => panic!("podproxy still running after {bound:?}:\n{}", self.logs()),
        }
    }
}

/// Opens a streaming chat completion (`tokens` × `interval_ms`) and returns its body once
/// the first event has arrived, with the bytes read so far.
async fn open_stream(
    url: &str,
    tokens: usize,
    interval_ms: u64,
) -> (hyper::body::Incoming, Vec<u8>) {
    let resp = bounded(
        "stream head",
        http_client().request(
            Request::post(format!("{url}/v1/chat/completions"))
                .header("content-type", "application/json")
                .header("x-sim-interval-ms", interval_ms.to_string())
                .body(full(format!(
                    r#"{{"model":"Qwen/Qwen3-32B-FP8","stream":true,"max_tokens":{tokens},"messages":[{{"role":"user","content":"hi"}}]}}"#
                )))
                .unwrap(),
        ),
    )
    .await
    .expect("stream request");
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut seen = Vec::new();
    while !seen.windows(2).any(|w| w == b"\n\n") {
        let frame = bounded("first event", body.frame())
            .await
            .expect("body ended before the first event")
            .expect("body failed before the first event");
        if let Ok(data) = frame.into_data() {
            seen.extend_from_slice(&data);
        }
    }
    (body, seen)
}

/// Reads the rest of a body: `Ok(all bytes)` on a clean end, `Err` if it was aborted.
async fn read_rest(mut body: hyper::body::Incoming, mut seen: Vec<u8>) -> Result<String, String> {
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Ok(d) = f.into_data() {
                    seen.extend_from_slice(&d);
                }
            }
            Err(e) => return Err(format!("{e} after {} bytes", seen.len())),
        }
    }
    Ok(String::from_utf8_lossy(&seen).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_streams_then_exits_0() {
    let vllm = VllmSim::start(VllmConfig::default()).await.unwrap();
    let mut proc_ = Running::start("drain", "20s", &vllm.url()).await;

    let (body, seen) = open_stream(&proc_.url(), 60, 50).await;
    let stream = tokio::spawn(read_rest(body, seen));
    proc_.sigterm();

    // No new connections once the signal is handled, while the stream is still going.
    proc_.wait_refusing().await;
    assert!(
        !stream.is_finished(),
        "the stream ended before the listener closed; the drain was not observed"
    );

    let text = bounded("stream end", stream)
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("stream aborted during drain: {e}\n{}", proc_.logs()));
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    let events = text.matches("data: {").count();
    assert_eq!(events, 60, "{text}");

    let status = proc_.wait_exit(WAIT).await;
    assert!(status.success(), "exit status {status}:\n{}", proc_.logs());
    assert_eq!(vllm.stats().cancelled(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_grace_period_bounds_the_drain() {
    let vllm = VllmSim::start(VllmConfig::default()).await.unwrap();
    let mut proc_ = Running::start("grace", "1s", &vllm.url()).await;

    // 600 × 50 ms = 30 s: far beyond the 1 s grace.
    let (body, seen) = open_stream(&proc_.url(), 600, 50).await;
    let stream = tokio::spawn(read_rest(body, seen));
    let signalled = Instant::now();
    proc_.sigterm();

    let status = proc_.wait_exit(Duration::from_secs(10)).await;
    let took = signalled.elapsed();
    assert!(status.success(), "exit status {status}:\n{}", proc_.logs());
    assert!(
        took >= Duration::from_millis(900),
        "exited after {took:?}, before the 1 s grace"
    );

    let result = bounded("stream end", stream).await.unwrap();
    assert!(
        result.is_err(),
        "a stream cut by the grace period must be aborted, not ended cleanly: {result:?}"
    );
    // The cut reached the backend too: the generation was abandoned, not left running.
    assert!(
        vllm.stats().wait_cancelled(1, WAIT).await,
        "vLLM generation not cancelled"
    );
}
