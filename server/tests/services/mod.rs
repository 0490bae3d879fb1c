//! Harness for multi-node tests: real PostgreSQL, real Redis (single or
//! Cluster) and real `herald` processes.
//!
//! - Shared services: [`postgres_admin_url`] and [`redis_url`] use
//!   `HERALD_TEST_POSTGRES_URL` / `HERALD_TEST_REDIS_URL`, else the local
//!   default port when it answers, else one private instance for the whole
//!   test process. Nothing here skips a test: no service means a panic.
//! - Isolation on shared services: every [`Cluster`] gets its own database
//!   ([`TestDatabase`], dropped at the end) and its own `HERALD_REDIS_PREFIX`.
//! - Private services a test may stop and start: [`PrivatePostgres`],
//!   [`PrivateRedis`], [`RedisCluster`].
//! - [`Node`]: one `herald` process; its log is printed when a test fails.
//! - [`Reader`] reads a session in the background; [`PublishLoop`] publishes
//!   in the background and records every answer.
//!
//! Every process started here also gets a small reaper (`sh`) that cleans up
//! if the test process dies without running destructors (statics, SIGKILL).
#![allow(dead_code, unused_imports)] // each test file uses a part of the harness

mod node;
mod postgres;
mod redis;
mod traffic;

use std::future::Future;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub use node::*;
pub use postgres::*;
pub use redis::*;
pub use traffic::*;

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// `<pid>_<n>_<random>`: unique in this process and across re-runs.
pub fn unique_suffix() -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{}_{n}_{:04x}", std::process::id(), rand::random::<u16>())
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0").local_addr().unwrap().port()
}

fn reachable(addr: &str) -> bool {
    let addr: SocketAddr = addr.parse().expect("a socket address");
    TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
}

/// Polls `check` until it holds; panics with `what` after `deadline`.
fn wait_until(what: &str, deadline: Duration, check: impl FnMut() -> bool) {
    assert!(poll_until(deadline, check), "never happened within {deadline:?}: {what}");
}

/// Polls `check` until it holds (true) or `deadline` passes (false).
fn poll_until(deadline: Duration, mut check: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + deadline;
    while !check() {
        if Instant::now() >= until {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false)
}

/// Runs a command to completion; panics with its output when it fails.
fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{cmd:?} failed ({}):\n{text}", out.status);
    text
}

/// Runs `make()` on a thread of its own with its own runtime, so sync code
/// (constructors, `Drop`) can use async libraries from inside a test runtime.
fn block_on_thread<T, Fut>(make: impl FnOnce() -> Fut + Send + 'static) -> T
where
    T: Send + 'static,
    Fut: Future<Output = T>,
{
    let thread = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime").block_on(make())
    });
    thread.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// A detached `sh` that runs `cleanup` once this test process is gone, in
/// case destructors never run. Dropping the reaper ends it without cleaning.
struct Reaper(Child);

impl Reaper {
    fn spawn(cleanup: &str) -> Reaper {
        use std::os::unix::process::CommandExt;
        let script = format!("while kill -0 {} 2>/dev/null; do sleep 1; done; {cleanup}", std::process::id());
        let child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("spawn sh");
        Reaper(child)
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A path as a `&str` argument.
fn path(p: &Path) -> String {
    p.to_str().expect("a UTF-8 path").to_string()
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}
