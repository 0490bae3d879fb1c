//! PostgreSQL for tests: the shared server, a database per test, and a
//! private cluster a test may stop and start.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use super::{
    block_on_thread, free_port, is_root, path, reachable, run, shell_quote, unique_suffix, wait_until, Reaper,
};

/// The admin URL of a PostgreSQL server tests may create databases on.
pub fn postgres_admin_url() -> String {
    static URL: OnceLock<String> = OnceLock::new();
    static PRIVATE: OnceLock<PrivatePostgres> = OnceLock::new();
    URL.get_or_init(|| {
        if let Ok(url) = std::env::var("HERALD_TEST_POSTGRES_URL") {
            if let Err(e) = check_postgres(&url) {
                panic!("HERALD_TEST_POSTGRES_URL={url} does not answer: {e}");
            }
            return url;
        }
        let local = "postgres://postgres@127.0.0.1:5432/postgres";
        if reachable("127.0.0.1:5432") {
            match check_postgres(local) {
                Ok(()) => return local.to_string(),
                Err(e) => eprintln!("PostgreSQL on 127.0.0.1:5432 refuses {local} ({e}); starting a private one"),
            }
        }
        PRIVATE.get_or_init(PrivatePostgres::start).url()
    })
    .clone()
}

fn check_postgres(url: &str) -> Result<(), String> {
    let url = url.to_string();
    block_on_thread(move || async move {
        use sqlx::Connection;
        let connect = sqlx::PgConnection::connect(&url);
        let mut conn = tokio::time::timeout(Duration::from_secs(5), connect)
            .await
            .map_err(|_| "connect timed out".to_string())?
            .map_err(|e| e.to_string())?;
        sqlx::query("SELECT 1").execute(&mut conn).await.map_err(|e| e.to_string())?;
        let _ = conn.close().await;
        Ok(())
    })
}

/// Runs statements on the admin URL, one after another.
pub fn admin_execute(admin_url: &str, statements: Vec<String>) -> Result<(), String> {
    let url = admin_url.to_string();
    block_on_thread(move || async move {
        use sqlx::Connection;
        let work = async {
            let mut conn = sqlx::PgConnection::connect(&url).await.map_err(|e| e.to_string())?;
            for sql in &statements {
                sqlx::query(sql).execute(&mut conn).await.map_err(|e| format!("{sql}: {e}"))?;
            }
            let _ = conn.close().await;
            Ok::<_, String>(())
        };
        tokio::time::timeout(Duration::from_secs(20), work).await.map_err(|_| "timed out".to_string())?
    })
}

/// Drops `herald_test_<pid>_…` databases of test processes that have exited.
fn drop_stale_databases(admin_url: &str) {
    let url = admin_url.to_string();
    let names: Vec<String> = block_on_thread(move || async move {
        use sqlx::Connection;
        let Ok(mut conn) = sqlx::PgConnection::connect(&url).await else { return Vec::new() };
        sqlx::query_scalar("SELECT datname FROM pg_database WHERE datname LIKE 'herald_test_%'")
            .fetch_all(&mut conn)
            .await
            .unwrap_or_default()
    });
    let stale: Vec<String> = names
        .into_iter()
        .filter(|name| {
            let pid = name.trim_start_matches("herald_test_").split('_').next().unwrap_or("");
            !pid.is_empty() && !Path::new("/proc").join(pid).exists()
        })
        .map(|name| format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .collect();
    if !stale.is_empty() {
        let _ = admin_execute(admin_url, stale);
    }
}

/// A database of one test, dropped (`WITH (FORCE)`) when this is dropped.
pub struct TestDatabase {
    admin_url: String,
    name: String,
    url: String,
}

impl TestDatabase {
    /// A new, empty database on the shared server.
    pub fn create() -> TestDatabase {
        TestDatabase::create_on(&postgres_admin_url())
    }

    /// A new, empty database on the server of `admin_url`.
    pub fn create_on(admin_url: &str) -> TestDatabase {
        static CLEANED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
        let first_here = {
            let mut cleaned = CLEANED.lock().unwrap();
            let first = !cleaned.iter().any(|u| u == admin_url);
            if first {
                cleaned.push(admin_url.to_string());
            }
            first
        };
        if first_here {
            drop_stale_databases(admin_url);
        }
        let name = format!("herald_test_{}", unique_suffix());
        admin_execute(admin_url, vec![format!("CREATE DATABASE \"{name}\"")])
            .unwrap_or_else(|e| panic!("cannot create a test database on {admin_url}: {e}"));
        let url = replace_database(admin_url, &name);
        TestDatabase { admin_url: admin_url.to_string(), name, url }
    }

    pub fn url(&self) -> String {
        self.url.clone()
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let _ = admin_execute(&self.admin_url, vec![format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name)]);
    }
}

/// A new database on the shared server; it outlives the test (its name,
/// `herald_test_<pid>_…`, lets a later run drop it). Prefer [`TestDatabase`].
pub fn fresh_database() -> String {
    let db = TestDatabase::create();
    let url = db.url();
    std::mem::forget(db);
    url
}

