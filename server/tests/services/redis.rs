//! Redis for tests: the shared server (a prefix per test), a private one a
//! test may stop and start, and a three-master Redis Cluster.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use super::{free_port, path, poll_until, run, shell_quote, unique_suffix, wait_until, Reaper};

/// The URL of a Redis server tests may share (each with its own prefix).
pub fn redis_url() -> String {
    static URL: OnceLock<String> = OnceLock::new();
    static PRIVATE: OnceLock<PrivateRedis> = OnceLock::new();
    URL.get_or_init(|| {
        if let Ok(url) = std::env::var("HERALD_TEST_REDIS_URL") {
            return url;
        }
        if redis_ping(6379) {
            return "redis://127.0.0.1:6379".to_string();
        }
        PRIVATE.get_or_init(PrivateRedis::start).url()
    })
    .clone()
}

/// A prefix no other test uses: `t<pid>_<n>_<random>`.
pub fn unique_prefix() -> String {
    format!("t{}", unique_suffix())
}

/// Deletes the keys under `prefix` (`<prefix>:*`) on a single Redis, so
/// test runs leave nothing behind; errors are ignored. Not for a cluster.
pub fn delete_prefix(url: &str, prefix: &str) {
    if !url.starts_with("redis://") {
        return;
    }
    let delete = || -> redis::RedisResult<()> {
        let client = redis::Client::open(url)?;
        let mut conn = client.get_connection_with_timeout(Duration::from_secs(2))?;
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut cursor = 0u64;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{prefix}:*"))
                .arg("COUNT")
                .arg(1000)
                .query(&mut conn)?;
            if !keys.is_empty() {
                redis::cmd("DEL").arg(&keys).query::<()>(&mut conn)?;
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    };
    let _ = delete();
}

/// `PING` → `+PONG` on 127.0.0.1:`port`.
fn redis_ping(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(500)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    stream.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

fn redis_server(port: u16, dir: &Path, extra: &[&str]) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("redis-{port}.log")))
        .expect("a redis log file");
    Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .args(["--dir", &path(dir)])
        .args(extra)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start redis-server (is it installed?): {e}"))
}

fn stop_child(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// A Redis server of this test's own that can be stopped and started again.
pub struct PrivateRedis {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    reaper: Option<Reaper>,
}

impl PrivateRedis {
    pub fn start() -> PrivateRedis {
        let dir = tempfile::Builder::new().prefix("herald-redis-").tempdir().expect("a temp dir");
        let mut redis = PrivateRedis { port: free_port(), dir, child: None, reaper: None };
        redis.start_again();
        redis
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts it (again) on the same port; waits until it answers `PING`.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = redis_server(self.port, self.dir.path(), &[]);
        self.reaper =
            Some(Reaper::spawn(&format!("kill -9 {}; rm -rf {}", child.id(), shell_quote(&path(self.dir.path())))));
        self.child = Some(child);
        let port = self.port;
        wait_until("the private Redis answers PING", Duration::from_secs(10), || redis_ping(port));
    }

    /// Kills it (SIGKILL) and waits for the exit: every connection drops.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_child(&mut child);
        }
        self.reaper = None;
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("redis-{}.log", self.port))).unwrap_or_default()
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A Redis of this test's own that speaks TLS only (`--port 0`): it serves
/// the PEM chain `cert` with `key`, and with `require_client_cert` accepts
/// only clients presenting a certificate signed by `ca`.
pub struct TlsRedis {
    port: u16,
    child: Child,
    dir: tempfile::TempDir,
    _reaper: Reaper,
}

impl TlsRedis {
    pub fn start(cert: &Path, key: &Path, ca: &Path, require_client_cert: bool) -> TlsRedis {
        let dir = tempfile::Builder::new().prefix("herald-redis-tls-").tempdir().expect("a temp dir");
        let port = free_port();
        let child = redis_server(
            port,
            dir.path(),
            &[
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--tls-cert-file",
                &path(cert),
                "--tls-key-file",
                &path(key),
                "--tls-ca-cert-file",
                &path(ca),
                "--tls-auth-clients",
                if require_client_cert { "yes" } else { "no" },
            ],
        );
        let reaper = Reaper::spawn(&format!("kill -9 {}; rm -rf {}", child.id(), shell_quote(&path(dir.path()))));
        let redis = TlsRedis { port, child, dir, _reaper: reaper };
        let addr = format!("127.0.0.1:{port}");
        wait_until("the TLS Redis listens", Duration::from_secs(10), || super::reachable(&addr));
        redis
    }

