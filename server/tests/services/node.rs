//! Real `herald` processes, alone or as a [`Cluster`] sharing a database
//! and a Redis.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use herald_client::{Connect, Publisher, Seq, Session};

use super::{delete_prefix, redis_url, unique_prefix, Reaper, TestDatabase};
use crate::common::{API_KEY, SECRET};

/// How long a `herald` process may take to print its `listening` line.
pub const START_DEADLINE: Duration = Duration::from_secs(15);

/// One real `herald` process.
pub struct Node {
    pub name: String,
    child: Child,
    addr: Option<SocketAddr>,
    /// Holds `stdout` and `stderr`; kept when a test fails.
    dir: std::path::PathBuf,
    tmp: Option<tempfile::TempDir>,
    exit: Option<i32>,
    _reaper: Reaper,
}

impl Node {
    /// Starts `herald` with `vars` (on top of a cleared environment with
    /// `PATH` and `HERALD_LISTEN=127.0.0.1:0`) and waits for `listening`.
    pub fn start(name: &str, vars: &[(String, String)]) -> Node {
        let mut node = Node::spawn(name, vars);
        node.wait_listening();
        node
    }

    /// Starts the process without waiting; see [`Node::wait_listening`].
    pub fn spawn(name: &str, vars: &[(String, String)]) -> Node {
        let tmp = tempfile::Builder::new().prefix(&format!("herald-{name}-")).tempdir().expect("a temp dir");
        let dir = tmp.path().to_path_buf();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_herald"));
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HERALD_LISTEN", "127.0.0.1:0")
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.join("stdout")).unwrap())
            .stderr(std::fs::File::create(dir.join("stderr")).unwrap());
        for (k, v) in vars {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn herald");
        let reaper = Reaper::spawn(&format!("kill -9 {}", child.id()));
        Node { name: name.to_string(), child, addr: None, dir, tmp: Some(tmp), exit: None, _reaper: reaper }
    }

    /// Waits (at most [`START_DEADLINE`]) for the `listening … addr=` line
    /// (or its JSON form, `"addr":"…"`).
    pub fn wait_listening(&mut self) {
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            let log = self.log();
            let addr = log.lines().filter(|l| l.contains("listening")).find_map(|l| {
                let text = || l.split("addr=").nth(1)?.split_whitespace().next()?.parse::<SocketAddr>().ok();
                let json = || l.split("\"addr\":\"").nth(1)?.split('"').next()?.parse::<SocketAddr>().ok();
                text().or_else(json)
            });
            if let Some(addr) = addr {
                self.addr = Some(addr);
                return;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("{} exited with {status} before listening:\n{log}", self.name);
            }
            if Instant::now() > deadline {
                panic!("{} did not print `listening` within {START_DEADLINE:?}:\n{log}", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr.expect("the node is listening")
    }

    pub fn http(&self) -> String {
        format!("http://{}", self.addr())
    }

    pub fn ws(&self) -> String {
        format!("ws://{}", self.addr())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn publisher(&self) -> Publisher {
        Publisher::new(self.http(), API_KEY)
    }

    pub fn token(&self, user: &str) -> String {
        herald_server::auth::mint(SECRET, user, 3600)
    }

    /// A session of `user` on this node (`since` when given).
    pub async fn connect(&self, user: &str, since: Option<Seq>) -> Session {
        let mut connect = Connect::new(self.ws(), self.token(user));
        if let Some(since) = since {
            connect = connect.since(since);
        }
        match tokio::time::timeout(Duration::from_secs(15), connect.connect()).await {
            Ok(Ok(session)) => session,
            Ok(Err(e)) => panic!("{user} cannot connect to {}: {e}", self.name),
            Err(_) => panic!("{user}: connecting to {} hung", self.name),
        }
    }

    pub fn sigterm(&self) {
        let status = Command::new("kill").args(["-TERM", &self.pid().to_string()]).status().unwrap();
        assert!(status.success(), "kill -TERM {}", self.name);
    }

    /// SIGKILL, and reap the process.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let status = self.child.wait().expect("wait");
        self.exit = Some(status.code().unwrap_or(-1));
    }

    /// Waits (at most 30 s) for the process to exit; its exit code, or -1
    /// when a signal ended it.
    pub async fn wait_exit(&mut self) -> i32 {
        if let Some(code) = self.exit {
            return code;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let code = status.code().unwrap_or(-1);
                self.exit = Some(code);
                return code;
            }
            assert!(Instant::now() < deadline, "{} did not exit within 30 s:\n{}", self.name, self.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Everything the process wrote to stderr so far (its log).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr")).unwrap_or_default()
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.join("stdout")).unwrap_or_default()
    }

    /// `GET /readyz` status.
    pub async fn ready_status(&self) -> u16 {
        let request = reqwest::Client::new().get(format!("{}/readyz", self.http())).timeout(Duration::from_secs(10));
        request.send().await.map(|r| r.status().as_u16()).unwrap_or(0)
    }
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Drop for Node {
    fn drop(&mut self) {
        if self.exit.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            if let Some(tmp) = self.tmp.take() {
                let _kept = tmp.keep();
            }
            let log = self.log();
            eprintln!(
                "\n===== log of {} (last 200 lines; full log kept in {}) =====\n{}\n===== end of {} =====",
                self.name,
                self.dir.join("stderr").display(),
                tail(&log, 200),
                self.name
            );
        }
    }
}

/// How to start a [`Cluster`].
pub struct ClusterBuilder {
    nodes: usize,
    redis_url: Option<String>,
    postgres_admin: Option<String>,
    env: Vec<(String, String)>,
}

impl ClusterBuilder {
    pub fn nodes(mut self, n: usize) -> Self {
        self.nodes = n;
        self
    }

    /// The Redis to use instead of [`redis_url`].
    pub fn redis(mut self, url: impl Into<String>) -> Self {
        self.redis_url = Some(url.into());
        self
    }

    /// The PostgreSQL server (admin URL) to create the database on, instead
    /// of [`postgres_admin_url`].
    pub fn postgres_admin(mut self, url: impl Into<String>) -> Self {
        self.postgres_admin = Some(url.into());
        self
    }

    /// One more `HERALD_*` variable for every node (overrides defaults).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Creates the database and starts the nodes (in parallel).
    pub fn start(self) -> Cluster {
        let db = match &self.postgres_admin {
            Some(admin) => TestDatabase::create_on(admin),
            None => TestDatabase::create(),
        };
        let redis = self.redis_url.unwrap_or_else(redis_url);
        let prefix = unique_prefix();
        let mut env: Vec<(String, String)> = [
            ("HERALD_JWT_SECRET", SECRET),
            ("HERALD_API_KEYS", API_KEY),
            ("HERALD_DATABASE_URL", &db.url()),
            ("HERALD_REDIS_URL", &redis),
            ("HERALD_REDIS_PREFIX", &prefix),
            ("HERALD_HEARTBEAT_SECS", "5"),
            ("HERALD_DRAIN_GRACE", "1s"),
            ("HERALD_LOG", "info,herald_server=debug"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for (k, v) in self.env {
            env.retain(|(key, _)| *key != k);
            env.push((k, v));
        }
        let mut cluster = Cluster { nodes: Vec::new(), env, prefix, redis_url: redis, db };
        let spawned: Vec<Node> = (0..self.nodes).map(|i| cluster.spawn_node(i)).collect();
        cluster.nodes = spawned;
        for node in &mut cluster.nodes {
            node.wait_listening();
        }
        cluster
    }
}

/// Nodes sharing one fresh database and one Redis (with a prefix of their
/// own). Node `i` runs with `HERALD_NODE_ID=node-<i>`.
pub struct Cluster {
    // Field order is drop order: the nodes go before their database.
    pub nodes: Vec<Node>,
    env: Vec<(String, String)>,
    pub prefix: String,
    pub redis_url: String,
    db: TestDatabase,
}

impl Cluster {
    pub fn build() -> ClusterBuilder {
        ClusterBuilder { nodes: 3, redis_url: None, postgres_admin: None, env: Vec::new() }
    }

    /// `n` nodes on the shared PostgreSQL and Redis.
    pub fn start(n: usize) -> Cluster {
        Cluster::build().nodes(n).start()
    }

    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i]
    }

    pub fn node_mut(&mut self, i: usize) -> &mut Node {
        &mut self.nodes[i]
    }

    pub fn database_url(&self) -> String {
        self.db.url()
    }

    /// The environment every node gets.
    pub fn env(&self) -> &[(String, String)] {
        &self.env
    }

    fn spawn_node(&self, i: usize) -> Node {
        let name = format!("node-{i}");
        let mut env = self.env.clone();
        env.push(("HERALD_NODE_ID".into(), name.clone()));
        Node::spawn(&name, &env)
    }

    /// Starts one more node with the same settings; returns its index.
    pub fn add_node(&mut self) -> usize {
        let i = self.nodes.len();
        let mut node = self.spawn_node(i);
        node.wait_listening();
        self.nodes.push(node);
        i
    }

    /// Every node's log, for a failure message.
    pub fn logs(&self) -> String {
        self.nodes.iter().map(|n| format!("===== {} =====\n{}", n.name, n.log())).collect::<Vec<_>>().join("\n")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // The nodes first (their logs print on failure), then their Redis
        // keys; the database goes with the fields.
        self.nodes.clear();
        delete_prefix(&self.redis_url, &self.prefix);
    }
}
