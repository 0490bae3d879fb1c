//! The Redis broker: many nodes share one Redis (or a Redis Cluster, or the
//! master a set of Sentinels names: [`super::sentinel`]).
//!
//! **Channels.** Each user has a channel, `{prefix}:u:{<user>}`; a node
//! subscribes to it while the user has a session there. Subscription changes
//! are not made per session: the hub reports every change of a user's local
//! session count ([`Interest`]), and one maintenance task turns whatever has
//! accumulated into batched `SUBSCRIBE`/`UNSUBSCRIBE` commands (on a Redis
//! Cluster, sharded `SSUBSCRIBE` per channel, pipelined; the `{<user>}` hash
//! tag puts a user's channel in the user's slot).
//!
//! **Publishing.** [`Broker::publish`] is called only after the store
//! committed. It hands the events to local sessions at once, then queues them
//! (bounded) for a publisher task that pipelines them to Redis. A message
//! carries kind, seq, id, user, origin node and the already-encoded frame, so
//! no node re-encodes anything; a node ignores its own messages.
//!
//! **Loss and repair.** Redis pub/sub is at most once, and so is this broker:
//! a full queue or a Redis outage drops messages (counted in
//! `herald_broker_dropped`). Nothing is lost for users, because
//! - a live seq ahead of a session's cursor makes it fetch the gap (`ws::session`);
//! - when the subscriber reconnects, the node re-subscribes every local user
//!   and immediately runs the repair below;
//! - every `repair_interval` the node reads the newest seq of all its local
//!   users from the store (batched) and sends a `Head` to every user whose
//!   sessions have seen less; they fetch the rest from the store.
//!
//! **Presence.** Each node keeps a hash `{prefix}:presence:<node>` of user →
//! local sessions, with a TTL it refreshes, and its name in the sorted set
//! `{prefix}:nodes` scored by when it expires. A reader sums the user's
//! count over the live nodes, so a dead node's sessions stop counting after
//! `presence_ttl`. The list of live nodes is read at most once per
//! maintenance tick. Every handshake asks for its user's count (the
//! sessions-per-user cap), so lookups are batched as the store's reads are:
//! one task takes every lookup queued and reads them with one `HMGET` per
//! live node, and the next batch is what queued meanwhile — a reconnect
//! storm of thousands of handshakes costs a few commands per batch instead
//! of one per node per handshake.
//! Beside each user's count, under the field `\x01<user>` (no user id has a
//! control character, so the two never meet), the same hash holds the JSON
//! list of that user's sessions on the node ([`Hub::listing`]), written in
//! the same command: `GET /v1/users/{id}/sessions` reads both with one
//! `HMGET` per live node.

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::future::join_all;
use herald_protocol::http::UserSession;
use herald_protocol::Seq;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClientBuilder, SentinelServerType};
use redis::{
    ClientTlsConfig, ConnectionAddr, FromRedisValue, IntoConnectionInfo, ProtocolVersion, PushInfo, PushKind,
    RedisResult, TlsCertificates, TlsMode, Value,
};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::time::{interval, sleep, timeout, Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::sentinel::Followed;
use super::{Broker, BrokerError, Elsewhere, Event};
use crate::hub::{Delivery, Frame, Hub, Interest};
use crate::store::{now_ms, Store};
use crate::telemetry::Metrics;
use crate::tls;

/// Events queued for the publisher task; beyond this they are dropped (and repaired).
const PUBLISH_QUEUE: usize = 16_384;
/// Messages received from Redis waiting for the hub.
const RECEIVE_QUEUE: usize = 16_384;
/// Most messages in one pipeline to Redis.
const PUBLISH_BATCH: usize = 512;
/// Most channels in one `SUBSCRIBE`.
const SUBSCRIBE_BATCH: usize = 500;
/// Users per store query in the periodic repair.
const REPAIR_BATCH: usize = 1000;
/// How long a new session waits for its user's subscription before going on.
const SUBSCRIBE_WAIT: Duration = Duration::from_secs(2);
/// Presence lookups waiting for the next batch; a full queue makes callers wait.
const PRESENCE_QUEUE: usize = 4096;
/// Most users in one batch of presence lookups (one `HMGET` per live node).
const PRESENCE_BATCH: usize = 512;
/// Any one Redis command.
pub(super) const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// A Redis error, as callers of the broker see it.
fn unavailable(e: redis::RedisError) -> BrokerError {
    BrokerError::Unavailable(e.to_string())
}

/// The error of a command or connection that took longer than allowed.
pub(super) fn timed_out() -> redis::RedisError {
    redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut))
}

/// How often the maintenance task wakes without being told to.
const MAINTAIN_TICK: Duration = Duration::from_millis(250);

/// How long this node's presence writes may fail (each tick retries them)
/// before it says so: a `warn` line, `herald_broker_presence_ok` 0, and
/// presence answered 503 rather than with counts that leave its sessions
/// out. A Redis that answers reads but refuses writes (`OOM` at
/// `maxmemory`, `MISCONF` when it cannot save, `READONLY` on a replica)
/// keeps delivering — `PUBLISH` is not refused — so nothing else shows it.
const PRESENCE_FAILING_AFTER: Duration = Duration::from_secs(1);

/// Where Redis is, from `HERALD_REDIS_URL`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// `redis://[user:pass@]host:port[/db]`, or `rediss://…` over TLS
    Single(String),
    /// `redis+cluster://[user:pass@]host:port,host:port,…` (or
    /// `rediss+cluster://…` over TLS) — seed nodes of a Redis Cluster;
    /// sharded pub/sub (Redis 7+).
    Cluster(Vec<String>),
    /// `redis+sentinel://[user:pass@]host:port,host:port,…/NAME[/DB]` (or
    /// `rediss+sentinel://…`, TLS to Sentinel and the master alike) — the
    /// Sentinels watching the master named NAME; the credentials and DB are
    /// the master's. Follows failovers ([`super::sentinel`]).
    Sentinel {
        /// `redis[s]://host:port` of each Sentinel.
        sentinels: Vec<String>,
        name: String,
        /// `redis[s]://[user:pass@]<first sentinel>/DB`: the master's
        /// credentials and DB, in a URL so they are read as in any other.
        master: String,
    },
}

/// The port a Sentinel listens on unless the URL says otherwise.
const SENTINEL_PORT: u16 = 26379;

impl RedisTarget {
    pub fn parse(url: &str) -> Result<RedisTarget, String> {
        let sentinel = [("redis+sentinel://", "redis://"), ("rediss+sentinel://", "rediss://")]
            .into_iter()
            .find_map(|(prefix, scheme)| url.strip_prefix(prefix).map(|rest| (rest, scheme)));
        let cluster = [("redis+cluster://", "redis://"), ("rediss+cluster://", "rediss://")]
            .into_iter()
            .find_map(|(prefix, scheme)| url.strip_prefix(prefix).map(|rest| (rest, scheme)));
        let target = if let Some((rest, scheme)) = sentinel {
            RedisTarget::sentinel(rest, scheme)?
        } else if let Some((rest, scheme)) = cluster {
            let (credentials, hosts) = split_credentials(rest);
            let nodes: Vec<String> = hosts_of(hosts).map(|h| format!("{scheme}{credentials}{h}")).collect();
            if nodes.is_empty() {
                return Err("redis+cluster:// needs at least one HOST:PORT".into());
            }
            RedisTarget::Cluster(nodes)
        } else if ["redis://", "rediss://", "redis+unix://", "unix://"].iter().any(|s| url.starts_with(s)) {
            if url.contains("#insecure") {
                return Err("#insecure (no certificate check) is not supported: trust the server's CA with \
                            HERALD_REDIS_TLS_CA instead"
                    .into());
            }
            RedisTarget::Single(url.to_string())
        } else {
            return Err("expected redis://HOST:PORT, rediss://HOST:PORT (TLS), redis+cluster://HOST:PORT,HOST:PORT,… \
                        or redis+sentinel://HOST:PORT,HOST:PORT,…/NAME (rediss+… for TLS)"
                .into());
        };
        for url in target.urls() {
            url.as_str().into_connection_info().map_err(|e| format!("not a Redis URL: {e}"))?;
        }
        Ok(target)
    }

