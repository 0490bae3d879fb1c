//! A smoke run of every scenario, seconds long and with small numbers,
//! against a real `herald` (the debug binary, built here if needed) on a
//! fresh SQLite database. Each asserts that the run wrote its results and
//! its summary, and that no notification was lost or repeated.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

const SECRET: &str = "smoke-secret-0123456789abcdef";
const KEY: &str = "smoke-key";

/// `<target>/<profile>/herald`, built from the workspace on first use.
///
/// Built as `cargo test --workspace` builds it: with the whole workspace's
/// features, dev-dependencies included (`--workspace --tests`). Under that
/// command, as in CI, this finds everything fresh and builds nothing. Built
/// alone (`-p herald-server`), the shared dependencies resolve other features
/// (libc without the `extra_traits` the load generator's nix asks for, say),
/// and about 75 crates were compiled again, a second time, for this one test.
/// The variables cargo sets for this test process are dropped too: ring's
/// build script asks to rerun when `CARGO_MANIFEST_DIR` or `CARGO_PKG_NAME`
/// differ from what the outer cargo saw (unset), and that alone recompiled
/// ring and the 20 crates above it here, and again in the next build.
fn herald_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        // This test runs as <target>/<profile>/deps/smoke-<hash>.
        let exe = std::env::current_exe().unwrap();
        let profile_dir = exe.parent().and_then(Path::parent).unwrap().to_path_buf();
        let mut build = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        build.args(["build", "--workspace", "--tests", "--bin", "herald"]);
        for (name, _) in std::env::vars_os() {
            if name.to_str().is_some_and(set_by_cargo_for_tests) {
                build.env_remove(name);
            }
        }
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            build.arg("--release");
        }
        let status = build.current_dir(env!("CARGO_MANIFEST_DIR")).status().expect("running cargo build");
        assert!(status.success(), "building herald failed");
        let bin = profile_dir.join("herald");
        assert!(bin.exists(), "no herald binary at {}", bin.display());
        bin
    })
}

/// What cargo sets in a test's environment (its package's metadata and
/// paths), as opposed to settings a user gives cargo (`CARGO_TARGET_DIR`,
/// `CARGO_HOME`, `CARGO_PROFILE_*`, …), which the inner build must keep.
fn set_by_cargo_for_tests(name: &str) -> bool {
    const EXACT: [&str; 8] = [
        "CARGO_MANIFEST_DIR",
        "CARGO_MANIFEST_PATH",
        "CARGO_MANIFEST_LINKS",
        "CARGO_CRATE_NAME",
        "CARGO_BIN_NAME",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_TARGET_TMPDIR",
        "CARGO_RUSTC_CURRENT_DIR",
    ];
    EXACT.contains(&name) || name.starts_with("CARGO_PKG_") || name.starts_with("CARGO_BIN_EXE_") || name == "OUT_DIR"
}

/// A herald process on a free port; killed on drop.
struct Herald {
    child: Child,
    url: String,
    dir: tempfile::TempDir,
}

