//! Settings (spec §1): every key from a `HERALD_*` variable or a TOML file,
//! parsed and validated before anything binds.
//!
//! Precedence: environment variable, then the `--config` file (keys in lower
//! case without the prefix), then the default. An error names the variable
//! (and the file key when the value came from the file).
//!
//! The environment is read through [`Env`], so tests pass a map instead of
//! calling `set_var`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;

use crate::auth::{ApiKeyGrant, Scopes};
use crate::broker::redis::{RedisTarget, RedisTls};
use crate::capacity::Cap;
use crate::limit::{LimitSettings, Rate};
use crate::tls::TlsFiles;
use rand::Rng;
use rustls_pki_types::CertificateDer;

/// Where settings come from; [`ProcessEnv`] in production, a map in tests.
pub trait Env {
    fn get(&self, key: &str) -> Option<String>;
}

pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn get(&self, key: &str) -> Option<String> {
        std::env::var(key).ok()
    }
}

impl Env for HashMap<String, String> {
    fn get(&self, key: &str) -> Option<String> {
        HashMap::get(self, key).cloned()
    }
}

impl Env for HashMap<&str, &str> {
    fn get(&self, key: &str) -> Option<String> {
        HashMap::get(self, key).map(|v| v.to_string())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{name}: {message}")]
pub struct ConfigError {
    /// The variable, and the file key when the value came from the file.
    pub name: String,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Default)]
pub struct JwtSettings {
    pub secret: Option<String>,
    pub public_keys: Option<PathBuf>,
    /// An identity provider's JWKS endpoint (instead of `public_keys`).
    pub jwks_url: Option<String>,
    /// How often the JWKS is fetched again.
    pub jwks_refresh: Duration,
    /// CA certificates the JWKS endpoint's certificate must chain to, instead
    /// of the built-in web PKI roots (empty: the built-in roots).
    pub jwks_ca: Vec<CertificateDer<'static>>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    /// Clock skew allowed on `exp` / `nbf`.
    pub leeway_secs: u64,
}

impl std::fmt::Debug for JwtSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtSettings")
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("public_keys", &self.public_keys)
            .field("jwks_url", &self.jwks_url.as_deref().map(redact_url))
            .field("jwks_refresh", &self.jwks_refresh)
            .field("jwks_ca", &format_args!("<{} certificates>", self.jwks_ca.len()))
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("leeway_secs", &self.leeway_secs)
            .finish()
    }
}