    /// `[user:pass@]host[:port],…/NAME[/DB]` after `redis[s]+sentinel://`;
    /// `scheme` is `redis://` or `rediss://`.
    fn sentinel(rest: &str, scheme: &str) -> Result<RedisTarget, String> {
        let usage = "redis+sentinel://HOST:PORT,HOST:PORT,…/NAME[/DB]";
        if rest.contains(['#', '?']) {
            return Err(format!("expected {usage}, without ?… or #…"));
        }
        let (credentials, rest) = split_credentials(rest);
        let (hosts, path) = rest.split_once('/').unwrap_or((rest, ""));
        let mut path = path.split('/');
        let name = path.next().filter(|n| !n.is_empty()).ok_or(format!("give the master's name: {usage}"))?;
        let db = path.next().filter(|d| !d.is_empty()).unwrap_or("0");
        if path.next().is_some() {
            return Err(format!("expected {usage}"));
        }
        let sentinels: Vec<String> = hosts_of(hosts)
            .map(|h| match h.rsplit_once(':') {
                Some((_, port)) if !port.contains(']') => format!("{scheme}{h}"),
                _ => format!("{scheme}{h}:{SENTINEL_PORT}"),
            })
            .collect();
        let Some(first) = sentinels.first() else {
            return Err(format!("give at least one Sentinel: {usage}"));
        };
        let master = format!("{scheme}{credentials}{}/{db}", &first[scheme.len()..]);
        Ok(RedisTarget::Sentinel { sentinels, name: name.to_string(), master })
    }

    /// Whether this names Sentinels (`redis+sentinel://`).
    pub fn is_sentinel(&self) -> bool {
        matches!(self, RedisTarget::Sentinel { .. })
    }

    /// Whether the connections use TLS (`rediss://`, `rediss+cluster://`).
    pub fn is_tls(&self) -> bool {
        self.urls().iter().all(|url| url.starts_with("rediss://"))
    }

    fn urls(&self) -> Vec<String> {
        match self {
            RedisTarget::Single(url) => vec![url.clone()],
            RedisTarget::Cluster(nodes) => nodes.clone(),
            RedisTarget::Sentinel { sentinels, master, .. } => {
                sentinels.iter().chain(std::iter::once(master)).cloned().collect()
            }
        }
    }
}

/// `user:pass@rest` → (`user:pass@`, `rest`); no `@`: (``, all of it).
fn split_credentials(rest: &str) -> (&str, &str) {
    match rest.rfind('@') {
        Some(at) => (&rest[..=at], &rest[at + 1..]),
        None => ("", rest),
    }
}

/// The `HOST:PORT`s of a comma-separated list, blanks skipped.
fn hosts_of(hosts: &str) -> impl Iterator<Item = &str> {
    hosts.split(',').map(str::trim).filter(|h| !h.is_empty())
}

/// What a `rediss://` connection trusts and presents, read at start from
/// `HERALD_REDIS_TLS_CA` (PEM CA certificates trusted instead of the
/// built-in web PKI roots) and `HERALD_REDIS_TLS_CERT` / `_KEY` (a PEM
/// client certificate and its key, for servers that require one). Empty:
/// the built-in roots, no client certificate.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct RedisTls {
    ca_pem: Option<Vec<u8>>,
    client: Option<(Vec<u8>, Vec<u8>)>,
}

impl RedisTls {
    /// Trusts the CA certificates in `path` (PEM, at least one) instead of
    /// the built-in roots.
    pub fn with_ca(mut self, path: &Path) -> Result<RedisTls, String> {
        let pem = tls::read_file(path)?;
        tls::certificates(path, &pem)?;
        self.ca_pem = Some(pem);
        Ok(self)
    }

    /// Presents the chain in `cert` (leaf first) and its leaf's key in `key`
    /// (PEM) to a server that asks for a client certificate.
    pub fn with_client(mut self, cert: &Path, key: &Path) -> Result<RedisTls, String> {
        let (cert_pem, key_pem) = (tls::read_file(cert)?, tls::read_file(key)?);
        tls::pair((cert, &cert_pem), (key, &key_pem))?;
        self.client = Some((cert_pem, key_pem));
        Ok(self)
    }

    pub fn is_empty(&self) -> bool {
        self.ca_pem.is_none() && self.client.is_none()
    }

    fn certificates(&self) -> Option<TlsCertificates> {
        (!self.is_empty()).then(|| TlsCertificates {
            client_tls: self
                .client
                .clone()
                .map(|(client_cert, client_key)| ClientTlsConfig { client_cert, client_key }),
            root_cert: self.ca_pem.clone(),
        })
    }
}

impl std::fmt::Debug for RedisTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTls")
            .field("ca", &self.ca_pem.as_ref().map(|_| "from HERALD_REDIS_TLS_CA"))
            .field("client_certificate", &self.client.is_some())
            .finish()
    }
}

/// A connection to any kind of deployment; clones share it.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
    Sentinel(Arc<Followed>),
}

fn resp3(url: &str) -> RedisResult<redis::ConnectionInfo> {
    let info = url.into_connection_info()?;
    let settings = info.redis_settings().clone().set_protocol(ProtocolVersion::RESP3);
    Ok(info.set_redis_settings(settings))
}