    /// `rediss://127.0.0.1:<port>` (the test certificates name 127.0.0.1).
    pub fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.port)
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        stop_child(&mut self.child);
    }
}

/// A free port `p` whose Redis Cluster bus port `p + 10000` is free too.
fn free_cluster_port() -> u16 {
    for _ in 0..200 {
        let port = 20_000 + rand::random::<u16>() % 10_000;
        let ok = [port, port + 10_000].iter().all(|p| TcpListener::bind(("127.0.0.1", *p)).is_ok());
        if ok {
            return port;
        }
    }
    panic!("no free port pair for a Redis Cluster node");
}

/// Three Redis Cluster masters on loopback, slots spread by `redis-cli`.
pub struct RedisCluster {
    ports: Vec<u16>,
    children: Vec<Child>,
    _reaper: Reaper,
    dir: tempfile::TempDir,
    /// `redis+cluster` or `rediss+cluster`.
    scheme: &'static str,
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        RedisCluster::start_with(None)
    }

    /// Like [`start`](Self::start), speaking TLS only (clients and the
    /// cluster bus): the PEM chain `cert` with `key`, `ca` for peers.
    pub fn start_tls(cert: &Path, key: &Path, ca: &Path) -> RedisCluster {
        RedisCluster::start_with(Some((cert, key, ca)))
    }

    fn start_with(tls: Option<(&Path, &Path, &Path)>) -> RedisCluster {
        let dir = tempfile::Builder::new().prefix("herald-redis-cluster-").tempdir().expect("a temp dir");
        let mut ports: Vec<u16> = Vec::new();
        while ports.len() < 3 {
            let port = free_cluster_port();
            if !ports.contains(&port) {
                ports.push(port);
            }
        }
        // redis-cli's own TLS flags, and the servers'.
        let cli_tls: Vec<String> = match tls {
            Some((_, _, ca)) => vec!["--tls".into(), "--cacert".into(), path(ca)],
            None => Vec::new(),
        };
        let mut children = Vec::new();
        for port in &ports {
            let node_dir = dir.path().join(port.to_string());
            std::fs::create_dir(&node_dir).unwrap();
            let conf = path(&node_dir.join(format!("nodes-{port}.conf")));
            let mut args: Vec<String> =
                ["--cluster-enabled", "yes", "--cluster-config-file", &conf, "--cluster-node-timeout", "5000"]
                    .map(String::from)
                    .to_vec();
            if let Some((cert, key, ca)) = tls {
                args.extend(["--port".into(), "0".into(), "--tls-port".into(), port.to_string()]);
                args.extend(["--tls-cluster", "yes", "--tls-auth-clients", "no"].map(String::from));
                args.extend(["--tls-cert-file".into(), path(cert), "--tls-key-file".into(), path(key)]);
                args.extend(["--tls-ca-cert-file".into(), path(ca)]);
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            children.push(redis_server(*port, &node_dir, &args));
        }
        let pids: Vec<String> = children.iter().map(|c| c.id().to_string()).collect();
        let reaper = Reaper::spawn(&format!("kill -9 {}; rm -rf {}", pids.join(" "), shell_quote(&path(dir.path()))));
        let scheme = if tls.is_some() { "rediss+cluster" } else { "redis+cluster" };
        let cluster = RedisCluster { ports, children, _reaper: reaper, dir, scheme };
        for port in &cluster.ports {
            let port = *port;
            wait_until("a Redis Cluster node answers PING", Duration::from_secs(10), || {
                let ping = Command::new("redis-cli").args(&cli_tls).args(["-p", &port.to_string(), "ping"]).output();
                ping.map(|o| String::from_utf8_lossy(&o.stdout).contains("PONG")).unwrap_or(false)
            });
        }
        let addrs: Vec<String> = cluster.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        run(Command::new("redis-cli")
            .args(&cli_tls)
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null()));
        for port in &cluster.ports {
            wait_until("the Redis Cluster reports cluster_state:ok", Duration::from_secs(20), || {
                Command::new("redis-cli")
                    .args(&cli_tls)
                    .args(["-p", &port.to_string(), "cluster", "info"])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).contains("cluster_state:ok"))
                    .unwrap_or(false)
            });
        }
        cluster
    }

    pub fn ports(&self) -> &[u16] {
        &self.ports
    }

    /// `redis+cluster://127.0.0.1:A,127.0.0.1:B,127.0.0.1:C` (`rediss+cluster://…` over TLS)
    pub fn url(&self) -> String {
        let addrs: Vec<String> = self.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        format!("{}://{}", self.scheme, addrs.join(","))
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            stop_child(child);
        }
    }
}