/// Everything a node needs, validated.
#[derive(Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub database_url: String,
    pub redis_url: Option<String>,
    /// CA and client certificate for `rediss://` (empty: built-in roots).
    pub redis_tls: RedisTls,
    /// For Sentinels that require a password (`redis+sentinel://`).
    pub redis_sentinel_password: Option<String>,
    /// The Sentinels' ACL user (with `redis_sentinel_password`).
    pub redis_sentinel_username: Option<String>,
    pub jwt: JwtSettings,
    /// `HERALD_API_KEYS` (every scope), then `HERALD_API_KEYS_PUBLISH`,
    /// `_READ`, `_ERASE` and `_DISCONNECT` (one scope each).
    pub api_keys: Vec<ApiKeyGrant>,
    /// `None`: any Origin may open a WebSocket.
    pub allowed_origins: Option<Vec<String>>,
    pub node_id: String,
    pub log: String,
    pub log_format: LogFormat,
    pub heartbeat_secs: u64,
    /// How long notifications are kept.
    pub retention: Duration,
    pub purge_interval: Duration,
    /// How long a shutdown may take before the process exits anyway.
    pub shutdown_deadline: Duration,
    /// How long a draining node keeps answering (503 `draining`, not ready)
    /// before it stops accepting connections.
    pub drain_grace: Duration,
    /// Largest client frame, in bytes (close 1009 above it).
    pub max_frame_bytes: usize,
    /// Largest notification payload, in bytes (413 above it).
    pub max_payload_bytes: usize,
    /// Most user ids one synchronous publish may name; more become a job (202).
    pub max_user_ids: usize,
    /// Most user ids one publish may name at all (a job).
    pub max_audience: usize,
    /// Worker threads for heavy steps, and concurrent jobs per node.
    pub workers: usize,
    /// How long a worker holds a job or digest window without renewing it
    /// before another node's worker may take it over.
    pub job_lease: Duration,
    /// Frames queued for one session before it is closed with 1013.
    pub outbox_capacity: usize,
    /// Connections in the store's pool.
    pub db_pool_size: u32,
    /// Page cache of the SQLite writer's connection, in MiB.
    pub sqlite_cache_mib: u32,
    /// Longest a database statement may run.
    pub db_statement_timeout: Duration,
    /// Longest a request waits for a database connection.
    pub db_connect_timeout: Duration,
    /// Namespace of this deployment's Redis channels and keys.
    pub redis_prefix: String,
    /// How often a node compares its users' newest seqs with the store, to
    /// deliver what the broker lost (only with Redis).
    pub repair_interval: Duration,
    /// How long a node's presence counts outlive its last refresh (a dead
    /// node's sessions stop counting after this).
    pub presence_ttl: Duration,
    /// Serve https and wss with these files; `None`: plain http and ws.
    pub tls: Option<TlsFiles>,
    /// Set when no key was configured: keys were generated at start.
    pub dev_mode: bool,
    /// Abuse limits (see [`crate::limit`]).
    pub limits: LimitSettings,
    /// Longest a client may take to send a request's headers (slowloris);
    /// the connection is closed after it.
    pub header_timeout: Duration,
    /// Longest a client may take to send a JSON request body once its
    /// headers are in (408 after it).
    pub body_timeout: Duration,
    /// Largest request head (request line and headers), in bytes (431 above it).
    pub max_header_bytes: usize,
    /// Client connections held at once (see [`crate::capacity`]).
    pub max_connections: Cap,
    /// WebSocket sessions open at once (see [`crate::capacity`]).
    pub max_sessions: Cap,
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`: export traces there (OTLP over HTTP).
    pub otel_endpoint: Option<String>,
}

impl Settings {
    /// `https` when the node serves TLS itself, else `http`.
    pub fn http_scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// The first configured API key that grants `scope` (for the CLI's
    /// client commands).
    pub fn api_key_for(&self, scope: Scopes) -> Option<&str> {
        self.api_keys.iter().find(|g| g.scopes.any_of(scope)).map(|g| g.key.as_str())
    }
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("listen", &self.listen)
            .field("database_url", &redact_url(&self.database_url))
            .field("redis_url", &self.redis_url.as_deref().map(redact_url))
            .field("redis_tls", &self.redis_tls)
            .field("redis_sentinel_password", &self.redis_sentinel_password.as_ref().map(|_| "<redacted>"))
            .field("redis_sentinel_username", &self.redis_sentinel_username)
            .field("jwt", &self.jwt)
            .field("api_keys", &format_args!("<{} redacted>", self.api_keys.len()))
            .field("allowed_origins", &self.allowed_origins)
            .field("node_id", &self.node_id)
            .field("tls", &self.tls)
            .field("dev_mode", &self.dev_mode)
            .finish_non_exhaustive()
    }
}

/// `postgres://user:secret@host/db` → `postgres://user:***@host/db`.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.find(':') {
                Some(colon) => format!("{}{}:***{}", &url[..scheme + 3], &creds[..colon], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// One source of raw values: environment first, then the file.
struct Source<'a> {
    env: &'a dyn Env,
    file: HashMap<String, String>,
    file_name: Option<String>,
}