impl Herald {
    fn start(vars: &[(&str, &str)]) -> Herald {
        let dir = tempfile::tempdir().unwrap();
        let stderr = dir.path().join("herald.log");
        let mut cmd = Command::new(herald_binary());
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HERALD_LISTEN", "127.0.0.1:0")
            .env("HERALD_DATABASE_URL", format!("sqlite://{}/herald.db", dir.path().display()))
            .env("HERALD_JWT_SECRET", SECRET)
            .env("HERALD_API_KEYS", KEY)
            .env("HERALD_LIMIT_HANDSHAKES_PER_IP", "off")
            .env("HERALD_LIMIT_SESSIONS_PER_IP", "off")
            .env("HERALD_LOG", "info");
        for (k, v) in vars {
            cmd.env(k, v);
        }
        let mut child =
            cmd.stdout(Stdio::null()).stderr(std::fs::File::create(&stderr).unwrap()).spawn().expect("starting herald");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let log = std::fs::read_to_string(&stderr).unwrap_or_default();
            if let Some(port) = log
                .lines()
                .find(|l| l.contains("listening"))
                .and_then(|l| l.split("addr=127.0.0.1:").nth(1))
                .and_then(|r| r.split_whitespace().next())
            {
                return Herald { child, url: format!("http://127.0.0.1:{port}"), dir };
            }
            if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
                let _ = child.kill();
                panic!("herald did not start: {log}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs a scenario against this node; returns its exit status and result folder.
    fn loadtest(&self, scenario: &str, args: &[&str]) -> (i32, PathBuf) {
        let out = self.dir.path().join(scenario);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_herald-loadtest"));
        cmd.arg(scenario)
            .args(["--url", &self.url, "--jwt-secret", SECRET, "--api-key", KEY])
            .args(["--herald-pid", &self.child.id().to_string()])
            .arg("--out")
            .arg(&out)
            .args(["--ramp-rate", "0"])
            .args(args);
        if source_ip_bindable() {
            cmd.args(["--source-ips", "127.0.0.2"]);
        }
        let output = cmd.output().expect("running herald-loadtest");
        let stderr = String::from_utf8_lossy(&output.stderr);
        eprintln!("{stderr}");
        (output.status.code().unwrap_or(-1), out)
    }
}

impl Drop for Herald {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn source_ip_bindable() -> bool {
    std::net::TcpListener::bind("127.0.0.2:0").is_ok()
}

/// The result and summary exist; the run lost and repeated nothing.
fn check(status: i32, out: &Path) -> Value {
    let summary = std::fs::read_to_string(out.join("summary.md")).expect("summary.md");
    assert!(summary.contains("## Targets"), "{summary}");
    let result: Value = serde_json::from_slice(&std::fs::read(out.join("result.json")).expect("result.json")).unwrap();
    if let Some(v) = result.get("verification") {
        assert_eq!(v["lost"], 0, "{v}");
        assert_eq!(v["duplicates"], 0, "{v}");
        assert_eq!(v["gaps"], 0, "{v}");
        assert_eq!(v["ok"], true, "{v}");
        assert!(v["expected"].as_u64().unwrap() > 0, "nothing was published: {v}");
    }
    assert_eq!(status, 0, "{summary}");
    // Every scenario reads every program's CPU over its measured phase. Programs
    // under 0.05 CPU-seconds are left out, so a run this small may list none.
    let programs = result["server"]["cpu_by_program"].as_array().expect("server.cpu_by_program");
    for p in programs {
        assert!(p["cpu_seconds"].as_f64().unwrap() >= 0.05, "{p}");
        assert!(p["program"].as_str().is_some_and(|name| !name.is_empty()), "{p}");
    }
    // And the nodes' group commits over it, from their /metrics.
    let commits = &result["server"]["group_commits"];
    assert!(commits["commits"].as_u64().is_some() && commits["per_commit"].as_f64().is_some(), "{commits}");
    // And what herald wrote to storage meanwhile, from /proc/<pid>/io.
    assert!(result["server"]["disk_written_bytes"].as_u64().is_some(), "{}", result["server"]);
    result
}

#[test]
fn idle_holds_every_connection() {
    let herald = Herald::start(&[]);
    let (status, out) = herald.loadtest("idle", &["--connections", "200", "--processes", "2", "--duration", "2s"]);
    let r = check(status, &out);
    assert_eq!(r["connected"]["open"], 200);
    assert_eq!(r["drops"], 0);
    assert!(r["server_rss_per_connection_kib"].as_f64().is_some());
    assert!(out.join("connections.svg").exists());
}

#[test]
fn unicast_delivers_every_publish_in_order() {
    let herald = Herald::start(&[]);
    let args = ["--connections", "100", "--processes", "2", "--rate", "300", "--duration", "3s"];
    let (status, out) = herald.loadtest("unicast", &args);
    let r = check(status, &out);
    assert!(r["latency"]["count"].as_u64().unwrap() > 0);
    assert!(out.join("latency.svg").exists());
    // Every acknowledged publish was committed in the measured phase, and counted once.
    assert_eq!(r["server"]["group_commits"]["notifications"], r["published"]["notifications"]);
}

#[test]
fn unicast_batched() {
    let herald = Herald::start(&[]);
    let args = ["--connections", "60", "--rate", "600", "--batch", "10", "--duration", "2s"];
    let (status, out) = herald.loadtest("unicast", &args);
    check(status, &out);
}

#[test]
fn fanout_jobs_and_bursts_reach_everyone() {
    let herald = Herald::start(&[]);
    let args = ["--connections", "100", "--processes", "2", "--audience", "1500", "--jobs", "1", "--bursts", "1"];
    let (status, out) = herald.loadtest("fanout", &args);
    let r = check(status, &out);
    assert_eq!(r["rounds"].as_array().unwrap().len(), 2);
    assert_eq!(r["verification"]["expected"], 200);
}

#[test]
fn storm_clients_catch_up_exactly() {
    let herald = Herald::start(&[]);
    let (status, out) =
        herald.loadtest("storm", &["--connections", "100", "--processes", "2", "--missed", "10", "--batch", "50"]);
    let r = check(status, &out);
    assert_eq!(r["caught_up"], 100);
    assert_eq!(r["verification"]["expected"], 1000);
    assert_eq!(r["publish_commits"]["notifications"], 1000, "{}", r["publish_commits"]);
    assert!(out.join("catch-up.svg").exists());
}

#[test]
fn slow_clients_get_1013_and_recover() {
    // One-second heartbeats: a stalled session is given up within ~3 s.
    let herald = Herald::start(&[("HERALD_HEARTBEAT_SECS", "1")]);
    let args = ["--connections", "60", "--processes", "2", "--rate", "100", "--duration", "3s", "--flood-rate", "500"];
    let (status, out) = herald.loadtest("slow", &args);
    let r = check(status, &out);
    assert_eq!(r["stalled"], 6);
    assert_eq!(r["closed_by_server"], 6);
    assert_eq!(r["readers_dropped"], 0);
}

/// The crash soak, two short rounds on SQLite: herald (started by the tool)
/// killed with SIGKILL mid-publishing and restarted; every acknowledged
/// notification was read back, `herald check` passed, and the results say so.
#[test]
fn crash_rounds_lose_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("crash");
    let output = Command::new(env!("CARGO_BIN_EXE_herald-loadtest"))
        .arg("crash")
        .arg("--herald-bin")
        .arg(herald_binary())
        .args(["--rounds", "2", "--kill-min", "1s", "--kill-max", "2s"])
        .args(["--users", "50", "--batch", "10", "--publishers", "4"])
        .arg("--out")
        .arg(&out)
        .output()
        .expect("running herald-loadtest crash");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    let summary = std::fs::read_to_string(out.join("summary.md")).expect("summary.md");
    assert!(summary.contains("**Passed"), "{summary}");
    let result: Value = serde_json::from_slice(&std::fs::read(out.join("result.json")).unwrap()).unwrap();
    assert_eq!(result["passed"], true, "{result}");
    let rounds = result["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 2, "{result}");
    for round in rounds {
        let acknowledged = round["acknowledged"].as_u64().unwrap();
        assert!(acknowledged > 0, "nothing was published: {round}");
        assert!(round["verified"].as_u64().unwrap() >= acknowledged, "{round}");
    }
    assert!(result["stored_in_all"].as_i64().unwrap() >= result["acknowledged"].as_i64().unwrap(), "{result}");
}