/// `redis-cli [<tls…>] -p <port> <args…>`: what it printed (empty if it failed).
fn redis_cli(tls: &[String], port: u16, args: &[&str]) -> String {
    Command::new("redis-cli")
        .args(tls)
        .args(["-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// A Redis master, one replica and three Sentinels watching them (quorum
/// two), all of this test's own, under the master name [`Self::NAME`].
pub struct RedisSentinel {
    /// `[master, replica]` as started; a failover swaps their roles.
    ports: [u16; 2],
    sentinels: [u16; 3],
    /// redis-cli's TLS flags (none without TLS).
    cli_tls: Vec<String>,
    /// `redis+sentinel` or `rediss+sentinel`.
    scheme: &'static str,
    passwords: Option<SentinelPasswords>,
    children: Vec<Child>,
    _reaper: Reaper,
    _dir: tempfile::TempDir,
}

impl RedisSentinel {
    pub const NAME: &'static str = "herald-master";

    pub fn start() -> RedisSentinel {
        RedisSentinel::start_with(None, None)
    }

    /// Like [`start`](Self::start), the master and replica requiring
    /// `passwords.master`, the Sentinels `passwords.sentinel`.
    pub fn start_with_passwords(passwords: SentinelPasswords) -> RedisSentinel {
        RedisSentinel::start_with(None, Some(passwords))
    }

    /// Like [`start`](Self::start), every server and Sentinel speaking TLS
    /// only (to clients and to each other): the PEM chain `cert` with `key`,
    /// `ca` for peers; clients need no certificate.
    pub fn start_tls(cert: &Path, key: &Path, ca: &Path) -> RedisSentinel {
        RedisSentinel::start_with(Some((cert, key, ca)), None)
    }

    fn start_with(tls: Option<(&Path, &Path, &Path)>, passwords: Option<SentinelPasswords>) -> RedisSentinel {
        let dir = tempfile::Builder::new().prefix("herald-redis-sentinel-").tempdir().expect("a temp dir");
        let ports = [free_port(), free_port()];
        let cli_tls: Vec<String> = match tls {
            Some((_, _, ca)) => vec!["--tls".into(), "--cacert".into(), path(ca)],
            None => Vec::new(),
        };
        // The servers' TLS settings: as flags, and as Sentinel configuration lines.
        let tls_settings: Vec<(&str, String)> = match tls {
            Some((cert, key, ca)) => vec![
                ("tls-cert-file", path(cert)),
                ("tls-key-file", path(key)),
                ("tls-ca-cert-file", path(ca)),
                ("tls-auth-clients", "no".into()),
                ("tls-replication", "yes".into()),
            ],
            None => Vec::new(),
        };
        let server = |port: u16, extra: &[&str]| {
            let mut args: Vec<String> = extra.iter().map(|a| a.to_string()).collect();
            if let Some(p) = &passwords {
                // masterauth too: after a failover the old master replicates from the new.
                args.extend(["--requirepass".into(), p.master.into(), "--masterauth".into(), p.master.into()]);
            }
            if tls.is_some() {
                args.extend(["--port".into(), "0".into(), "--tls-port".into(), port.to_string()]);
                for (name, value) in &tls_settings {
                    args.extend([format!("--{name}"), value.clone()]);
                }
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            redis_server(port, dir.path(), &args)
        };
        let data_cli: Vec<String> = match &passwords {
            Some(p) => [cli_tls.clone(), vec!["--no-auth-warning".into(), "-a".into(), p.master.into()]].concat(),
            None => cli_tls.clone(),
        };
        let mut children = vec![server(ports[0], &[])];
        wait_until("the master answers PING", Duration::from_secs(10), || {
            redis_cli(&data_cli, ports[0], &["ping"]).contains("PONG")
        });
        children.push(server(ports[1], &["--replicaof", "127.0.0.1", &ports[0].to_string()]));
        let in_sync = poll_until(Duration::from_secs(20), || {
            redis_cli(&data_cli, ports[1], &["info", "replication"]).contains("master_link_status:up")
        });
        if !in_sync {
            // Not yet anyone's to stop: stop them here, and say why.
            children.iter_mut().for_each(stop_child);
            let log =
                |port: u16| std::fs::read_to_string(dir.path().join(format!("redis-{port}.log"))).unwrap_or_default();
            panic!(
                "the replica is not in sync after 20 s\n--- master ({}) ---\n{}\n--- replica ({}) ---\n{}",
                ports[0],
                log(ports[0]),
                ports[1],
                log(ports[1])
            );
        }
        let sentinels = [free_port(), free_port(), free_port()];
        for port in sentinels {
            // Sentinel rewrites its configuration file: each gets its own.
            let conf = dir.path().join(format!("sentinel-{port}.conf"));
            let mut text = format!(
                "bind 127.0.0.1\ndir {dir}\nsentinel monitor {name} 127.0.0.1 {master} 2\n\
                 sentinel down-after-milliseconds {name} 1000\nsentinel failover-timeout {name} 10000\n",
                dir = path(dir.path()),
                name = Self::NAME,
                master = ports[0],
            );
            match passwords {
                Some(SentinelPasswords { master, sentinel, sentinel_user: None }) => {
                    text.push_str(&format!("sentinel auth-pass {} {master}\nrequirepass {sentinel}\n", Self::NAME));
                }
                Some(SentinelPasswords { master, sentinel, sentinel_user: Some(user) }) => text.push_str(&format!(
                    "sentinel auth-pass {name} {master}\nuser default off\nuser {user} on >{sentinel} ~* &* +@all\n\
                     sentinel sentinel-user {user}\nsentinel sentinel-pass {sentinel}\n",
                    name = Self::NAME
                )),
                None => {}
            }
            match tls {
                None => text.push_str(&format!("port {port}\n")),
                Some(_) => {
                    text.push_str(&format!("port 0\ntls-port {port}\n"));
                    for (name, value) in &tls_settings {
                        text.push_str(&format!("{name} {value}\n"));
                    }
                }
            }
            std::fs::write(&conf, text).unwrap();
            let log = std::fs::File::create(dir.path().join(format!("sentinel-{port}.log"))).unwrap();
            children.push(
                Command::new("redis-server")
                    .arg(&conf)
                    .arg("--sentinel")
                    .stdin(Stdio::null())
                    .stdout(log.try_clone().unwrap())
                    .stderr(log)
                    .spawn()
                    .unwrap_or_else(|e| panic!("cannot start redis-server --sentinel: {e}")),
            );
        }
        let pids: Vec<String> = children.iter().map(|c| c.id().to_string()).collect();
        let reaper = Reaper::spawn(&format!("kill -9 {}; rm -rf {}", pids.join(" "), shell_quote(&path(dir.path()))));
        let scheme = if tls.is_some() { "rediss+sentinel" } else { "redis+sentinel" };
        let redis =
            RedisSentinel { ports, sentinels, cli_tls, scheme, passwords, children, _reaper: reaper, _dir: dir };
        for port in sentinels {
            wait_until("every Sentinel knows the replica and the other Sentinels", Duration::from_secs(30), || {
                let master = redis.cli_any(port, &["sentinel", "master", Self::NAME]);
                let field = |name: &str| {
                    let mut lines = master.lines();
                    lines.find(|l| l.trim() == name).and_then(|_| lines.next()).map(str::trim).map(str::to_string)
                };
                field("num-slaves").as_deref() == Some("1") && field("num-other-sentinels").as_deref() == Some("2")
            });
        }
        redis
    }

    /// `redis+sentinel://127.0.0.1:A,127.0.0.1:B,127.0.0.1:C/<NAME>` (`rediss+sentinel://…` over TLS;
    /// `…://:<master password>@…` with passwords)
    pub fn url(&self) -> String {
        let addrs: Vec<String> = self.sentinels.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let credentials = self.passwords.as_ref().map(|p| format!(":{}@", p.master)).unwrap_or_default();
        format!("{}://{credentials}{}/{}", self.scheme, addrs.join(","), Self::NAME)
    }

    /// `redis-cli` on any of its servers or Sentinels (with its password).
    fn cli_any(&self, port: u16, args: &[&str]) -> String {
        let mut flags = self.cli_tls.clone();
        if let Some(p) = &self.passwords {
            let sentinel = self.sentinels.contains(&port);
            let password = if sentinel { p.sentinel } else { p.master };
            flags.extend(["--no-auth-warning".into(), "-a".into(), password.into()]);
            if let (true, Some(user)) = (sentinel, p.sentinel_user) {
                flags.extend(["--user".into(), user.into()]);
            }
        }
        redis_cli(&flags, port, args)
    }

    /// The port of the server the first Sentinel names as master.
    pub fn master_port(&self) -> u16 {
        let answer = self.cli_any(self.sentinels[0], &["sentinel", "get-master-addr-by-name", Self::NAME]);
        answer.lines().nth(1).and_then(|p| p.trim().parse().ok()).expect("Sentinel names a master")
    }

    /// `redis-cli -p <port> <args…>` on one of the two data servers.
    pub fn cli(&self, port: u16, args: &[&str]) -> String {
        assert!(self.ports.contains(&port), "not one of this Sentinel's servers");
        self.cli_any(port, args)
    }

    /// Has the first Sentinel fail over (`SENTINEL FAILOVER`, the old master
    /// left running), then waits until every Sentinel names the new master
    /// and the old one has been made its replica — the moment Sentinel
    /// closes the old master's clients. Returns the new master's port.
    pub fn fail_over(&self) -> u16 {
        let old = self.master_port();
        let new = *self.ports.iter().find(|p| **p != old).unwrap();
        assert!(self.cli_any(self.sentinels[0], &["sentinel", "failover", Self::NAME]).contains("OK"));
        for port in self.sentinels {
            wait_until("every Sentinel names the new master", Duration::from_secs(30), || {
                self.cli_any(port, &["sentinel", "get-master-addr-by-name", Self::NAME]).contains(&new.to_string())
            });
        }
        wait_until("the old master is a replica of the new one", Duration::from_secs(60), || {
            let info = self.cli_any(old, &["info", "replication"]);
            info.contains("role:slave") && info.contains(&format!("master_port:{new}"))
        });
        new
    }
}

/// What [`RedisSentinel::start_with_passwords`] requires.
#[derive(Clone, Copy)]
pub struct SentinelPasswords {
    pub master: &'static str,
    pub sentinel: &'static str,
    /// `Some`: the Sentinels' `default` user is off and `sentinel` is the
    /// password of this ACL user (the Sentinels use it among themselves too).
    pub sentinel_user: Option<&'static str>,
}

impl RedisSentinel {
    /// Kills the master (SIGKILL) and waits until every Sentinel names the
    /// replica it promotes. Returns the new master's port.
    pub fn kill_master(&mut self) -> u16 {
        let old = self.master_port();
        let at = self.ports.iter().position(|p| *p == old).unwrap();
        stop_child(&mut self.children[at]);
        let new = self.ports[1 - at];
        for port in self.sentinels {
            wait_until("every Sentinel names the promoted replica", Duration::from_secs(30), || {
                self.cli_any(port, &["sentinel", "get-master-addr-by-name", Self::NAME]).contains(&new.to_string())
            });
        }
        new
    }
}

impl Drop for RedisSentinel {
    fn drop(&mut self) {
        for child in &mut self.children {
            stop_child(child);
        }
    }
}