impl Conn {
    /// Connects; `push` receives pub/sub messages (only the subscriber has one).
    async fn connect(target: &RedisTarget, options: &RedisOptions, push: Option<PushSink>) -> RedisResult<Conn> {
        let tls = &options.tls;
        match target {
            RedisTarget::Single(url) => {
                let client = match tls.certificates() {
                    Some(certificates) => redis::Client::build_with_tls(resp3(url)?, certificates)?,
                    None => redis::Client::open(resp3(url)?)?,
                };
                let mut config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(COMMAND_TIMEOUT))
                    .set_response_timeout(Some(COMMAND_TIMEOUT))
                    .set_min_delay(Duration::from_millis(50))
                    .set_max_delay(Duration::from_secs(2))
                    .set_number_of_retries(3);
                if let Some(push) = push {
                    config = config.set_push_sender(move |info| push.send(info));
                }
                Ok(Conn::Single(ConnectionManager::new_with_config(client, config).await?))
            }
            RedisTarget::Cluster(nodes) => {
                let nodes: Vec<redis::ConnectionInfo> = nodes.iter().map(|n| resp3(n)).collect::<RedisResult<_>>()?;
                let mut builder = redis::cluster::ClusterClientBuilder::new(nodes)
                    .use_protocol(ProtocolVersion::RESP3)
                    .connection_timeout(COMMAND_TIMEOUT)
                    .response_timeout(COMMAND_TIMEOUT)
                    .retries(3)
                    .min_retry_wait(50)
                    .max_retry_wait(2000);
                if let Some(push) = push {
                    builder = builder.push_sender(move |info| push.send(info));
                }
                if let Some(certificates) = tls.certificates() {
                    builder = builder.certs(certificates);
                }
                Ok(Conn::Cluster(builder.build()?.get_async_connection().await?))
            }
            RedisTarget::Sentinel { sentinels, name, master } => {
                let sentinels: Vec<ConnectionAddr> = sentinels
                    .iter()
                    .map(|s| s.as_str().into_connection_info().map(|info| info.addr().clone()))
                    .collect::<RedisResult<_>>()?;
                let master = master.as_str().into_connection_info()?;
                let master = master.redis_settings();
                let mut builder = SentinelClientBuilder::new(sentinels, name, SentinelServerType::Master)?
                    .set_client_to_redis_protocol(ProtocolVersion::RESP3)
                    .set_client_to_redis_db(master.db());
                if let Some(user) = master.username() {
                    builder = builder.set_client_to_redis_username(user);
                }
                if let Some(password) = master.password() {
                    builder = builder.set_client_to_redis_password(password);
                }
                if let Some(password) = &options.sentinel_password {
                    builder = builder.set_client_to_sentinel_password(password);
                }
                if let Some(user) = &options.sentinel_username {
                    builder = builder.set_client_to_sentinel_username(user);
                }
                if target.is_tls() {
                    builder = builder.set_client_to_redis_tls_mode(TlsMode::Secure);
                    if let Some(certificates) = tls.certificates() {
                        builder = builder.set_client_to_redis_certificates(certificates);
                    }
                    if let Some(certificates) = tls.certificates() {
                        builder = builder.set_client_to_sentinel_certificates(certificates);
                    }
                }
                Ok(Conn::Sentinel(Followed::connect(builder.build()?, push).await?))
            }
        }
    }

    async fn query<T: FromRedisValue>(&mut self, cmd: &redis::Cmd) -> RedisResult<T> {
        let run = async {
            match self {
                Conn::Single(c) => cmd.query_async(c).await,
                Conn::Cluster(c) => cmd.query_async(c).await,
                // Boxed: callers on the request path (the rate limiter) would
                // otherwise carry its whole state machine in theirs.
                Conn::Sentinel(f) => Box::pin(f.run(|mut c| async move { cmd.query_async(&mut c).await })).await,
            }
        };
        match timeout(COMMAND_TIMEOUT, run).await {
            Ok(result) => result,
            Err(_) => Err(timed_out()),
        }
    }

    /// Runs independent commands: one pipeline on a single Redis; on a
    /// cluster each goes to its slot's node, all in flight at once.
    async fn run_all(&mut self, cmds: Vec<redis::Cmd>) -> RedisResult<()> {
        let pipeline = |cmds: Vec<redis::Cmd>| {
            let mut pipe = redis::pipe();
            for cmd in cmds {
                pipe.add_command(cmd).ignore();
            }
            pipe
        };
        match self {
            Conn::Single(c) => match timeout(COMMAND_TIMEOUT, pipeline(cmds).exec_async(c)).await {
                Ok(result) => result,
                Err(_) => Err(timed_out()),
            },
            Conn::Sentinel(f) => {
                let pipe = pipeline(cmds);
                f.run(|mut c| async move { pipe.exec_async(&mut c).await }).await
            }
            Conn::Cluster(c) => {
                let runs = cmds.into_iter().map(|cmd| {
                    let mut c = c.clone();
                    async move { timeout(COMMAND_TIMEOUT, cmd.exec_async(&mut c)).await }
                });
                for result in join_all(runs).await {
                    match result {
                        Ok(r) => r?,
                        Err(_) => return Err(timed_out()),
                    }
                }
                Ok(())
            }
        }
    }

    fn is_cluster(&self) -> bool {
        matches!(self, Conn::Cluster(_))
    }
}

/// Where the subscriber connection's pushes go: a bounded queue. A full queue
/// drops the message and asks for a repair; a disconnection is never missed.
#[derive(Clone)]
pub(super) struct PushSink {
    queue: mpsc::Sender<PushInfo>,
    signals: Arc<Signals>,
}

impl PushSink {
    pub(super) fn send(&self, info: PushInfo) -> Result<(), ()> {
        if info.kind == PushKind::Disconnection {
            self.signals.disconnected.store(true, Ordering::SeqCst);
            self.signals.maintain.notify_one();
        }
        if self.queue.try_send(info).is_err() {
            self.signals.overflowed.store(true, Ordering::SeqCst);
            self.signals.repair_now.notify_one();
            return Err(());
        }
        Ok(())
    }
}

/// Flags and wake-ups shared by the broker's tasks.
#[derive(Default)]
struct Signals {
    disconnected: AtomicBool,
    overflowed: AtomicBool,
    maintain: Notify,
    repair_now: Notify,
    /// Woken whenever subscriptions were confirmed.
    subscribed: Notify,
}

/// The hub's [`Interest`]: users whose local session count changed since the
/// maintenance task last looked. Bounded by the number of local users.
#[derive(Default)]
pub struct Changes {
    dirty: Mutex<HashSet<Arc<str>>>,
    signals: Arc<Signals>,
}

impl Interest for Changes {
    fn changed(&self, user: &Arc<str>) {
        self.dirty.lock().expect("dirty set").insert(user.clone());
        self.signals.maintain.notify_one();
    }
}

impl Changes {
    fn take(&self) -> Vec<Arc<str>> {
        self.dirty.lock().expect("dirty set").drain().collect()
    }

    fn put_back(&self, users: impl IntoIterator<Item = Arc<str>>) {
        self.dirty.lock().expect("dirty set").extend(users);
    }
}

struct Shared {
    node_id: String,
    prefix: String,
    hub: Hub,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    changes: Arc<Changes>,
    signals: Arc<Signals>,
    /// Users whose channel this node is subscribed to (confirmed).
    subscribed: Mutex<HashSet<Arc<str>>>,
    /// The live nodes as last read, and when: see [`Shared::live_nodes`].
    live_nodes: Mutex<Option<(Instant, Arc<[String]>)>>,
    /// This node's presence writes failing; `None` while they succeed.
    presence_failing: Mutex<Option<PresenceFailing>>,
    publisher: Conn,
    subscriber: Conn,
    outgoing: mpsc::Sender<Vec<u8>>,
    /// Presence lookups for [`presence_loop`].
    lookups: mpsc::Sender<Lookup>,
    repair_interval: Duration,
    presence_ttl: Duration,
    stop: CancellationToken,
    tasks: TaskTracker,
}

pub struct RedisBroker {
    shared: Arc<Shared>,
}

/// A run of failed presence writes (see [`PRESENCE_FAILING_AFTER`]).
struct PresenceFailing {
    since: Instant,
    /// The last failure's error.
    error: String,
    /// Said so: logged, `herald_broker_presence_ok` 0, presence a 503.
    reported: bool,
}

/// What [`RedisBroker::connect`] needs besides the URL.
pub struct RedisOptions {
    pub node_id: String,
    pub prefix: String,
    pub repair_interval: Duration,
    pub presence_ttl: Duration,
    pub tls: RedisTls,
    /// For Sentinels that require one (`redis+sentinel://` only).
    pub sentinel_password: Option<String>,
    /// The Sentinels' ACL user, when not `default`.
    pub sentinel_username: Option<String>,
}

impl RedisBroker {
    /// The [`Interest`] to build the hub with, before the broker exists.
    pub fn changes() -> Arc<Changes> {
        Arc::new(Changes::default())
    }

