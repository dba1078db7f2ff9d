//! The real binary: `check` (embedded default, env, broken files), `PODPROXY_CONFIG`,
//! `--version`, and SIGTERM drain as PID-1-style process.

mod support;

use http::Request;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use support::*;
use testkit::client::{full, http_client};
use testkit::vllm::{VllmConfig, VllmSim};

#[test]
fn version_flag_prints_the_version() {
    let Ran { status, stdout, .. } = Podproxy::new().arg("--version").run();
    assert!(status.success());
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
    let (status, stdout, stderr) = check(None).parts();
    assert!(status.success(), "{stderr}");
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

    let (status, stdout, stderr) = Podproxy::new().env("POC_PORT", "9999").check(None).parts();
    assert!(status.success(), "{stderr}");
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
        let (status, stdout, stderr) = check(Some(&path)).parts();
        assert!(
            !status.success(),
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
    let out = check(Some(&path));
    assert!(out.success(), "{}", out.stderr);

    let missing = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("no-such-dir/podproxy.toml");
    let out = check(Some(&missing));
    assert!(!out.success());
    assert!(
        out.stderr.contains(&missing.display().to_string()),
        "missing file not named:\n{}",
        out.stderr
    );
}

#[test]
fn podproxy_config_env_selects_the_file() {
    let path = scratch_file("from_env.toml", GOOD);
    let (status, stdout, stderr) = Podproxy::new()
        .env("PODPROXY_CONFIG", &path)
        .check(None)
        .parts();
    assert!(status.success(), "{stderr}");
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
    let (status, stdout, stderr) = Podproxy::new().arg("check").config(&path).run().parts();
    assert_eq!(status.code(), Some(2), "{stdout}{stderr}");
    assert!(
        stderr.contains(&format!("listeners.poc.bind: 127.0.0.1:{port}: ")),
        "{stderr}"
    );
    assert!(stderr.contains("--skip-bind"), "{stderr}");
    let out = check(Some(&path));
    assert!(out.success(), "{}", out.stderr);
    drop(taken);
}

#[test]
fn check_reports_every_problem_and_every_unset_variable_in_one_run() {
    let path = scratch_file(
        "many.toml",
        "[listeners.poc]\nbind = \"${NOPE_ONE}\"\nroutes = [{ prefix = \"/\", upstream = \"${NOPE_TWO}\" }]\n\
         [upstreams.mlnode]\nurls = \"${NOPE_THREE}\"\n",
    );
    let Ran { status, stderr, .. } = Podproxy::new().arg("check").config(&path).run();
    assert_eq!(status.code(), Some(2));
    for name in ["NOPE_ONE", "NOPE_TWO", "NOPE_THREE"] {
        assert!(stderr.contains(name), "{name}: {stderr}");
    }
    let path = scratch_file(
        "types.toml",
        "[listeners.poc]\nbind = \"127.0.0.1:0\"\nmax_connections = \"lots\"\nroutes = [{ prefix = \"/\", upstream = \"mlnode\" }]\n\
         [upstreams.mlnode]\nurls = 8081\nresponse_timeout = \"5\"\n",
    );
    let Ran { status, stderr, .. } = Podproxy::new().arg("check").config(&path).run();
    assert_eq!(status.code(), Some(2));
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
    let Ran { status, stderr, .. } = Podproxy::new().arg("check").config(&path).run();
    assert!(status.success(), "{stderr}");
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
    let Ran { status, stderr, .. } = Podproxy::new().config(&path).run();
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("admin.bind"), "{stderr}");
    assert!(stderr.contains("allow_unauthenticated"), "{stderr}");
}

