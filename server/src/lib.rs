//! # Herald — a real-time notification server
//!
//! The request path of one notification:
//!
//! ```text
//! POST /v1/notifications (api::publish)
//!   → store.append: per-user seq assigned in the commit     (store)
//!   → broker.publish, only after the commit                 (broker)
//!   → hub.deliver to the user's local sessions              (hub)
//!   → session outbox (bounded) → one flush per batch        (ws::session)
//!   → the socket
//! ```
//!
//! A session that connects with `since` first catches up from the store, then
//! switches to live delivery with no gap and no duplicate (`ws::session`
//! explains the hand-over). A live seq that is ahead of what a session has seen
//! is repaired from the store, so the broker may lose messages.
//!
//! - [`config`]: settings from `HERALD_*` and `--config`, validated before binding.
//! - [`auth`]: user JWTs and backend API keys; token revocations, known to every node.
//! - [`ws`]: `GET /v1/ws` — `handshake` (every refusal, before the upgrade),
//!   `protocol` (client frames), `session` (one loop per connection), `close`.
//! - [`hub`]: user → local sessions (each with what listings show of it), bounded outboxes.
//! - [`limit`]: abuse limits — handshake and publish rates, session caps, frame rates.
//! - [`capacity`]: how many connections and sessions a node takes, below its open-file limit.
//! - [`broker`]: fan-out between nodes (`memory` for one node, `redis` for many,
//!   with the periodic repair that delivers what Redis lost).
//! - [`store`]: durable notifications and read state (`sqlite`, `postgres`).
//! - [`api`]: the HTTP API, its one error type, and operations endpoints.
//! - [`worker`]: large-audience publishes and digests, claimed from the store
//!   by any node; heavy steps on a thread pool of their own.
//! - [`telemetry`]: logs, metrics, the runtime-lag probe. [`shutdown`]: draining on SIGTERM.
//! - [`cli`]: `herald serve | migrate | check | backup | restore | mark-restored | token | publish | erase |
//!   sessions | disconnect | revoke`.

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub mod api;
pub mod auth;
pub mod broker;
pub mod capacity;
pub mod cli;
pub mod config;
pub mod hub;
pub mod limit;
pub mod listen;
pub mod shutdown;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod worker;
pub mod ws;

use auth::{ApiKeys, KeyFileError, Verifier};
use broker::redis::{RedisBroker, RedisOptions, RedisTarget};
use broker::Broker;
use config::Settings;
use hub::Hub;
use limit::Limits;
use store::{Store, StoreError, StoreOptions};
use telemetry::Metrics;
use worker::pool::Pool;

/// Everything a handler or session needs: one reference-counted handle, so a
/// clone per request or session is one atomic increment (see [`Node`]).
#[derive(Clone)]
pub struct AppState(Arc<Node>);

impl std::ops::Deref for AppState {
    type Target = Node;
    fn deref(&self) -> &Node {
        &self.0
    }
}

/// The node's shared parts, reached through [`AppState`].
pub struct Node {
    pub settings: Arc<Settings>,
    pub store: Arc<dyn Store>,
    pub broker: Arc<dyn Broker>,
    pub hub: Hub,
    pub verifier: Arc<Verifier>,
    pub api_keys: Arc<ApiKeys>,
    pub limits: Arc<Limits>,
    pub metrics: Arc<Metrics>,
    /// Cancelled when the node starts draining.
    pub shutdown: CancellationToken,
    /// Every WebSocket session, so shutdown can wait for them.
    pub sessions: TaskTracker,
    /// Threads for CPU-heavy steps (jobs, digests), off the async runtime.
    pub pool: Pool,
    /// Woken when this node queues work, so its workers need not poll.
    pub work: Arc<tokio::sync::Notify>,
    /// The store's clock when the token revocations were loaded at start
    /// (where [`auth::revocations::follow`] picks up).
    pub revocations_loaded_at_ms: i64,
    /// The store's epoch, read at start (a restore happens with the nodes
    /// stopped): sent in every welcome, compared with a resuming client's.
    pub epoch: String,
    /// The connection slots every accepted connection holds ([`listen`]).
    pub connections: listen::Slots,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("HERALD_JWT_PUBLIC_KEYS: {0}")]
    Keys(#[from] KeyFileError),
    #[error("HERALD_JWT_JWKS_URL: {0}")]
    Jwks(KeyFileError),
    #[error("HERALD_REDIS_URL: {0}")]
    Redis(String),
    #[error("{0}")]
    Capacity(String),
}