    /// Connects (failing if Redis does not answer now) and starts the
    /// publisher, receiver, maintenance and repair tasks.
    pub async fn connect(
        target: &RedisTarget,
        options: RedisOptions,
        hub: Hub,
        changes: Arc<Changes>,
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
    ) -> Result<RedisBroker, BrokerError> {
        let signals = changes.signals.clone();
        let (push_tx, push_rx) = mpsc::channel(RECEIVE_QUEUE);
        let sink = PushSink { queue: push_tx, signals: signals.clone() };
        let publisher = Conn::connect(target, &options, None).await.map_err(unavailable)?;
        let subscriber = Conn::connect(target, &options, Some(sink)).await.map_err(unavailable)?;
        let (outgoing, outgoing_rx) = mpsc::channel(PUBLISH_QUEUE);
        let (lookups, lookups_rx) = mpsc::channel(PRESENCE_QUEUE);
        let shared = Arc::new(Shared {
            node_id: options.node_id,
            prefix: options.prefix,
            hub,
            store,
            metrics,
            changes,
            signals,
            subscribed: Mutex::new(HashSet::new()),
            live_nodes: Mutex::new(None),
            presence_failing: Mutex::new(None),
            publisher,
            subscriber,
            outgoing,
            lookups,
            repair_interval: options.repair_interval,
            presence_ttl: options.presence_ttl,
            stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
        });
        shared.metrics.broker_connected.set(1);
        shared.metrics.broker_presence_ok.set(1);
        shared.tasks.spawn(publish_loop(shared.clone(), outgoing_rx));
        shared.tasks.spawn(receive_loop(shared.clone(), push_rx));
        shared.tasks.spawn(maintain_loop(shared.clone()));
        shared.tasks.spawn(repair_loop(shared.clone()));
        shared.tasks.spawn(presence_loop(shared.clone(), lookups_rx));
        tracing::info!(cluster = shared.publisher.is_cluster(), prefix = %shared.prefix, "Redis broker connected");
        Ok(RedisBroker { shared })
    }
}

impl RedisBroker {
    /// A handle for one-off commands (the rate limiter's scripts) on the
    /// broker's command connection, with the deployment's key prefix.
    pub fn commands(&self) -> RedisCommands {
        RedisCommands { conn: self.shared.publisher.clone(), prefix: self.shared.prefix.clone() }
    }
}

/// See [`RedisBroker::commands`]. Each command is bounded by the broker's
/// command timeout; callers on a hot path add a tighter one.
#[derive(Clone)]
pub struct RedisCommands {
    conn: Conn,
    prefix: String,
}

impl RedisCommands {
    pub async fn query<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> RedisResult<T> {
        self.conn.clone().query(cmd).await
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }
}

impl Shared {
    fn channel(&self, user: &str) -> String {
        format!("{}:u:{{{user}}}", self.prefix)
    }

    fn presence_key(&self, node: &str) -> String {
        format!("{}:presence:{node}", self.prefix)
    }

    fn nodes_key(&self) -> String {
        format!("{}:nodes", self.prefix)
    }

    /// The nodes whose presence counts are live, read from Redis at most
    /// once per [`MAINTAIN_TICK`]. Every handshake asks (the cluster-wide
    /// sessions-per-user cap), and the counts it then reads lag by as much
    /// anyway: each node rewrites its own once per tick. A node that just
    /// died stays listed that much longer, but its count expires with it.
    async fn live_nodes(&self) -> RedisResult<Arc<[String]>> {
        let cached = self.live_nodes.lock().expect("live nodes").clone();
        if let Some((_, nodes)) = cached.filter(|(read_at, _)| read_at.elapsed() < MAINTAIN_TICK) {
            return Ok(nodes);
        }
        let mut conn = self.publisher.clone();
        let nodes: Vec<String> =
            conn.query(redis::cmd("ZRANGEBYSCORE").arg(self.nodes_key()).arg(now_ms()).arg("+inf")).await?;
        let nodes: Arc<[String]> = nodes.into();
        *self.live_nodes.lock().expect("live nodes") = Some((Instant::now(), nodes.clone()));
        Ok(nodes)
    }

    /// Each of `users`' sessions summed over the live nodes, in order: one
    /// `HMGET` per node for all of them.
    async fn presence_counts(&self, users: &[&str]) -> Result<Vec<u64>, BrokerError> {
        let nodes = self.live_nodes().await.map_err(unavailable)?;
        let per_node = join_all(nodes.iter().map(|node| {
            let mut conn = self.publisher.clone();
            let mut cmd = redis::cmd("HMGET");
            cmd.arg(self.presence_key(node)).arg(users);
            async move { conn.query::<Vec<Option<u64>>>(&cmd).await }
        }))
        .await;
        let mut totals = vec![0; users.len()];
        for counts in per_node {
            let counts = counts.map_err(unavailable)?;
            if counts.len() != users.len() {
                return Err(BrokerError::Unavailable(format!(
                    "HMGET of {} fields answered {} values",
                    users.len(),
                    counts.len()
                )));
            }
            for (total, count) in totals.iter_mut().zip(counts) {
                *total += count.unwrap_or(0);
            }
        }
        Ok(totals)
    }

    /// Presence read from Redis is right only while this node's own writes
    /// succeed: else its sessions would be left out.
    fn presence_trusted(&self) -> Result<(), BrokerError> {
        match self.presence_failing() {
            Some(error) => Err(BrokerError::Unavailable(format!(
                "this node cannot write its presence to Redis ({error}); counts would leave its sessions out"
            ))),
            None => Ok(()),
        }
    }

    /// The error this node's presence writes keep failing with, once that
    /// was reported.
    fn presence_failing(&self) -> Option<String> {
        let failing = self.presence_failing.lock().expect("presence state");
        failing.as_ref().filter(|f| f.reported).map(|f| f.error.clone())
    }

    /// Records a failed presence write; true when this failure is the one
    /// that makes the run last [`PRESENCE_FAILING_AFTER`] (report it now).
    fn presence_failed(&self, error: &redis::RedisError) -> bool {
        let mut failing = self.presence_failing.lock().expect("presence state");
        let run = failing.get_or_insert_with(|| PresenceFailing {
            since: Instant::now(),
            error: String::new(),
            reported: false,
        });
        run.error = error.to_string();
        let report = !run.reported && run.since.elapsed() >= PRESENCE_FAILING_AFTER;
        if report {
            run.reported = true;
            self.metrics.broker_presence_ok.set(0);
        }
        report
    }

    /// A presence write succeeded; true when it ends a reported run.
    fn presence_written(&self) -> bool {
        let ended = self.presence_failing.lock().expect("presence state").take().is_some_and(|run| run.reported);
        if ended {
            self.metrics.broker_presence_ok.set(1);
        }
        ended
    }

    fn is_subscribed(&self, user: &str) -> bool {
        self.subscribed.lock().expect("subscribed set").contains(user)
    }