#[test]
fn a_port_in_use_is_reported_once_in_the_format_the_environment_asks_for() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    // A file config: the environment still chooses the log format.
    let path = scratch_file("busy-json.toml", &one_listener(port, ""));
    let Ran { status, stderr, .. } = Podproxy::new()
        .env("PODPROXY_LOG_FORMAT", "json")
        .config(&path)
        .run();
    assert!(!status.success());
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("cannot bind"))
        .collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    let v: serde_json::Value =
        serde_json::from_str(lines[0]).unwrap_or_else(|e| panic!("{e}: {stderr}"));
    assert_eq!(v["level"], "ERROR");
    // The flag wins over the environment; no colour codes into a file or pipe.
    let Ran { stderr, .. } = Podproxy::new()
        .env("PODPROXY_LOG_FORMAT", "json")
        .args(["--log-format", "text"])
        .config(&path)
        .run();
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
    let running = serve("summary", "5s", &format!("{}, {dead}", vllm.url())).await;
    // The first health round counts only backends that answered.
    running.wait_for_line("backends healthy").await;
    let logs = running.stderr();
    assert!(logs.contains("1/2 backends healthy"), "{logs}");
    let line = logs.lines().find(|l| l.contains("starting:")).unwrap();
    assert!(line.contains("summary.toml"), "{line}");
    assert!(
        line.contains(&format!(
            "listeners: inference {} [/->vllm]",
            running.addr()
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
    assert!(!logs.contains('\x1b'), "colour codes in a pipe: {logs:?}");
}

/// On a terminal (a pty from util-linux's `script`) text logs are coloured, unless
/// `NO_COLOR` is set; into a file they never are.
#[test]
fn colour_only_on_a_terminal_and_never_with_no_color() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let podproxy = Podproxy::new().config_text("tty.toml", &one_listener(port, ""));
    let on_a_pty = |podproxy: Podproxy| {
        let out = podproxy.run_on_a_terminal();
        assert!(
            out.stdout.contains("cannot bind"),
            "{}{} ({:?})",
            out.stdout,
            out.stderr,
            out.status
        );
        out.stdout
    };
    assert!(
        on_a_pty(podproxy.clone()).contains('\x1b'),
        "no colour on a terminal"
    );
    assert!(
        !on_a_pty(podproxy.clone().env("NO_COLOR", "1")).contains('\x1b'),
        "colour despite NO_COLOR"
    );
    let log = scratch_dir().join("tty.log");
    let out = podproxy.stderr_to_file(&log).run();
    assert!(out.stderr.contains("cannot bind"), "{}", out.stderr);
    assert!(
        !out.stderr.contains('\x1b'),
        "colour codes in a file: {:?}",
        out.stderr
    );
    drop(taken);
}

#[tokio::test]
async fn the_poc_rewrite_is_logged_as_old_and_new_url() {
    let mlnode = testkit::mlnode::MlnodeSim::start(Default::default())
        .await
        .unwrap();
    let port = free_port();
    let running = Podproxy::new()
        .config_text(
            "poc-log.toml",
            &format!(
                "[listeners.poc]\nbind = \"127.0.0.1:{port}\"\n\
             routes = [{{ prefix = \"/\", upstream = \"mlnode\", poc = true }}]\n\n\
             [upstreams.mlnode]\nurls = \"{}\"\n\n\
             [poc]\ncallback_origin = \"http://203.0.113.7:9100\"\n",
                mlnode.url()
            ),
        )
        .listening_on(port)
        .start()
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
    let line = running.wait_for_line("PoC callback url rewritten").await;
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

// ---------------------------------------------------------------------------------------
// SIGTERM drain
// ---------------------------------------------------------------------------------------

/// podproxy (its own process) on a free loopback port in front of `upstream_url`, with
/// `shutdown_grace = grace`, from the file `<name>.toml`.
async fn serve(name: &str, grace: &str, upstream_url: &str) -> Process {
    let port = free_port();
    Podproxy::new()
        .config_text(
            &format!("{name}.toml"),
            &format!(
                "[server]\nshutdown_grace = \"{grace}\"\n\n\
                 [listeners.inference]\nbind = \"127.0.0.1:{port}\"\n\
                 routes = [{{ prefix = \"/\", upstream = \"vllm\" }}]\n\n\
                 [upstreams.vllm]\nurls = \"{upstream_url}\"\n"
            ),
        )
        .listening_on(port)
        .start()
        .await
}

/// Opens a streaming chat completion (`tokens` × `interval_ms`) through `proc_` and reads
/// the rest of it in a task of its own, once the first event has arrived.
async fn stream_through(
    proc_: &Process,
    tokens: usize,
    interval_ms: u64,
) -> tokio::task::JoinHandle<Result<String, String>> {
    let url = format!("{}/v1/chat/completions", proc_.url());
    let (_, body, seen) =
        open_stream(&http_client(), streaming_chat(url, tokens, interval_ms)).await;
    tokio::spawn(read_rest(body, seen))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_streams_then_exits_0() {
    let vllm = VllmSim::start(VllmConfig::default()).await.unwrap();
    let mut proc_ = serve("drain", "20s", &vllm.url()).await;

    let stream = stream_through(&proc_, 60, 50).await;
    proc_.sigterm().await;

    // No new connections once the signal is handled, while the stream is still going.
    assert!(
        refused(proc_.addr()).await,
        "still accepting connections after SIGTERM:\n{}",
        proc_.stderr()
    );
    assert!(
        !stream.is_finished(),
        "the stream ended before the listener closed; the drain was not observed"
    );

    let text = bounded("stream end", stream)
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("stream aborted during drain: {e}\n{}", proc_.stderr()));
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    let events = text.matches("data: {").count();
    assert_eq!(events, 60, "{text}");

    let status = proc_.wait_exit(WAIT).await;
    assert!(
        status.success(),
        "exit status {status}:\n{}",
        proc_.stderr()
    );
    assert_eq!(vllm.stats().cancelled(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_grace_period_bounds_the_drain() {
    let vllm = VllmSim::start(VllmConfig::default()).await.unwrap();
    let mut proc_ = serve("grace", "1s", &vllm.url()).await;

    // 600 × 50 ms = 30 s: far beyond the 1 s grace.
    let stream = stream_through(&proc_, 600, 50).await;
    proc_.sigterm().await;
    let signalled = Instant::now();

    let status = proc_.wait_exit(Duration::from_secs(10)).await;
    let took = signalled.elapsed();
    assert!(
        status.success(),
        "exit status {status}:\n{}",
        proc_.stderr()
    );
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

/// The access lines the binary writes, as a host reads them: every field in order in text
/// (written by podproxy's own line formatter) and in JSON (through tracing); at `warn`
/// only failures, still naming their path.
#[tokio::test]
async fn access_lines_carry_every_field_and_at_warn_only_failures() {
    let vllm = VllmSim::start(VllmConfig::default()).await.unwrap();
    let dead = format!("http://127.0.0.1:{}", free_port());
    for (format, level) in [("text", "info"), ("json", "info"), ("text", "warn")] {
        let port = free_port();
        let mut running = Podproxy::new()
            .env("PODPROXY_LOG_FORMAT", format)
            .config_text(
                &format!("access-{format}-{level}.toml"),
                &format!(
                    "[server]\nlog_level = \"{level}\"\n\n\
                     [listeners.inference]\nbind = \"127.0.0.1:{port}\"\n\
                     routes = [{{ prefix = \"/dead/\", upstream = \"dead\" }}, \
                     {{ prefix = \"/\", upstream = \"vllm\" }}]\n\n\
                     [upstreams.vllm]\nurls = \"{}\"\nhealth = {{ enabled = false }}\n\n\
                     [upstreams.dead]\nurls = \"{dead}\"\nhealth = {{ enabled = false }}\n",
                    vllm.url()
                ),
            )
            .listening_on(port)
            .start()
            .await;
        let client = http_client();
        for (path, status) in [("/v1/models?key=secret", 200), ("/dead/x", 502)] {
            let (parts, _) = send(
                &client,
                Request::get(format!("{}{path}", running.url()))
                    .header("x-request-id", "req-7")
                    .body(full(""))
                    .unwrap(),
            )
            .await;
            assert_eq!(parts.status, status, "{format} {level} {path}");
        }
        // Exited: every line is written, so a missing one was never logged.
        running.sigterm().await;
        running.wait_exit(WAIT).await;
        let logs = running.stderr();
        let access: Vec<&str> = logs
            .lines()
            .filter(|l| l.contains("podproxy::access"))
            .collect();
        let expect = if level == "warn" { 1 } else { 2 };
        assert_eq!(access.len(), expect, "{format} {level}:\n{logs}");
        let failed = access[expect - 1];
        if format == "json" {
            let v: serde_json::Value =
                serde_json::from_str(failed).unwrap_or_else(|e| panic!("{e}: {failed}"));
            assert_eq!(v["level"], "WARN", "{failed}");
            assert_eq!(v["path"], "/dead/x", "{failed}");
            assert_eq!(v["status"], 502, "{failed}");
            assert_eq!(v["request_id"], "req-7", "{failed}");
            assert_eq!(v["outcome"], "refused", "{failed}");
            assert_eq!(v["client"], "127.0.0.1", "{failed}");
            continue;
        }
        let names: Vec<&str> = failed
            .split_once("podproxy::access: ")
            .unwrap_or_else(|| panic!("{failed}"))
            .1
            .split(' ')
            .filter_map(|f| f.split_once('=').map(|(name, _)| name))
            .filter(|n| n.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
            .collect();
        assert_eq!(
            names[..14],
            [
                "listener",
                "client",
                "method",
                "path",
                "status",
                "upstream",
                "backend",
                "bytes_in",
                "bytes_out",
                "duration_ms",
                "ttfb_ms",
                "request_id",
                "outcome",
                "error"
            ],
            "{failed}"
        );
        assert!(failed.contains(" WARN podproxy::access: "), "{failed}");
        assert!(failed.contains(" path=\"/dead/x\" status=502 "), "{failed}");
        assert!(failed.contains(" request_id=\"req-7\" "), "{failed}");
        assert!(failed.contains(" client=\"127.0.0.1\" "), "{failed}");
        if level == "info" {
            let ok = access[0];
            assert!(ok.contains(" INFO podproxy::access: "), "{ok}");
            assert!(ok.contains(" path=\"/v1/models\" status=200 "), "{ok}");
            assert!(ok.contains(" outcome=\"complete\" error=\"\""), "{ok}");
            assert!(!logs.contains("secret"), "a query in the log: {logs}");
        }
    }
}

/// The descriptor table is grown before the first thread, for the connections the
/// listeners allow (two each): a burst of new streams then never waits for it to grow.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn the_descriptor_table_is_grown_at_start() {
    let vllm = VllmSim::start(VllmConfig::default()).await.unwrap();
    let running = serve("fds", "5s", &vllm.url()).await;
    let status = std::fs::read_to_string(format!("/proc/{}/status", running.pid())).unwrap();
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", running.pid())).unwrap();
    let field = |text: &str, key: &str| -> u64 {
        let line = text.lines().find(|l| l.starts_with(key)).unwrap();
        line[key.len()..]
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let size = field(&status, "FDSize:");
    let soft_limit = field(&limits, "Max open files");
    // One listener with the default 10,000 connections: 20,064 slots, or the limit.
    let want = 20_064.min(soft_limit);
    assert!(size >= want, "FDSize {size} < {want} (limit {soft_limit})");
}