impl Source<'_> {
    /// The raw value of `key` (lower-case file key), with the name to report.
    fn raw(&self, key: &str) -> Option<(String, String)> {
        let var = env_name(key);
        if let Some(v) = self.env.get(&var) {
            return Some((v, var));
        }
        self.file.get(key).map(|v| {
            let file = self.file_name.as_deref().unwrap_or("config file");
            (v.clone(), format!("{var} (key `{key}` in {file})"))
        })
    }

    fn string(&self, key: &str) -> Option<String> {
        self.raw(key).map(|(v, _)| v).filter(|v| !v.is_empty())
    }

    fn parse<T>(&self, key: &str, default: T, parse: impl Fn(&str) -> Result<T, String>) -> Result<T, ConfigError> {
        match self.raw(key) {
            None => Ok(default),
            Some((v, _)) if v.is_empty() => Ok(default),
            Some((v, name)) => parse(v.trim()).map_err(|message| ConfigError { name, message }),
        }
    }

    fn number<T: std::str::FromStr + PartialOrd + std::fmt::Display>(
        &self,
        key: &str,
        default: T,
        min: T,
    ) -> Result<T, ConfigError> {
        self.parse(key, default, |v| match v.parse::<T>() {
            Ok(n) if n >= min => Ok(n),
            Ok(_) => Err(format!("must be at least {min}")),
            Err(_) => Err(format!("`{v}` is not a whole number")),
        })
    }

    fn duration(&self, key: &str, default: Duration) -> Result<Duration, ConfigError> {
        self.parse(key, default, |v| {
            humantime::parse_duration(v).map_err(|e| format!("`{v}` is not a duration like 30s, 5m or 30d ({e})"))
        })
    }

    /// A [`Rate`] like `100/s`, or `off`.
    fn rate(&self, key: &str, default: &str) -> Result<Option<Rate>, ConfigError> {
        let default = Rate::parse(default).expect("defaults parse");
        self.parse(key, default, Rate::parse)
    }

    /// A cap: a whole number of at least 1, or `off`.
    fn cap(&self, key: &str, default: usize) -> Result<Option<usize>, ConfigError> {
        self.parse(key, Some(default), |v| match v {
            "off" | "0" => Ok(None),
            v => v.parse::<usize>().map(Some).map_err(|_| format!("`{v}` is not a whole number (or `off`)")),
        })
    }

    /// A certificate file and its key file: both or neither.
    fn cert_and_key(&self, cert: &str, key: &str) -> Result<Option<(PathBuf, PathBuf)>, ConfigError> {
        match (self.string(cert), self.string(key)) {
            (None, None) => Ok(None),
            (Some(c), Some(k)) => Ok(Some((c.into(), k.into()))),
            (Some(_), None) => Err(self.error(key, format!("{} is set: give the private key too", env_name(cert)))),
            (None, Some(_)) => Err(self.error(cert, format!("{} is set: give the certificate too", env_name(key)))),
        }
    }

    fn list(&self, key: &str) -> Option<Vec<String>> {
        self.string(key).map(|v| v.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect())
    }

    fn error(&self, key: &str, message: impl Into<String>) -> ConfigError {
        let name = self.raw(key).map(|(_, n)| n).unwrap_or_else(|| env_name(key));
        ConfigError { name, message: message.into() }
    }
}

fn env_name(key: &str) -> String {
    if key.starts_with("otel_") {
        key.to_uppercase()
    } else {
        format!("HERALD_{}", key.to_uppercase())
    }
}

/// Every key a file may set (and, upper-cased with `HERALD_`, every variable).
const KEYS: &[&str] = &[
    "listen",
    "database_url",
    "redis_url",
    "redis_tls_ca",
    "redis_tls_cert",
    "redis_tls_key",
    "redis_sentinel_password",
    "redis_sentinel_username",
    "jwt_secret",
    "jwt_public_keys",
    "jwt_jwks_url",
    "jwt_jwks_refresh",
    "jwt_jwks_ca",
    "jwt_issuer",
    "jwt_audience",
    "jwt_leeway_secs",
    "api_keys",
    "api_keys_publish",
    "api_keys_read",
    "api_keys_erase",
    "api_keys_disconnect",
    "allowed_origins",
    "node_id",
    "tls_cert",
    "tls_key",
    "tls_reload_interval",
    "log",
    "log_format",
    "heartbeat_secs",
    "retention",
    "purge_interval",
    "shutdown_deadline",
    "drain_grace",
    "max_frame_bytes",
    "max_payload_bytes",
    "max_user_ids",
    "max_audience",
    "workers",
    "job_lease",
    "outbox_capacity",
    "db_pool_size",
    "sqlite_cache_mib",
    "db_statement_timeout",
    "db_connect_timeout",
    "redis_prefix",
    "repair_interval",
    "presence_ttl",
    "limit_handshakes_per_ip",
    "limit_sessions_per_ip",
    "limit_sessions_per_user",
    "limit_frames_per_session",
    "limit_publishes_per_key",
    "trusted_proxies",
    "header_timeout",
    "body_timeout",
    "max_header_bytes",
    "max_connections",
    "max_sessions",
    "otel_exporter_otlp_endpoint",
];