/// `postgres://u@h:p/old?x` → `postgres://u@h:p/<name>?x`.
fn replace_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let authority_start = base.find("://").map(|i| i + 3).unwrap_or(0);
    let path_start = base[authority_start..].find('/').map(|i| i + authority_start).unwrap_or(base.len());
    let mut out = format!("{}/{name}", &base[..path_start]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// The directory of the newest installed PostgreSQL's binaries.
fn postgres_bin_dir() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return bin;
    }
    let from_path = Command::new("pg_config").arg("--bindir").output().ok().filter(|o| o.status.success());
    match from_path {
        Some(out) => PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()),
        None => panic!("PostgreSQL is not installed: no /usr/lib/postgresql/*/bin/initdb and no pg_config"),
    }
}

/// A PostgreSQL cluster of this test's own, on a free loopback port, with
/// trust authentication. It can be stopped and started again (same port,
/// same data) to simulate an outage.
pub struct PrivatePostgres {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    as_postgres: bool,
    /// `-c name=value` settings beyond the defaults below.
    settings: Vec<String>,
    /// The data directory (on the small disk, when there is one).
    data: PathBuf,
    disk: Option<SmallDisk>,
    _reaper: Reaper,
}

/// A tmpfs of a few MiB in a mount namespace of its own, held open by a
/// `sleep` (`unshare --user --mount`, as for the SQLite full-disk test in
/// binary.rs: root is not needed). PostgreSQL's programs run there in a
/// user namespace nested in it, as `nobody` (uid 65534, which is the user
/// running the tests outside), since initdb and postgres refuse to run as
/// root.
struct SmallDisk {
    holder: Child,
    /// The mount point, as a path inside the namespace.
    mount: PathBuf,
}

impl SmallDisk {
    const SCRIPT: &'static str =
        r#"mount -t tmpfs -o "size=$2m" herald-pg-disk "$1" && touch "$1/.mounted" && exec sleep 86400"#;

    fn mount(mount: PathBuf, mib: u32) -> SmallDisk {
        std::fs::create_dir_all(&mount).expect("the mount point");
        let holder = Command::new("unshare")
            .args(["--user", "--map-root-user", "--mount", "--propagation", "private", "sh", "-c", Self::SCRIPT, "sh"])
            .arg(&mount)
            .arg(mib.to_string())
            .stdin(Stdio::null())
            .spawn()
            .expect("unshare runs (util-linux)");
        let disk = SmallDisk { holder, mount };
        wait_until("the small disk is mounted", Duration::from_secs(10), || disk.outside().join(".mounted").exists());
        disk
    }

    /// The mount point as this process reaches it.
    fn outside(&self) -> PathBuf {
        Path::new("/proc").join(self.holder.id().to_string()).join("root").join(self.mount.strip_prefix("/").unwrap())
    }

    /// `program` run as `nobody` in the disk's namespaces.
    fn command(&self, program: &Path) -> Command {
        let mut c = Command::new("nsenter");
        c.args(["--target", &self.holder.id().to_string(), "--user", "--mount", "--preserve-credentials", "--"]);
        c.args(["unshare", "--user", "--map-user=65534", "--map-group=65534", "--"]).arg(program);
        c
    }
}

impl PrivatePostgres {
    pub fn start() -> PrivatePostgres {
        PrivatePostgres::start_with(None)
    }

    /// A cluster whose data directory, WAL included, lies on a disk of
    /// `mib` MiB (a tmpfs) that [`disk`](Self::disk) reaches, so a test can
    /// fill it; initialised, then started. WAL segments are not recycled
    /// and checkpoints are rare, so a new segment is a new file: once the
    /// disk is full, the next segment cannot be made. (`fsync=off`, as for
    /// every private cluster, changes nothing here: a write that finds no
    /// free block fails whether it is synced or not.)
    pub fn start_on_small_disk(mib: u32) -> PrivatePostgres {
        let dir = tempfile::Builder::new().prefix("herald-pg-").tempdir().expect("a temp dir");
        let disk = SmallDisk::mount(dir.path().join("disk"), mib);
        let settings = ["wal_recycle=off", "min_wal_size=32MB", "max_wal_size=64MB", "checkpoint_timeout=1h"];
        let pg = PrivatePostgres::init(dir, false, Some(disk), settings.iter().map(|s| s.to_string()).collect());
        pg.start_again();
        pg
    }

    /// The small disk's mount point, as this process reaches it; `None` for
    /// a cluster on the test machine's own disk.
    pub fn disk(&self) -> Option<PathBuf> {
        self.disk.as_ref().map(SmallDisk::outside)
    }

    /// Whether the server runs (`pg_ctl status`).
    pub fn is_running(&self) -> bool {
        self.command("pg_ctl").args(["status", "-D", &self.data()]).stdout(Stdio::null()).status().unwrap().success()
    }

    /// Like [`start`](Self::start), also offering TLS (`ssl=on`) with the
    /// PEM chain `cert` and its `key`; clients may still connect without.
    pub fn start_with_tls(cert: &Path, key: &Path) -> PrivatePostgres {
        PrivatePostgres::start_with(Some((cert, key)))
    }