impl AppState {
    /// Opens the store (running migrations) and wires the node together.
    pub async fn build(settings: Settings, shutdown: CancellationToken) -> Result<AppState, StartError> {
        let capacity = capacity::of(&settings).map_err(StartError::Capacity)?;
        let metrics = Arc::new(Metrics::new());
        let options = StoreOptions { group_commits: metrics.group_commits.clone(), ..settings.store_options() };
        let store = store::open(&settings.database_url, &options).await.map_err(|e| match e {
            StoreError::Unavailable(m) => StoreError::Unavailable(tls::with_certificate_hint(m, "sslrootcert=PATH")),
            other => other,
        })?;
        let (hub, broker, shared): (Hub, Arc<dyn Broker>, _) = match &settings.redis_url {
            None => {
                let hub = Hub::new(Arc::new(hub::NoInterest));
                (hub.clone(), Arc::new(broker::memory::MemoryBroker::new(hub)), None)
            }
            Some(url) => {
                let target = RedisTarget::parse(url).map_err(StartError::Redis)?;
                let changes = RedisBroker::changes();
                let hub = Hub::new(changes.clone());
                let options = RedisOptions {
                    node_id: settings.node_id.clone(),
                    prefix: settings.redis_prefix.clone(),
                    repair_interval: settings.repair_interval,
                    presence_ttl: settings.presence_ttl,
                    tls: settings.redis_tls.clone(),
                    sentinel_password: settings.redis_sentinel_password.clone(),
                    sentinel_username: settings.redis_sentinel_username.clone(),
                };
                let broker =
                    RedisBroker::connect(&target, options, hub.clone(), changes, store.clone(), metrics.clone())
                        .await
                        .map_err(|e| {
                            StartError::Redis(tls::with_certificate_hint(e.to_string(), "HERALD_REDIS_TLS_CA"))
                        })?;
                let commands = broker.commands();
                (hub, Arc::new(broker), Some(commands))
            }
        };
        let revocations_loaded_at_ms = auth::revocations::load(store.as_ref(), &hub).await?;
        let epoch = store.epoch().await?;
        let mut verifier = Verifier::new(&settings.jwt)?;
        verifier.fetch_jwks(&settings.jwt, shutdown.clone(), metrics.clone()).await.map_err(StartError::Jwks)?;
        let pool = Pool::new(settings.workers, settings.workers * 4, metrics.clone());
        let limits = Arc::new(Limits::new(settings.limits.clone(), capacity.sessions, shared, metrics.clone()));
        let connections = listen::Slots::new(capacity.connections, &metrics);
        let as_gauge = |cap: Option<usize>| cap.map_or(0, |n| n as i64);
        metrics.connections_max.set(as_gauge(capacity.connections));
        metrics.sessions_max.set(as_gauge(capacity.sessions));
        tracing::info!(%capacity, "capacity");
        Ok(AppState(Arc::new(Node {
            limits,
            verifier: Arc::new(verifier),
            api_keys: Arc::new(ApiKeys::new(&settings.api_keys)),
            settings: Arc::new(settings),
            store,
            broker,
            hub,
            pool,
            work: Arc::new(tokio::sync::Notify::new()),
            metrics,
            shutdown,
            sessions: TaskTracker::new(),
            revocations_loaded_at_ms,
            epoch,
            connections,
        })))
    }
}

impl Node {
    /// A user token, verified ([`Verifier::verify_fresh`]) and checked
    /// against the revocations this node knows of: the one check of the
    /// handshake, a session's `refresh` and the `/v1/me` routes.
    pub async fn authenticate(&self, token: &str) -> Result<auth::UserToken, auth::AuthError> {
        let user = self.verifier.verify_fresh(token).await?;
        if self.hub.is_revoked(&user.user_id, user.issued_at, user.token_id.as_deref()) {
            return Err(auth::AuthError::Revoked);
        }
        Ok(user)
    }
}

/// Runs a node on an already-bound listener until `shutdown` is cancelled and
/// the node has drained (see [`shutdown::serve`]).
pub async fn run(settings: Settings, listener: TcpListener, shutdown: CancellationToken) -> Result<(), StartError> {
    let state = AppState::build(settings, shutdown).await?;
    shutdown::serve(state, listener).await;
    Ok(())
}