fn read_file(path: &Path) -> Result<HashMap<String, String>, ConfigError> {
    let name = format!("--config {}", path.display());
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError { name: name.clone(), message: format!("cannot read the file: {e}") })?;
    let table: toml::Table =
        text.parse().map_err(|e| ConfigError { name: name.clone(), message: format!("not valid TOML: {e}") })?;
    let mut out = HashMap::new();
    for (key, value) in table {
        if !KEYS.contains(&key.as_str()) {
            return Err(ConfigError { name, message: format!("unknown key `{key}`") });
        }
        let text = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            toml::Value::Array(items) => {
                let mut parts = Vec::new();
                for item in items {
                    match item {
                        toml::Value::String(s) => parts.push(s),
                        other => parts.push(other.to_string()),
                    }
                }
                parts.join(",")
            }
            other => {
                return Err(ConfigError { name, message: format!("key `{key}` has an unsupported value {other}") })
            }
        };
        out.insert(key, text);
    }
    Ok(out)
}

fn random_token(bytes: usize) -> String {
    let mut rng = rand::rng();
    (0..bytes).map(|_| format!("{:02x}", rng.random::<u8>())).collect()
}

fn default_node_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "herald".into());
    format!("{host}-{}", random_token(3))
}

/// Reads the certificates a `rediss://` URL may use (`target`: the parsed
/// `HERALD_REDIS_URL`); they are refused with any other URL, where they
/// would be ignored.
fn redis_tls(src: &Source, target: Option<&RedisTarget>) -> Result<RedisTls, ConfigError> {
    let ca = src.string("redis_tls_ca").map(PathBuf::from);
    let client = src.cert_and_key("redis_tls_cert", "redis_tls_key")?;
    if ca.is_none() && client.is_none() {
        return Ok(RedisTls::default());
    }
    let set = if ca.is_some() { "redis_tls_ca" } else { "redis_tls_cert" };
    if !target.is_some_and(|t| t.is_tls()) {
        return Err(src.error(set, "applies to TLS connections only: HERALD_REDIS_URL must be rediss://"));
    }
    let mut tls = RedisTls::default();
    if let Some(ca) = &ca {
        tls = tls.with_ca(ca).map_err(|e| src.error("redis_tls_ca", e))?;
    }
    if let Some((cert, key)) = &client {
        tls = tls.with_client(cert, key).map_err(|e| src.error("redis_tls_cert", e))?;
    }
    Ok(tls)
}

/// A JWKS endpoint must be `https://`, except on a loopback host (a local
/// provider, tests), where `http://` will do: keys fetched in the clear
/// could be swapped on the way.
fn check_jwks_url(url: &str) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("not a URL: {e}"))?;
    let host = parsed.host_str().unwrap_or_default().trim_start_matches('[').trim_end_matches(']');
    let loopback = host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    match parsed.scheme() {
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        "http" => Err("must be https:// (http:// only on a loopback host)".into()),
        other => Err(format!("must be https://, not {other}://")),
    }
}