    /// `SUBSCRIBE` (or `SSUBSCRIBE` per channel on a cluster) for `users`.
    async fn subscribe(&self, users: &[Arc<str>], on: bool) -> RedisResult<()> {
        let mut conn = self.subscriber.clone();
        for chunk in users.chunks(SUBSCRIBE_BATCH) {
            let channels: Vec<String> = chunk.iter().map(|u| self.channel(u)).collect();
            let run = async {
                match &mut conn {
                    Conn::Single(c) if on => c.subscribe(&channels).await,
                    Conn::Single(c) => c.unsubscribe(&channels).await,
                    Conn::Sentinel(f) if on => f.run(|mut c| async move { c.subscribe(&channels).await }).await,
                    Conn::Sentinel(f) => f.run(|mut c| async move { c.unsubscribe(&channels).await }).await,
                    Conn::Cluster(c) => {
                        let runs = channels.iter().map(|ch| {
                            let mut c = c.clone();
                            async move {
                                if on {
                                    c.ssubscribe(ch).await
                                } else {
                                    c.sunsubscribe(ch).await
                                }
                            }
                        });
                        join_all(runs).await.into_iter().collect::<RedisResult<Vec<()>>>().map(|_| ())
                    }
                }
            };
            match timeout(COMMAND_TIMEOUT * 2, run).await {
                Ok(result) => result?,
                Err(_) => return Err(timed_out()),
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Broker for RedisBroker {
    async fn publish(&self, events: Vec<Event>) -> Result<(), BrokerError> {
        let shared = &self.shared;
        let mut dropped = 0;
        for event in &events {
            shared.hub.deliver(&event.user_id, &event.delivery);
            let message = Message::encode(event, &shared.node_id);
            if shared.outgoing.try_send(message).is_err() {
                dropped += 1;
            }
        }
        if dropped > 0 {
            shared.metrics.broker_dropped.inc_by(dropped);
            return Err(BrokerError::Unavailable(format!(
                "{dropped} events not queued for Redis (queue full); other nodes repair them from the store"
            )));
        }
        Ok(())
    }

    async fn ping(&self) -> Result<(), BrokerError> {
        let shared = &self.shared;
        let mut conn = shared.publisher.clone();
        conn.query::<String>(&redis::cmd("PING")).await.map_err(|e| BrokerError::Unavailable(e.to_string()))?;
        if shared.signals.disconnected.load(Ordering::SeqCst) {
            return Err(BrokerError::Unavailable("the subscriber is reconnecting".into()));
        }
        Ok(())
    }

    async fn subscribed(&self, user: &str) {
        let shared = &self.shared;
        let deadline = Instant::now() + SUBSCRIBE_WAIT;
        loop {
            let confirmed = shared.signals.subscribed.notified();
            if shared.is_subscribed(user) {
                return;
            }
            if tokio::time::timeout_at(deadline, confirmed).await.is_err() {
                tracing::debug!(user, "no subscription confirmed in time; the periodic repair covers this session");
                return;
            }
        }
    }

    async fn presence(&self, user: &str) -> Result<u64, BrokerError> {
        let shared = &self.shared;
        shared.presence_trusted()?;
        let stopped = || BrokerError::Unavailable("the broker is stopping".into());
        let (reply, answer) = oneshot::channel();
        shared.lookups.send(Lookup { user: user.to_owned(), reply }).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    async fn sessions_elsewhere(&self, user: &str) -> Result<Elsewhere, BrokerError> {
        let shared = &self.shared;
        shared.presence_trusted()?;
        let nodes = shared.live_nodes().await.map_err(unavailable)?;
        let others = nodes.iter().filter(|node| **node != shared.node_id);
        let records = join_all(others.map(|node| {
            let mut conn = shared.publisher.clone();
            let cmd = redis::cmd("HMGET").arg(shared.presence_key(node)).arg(user).arg(listing_field(user)).clone();
            async move { conn.query::<(Option<u64>, Option<String>)>(&cmd).await.map(|record| (node, record)) }
        }))
        .await;
        let mut elsewhere = Elsewhere::default();
        for record in records {
            let (node, (count, listing)) = record.map_err(unavailable)?;
            elsewhere.count += count.unwrap_or(0);
            // A node from before listings writes counts alone.
            let Some(listing) = listing else { continue };
            match serde_json::from_str::<Vec<UserSession>>(&listing) {
                Ok(sessions) => elsewhere.sessions.extend(sessions),
                Err(e) => tracing::debug!(%node, error = %e, "a node's listing of a user's sessions does not parse"),
            }
        }
        Ok(elsewhere)
    }

    async fn close(&self) {
        let shared = &self.shared;
        shared.stop.cancel();
        shared.tasks.close();
        if timeout(Duration::from_secs(3), shared.tasks.wait()).await.is_err() {
            tracing::warn!("Redis broker tasks did not finish in time");
        }
        let mut conn = shared.publisher.clone();
        let _ = conn.query::<()>(redis::cmd("DEL").arg(shared.presence_key(&shared.node_id))).await;
        let _ = conn.query::<()>(redis::cmd("ZREM").arg(shared.nodes_key()).arg(&shared.node_id)).await;
    }
}

/// The wire format of one event on a channel:
/// `<kind> <seq> <id> <user bytes> <origin bytes>[ <traceparent>]\n<user><origin><frame>`,
/// kind `n` (notification), `r` (read), `h` (head), `d` (disconnect) or
/// `t` (tokens revoked; the seq field carries `issued_before`, the frame
/// `expires_at` in decimal or nothing) or `j` (one token revoked; the seq
/// field carries `expires_at`, 0 for never, the frame the `jti`) or `s`
/// (one session closed; the frame is its id).
/// Older nodes ignore the optional trace field, and kinds they do not know
/// (a node before `j` learns of a single token's revocation only from the
/// table, which it does not read either: it goes on taking the token until
/// it is upgraded; a node before `s` leaves the session open). From `s`
/// on, a node logs a kind it does not know ([`Undecodable::UnknownKind`])
/// at `debug`, not as malformed.
struct Message {
    user: Arc<str>,
    origin: String,
    delivery: Delivery,
    trace: Option<String>,
}

impl Message {
    fn encode(event: &Event, origin: &str) -> Vec<u8> {
        // The decimal expiry, or the session id, that the frame field carries.
        let text;
        let (kind, seq, frame) = match &event.delivery {
            Delivery::Notification { seq, frame } => ('n', *seq, frame.as_str()),
            Delivery::Read { frame } => ('r', 0, frame.as_str()),
            Delivery::Head { seq } => ('h', *seq, ""),
            Delivery::Disconnect => ('d', 0, ""),
            Delivery::Revoke { issued_before, expires_at } => {
                text = expires_at.map(|at| at.to_string()).unwrap_or_default();
                ('t', *issued_before, text.as_str())
            }
            // An expiry is after the revocation was taken, so never 0.
            Delivery::RevokeToken { jti, expires_at } => ('j', expires_at.unwrap_or(0), &**jti),
            Delivery::DisconnectSession { session_id } => {
                text = session_id.to_string();
                ('s', 0, text.as_str())
            }
        };
        let id = event.id.as_deref().unwrap_or("-");
        let user = &*event.user_id;
        let mut out = format!("{kind} {seq} {id} {} {}", user.len(), origin.len()).into_bytes();
        // A traceparent is `00-<hex>-<hex>-<hex>`: no spaces or newlines.
        if let Some(trace) = event.trace.as_deref().filter(|t| !t.contains([' ', '\n'])) {
            out.push(b' ');
            out.extend_from_slice(trace.as_bytes());
        }
        out.push(b'\n');
        out.reserve(user.len() + origin.len() + frame.len());
        out.extend_from_slice(user.as_bytes());
        out.extend_from_slice(origin.as_bytes());
        out.extend_from_slice(frame.as_bytes());
        out
    }

    fn decode(bytes: &[u8]) -> Result<Message, Undecodable> {
        let (kind, seq, user, origin, text, trace) = Self::split(bytes).ok_or(Undecodable::Malformed)?;
        let delivery = match kind {
            "n" => Delivery::Notification { seq, frame: Frame::from(text.to_string()) },
            "r" => Delivery::Read { frame: Frame::from(text.to_string()) },
            "h" => Delivery::Head { seq },
            "d" => Delivery::Disconnect,
            "t" => Delivery::Revoke { issued_before: seq, expires_at: text.parse().ok() },
            "j" => Delivery::RevokeToken { jti: text.into(), expires_at: (seq != 0).then_some(seq) },
            "s" => Delivery::DisconnectSession { session_id: text.parse().map_err(|_| Undecodable::Malformed)? },
            // A newer node's: a lowercase word, as every kind is.
            kind if (1..=16).contains(&kind.len()) && kind.bytes().all(|b| b.is_ascii_lowercase()) => {
                return Err(Undecodable::UnknownKind(kind.to_string()))
            }
            _ => return Err(Undecodable::Malformed),
        };
        Ok(Message { user: user.into(), origin: origin.to_string(), delivery, trace })
    }

    /// A message's kind, seq, user, origin, frame text and trace, when its
    /// header and body have the shape every kind shares.
    #[allow(clippy::type_complexity)]
    fn split(bytes: &[u8]) -> Option<(&str, Seq, &str, &str, &str, Option<String>)> {
        let newline = bytes.iter().position(|&b| b == b'\n')?;
        let header = std::str::from_utf8(&bytes[..newline]).ok()?;
        let mut fields = header.split(' ');
        let kind = fields.next()?;
        let seq: Seq = fields.next()?.parse().ok()?;
        let _id = fields.next()?;
        let user_len: usize = fields.next()?.parse().ok()?;
        let origin_len: usize = fields.next()?.parse().ok()?;
        let trace = fields.next().map(str::to_string);
        let body = &bytes[newline + 1..];
        if body.len() < user_len.checked_add(origin_len)? {
            return None;
        }
        let user = std::str::from_utf8(&body[..user_len]).ok()?;
        let origin = std::str::from_utf8(&body[user_len..user_len + origin_len]).ok()?;
        let text = std::str::from_utf8(&body[user_len + origin_len..]).ok()?;
        Some((kind, seq, user, origin, text, trace))
    }
}

/// Why a message on a Herald channel could not be read.
#[derive(Debug, PartialEq)]
enum Undecodable {
    /// Well formed, of a kind this node does not know: a newer node sent it
    /// (a rolling upgrade).
    UnknownKind(String),
    Malformed,
}

/// Moves what is queued in `rx` into `batch`, until it holds `max`.
fn take_queued<T>(rx: &mut mpsc::Receiver<T>, batch: &mut Vec<T>, max: usize) {
    while batch.len() < max {
        match rx.try_recv() {
            Ok(item) => batch.push(item),
            Err(_) => break,
        }
    }
}

/// One presence lookup: `user`'s sessions on every live node.
struct Lookup {
    user: String,
    reply: oneshot::Sender<Result<u64, BrokerError>>,
}

/// Answers presence lookups in batches: the first one queued and every one
/// behind it (up to [`PRESENCE_BATCH`]), read together; lookups arriving
/// meanwhile make the next batch. A lone lookup is read at once.
async fn presence_loop(shared: Arc<Shared>, mut lookups: mpsc::Receiver<Lookup>) {
    let mut batch = Vec::with_capacity(PRESENCE_BATCH);
    loop {
        let first = tokio::select! {
            lookup = lookups.recv() => lookup,
            _ = shared.stop.cancelled() => None,
        };
        let Some(first) = first else { return };
        batch.push(first);
        take_queued(&mut lookups, &mut batch, PRESENCE_BATCH);
        // Handshakes give up on a slow Redis after a moment (and fail open):
        // their lookups are not read once it answers again.
        batch.retain(|lookup| !lookup.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        let users: Vec<&str> = batch.iter().map(|l| l.user.as_str()).collect();
        let counts = shared.presence_counts(&users).await;
        drop(users);
        match counts {
            Ok(counts) => {
                for (lookup, count) in batch.drain(..).zip(counts) {
                    let _ = lookup.reply.send(Ok(count));
                }
            }
            Err(e) => {
                for lookup in batch.drain(..) {
                    let _ = lookup.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// Pipelines queued events to Redis; finishes the queue when stopping.
async fn publish_loop(shared: Arc<Shared>, mut rx: mpsc::Receiver<Vec<u8>>) {
    let mut conn = shared.publisher.clone();
    let mut failing = false;
    let mut batch = Vec::with_capacity(PUBLISH_BATCH);
    loop {
        let first = tokio::select! {
            message = rx.recv() => message,
            _ = shared.stop.cancelled() => {
                rx.close();
                rx.recv().await
            }
        };
        let Some(first) = first else { return };
        batch.push(first);
        take_queued(&mut rx, &mut batch, PUBLISH_BATCH);
        let command = if conn.is_cluster() { "SPUBLISH" } else { "PUBLISH" };
        let cmds: Vec<redis::Cmd> = batch
            .drain(..)
            .map(|m| {
                let user = Message::user_of(&m).unwrap_or_default();
                let mut cmd = redis::cmd(command);
                cmd.arg(shared.channel(&user)).arg(m);
                cmd
            })
            .collect();
        let n = cmds.len() as u64;
        match conn.run_all(cmds).await {
            Ok(()) => {
                shared.metrics.broker_published.inc_by(n);
                if failing {
                    tracing::info!("publishing to Redis again");
                    failing = false;
                }
            }
            Err(e) => {
                shared.metrics.broker_dropped.inc_by(n);
                if !failing {
                    tracing::warn!(error = %e, "publishing to Redis failed; other nodes repair from the store");
                    failing = true;
                }
            }
        }
    }
}

impl Message {
    /// The user of an encoded message, without decoding the frame.
    fn user_of(bytes: &[u8]) -> Option<String> {
        let newline = bytes.iter().position(|&b| b == b'\n')?;
        let header = std::str::from_utf8(&bytes[..newline]).ok()?;
        let user_len: usize = header.split(' ').nth(3)?.parse().ok()?;
        let user = bytes.get(newline + 1..(newline + 1).checked_add(user_len)?)?;
        std::str::from_utf8(user).ok().map(str::to_string)
    }
}

/// Hands messages from Redis to the hub.
async fn receive_loop(shared: Arc<Shared>, mut rx: mpsc::Receiver<PushInfo>) {
    loop {
        let info = tokio::select! {
            info = rx.recv() => info,
            _ = shared.stop.cancelled() => return,
        };
        let Some(info) = info else { return };
        if !matches!(info.kind, PushKind::Message | PushKind::SMessage) {
            continue;
        }
        let Some(Value::BulkString(bytes)) = info.data.get(1) else { continue };
        match Message::decode(bytes) {
            Ok(m) if m.origin == shared.node_id => {}
            Ok(m) => {
                shared.metrics.broker_received.inc();
                match &m.trace {
                    None => {
                        shared.hub.deliver(&m.user, &m.delivery);
                    }
                    Some(trace) => {
                        let span = tracing::info_span!(
                            "broker.deliver",
                            otel.kind = "consumer",
                            node_id = %shared.node_id,
                            sessions = tracing::field::Empty,
                        );
                        crate::telemetry::trace_export::continue_from(&span, trace);
                        let sessions = span.in_scope(|| shared.hub.deliver(&m.user, &m.delivery));
                        span.record("sessions", sessions);
                    }
                }
            }
            Err(Undecodable::UnknownKind(kind)) => {
                tracing::debug!(kind, "ignored a message of a kind this node does not know (from a newer node?)")
            }
            Err(Undecodable::Malformed) => tracing::warn!("ignored a malformed message on a Herald channel"),
        }
    }
}

/// Subscriptions and presence follow the hub; after a reconnect everything
/// is re-subscribed and a repair runs.
async fn maintain_loop(shared: Arc<Shared>) {
    let mut tick = interval(MAINTAIN_TICK);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let refresh_every = shared.presence_ttl / 3;
    let mut last_refresh: Option<Instant> = None;
    let mut resubscribe = false;
    let mut rewrite_presence = true;
    loop {
        tokio::select! {
            _ = shared.stop.cancelled() => return,
            _ = shared.signals.maintain.notified() => {}
            _ = tick.tick() => {}
        }
        if shared.signals.disconnected.swap(false, Ordering::SeqCst) {
            tracing::warn!("Redis subscriber disconnected; re-subscribing when it is back");
            shared.metrics.broker_connected.set(0);
            resubscribe = true;
            rewrite_presence = true;
        }
        if resubscribe {
            let everyone: Vec<Arc<str>> = shared.hub.users().into_iter().map(|(u, _)| u).collect();
            match shared.subscribe(&everyone, true).await {
                Ok(()) => {
                    {
                        let mut subscribed = shared.subscribed.lock().expect("subscribed set");
                        subscribed.clear();
                        subscribed.extend(everyone.iter().cloned());
                    }
                    shared.signals.subscribed.notify_waiters();
                    shared.metrics.broker_connected.set(1);
                    shared.metrics.broker_resyncs.inc();
                    tracing::info!(users = everyone.len(), "Redis subscriber back; re-subscribed, repairing");
                    resubscribe = false;
                    shared.signals.repair_now.notify_one();
                }
                Err(e) => {
                    tracing::debug!(error = %e, "re-subscribing failed; retrying");
                    continue;
                }
            }
        }
        match reconcile(&shared).await {
            Ok(lost) => rewrite_presence |= lost,
            Err(e) => {
                report_presence_failure(&shared, &e);
                rewrite_presence = true;
                continue;
            }
        }
        if rewrite_presence || last_refresh.is_none_or(|t| t.elapsed() >= refresh_every) {
            match refresh_presence(&shared, rewrite_presence).await {
                Ok(()) => {
                    rewrite_presence = false;
                    last_refresh = Some(Instant::now());
                    if shared.presence_written() {
                        tracing::info!("this node's presence is written to Redis again");
                    }
                }
                Err(e) => report_presence_failure(&shared, &e),
            }
        }
    }
}

/// A presence write failed (or the subscription change before it, which
/// leaves the presence unwritten too): logged at `debug`, and once per run
/// of failures at `warn` when it has lasted [`PRESENCE_FAILING_AFTER`].
fn report_presence_failure(shared: &Shared, error: &redis::RedisError) {
    if shared.presence_failed(error) {
        tracing::warn!(
            %error,
            "this node's presence writes to Redis keep failing (retried every tick): presence answers 503 \
             and the cluster-wide sessions-per-user cap is off until they succeed"
        );
    } else {
        tracing::debug!(%error, "writing presence to Redis failed; retrying");
    }
}

/// Turns the users whose local sessions changed into (un)subscriptions and
/// presence updates. On failure the users stay pending. True when Redis had
/// lost this node's presence hash (evicted, deleted): it must then be
/// written whole, since the changes alone would leave the other users out.
async fn reconcile(shared: &Shared) -> RedisResult<bool> {
    let users = shared.changes.take();
    if users.is_empty() {
        return Ok(false);
    }
    let mut add = Vec::new();
    let mut remove = Vec::new();
    let mut present = Vec::new();
    let mut gone = Vec::new();
    for user in &users {
        let subscribed = shared.is_subscribed(user);
        if let Some(record) = presence_record(shared, user) {
            present.push((user.clone(), record));
            if !subscribed {
                add.push(user.clone());
            }
        } else {
            gone.push(user.clone());
            if subscribed {
                // Forget it first: a session arriving meanwhile waits for the new subscription.
                shared.subscribed.lock().expect("subscribed set").remove(user);
                remove.push(user.clone());
            }
        }
    }
    if let Err(e) = shared.subscribe(&add, true).await {
        shared.changes.put_back(users);
        return Err(e);
    }
    shared.subscribed.lock().expect("subscribed set").extend(add.iter().cloned());
    shared.signals.subscribed.notify_waiters();
    if !remove.is_empty() {
        // A failure leaves a subscription with no sessions: harmless.
        let _ = shared.subscribe(&remove, false).await;
    }
    let key = shared.presence_key(&shared.node_id);
    let mut cmds = presence_writes(&key, &present);
    for chunk in gone.chunks(SUBSCRIBE_BATCH) {
        let mut cmd = redis::cmd("HDEL");
        cmd.arg(&key);
        for user in chunk {
            cmd.arg(&**user).arg(listing_field(user));
        }
        cmds.push(cmd);
    }
    // Never leave the hash without an expiry, even if this node dies now.
    let ttl_ms = shared.presence_ttl.as_millis() as u64;
    cmds.push(redis::cmd("PEXPIRE").arg(&key).arg(ttl_ms).clone());
    let mut conn = shared.publisher.clone();
    // Asked first, apart: on a cluster `run_all` sends its commands at once.
    let kept: bool = conn.query(redis::cmd("PEXPIRE").arg(&key).arg(ttl_ms)).await?;
    conn.run_all(cmds).await?;
    Ok(!kept)
}

/// A user's entry in this node's presence hash: the count of local
/// sessions and their listing (JSON); `None` when the user has none here.
fn presence_record(shared: &Shared, user: &str) -> Option<(usize, String)> {
    let count = shared.hub.local_sessions(user);
    (count > 0).then(|| {
        let listing = shared.hub.listing(user, &shared.node_id);
        (count, serde_json::to_string(&listing).expect("a listing always serializes"))
    })
}

/// `HSET`s of users' records, [`SUBSCRIBE_BATCH`] users per command.
fn presence_writes(key: &str, records: &[(Arc<str>, (usize, String))]) -> Vec<redis::Cmd> {
    let mut cmds = Vec::new();
    for chunk in records.chunks(SUBSCRIBE_BATCH) {
        let mut cmd = redis::cmd("HSET");
        cmd.arg(key);
        for (user, (count, listing)) in chunk {
            cmd.arg(&**user).arg(*count).arg(listing_field(user)).arg(listing);
        }
        cmds.push(cmd);
    }
    cmds
}

/// The presence hash's field for a user's listing: see the module's doc.
fn listing_field(user: &str) -> String {
    format!("\u{1}{user}")
}

/// Keeps this node's presence alive; rewrites it whole when Redis lost it.
async fn refresh_presence(shared: &Shared, rewrite: bool) -> RedisResult<()> {
    let mut conn = shared.publisher.clone();
    let key = shared.presence_key(&shared.node_id);
    let ttl_ms = shared.presence_ttl.as_millis() as u64;
    let kept: bool = conn.query(redis::cmd("PEXPIRE").arg(&key).arg(ttl_ms)).await?;
    let users = shared.hub.users();
    if rewrite || (!kept && !users.is_empty()) {
        let present: Vec<_> =
            users.into_iter().filter_map(|(user, _)| presence_record(shared, &user).map(|r| (user, r))).collect();
        let mut cmds = vec![redis::cmd("DEL").arg(&key).clone()];
        cmds.extend(presence_writes(&key, &present));
        cmds.push(redis::cmd("PEXPIRE").arg(&key).arg(ttl_ms).clone());
        conn.run_all(cmds).await?;
    }
    let now = now_ms();
    conn.query::<()>(redis::cmd("ZADD").arg(shared.nodes_key()).arg(now + ttl_ms as i64).arg(&shared.node_id)).await?;
    conn.query::<()>(redis::cmd("ZREMRANGEBYSCORE").arg(shared.nodes_key()).arg("-inf").arg(now)).await?;
    // The set lives while any node refreshes it.
    conn.query::<()>(redis::cmd("PEXPIRE").arg(shared.nodes_key()).arg(ttl_ms * 2)).await?;
    Ok(())
}

/// Every `repair_interval` (or at once when asked): users whose sessions are
/// behind the store get a `Head` and fetch what the broker lost.
async fn repair_loop(shared: Arc<Shared>) {
    loop {
        tokio::select! {
            _ = shared.stop.cancelled() => return,
            _ = sleep(shared.repair_interval) => {}
            _ = shared.signals.repair_now.notified() => {}
        }
        shared.signals.overflowed.store(false, Ordering::SeqCst);
        let users = shared.hub.users();
        for chunk in users.chunks(REPAIR_BATCH) {
            let names: Vec<Arc<str>> = chunk.iter().map(|(u, _)| u.clone()).collect();
            match shared.metrics.store_op("last_seqs", shared.store.last_seqs(&names)).await {
                Ok(newest) => {
                    for ((user, seen), newest) in chunk.iter().zip(newest) {
                        if newest > *seen {
                            shared.metrics.repair_heads.inc();
                            shared.hub.deliver(user, &Delivery::Head { seq: newest });
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "repair check could not read the store; retrying next interval");
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_select_single_or_cluster() {
        assert_eq!(
            RedisTarget::parse("redis://127.0.0.1:6379").unwrap(),
            RedisTarget::Single("redis://127.0.0.1:6379".into())
        );
        assert_eq!(
            RedisTarget::parse("redis+cluster://pw@127.0.0.1:7000, 127.0.0.1:7001").unwrap(),
            RedisTarget::Cluster(vec!["redis://pw@127.0.0.1:7000".into(), "redis://pw@127.0.0.1:7001".into()])
        );
        assert!(RedisTarget::parse("redis+cluster://").is_err());
        assert!(RedisTarget::parse("rediss+cluster://").is_err());
        assert!(RedisTarget::parse("http://h").is_err());
        assert!(!RedisTarget::parse("redis://h:1").unwrap().is_tls());
        assert!(!RedisTarget::parse("redis+cluster://h:1,h:2").unwrap().is_tls());
    }

    #[test]
    fn rediss_urls_select_tls() {
        let single = RedisTarget::parse("rediss://user:pw@cache.internal:6380/0").unwrap();
        assert_eq!(single, RedisTarget::Single("rediss://user:pw@cache.internal:6380/0".into()));
        assert!(single.is_tls());
        let cluster = RedisTarget::parse("rediss+cluster://pw@10.0.0.1:7000,10.0.0.2:7000").unwrap();
        assert_eq!(
            cluster,
            RedisTarget::Cluster(vec!["rediss://pw@10.0.0.1:7000".into(), "rediss://pw@10.0.0.2:7000".into()])
        );
        assert!(cluster.is_tls());
        let insecure = RedisTarget::parse("rediss://h:6380/#insecure").unwrap_err();
        assert!(insecure.contains("HERALD_REDIS_TLS_CA"), "{insecure}");
    }

    #[test]
    fn messages_round_trip_with_any_user_id() {
        for user in ["alice", "with space", "new\nline", "{braces}", "é"] {
            let event = Event {
                user_id: user.into(),
                id: Some("0190-abc".into()),
                delivery: Delivery::Notification { seq: 42, frame: Frame::from_static("{\"type\":\"notification\"}") },
                trace: None,
            };
            let bytes = Message::encode(&event, "node 1");
            assert_eq!(Message::user_of(&bytes).as_deref(), Some(user));
            let m = Message::decode(&bytes).unwrap();
            assert_eq!(&*m.user, user);
            assert_eq!(m.origin, "node 1");
            assert_eq!(m.delivery_seq(), Some(42));
            assert_eq!(m.trace, None);

            let parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
            let traced = Event { trace: Some(parent.into()), ..event };
            let bytes = Message::encode(&traced, "node 1");
            assert_eq!(Message::user_of(&bytes).as_deref(), Some(user));
            let m = Message::decode(&bytes).unwrap();
            assert_eq!((&*m.user, m.trace.as_deref(), m.delivery_seq()), (user, Some(parent), Some(42)));
        }
        assert!(Message::decode(b"garbage").is_err());
        assert!(Message::decode(b"n 1 x 99 1\nshort").is_err());
        let revoke = Event {
            user_id: "alice".into(),
            id: None,
            delivery: Delivery::Revoke { issued_before: 1_767_225_600, expires_at: Some(1_767_312_000) },
            trace: None,
        };
        let m = Message::decode(&Message::encode(&revoke, "a")).unwrap();
        assert!(
            matches!(m.delivery, Delivery::Revoke { issued_before: 1_767_225_600, expires_at: Some(1_767_312_000) }),
            "{:?}",
            m.delivery
        );
        let kept = Event { delivery: Delivery::Revoke { issued_before: 7, expires_at: None }, ..revoke };
        let m = Message::decode(&Message::encode(&kept, "a")).unwrap();
        assert!(matches!(m.delivery, Delivery::Revoke { issued_before: 7, expires_at: None }), "{:?}", m.delivery);
        for (jti, expires_at) in [("phone 1/é", Some(1_767_312_000)), ("x", None)] {
            let one = Event { delivery: Delivery::RevokeToken { jti: jti.into(), expires_at }, ..kept.clone() };
            let m = Message::decode(&Message::encode(&one, "a")).unwrap();
            match m.delivery {
                Delivery::RevokeToken { jti: read, expires_at: read_at } => {
                    assert_eq!((&*read, read_at), (jti, expires_at))
                }
                other => panic!("{other:?}"),
            }
        }
        let session_id = uuid::Uuid::now_v7();
        let one = Event { delivery: Delivery::DisconnectSession { session_id }, ..kept.clone() };
        let m = Message::decode(&Message::encode(&one, "a")).unwrap();
        assert!(matches!(m.delivery, Delivery::DisconnectSession { session_id: read } if read == session_id));
        assert!(Message::decode(b"s 0 - 5 1\nalicean-id").is_err(), "a session id that is no UUID");
    }

    /// A kind this node does not know is told apart from a malformed
    /// message; every kind it writes is one it knows.
    #[test]
    fn a_newer_nodes_kind_is_not_taken_for_a_malformed_message() {
        let unknown = |kind: &str| Some(Undecodable::UnknownKind(kind.into()));
        assert_eq!(Message::decode(b"x 0 - 5 1\nalicea").err(), unknown("x"));
        assert_eq!(Message::decode(b"presence 0 - 5 1\nalicea").err(), unknown("presence"));
        // Lengths that overflow when added are malformed too, not a panic.
        let huge = format!("n 1 x {} 1\nab", usize::MAX);
        assert_eq!(Message::user_of(huge.as_bytes()), None);
        for malformed in [
            &b"garbage"[..],
            b"x 0 - 5\nalice",
            b"",
            b"N 1 - 1 1\nab",
            b"n 1 x 99 1\nshort",
            b"\xff 1",
            huge.as_bytes(),
        ] {
            assert_eq!(Message::decode(malformed).err(), Some(Undecodable::Malformed), "{malformed:?}");
        }
        let kinds = [
            Delivery::Notification { seq: 1, frame: Frame::from_static("{}") },
            Delivery::Read { frame: Frame::from_static("{}") },
            Delivery::Head { seq: 1 },
            Delivery::Disconnect,
            Delivery::Revoke { issued_before: 1, expires_at: None },
            Delivery::RevokeToken { jti: "j".into(), expires_at: None },
            Delivery::DisconnectSession { session_id: uuid::Uuid::now_v7() },
        ];
        for delivery in kinds {
            let bytes = Message::encode(&Event { user_id: "a".into(), id: None, delivery, trace: None }, "o");
            assert!(Message::decode(&bytes).is_ok(), "{}", String::from_utf8_lossy(&bytes));
        }
    }

    impl Message {
        fn delivery_seq(&self) -> Option<Seq> {
            match self.delivery {
                Delivery::Notification { seq, .. } => Some(seq),
                _ => None,
            }
        }
    }
}
