//! A connection to the Redis master that Sentinel names, which follows a
//! failover (`redis+sentinel://`).
//!
//! A plain Redis client reconnects to the address it had. After a failover
//! that is the old master, now a replica: writes fail there, and a
//! `PUBLISH` reaches only that replica's own subscribers, so nodes would
//! silently stop hearing each other. Here every connection starts by asking
//! Sentinel for the master, and a connection is given up
//! - as soon as its socket closes (Sentinel closes every client of a master
//!   it demotes; a master that dies closes them too), and
//! - when a command fails in a way that means the server is gone or is no
//!   longer the master (I/O error, timeout, `READONLY`).
//!
//! The next command then asks Sentinel again and connects to the master it
//! names; callers that race for that share one lookup, and after a lookup or
//! connection that failed, commands fail at once for a while (50 ms, doubling
//! to 2 s) instead of each asking again: a busy node cannot turn a master's
//! outage into a flood of lookups on the Sentinels. A command that failed
//! is not retried here: the broker's callers retry (subscriptions, presence)
//! or the store repairs what they dropped (publishes). The subscriber's
//! broker is told of each move as a disconnection, so it re-subscribes every
//! local user on the new master and repairs.
//!
//! Between a promotion and the old master's demotion (when Sentinel
//! reconfigures it) a node may still talk to the old master: what it
//! publishes there is lost to other nodes, and the periodic repair fetches
//! it from the store.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::sentinel::SentinelClient;
use redis::{AsyncConnectionConfig, PushInfo, PushKind, RedisError, RedisResult};
use tokio::time::{timeout, Instant};

use super::redis::{timed_out, PushSink, COMMAND_TIMEOUT};

/// What asking Sentinel needs, behind one lock.
struct Moving {
    sentinel: SentinelClient,
    backoff: Backoff,
}

/// When to try connecting again after a failure.
#[derive(Default)]
struct Backoff {
    retry_at: Option<Instant>,
    delay: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(50);
    const MAX: Duration = Duration::from_secs(2);

    fn after(&mut self, succeeded: bool) {
        if succeeded {
            *self = Backoff::default();
        } else {
            self.delay = (self.delay * 2).clamp(Self::FIRST, Self::MAX);
            self.retry_at = Some(Instant::now() + self.delay);
        }
    }
}

/// See the module documentation. Shared by its clones through an `Arc`.
pub(super) struct Followed {
    /// The subscriber's pushes; `None` on the command connection.
    push: Option<PushSink>,
    /// The connection in use, numbered; `None` until the next command
    /// connects.
    current: Mutex<Option<(u64, MultiplexedConnection)>>,
    generation: AtomicU64,
    /// Held while asking Sentinel and connecting.
    moving: tokio::sync::Mutex<Moving>,
    this: Weak<Followed>,
}

impl Followed {
    /// Asks Sentinel for the master and connects (an error if either fails).
    pub async fn connect(sentinel: SentinelClient, push: Option<PushSink>) -> RedisResult<Arc<Followed>> {
        let followed = Arc::new_cyclic(|this| Followed {
            push,
            current: Mutex::new(None),
            generation: AtomicU64::new(0),
            moving: tokio::sync::Mutex::new(Moving { sentinel, backoff: Backoff::default() }),
            this: this.clone(),
        });
        followed.connection().await?;
        Ok(followed)
    }

    /// Runs `command` on the master's connection; gives the connection up
    /// when the error says it is lost or no longer the master's.
    pub async fn run<T, F>(&self, command: impl FnOnce(MultiplexedConnection) -> F) -> RedisResult<T>
    where
        F: std::future::Future<Output = RedisResult<T>>,
    {
        let (generation, conn) = self.connection().await?;
        let result = match timeout(COMMAND_TIMEOUT, command(conn)).await {
            Ok(result) => result,
            Err(_) => Err(timed_out()),
        };
        if let Err(e) = &result {
            if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() || e.code() == Some("READONLY") {
                self.forget(generation, &e.to_string());
            }
        }
        result
    }

    fn current(&self) -> Option<(u64, MultiplexedConnection)> {
        self.current.lock().expect("current connection").clone()
    }

    async fn connection(&self) -> RedisResult<(u64, MultiplexedConnection)> {
        if let Some(current) = self.current() {
            return Ok(current);
        }
        let mut moving = self.moving.lock().await;
        if let Some(current) = self.current() {
            return Ok(current);
        }
        if moving.backoff.retry_at.is_some_and(|at| Instant::now() < at) {
            let waiting = std::io::Error::new(std::io::ErrorKind::NotConnected, "no Redis master yet; retrying soon");
            return Err(RedisError::from(waiting));
        }
        let connected = self.ask_and_connect(&mut moving.sentinel).await;
        moving.backoff.after(connected.is_ok());
        connected
    }

    /// Asks Sentinel for the master and connects to it.
    async fn ask_and_connect(&self, sentinel: &mut SentinelClient) -> RedisResult<(u64, MultiplexedConnection)> {
        let client = match timeout(COMMAND_TIMEOUT * 2, sentinel.async_get_client()).await {
            Ok(client) => client?,
            Err(_) => return Err(timed_out()),
        };
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let (this, push) = (self.this.clone(), self.push.clone());
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(COMMAND_TIMEOUT))
            .set_response_timeout(Some(COMMAND_TIMEOUT))
            .set_push_sender(move |info: PushInfo| {
                if info.kind == PushKind::Disconnection {
                    if let Some(followed) = this.upgrade() {
                        followed.forget(generation, "the connection closed");
                    }
                    return Ok(());
                }
                match &push {
                    Some(push) => push.send(info),
                    None => Ok(()),
                }
            });
        let conn = client.get_multiplexed_async_connection_with_config(&config).await?;
        tracing::info!(master = ?client.get_connection_info().addr(), "connected to the Redis master Sentinel names");
        *self.current.lock().expect("current connection") = Some((generation, conn.clone()));
        Ok((generation, conn))
    }

    /// Gives up connection `generation` if it is still the one in use; the
    /// subscriber's broker hears of it as a disconnection.
    fn forget(&self, generation: u64, why: &str) {
        let mut current = self.current.lock().expect("current connection");
        if current.as_ref().is_some_and(|(g, _)| *g == generation) {
            *current = None;
            drop(current);
            tracing::info!(why, "Redis master lost; the next command asks Sentinel again");
            if let Some(push) = &self.push {
                let _ = push.send(PushInfo { kind: PushKind::Disconnection, data: Vec::new() });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_tries_wait_longer_up_to_a_bound_and_a_success_resets() {
        let mut backoff = Backoff::default();
        let mut delays = Vec::new();
        for _ in 0..8 {
            backoff.after(false);
            assert!(backoff.retry_at.is_some_and(|at| at > Instant::now()));
            delays.push(backoff.delay.as_millis());
        }
        assert_eq!(delays, [50, 100, 200, 400, 800, 1600, 2000, 2000]);
        backoff.after(true);
        assert!(backoff.retry_at.is_none());
        backoff.after(false);
        assert_eq!(backoff.delay, Backoff::FIRST);
    }
}