impl Settings {
    /// Reads and validates every setting. Nothing is bound or opened here
    /// except the files settings point at (key files), which are parsed.
    pub fn load(env: &dyn Env, config_file: Option<&Path>) -> Result<Settings, ConfigError> {
        let file = match config_file {
            Some(path) => read_file(path)?,
            None => HashMap::new(),
        };
        let src = Source { env, file, file_name: config_file.map(|p| p.display().to_string()) };

        let listen = src.parse("listen", SocketAddr::from(([127, 0, 0, 1], 8080)), |v| {
            v.parse().map_err(|_| format!("`{v}` is not an address like 127.0.0.1:8080"))
        })?;
        let database_url = src.string("database_url").unwrap_or_else(|| "sqlite://herald.db".into());
        let postgres = crate::store::is_postgres(&database_url);
        if !postgres && !database_url.starts_with("sqlite:") {
            return Err(src.error("database_url", "expected sqlite://FILE or postgres://USER@HOST/DB"));
        }
        if database_url.contains(":memory:") || database_url.contains("mode=memory") {
            return Err(src.error("database_url", "an in-memory SQLite database loses every notification; give a file"));
        }
        let redis_url = src.string("redis_url");
        let redis_target = match &redis_url {
            Some(url) => Some(RedisTarget::parse(url).map_err(|e| src.error("redis_url", e))?),
            None => None,
        };
        let redis_tls = redis_tls(&src, redis_target.as_ref())?;
        let redis_sentinel_password = src.string("redis_sentinel_password");
        let redis_sentinel_username = src.string("redis_sentinel_username");
        for (key, value) in [
            ("redis_sentinel_password", &redis_sentinel_password),
            ("redis_sentinel_username", &redis_sentinel_username),
        ] {
            if value.is_some() && !redis_target.as_ref().is_some_and(RedisTarget::is_sentinel) {
                return Err(src.error(key, "applies to Sentinels only: HERALD_REDIS_URL must be redis+sentinel://"));
            }
        }
        if redis_sentinel_username.is_some() && redis_sentinel_password.is_none() {
            return Err(src.error(
                "redis_sentinel_username",
                "an ACL user needs its password: set HERALD_REDIS_SENTINEL_PASSWORD too",
            ));
        }
        let tls = match src.cert_and_key("tls_cert", "tls_key")? {
            None => None,
            Some((cert, key)) => {
                let reload_every = src.duration("tls_reload_interval", Duration::from_secs(60))?;
                if reload_every < Duration::from_millis(100) {
                    return Err(src.error("tls_reload_interval", "must be at least 100ms"));
                }
                let files = TlsFiles { cert, key, reload_every };
                files.load().map_err(|e| src.error("tls_cert", e))?;
                Some(files)
            }
        };

        let mut jwt = JwtSettings {
            secret: src.string("jwt_secret"),
            public_keys: src.string("jwt_public_keys").map(PathBuf::from),
            jwks_url: src.string("jwt_jwks_url"),
            jwks_refresh: src.duration("jwt_jwks_refresh", Duration::from_secs(300))?,
            jwks_ca: Vec::new(),
            issuer: src.string("jwt_issuer"),
            audience: src.string("jwt_audience"),
            leeway_secs: src.number("jwt_leeway_secs", 0u64, 0)?,
        };
        let mut api_keys: Vec<ApiKeyGrant> = [
            ("api_keys", Scopes::ALL),
            ("api_keys_publish", Scopes::PUBLISH),
            ("api_keys_read", Scopes::READ),
            ("api_keys_erase", Scopes::ERASE),
            ("api_keys_disconnect", Scopes::DISCONNECT),
        ]
        .into_iter()
        .flat_map(|(key, scopes)| {
            src.list(key).unwrap_or_default().into_iter().map(move |key| ApiKeyGrant { key, scopes })
        })
        .collect();
        let dev_mode =
            jwt.secret.is_none() && jwt.public_keys.is_none() && jwt.jwks_url.is_none() && api_keys.is_empty();
        if dev_mode {
            if !listen.ip().is_loopback() {
                return Err(src.error(
                    "listen",
                    format!(
                        "dev mode (no HERALD_JWT_SECRET, HERALD_JWT_PUBLIC_KEYS, HERALD_JWT_JWKS_URL or HERALD_API_KEYS*) listens only on loopback, not {}",
                        listen.ip()
                    ),
                ));
            }
            jwt.secret = Some(random_token(32));
            api_keys.push(ApiKeyGrant { key: format!("dev-{}", random_token(16)), scopes: Scopes::ALL });
        }
        if let Some(secret) = &jwt.secret {
            if secret.len() < 16 {
                return Err(src.error("jwt_secret", "must be at least 16 bytes"));
            }
        }
        if let Some(path) = &jwt.public_keys {
            crate::auth::KeySet::load(path).map_err(|e| src.error("jwt_public_keys", e.to_string()))?;
        }
        if let Some(url) = &jwt.jwks_url {
            if jwt.public_keys.is_some() {
                return Err(src.error("jwt_jwks_url", "give HERALD_JWT_PUBLIC_KEYS or HERALD_JWT_JWKS_URL, not both"));
            }
            check_jwks_url(url).map_err(|e| src.error("jwt_jwks_url", e))?;
        }
        if let Some(ca) = src.string("jwt_jwks_ca") {
            if !jwt.jwks_url.as_deref().is_some_and(crate::auth::jwks::is_https) {
                return Err(src.error("jwt_jwks_ca", "applies to an https:// HERALD_JWT_JWKS_URL only"));
            }
            jwt.jwks_ca = crate::tls::read_certificates(Path::new(&ca)).map_err(|e| src.error("jwt_jwks_ca", e))?;
        }
        if jwt.jwks_refresh < Duration::from_secs(1) {
            return Err(src.error("jwt_jwks_refresh", "must be at least 1s"));
        }

        let log_format = src.parse("log_format", LogFormat::Text, |v| match v {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(format!("`{v}` is neither `text` nor `json`")),
        })?;

        let log = src.string("log").unwrap_or_else(|| "info".into());
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&log) {
            return Err(src.error("log", format!("not a tracing filter: {e}")));
        }

