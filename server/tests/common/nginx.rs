//! A real nginx running the repo's own `deploy/nginx/herald.conf`, with its
//! placeholders filled in: TLS from [`TestCerts`], the given nodes as
//! upstreams, a free loopback port. One master process (not a daemon) with a
//! prefix, config and logs in a temp dir of its own; stopped on drop.
//!
//! The test fails, never skips, when nginx is not installed
//! (`apt-get install nginx`; `HERALD_TEST_NGINX` names another binary).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::tls::TestCerts;

const DEFAULT_BINARY: &str = "/usr/sbin/nginx";
/// How long nginx may take to listen.
const START_DEADLINE: Duration = Duration::from_secs(10);

pub struct Nginx {
    child: Child,
    pub port: u16,
    dir: tempfile::TempDir,
    /// Kills nginx if this test process dies without running `Drop`.
    reaper: Child,
}

/// The repo's config, as committed.
pub fn herald_conf() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/nginx/herald.conf");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// `template` with every `${NAME}` of `values` replaced; panics when a
/// `${HERALD_NGINX_…}` placeholder is left (the config grew one the test
/// does not know) or when a value was never used.
pub fn render(template: &str, values: &[(&str, String)]) -> String {
    let mut out = template.to_string();
    for (name, value) in values {
        let placeholder = format!("${{{name}}}");
        assert!(out.contains(&placeholder), "herald.conf has no {placeholder} any more");
        out = out.replace(&placeholder, value);
    }
    if let Some(at) = out.find("${HERALD_NGINX_") {
        let rest: String = out[at..].chars().take(40).collect();
        panic!("herald.conf has a placeholder the test does not fill in: {rest}");
    }
    out
}

/// The nginx binary; panics with what to install when it is missing.
pub fn binary() -> PathBuf {
    let binary = std::env::var_os("HERALD_TEST_NGINX").map(PathBuf::from).unwrap_or_else(|| DEFAULT_BINARY.into());
    assert!(
        binary.exists(),
        "{} is missing: this test runs the real nginx in front of Herald. \
         Install it (Debian: `apt-get install -y nginx`; .ci/run does) or point HERALD_TEST_NGINX at one",
        binary.display()
    );
    binary
}

impl Nginx {
    /// Starts nginx on `127.0.0.1:<free port>` in front of `nodes`, serving
    /// `certs`, and waits until it accepts connections.
    pub fn start(certs: &TestCerts, nodes: &[SocketAddr]) -> Nginx {
        let binary = binary();
        let dir = tempfile::Builder::new().prefix("herald-nginx-").tempdir().expect("a temp dir");
        // Workers run as `nobody` when the master is root: let them in.
        set_mode(dir.path(), 0o755);
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let upstreams: String = nodes.iter().map(|addr| format!("server {addr};\n")).collect();
        std::fs::write(dir.path().join("upstreams.conf"), upstreams).unwrap();
        let conf = render(
            &herald_conf(),
            &[
                ("HERALD_NGINX_LISTEN", format!("127.0.0.1:{port}")),
                ("HERALD_NGINX_SERVER_NAME", "localhost".into()),
                ("HERALD_NGINX_CERT", certs.cert.display().to_string()),
                ("HERALD_NGINX_KEY", certs.key.display().to_string()),
                ("HERALD_NGINX_UPSTREAMS", dir.path().join("upstreams.conf").display().to_string()),
            ],
        );
        std::fs::write(dir.path().join("herald.conf"), conf).unwrap();
        std::fs::write(dir.path().join("nginx.conf"), main_conf(dir.path())).unwrap();

        let child = Command::new(&binary)
            .arg("-p")
            .arg(format!("{}/", dir.path().display()))
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.path().join("access.log")).unwrap())
            .stderr(std::fs::File::create(dir.path().join("stderr")).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", binary.display()));
        let reaper = reaper(child.id());
        let mut nginx = Nginx { child, port, dir, reaper };
        nginx.wait_listening();
        nginx
    }

    fn wait_listening(&mut self) {
        let addr: SocketAddr = ([127, 0, 0, 1], self.port).into();
        let deadline = Instant::now() + START_DEADLINE;
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("nginx exited with {status} before listening:\n{}", self.logs());
            }
            assert!(Instant::now() < deadline, "nginx did not listen within {START_DEADLINE:?}:\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `https://127.0.0.1:<port>`.
    pub fn https(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// `wss://127.0.0.1:<port>`.
    pub fn wss(&self) -> String {
        format!("wss://127.0.0.1:{}", self.port)
    }

    /// The error log, stderr and access log so far.
    pub fn logs(&self) -> String {
        let read = |name: &str| std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
        format!(
            "--- nginx error.log ---\n{}--- nginx stderr ---\n{}--- nginx access log ---\n{}",
            read("error.log"),
            read("stderr"),
            read("access.log")
        )
    }
}

/// The main config around herald.conf: everything nginx writes stays in `dir`.
fn main_conf(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "daemon off;\n\
         worker_processes 1;\n\
         pid {d}/nginx.pid;\n\
         error_log {d}/error.log info;\n\
         events {{ worker_connections 1024; }}\n\
         http {{\n\
         \x20   client_body_temp_path {d}/client_body;\n\
         \x20   proxy_temp_path {d}/proxy;\n\
         \x20   fastcgi_temp_path {d}/fastcgi;\n\
         \x20   uwsgi_temp_path {d}/uwsgi;\n\
         \x20   scgi_temp_path {d}/scgi;\n\
         \x20   include {d}/herald.conf;\n\
         }}\n"
    )
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A detached `sh` that stops nginx once this test process is gone.
fn reaper(pid: u32) -> Child {
    use std::os::unix::process::CommandExt;
    let script = format!("while kill -0 {} 2>/dev/null; do sleep 1; done; kill -TERM {pid}", std::process::id());
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("spawn sh")
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its workers, then exits.
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        let _ = self.reaper.kill();
        let _ = self.reaper.wait();
        if std::thread::panicking() {
            eprintln!("\n===== nginx =====\n{}\n===== end of nginx =====", self.logs());
        }
    }
}