    fn start_with(tls: Option<(&Path, &Path)>) -> PrivatePostgres {
        let dir = tempfile::Builder::new().prefix("herald-pg-").tempdir().expect("a temp dir");
        let as_postgres = is_root();
        if as_postgres {
            // initdb and postgres refuse to run as root.
            run(Command::new("chown").arg("postgres:").arg(dir.path()));
        }
        let mut pg = PrivatePostgres::init(dir, as_postgres, None, Vec::new());
        if let Some((cert, key)) = tls {
            pg.serve_tls(cert, key);
        }
        pg.start_again();
        pg
    }

    /// A cluster initialised in `dir` (or on `disk`), on a free port, not
    /// started; its reaper stops it and removes `dir` if the test process
    /// dies without dropping it.
    fn init(
        dir: tempfile::TempDir,
        as_postgres: bool,
        disk: Option<SmallDisk>,
        settings: Vec<String>,
    ) -> PrivatePostgres {
        let bin = postgres_bin_dir();
        let data = disk.as_ref().map_or_else(|| dir.path().join("data"), |d| d.mount.join("data"));
        let mut stop = postgres_command(&bin, "pg_ctl", as_postgres, disk.as_ref());
        stop.args(["stop", "-m", "immediate", "-D"]).arg(&data);
        let holder = disk.as_ref().map(|d| format!("kill {}; ", d.holder.id())).unwrap_or_default();
        let cleanup = format!("{}; {holder}rm -rf {}", command_line(&stop), shell_quote(&path(dir.path())));
        let pg = PrivatePostgres {
            _reaper: Reaper::spawn(&cleanup),
            bin,
            dir,
            port: free_port(),
            as_postgres,
            settings,
            data,
            disk,
        };
        pg.tool("initdb", &["-D", &pg.data(), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"]);
        pg
    }

    /// Copies the pair where the server may read it (PostgreSQL wants the key
    /// owned by its user and private) and turns `ssl` on.
    fn serve_tls(&mut self, cert: &Path, key: &Path) {
        use std::os::unix::fs::PermissionsExt;
        let (cert_copy, key_copy) = (self.dir.path().join("server.crt"), self.dir.path().join("server.key"));
        std::fs::copy(cert, &cert_copy).expect("copy the certificate");
        std::fs::copy(key, &key_copy).expect("copy the key");
        std::fs::set_permissions(&key_copy, std::fs::Permissions::from_mode(0o600)).expect("chmod the key");
        if self.as_postgres {
            run(Command::new("chown").arg("postgres:").arg(&cert_copy).arg(&key_copy));
        }
        self.settings.extend([
            "ssl=on".to_string(),
            format!("ssl_cert_file={}", path(&cert_copy)),
            format!("ssl_key_file={}", path(&key_copy)),
        ]);
    }

    fn data(&self) -> String {
        path(&self.data)
    }

    fn command(&self, name: &str) -> Command {
        let mut cmd = postgres_command(&self.bin, name, self.as_postgres, self.disk.as_ref());
        cmd.current_dir(self.dir.path()).stdin(Stdio::null());
        cmd
    }

    fn tool(&self, name: &str, args: &[&str]) -> String {
        run(self.command(name).args(args))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The admin URL (`postgres` database, superuser `postgres`).
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts the server (again) on the same port and data, waiting until it
    /// accepts connections.
    pub fn start_again(&self) {
        let mut options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c fsync=off -c max_connections=200",
            self.port,
            path(self.dir.path())
        );
        for setting in &self.settings {
            options.push_str(&format!(" -c {setting}"));
        }
        let log = path(&self.dir.path().join("postgres.log"));
        self.tool("pg_ctl", &["start", "-w", "-t", "60", "-D", &self.data(), "-l", &log, "-o", &options]);
        wait_until("the private PostgreSQL accepts connections", Duration::from_secs(30), || {
            check_postgres(&self.url()).is_ok()
        });
    }

    /// Stops the server (`-m fast`: sessions are disconnected at once).
    pub fn stop(&self) {
        self.tool("pg_ctl", &["stop", "-w", "-m", "fast", "-D", &self.data()]);
    }

    /// The server's own log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let args = ["stop", "-w", "-m", "immediate", "-D", &self.data()];
        let _ = self.command("pg_ctl").args(args).stdout(Stdio::null()).stderr(Stdio::null()).status();
        if let Some(disk) = &mut self.disk {
            let _ = disk.holder.kill();
            let _ = disk.holder.wait();
        }
    }
}

/// PostgreSQL's program `name`, run as the user a cluster belongs to:
/// `postgres` when the tests run as root, else the tests' user, or `nobody`
/// in a small disk's namespaces.
fn postgres_command(bin: &Path, name: &str, as_postgres: bool, disk: Option<&SmallDisk>) -> Command {
    let program = bin.join(name);
    match disk {
        Some(disk) => disk.command(&program),
        None if as_postgres => {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&program);
            c
        }
        None => Command::new(&program),
    }
}

/// `cmd` as one shell line, each word quoted.
fn command_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| shell_quote(&a.to_string_lossy()))
        .collect::<Vec<_>>()
        .join(" ")
}