        let settings = Settings {
            listen,
            database_url,
            redis_url,
            redis_tls,
            redis_sentinel_password,
            redis_sentinel_username,
            jwt,
            api_keys,
            allowed_origins: src.list("allowed_origins"),
            node_id: src.string("node_id").unwrap_or_else(default_node_id),
            log,
            log_format,
            heartbeat_secs: src.number("heartbeat_secs", 25u64, 1)?,
            retention: src.duration("retention", Duration::from_secs(30 * 24 * 3600))?,
            purge_interval: src.duration("purge_interval", Duration::from_secs(3600))?,
            shutdown_deadline: src.duration("shutdown_deadline", Duration::from_secs(25))?,
            drain_grace: src.duration("drain_grace", Duration::from_secs(1))?,
            max_frame_bytes: src.number("max_frame_bytes", 64 * 1024usize, 1024)?,
            max_payload_bytes: src.number("max_payload_bytes", 64 * 1024usize, 2)?,
            max_user_ids: src.number("max_user_ids", 1000usize, 1)?,
            max_audience: src.number("max_audience", 100_000usize, 1)?,
            workers: src.number("workers", std::thread::available_parallelism().map_or(2, |n| n.get()), 1)?,
            job_lease: src.duration("job_lease", Duration::from_secs(30))?,
            outbox_capacity: src.number("outbox_capacity", 1024usize, 1)?,
            db_pool_size: src.number("db_pool_size", if postgres { 16u32 } else { 8 }, 1)?,
            sqlite_cache_mib: src.number("sqlite_cache_mib", 64u32, 1)?,
            db_statement_timeout: src.duration("db_statement_timeout", Duration::from_secs(5))?,
            db_connect_timeout: src.duration("db_connect_timeout", Duration::from_secs(5))?,
            redis_prefix: src.string("redis_prefix").unwrap_or_else(|| "herald".into()),
            repair_interval: src.duration("repair_interval", Duration::from_secs(3))?,
            presence_ttl: src.duration("presence_ttl", Duration::from_secs(30))?,
            tls,
            dev_mode,
            limits: LimitSettings {
                handshakes_per_ip: src.rate("limit_handshakes_per_ip", "100/s")?,
                sessions_per_ip: src.cap("limit_sessions_per_ip", 1000)?,
                sessions_per_user: src.cap("limit_sessions_per_user", 100)?,
                frames_per_session: src.rate("limit_frames_per_session", "50/s")?,
                publishes_per_key: src.rate("limit_publishes_per_key", "off")?,
                trusted_proxies: src.parse("trusted_proxies", Vec::new(), |v| {
                    v.split(',')
                        .map(str::trim)
                        .filter(|p| !p.is_empty())
                        .map(|p| {
                            p.parse::<IpNet>()
                                .or_else(|_| p.parse::<std::net::IpAddr>().map(IpNet::from))
                                .map_err(|_| format!("`{p}` is not an IP address or a network like 10.0.0.0/8"))
                        })
                        .collect()
                })?,
            },
            header_timeout: src.duration("header_timeout", Duration::from_secs(10))?,
            body_timeout: src.duration("body_timeout", Duration::from_secs(30))?,
            max_header_bytes: src.number("max_header_bytes", 16 * 1024usize, 8 * 1024)?,
            max_connections: src.parse("max_connections", Cap::Auto, Cap::parse)?,
            max_sessions: src.parse("max_sessions", Cap::Auto, Cap::parse)?,
            otel_endpoint: src.string("otel_exporter_otlp_endpoint"),
        };
        if settings.header_timeout < Duration::from_millis(100) {
            return Err(src.error("header_timeout", "must be at least 100ms"));
        }
        if settings.body_timeout < Duration::from_millis(100) {
            return Err(src.error("body_timeout", "must be at least 100ms"));
        }
        if settings.retention.is_zero() {
            return Err(src.error("retention", "must be longer than zero"));
        }
        if settings.purge_interval.is_zero() {
            return Err(src.error("purge_interval", "must be longer than zero"));
        }
        for (key, value) in [
            ("db_statement_timeout", settings.db_statement_timeout),
            ("db_connect_timeout", settings.db_connect_timeout),
            ("repair_interval", settings.repair_interval),
        ] {
            if value < Duration::from_millis(100) {
                return Err(src.error(key, "must be at least 100ms"));
            }
        }
        if settings.max_audience < settings.max_user_ids {
            return Err(src.error("max_audience", "must be at least HERALD_MAX_USER_IDS"));
        }
        if settings.job_lease < Duration::from_millis(500) {
            return Err(src.error("job_lease", "must be at least 500ms"));
        }
        if settings.presence_ttl < Duration::from_secs(2) {
            return Err(src.error("presence_ttl", "must be at least 2s"));
        }
        if settings.redis_prefix.contains(char::is_whitespace) || settings.redis_prefix.contains(['{', '}']) {
            return Err(src.error("redis_prefix", "no spaces or braces"));
        }
        if settings.drain_grace >= settings.shutdown_deadline {
            return Err(src.error("drain_grace", "must be shorter than HERALD_SHUTDOWN_DEADLINE"));
        }
        Ok(settings)
    }

    pub fn store_options(&self) -> crate::store::StoreOptions {
        crate::store::StoreOptions {
            pool_size: self.db_pool_size,
            sqlite_cache_mib: self.sqlite_cache_mib,
            statement_timeout: self.db_statement_timeout,
            connect_timeout: self.db_connect_timeout,
            ..crate::store::StoreOptions::default()
        }
    }

    /// The SQLite file behind `database_url`, for messages.
    pub fn database_display(&self) -> String {
        redact_url(&self.database_url)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(vars: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let env: HashMap<&str, &str> = vars.iter().copied().collect();
        Settings::load(&env, None)
    }

    #[test]
    fn defaults_are_the_spec_defaults() {
        let s = load(&[("HERALD_JWT_SECRET", "0123456789abcdef0123")]).unwrap();
        assert_eq!(s.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(s.database_url, "sqlite://herald.db");
        assert_eq!(s.heartbeat_secs, 25);
        assert_eq!(s.retention, Duration::from_secs(30 * 24 * 3600));
        assert_eq!(s.store_options().sqlite_cache_mib, 64);
        assert_eq!((s.header_timeout, s.body_timeout), (Duration::from_secs(10), Duration::from_secs(30)));
        assert!(!s.dev_mode);
    }

    #[test]
    fn an_error_names_the_variable() {
        let e = load(&[("HERALD_HEARTBEAT_SECS", "soon")]).err().unwrap();
        assert_eq!(e.name, "HERALD_HEARTBEAT_SECS");
        let e = load(&[("HERALD_SQLITE_CACHE_MIB", "0")]).err().unwrap();
        assert_eq!(e.name, "HERALD_SQLITE_CACHE_MIB");
        let e = load(&[("HERALD_BODY_TIMEOUT", "10ms")]).err().unwrap();
        assert_eq!(e.name, "HERALD_BODY_TIMEOUT");
        let e = load(&[("HERALD_LISTEN", "nowhere")]).err().unwrap();
        assert!(e.to_string().starts_with("HERALD_LISTEN: "), "{e}");
    }

    #[test]
    fn dev_mode_generates_keys_and_refuses_public_addresses() {
        let s = load(&[]).unwrap();
        assert!(s.dev_mode);
        assert!(s.jwt.secret.as_ref().unwrap().len() >= 32);
        assert_eq!(s.api_keys.len(), 1);
        let e = load(&[("HERALD_LISTEN", "0.0.0.0:8080")]).err().unwrap();
        assert_eq!(e.name, "HERALD_LISTEN");
        assert!(load(&[("HERALD_LISTEN", "0.0.0.0:8080"), ("HERALD_API_KEYS", "k1")]).is_ok());
    }

    #[test]
    fn scoped_api_keys_are_keys_too_and_a_key_in_several_lists_has_each_scope() {
        let s = load(&[
            ("HERALD_API_KEYS_PUBLISH", "p1, p2"),
            ("HERALD_API_KEYS_READ", "r1,p2"),
            ("HERALD_API_KEYS_ERASE", "e1"),
            ("HERALD_API_KEYS_DISCONNECT", "d1"),
        ])
        .unwrap();
        assert!(!s.dev_mode, "scoped keys are configured keys");
        assert_eq!(s.api_keys.len(), 6);
        assert_eq!(s.api_key_for(Scopes::DISCONNECT), Some("d1"));
        assert_eq!(s.api_key_for(Scopes::PUBLISH), Some("p1"));
        assert_eq!(s.api_key_for(Scopes::READ), Some("r1"));
        assert_eq!(s.api_key_for(Scopes::ERASE), Some("e1"));
        let keys = crate::auth::ApiKeys::new(&s.api_keys);
        assert_eq!(keys.check("p2"), Some(Scopes::PUBLISH.union(Scopes::READ)));
        assert_eq!(keys.check("e1"), Some(Scopes::ERASE));

        let s = load(&[("HERALD_API_KEYS", "all"), ("HERALD_API_KEYS_PUBLISH", "p1")]).unwrap();
        assert_eq!(s.api_key_for(Scopes::ERASE), Some("all"));
        assert_eq!(s.api_key_for(Scopes::PUBLISH), Some("all"));
        assert!(!format!("{s:?}").contains("p1"), "keys never appear in the settings' Debug");
        // Outside loopback, scoped keys alone also leave dev mode.
        assert!(load(&[("HERALD_LISTEN", "0.0.0.0:8080"), ("HERALD_API_KEYS_READ", "r")]).is_ok());
    }

    #[test]
    fn file_values_yield_to_the_environment_and_unknown_keys_are_refused() {
        let dir = std::env::temp_dir().join(format!("herald-config-{}", random_token(4)));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("herald.toml");
        std::fs::write(&path, "heartbeat_secs = 10\napi_keys = [\"a\", \"b\"]\nlisten = \"127.0.0.1:9000\"\n").unwrap();
        let env: HashMap<&str, &str> = [("HERALD_LISTEN", "127.0.0.1:9100")].into_iter().collect();
        let s = Settings::load(&env, Some(&path)).unwrap();
        assert_eq!(s.heartbeat_secs, 10);
        let keys: Vec<(&str, Scopes)> = s.api_keys.iter().map(|g| (g.key.as_str(), g.scopes)).collect();
        assert_eq!(keys, vec![("a", Scopes::ALL), ("b", Scopes::ALL)]);
        assert_eq!(s.listen.port(), 9100);

        std::fs::write(&path, "heartbeat_secs = 0\napi_keys = \"a\"\n").unwrap();
        let e = Settings::load(&HashMap::<&str, &str>::new(), Some(&path)).err().unwrap();
        assert!(e.name.starts_with("HERALD_HEARTBEAT_SECS (key `heartbeat_secs`"), "{e}");

        std::fs::write(&path, "heartbeat = 3\n").unwrap();
        let e = Settings::load(&HashMap::<&str, &str>::new(), Some(&path)).err().unwrap();
        assert!(e.message.contains("unknown key `heartbeat`"), "{e}");
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn urls_are_redacted_for_display() {
        assert_eq!(redact_url("postgres://u:pw@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact_url("sqlite://herald.db"), "sqlite://herald.db");
    }
}
