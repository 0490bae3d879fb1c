//! Abuse limits: what one client, user or API key may take from a node.
//!
//! | limit | key | where | when exceeded |
//! |---|---|---|---|
//! | handshakes per IP (rate) | client IP | cluster-wide with Redis, else per node | 429 `rate_limited` before the upgrade |
//! | open sessions per IP (cap) | client IP | per node | 429 `rate_limited` before the upgrade |
//! | open sessions per user (cap) | `sub` | per node, and across the cluster through the presence counts with Redis (`ws::handshake`) | 429 `rate_limited` before the upgrade |
//! | client frames per session (rate) | session | the session's node | close 4029 |
//! | publishes per API key (rate) | the key's hash | cluster-wide with Redis, else per node | 429 `rate_limited` with `X-RateLimit-*` |
//!
//! Rates are GCRA: `N/s` lets a burst of N through, then one every 1/N s.
//! Locally that is `governor`'s keyed limiter; across a cluster it is one
//! Lua script on Redis, keyed under the deployment's prefix, on Redis' clock.
//! **Fail open:** when Redis does not answer within [`SHARED_TIMEOUT`], the
//! node's local limiter decides instead (so a limit still holds per node),
//! `herald_rate_limit_fallbacks_total` counts it, and Redis is not asked
//! again for [`SHARED_BACKOFF`].
//!
//! The client IP is the TCP peer, unless the peer is a trusted proxy
//! (`HERALD_TRUSTED_PROXIES`): then it is the right-most address of
//! `X-Forwarded-For` that is not itself a trusted proxy.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderMap;
use dashmap::DashMap;
use governor::middleware::StateInformationMiddleware;
use governor::{clock::Clock, DefaultKeyedRateLimiter, Quota};
use ipnet::IpNet;

use crate::broker::redis::RedisCommands;
use crate::store::now_ms;
use crate::telemetry::{Limit, Metrics};

/// Longest a limit check waits for Redis before the local limiter decides.
pub const SHARED_TIMEOUT: Duration = Duration::from_millis(100);
/// After a Redis failure, how long checks stay local.
pub const SHARED_BACKOFF: Duration = Duration::from_secs(1);
/// How often idle keys are dropped from the local limiters and caps.
pub const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// A rate setting: `N/s`, `N/min` or `N/h`; `off` (or `0`) disables it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: NonZeroU32,
    pub per: Duration,
}

impl Rate {
    /// `Ok(None)` for `off`/`0`.
    pub fn parse(v: &str) -> Result<Option<Rate>, String> {
        let v = v.trim();
        if v == "off" || v == "0" {
            return Ok(None);
        }
        let err = || format!("`{v}` is not a rate like 100/s, 600/min or 10000/h (or `off`)");
        let (count, unit) = v.split_once('/').ok_or_else(err)?;
        let count: u32 = count.trim().parse().map_err(|_| err())?;
        let per = match unit.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            _ => return Err(err()),
        };
        match NonZeroU32::new(count) {
            None => Ok(None),
            Some(count) => Ok(Some(Rate { count, per })),
        }
    }

    /// A burst of `count`, refilled evenly over `per`.
    pub fn quota(self) -> Quota {
        Quota::with_period(self.per / self.count.get()).expect("a positive period").allow_burst(self.count)
    }

    fn interval(self) -> Duration {
        self.per / self.count.get()
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let unit = match self.per.as_secs() {
            1 => "s",
            60 => "min",
            _ => "h",
        };
        write!(f, "{}/{unit}", self.count)
    }
}

/// The limits' settings (see docs/configuration.md).
#[derive(Debug, Clone, PartialEq)]
pub struct LimitSettings {
    pub handshakes_per_ip: Option<Rate>,
    pub sessions_per_ip: Option<usize>,
    pub sessions_per_user: Option<usize>,
    pub frames_per_session: Option<Rate>,
    pub publishes_per_key: Option<Rate>,
    pub trusted_proxies: Vec<IpNet>,
}

/// What a rate check decided, with what the `X-RateLimit-*` headers say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub limit: u32,
    pub remaining: u32,
    /// Until the bucket is full again.
    pub reset_after: Duration,
    /// When refused: until one more is allowed.
    pub retry_after: Duration,
}

impl Decision {
    /// `Retry-After` in whole seconds, at least 1.
    pub fn retry_after_secs(&self) -> u64 {
        self.retry_after.as_secs_f64().ceil().max(1.0) as u64
    }
}

/// A keyed rate: local, or shared through Redis with the local one as the fallback.
pub struct KeyedRate {
    kind: Limit,
    rate: Rate,
    local: DefaultKeyedRateLimiter<String, StateInformationMiddleware>,
    shared: Option<RedisCommands>,
    /// Unix ms before which Redis is not asked (after a failure).
    local_until: AtomicU64,
    metrics: Arc<Metrics>,
}

/// GCRA on Redis' clock, in microseconds. Returns
/// `{allowed, remaining, retry_after_us, reset_after_us}`.
const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - burst * interval
if allow_at > now then
  return {0, 0, allow_at - now, tat - now}
end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
return {1, math.floor((now - allow_at) / interval), 0, new_tat - now}
";

impl KeyedRate {
    pub fn new(kind: Limit, rate: Rate, shared: Option<RedisCommands>, metrics: Arc<Metrics>) -> KeyedRate {
        KeyedRate {
            kind,
            rate,
            local: DefaultKeyedRateLimiter::keyed(rate.quota()).with_middleware::<StateInformationMiddleware>(),
            shared,
            local_until: AtomicU64::new(0),
            metrics,
        }
    }

    /// Takes one from `key`'s bucket if it has one.
    pub async fn check(&self, key: &str) -> Decision {
        let decision = match &self.shared {
            Some(redis) if now_ms() as u64 >= self.local_until.load(Ordering::Relaxed) => {
                match self.check_shared(redis, key).await {
                    Some(d) => d,
                    None => {
                        self.metrics.rate_limit_fallbacks.get_or_create(&self.kind).inc();
                        self.local_until.store(now_ms() as u64 + SHARED_BACKOFF.as_millis() as u64, Ordering::Relaxed);
                        self.check_local(key)
                    }
                }
            }
            _ => self.check_local(key),
        };
        if !decision.allowed {
            self.metrics.rate_limited.get_or_create(&self.kind).inc();
        }
        decision
    }

    fn check_local(&self, key: &str) -> Decision {
        let limit = self.rate.count.get();
        match self.local.check_key(&key.to_owned()) {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity();
                Decision {
                    allowed: true,
                    limit,
                    remaining,
                    reset_after: self.rate.interval() * (limit - remaining),
                    retry_after: Duration::ZERO,
                }
            }
            Err(not_until) => {
                let wait = not_until.wait_time_from(self.local.clock().now());
                Decision {
                    allowed: false,
                    limit,
                    remaining: 0,
                    reset_after: self.rate.interval() * limit,
                    retry_after: wait,
                }
            }
        }
    }

    /// `None` when Redis failed or was too slow.
    async fn check_shared(&self, redis: &RedisCommands, key: &str) -> Option<Decision> {
        let name = format!("{}:rl:{}:{{{key}}}", redis.prefix(), self.kind.limit);
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(GCRA).arg(1).arg(name).arg(self.rate.interval().as_micros() as u64).arg(self.rate.count.get());
        let answer: Vec<i64> = match tokio::time::timeout(SHARED_TIMEOUT, redis.query(&cmd)).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => {
                tracing::warn!(limit = self.kind.limit, error = %e, "rate limit on Redis failed; deciding locally");
                return None;
            }
            Err(_) => {
                tracing::warn!(limit = self.kind.limit, "rate limit on Redis timed out; deciding locally");
                return None;
            }
        };
        let [allowed, remaining, retry_us, reset_us] = answer[..] else {
            tracing::warn!(limit = self.kind.limit, ?answer, "unexpected answer from the rate-limit script");
            return None;
        };
        let micros = |us: i64| Duration::from_micros(us.max(0) as u64);
        Some(Decision {
            allowed: allowed == 1,
            limit: self.rate.count.get(),
            remaining: remaining.clamp(0, u32::MAX as i64) as u32,
            reset_after: micros(reset_us),
            retry_after: micros(retry_us),
        })
    }

    fn sweep(&self) {
        self.local.retain_recent();
        self.local.shrink_to_fit();
    }
}

/// Counts what is open per key, up to a cap; a [`Permit`] gives one back on drop.
pub struct Cap<K: std::hash::Hash + Eq + Clone + Send + Sync + 'static> {
    max: usize,
    open: DashMap<K, usize>,
}

pub struct Permit<K: std::hash::Hash + Eq + Clone + Send + Sync + 'static> {
    cap: Arc<Cap<K>>,
    key: K,
}

impl<K: std::hash::Hash + Eq + Clone + Send + Sync + 'static> Cap<K> {
    pub fn new(max: usize) -> Arc<Cap<K>> {
        Arc::new(Cap { max, open: DashMap::new() })
    }

    /// One more for `key`, unless it already has `max`.
    pub fn acquire(self: &Arc<Self>, key: K) -> Option<Permit<K>> {
        let mut open = self.open.entry(key.clone()).or_insert(0);
        if *open >= self.max {
            return None;
        }
        *open += 1;
        drop(open);
        Some(Permit { cap: self.clone(), key })
    }

    pub fn open(&self, key: &K) -> usize {
        self.open.get(key).map_or(0, |n| *n)
    }
}

impl<K: std::hash::Hash + Eq + Clone + Send + Sync + 'static> Drop for Permit<K> {
    fn drop(&mut self) {
        self.cap.open.remove_if_mut(&self.key, |_, n| {
            *n -= 1;
            *n == 0
        });
    }
}

/// What a session holds while it is open: its places under the caps.
#[derive(Default)]
pub struct SessionPermits {
    _node: Option<tokio::sync::OwnedSemaphorePermit>,
    _ip: Option<Permit<IpAddr>>,
    _user: Option<Permit<Arc<str>>>,
}

impl std::fmt::Debug for SessionPermits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionPermits")
    }
}

/// Why a handshake was refused by a limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The node holds `HERALD_MAX_SESSIONS` sessions ([`crate::capacity`]).
    NodeFull(usize),
    HandshakeRate(Decision),
    SessionsPerIp(usize),
    SessionsPerUser(usize),
}

/// The node's limits; one per node, shared by handle.
pub struct Limits {
    pub settings: LimitSettings,
    handshakes: Option<KeyedRate>,
    publishes: Option<KeyedRate>,
    /// Sessions this node takes (`HERALD_MAX_SESSIONS`), with its cap.
    per_node: Option<(Arc<tokio::sync::Semaphore>, usize)>,
    per_ip: Option<Arc<Cap<IpAddr>>>,
    per_user: Option<Arc<Cap<Arc<str>>>>,
    /// One clock for every session's frame limiter (making one per session
    /// calibrates a new clock each time).
    clock: governor::clock::DefaultClock,
    metrics: Arc<Metrics>,
}

impl Limits {
    /// `sessions_per_node`: [`crate::capacity::Capacity::sessions`].
    pub fn new(
        settings: LimitSettings,
        sessions_per_node: Option<usize>,
        shared: Option<RedisCommands>,
        metrics: Arc<Metrics>,
    ) -> Limits {
        let rate = |kind: &'static str, rate: Option<Rate>| {
            rate.map(|r| KeyedRate::new(Limit { limit: kind }, r, shared.clone(), metrics.clone()))
        };
        Limits {
            handshakes: rate("handshakes_per_ip", settings.handshakes_per_ip),
            publishes: rate("publishes_per_key", settings.publishes_per_key),
            per_node: sessions_per_node.map(|max| (Arc::new(tokio::sync::Semaphore::new(max)), max)),
            per_ip: settings.sessions_per_ip.map(Cap::new),
            per_user: settings.sessions_per_user.map(Cap::new),
            clock: governor::clock::DefaultClock::default(),
            settings,
            metrics,
        }
    }

    /// Before the token is checked: may this IP open another session now?
    pub async fn handshake_rate(&self, ip: Option<IpAddr>) -> Result<(), Refusal> {
        let (Some(rate), Some(ip)) = (&self.handshakes, ip) else { return Ok(()) };
        let decision = rate.check(&ip.to_string()).await;
        if decision.allowed {
            Ok(())
        } else {
            Err(Refusal::HandshakeRate(decision))
        }
    }

    /// First of all: a place among the sessions this node takes. Not a
    /// limit on a client, so not counted in `herald_rate_limited_total`
    /// (`herald_handshakes_total{outcome="node_full"}` counts it).
    pub fn node_place(&self) -> Result<SessionPermits, Refusal> {
        let mut permits = SessionPermits::default();
        if let Some((semaphore, max)) = &self.per_node {
            permits._node = Some(semaphore.clone().try_acquire_owned().map_err(|_| Refusal::NodeFull(*max))?);
        }
        Ok(permits)
    }

    /// After the token is checked: `permits` (from [`Limits::node_place`])
    /// with places under the per-IP and per-user caps.
    pub fn admit(
        &self,
        mut permits: SessionPermits,
        ip: Option<IpAddr>,
        user: &Arc<str>,
    ) -> Result<SessionPermits, Refusal> {
        if let (Some(cap), Some(ip)) = (&self.per_ip, ip) {
            permits._ip =
                Some(cap.acquire(ip).ok_or_else(|| self.refused("sessions_per_ip", Refusal::SessionsPerIp(cap.max)))?);
        }
        if let Some(cap) = &self.per_user {
            permits._user = Some(
                cap.acquire(user.clone())
                    .ok_or_else(|| self.refused("sessions_per_user", Refusal::SessionsPerUser(cap.max)))?,
            );
        }
        Ok(permits)
    }

    fn refused(&self, limit: &'static str, refusal: Refusal) -> Refusal {
        self.metrics.rate_limited.get_or_create(&Limit { limit }).inc();
        refusal
    }

    /// A publish with `api_key`; Redis and the local map see a hash of the
    /// key, never the key.
    pub async fn publish(&self, api_key: &str) -> Option<Decision> {
        let rate = self.publishes.as_ref()?;
        Some(rate.check(&key_id(api_key)).await)
    }

    /// A new session's frame limiter, if frames are limited.
    pub fn frame_limiter(&self) -> Option<governor::DefaultDirectRateLimiter> {
        self.settings
            .frames_per_session
            .map(|r| governor::RateLimiter::direct_with_clock(r.quota(), self.clock.clone()))
    }

    /// The client's IP: the peer, or what a trusted proxy forwarded.
    pub fn client_ip(&self, peer: Option<IpAddr>, headers: &HeaderMap) -> Option<IpAddr> {
        let peer = peer?;
        if !self.trusted(peer) {
            return Some(peer);
        }
        let forwarded = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect::<Vec<_>>();
        for hop in forwarded.iter().rev() {
            match hop.parse::<IpAddr>() {
                Ok(ip) if self.trusted(ip) => continue,
                Ok(ip) => return Some(ip),
                // A garbled hop: nothing left of it can be believed.
                Err(_) => return Some(peer),
            }
        }
        Some(peer)
    }

    fn trusted(&self, ip: IpAddr) -> bool {
        self.settings.trusted_proxies.iter().any(|net| net.contains(&ip))
    }

    /// Drops idle keys from the local limiters, every [`SWEEP_EVERY`].
    pub async fn sweep(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(SWEEP_EVERY);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {
                    for rate in [&self.handshakes, &self.publishes].into_iter().flatten() {
                        rate.sweep();
                    }
                }
            }
        }
    }
}

/// A short, stable, non-reversible name for an API key.
fn key_id(api_key: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, api_key.as_bytes());
    digest.as_ref()[..12].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(settings: LimitSettings) -> Limits {
        Limits::new(settings, None, None, Arc::new(Metrics::new()))
    }

    fn off() -> LimitSettings {
        LimitSettings {
            handshakes_per_ip: None,
            sessions_per_ip: None,
            sessions_per_user: None,
            frames_per_session: None,
            publishes_per_key: None,
            trusted_proxies: vec![],
        }
    }

    #[test]
    fn rates_parse_with_their_unit() {
        assert_eq!(Rate::parse("100/s").unwrap().unwrap().per, Duration::from_secs(1));
        assert_eq!(Rate::parse("600/min").unwrap().unwrap().count.get(), 600);
        assert_eq!(Rate::parse("5/h").unwrap().unwrap().per, Duration::from_secs(3600));
        assert_eq!(Rate::parse("off").unwrap(), None);
        assert_eq!(Rate::parse("0").unwrap(), None);
        for bad in ["100", "x/s", "10/d", "-1/s", "/s"] {
            assert!(Rate::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Rate::parse("600/min").unwrap().unwrap().to_string(), "600/min");
    }

    #[tokio::test]
    async fn a_local_rate_lets_the_burst_through_then_refuses_with_a_wait() {
        let l = limits(LimitSettings { publishes_per_key: Rate::parse("3/min").unwrap(), ..off() });
        for remaining in [2, 1, 0] {
            let d = l.publish("k1").await.unwrap();
            assert!(d.allowed);
            assert_eq!((d.limit, d.remaining), (3, remaining));
        }
        let refused = l.publish("k1").await.unwrap();
        assert!(!refused.allowed);
        assert!(refused.retry_after > Duration::from_secs(15) && refused.retry_after <= Duration::from_secs(20));
        assert_eq!(refused.retry_after_secs(), refused.retry_after.as_secs() + 1);
        // Another key has its own bucket.
        assert!(l.publish("k2").await.unwrap().allowed);
    }

    #[test]
    fn the_node_refuses_sessions_past_its_cap_until_one_ends() {
        let l =
            Limits::new(LimitSettings { sessions_per_ip: Some(1), ..off() }, Some(2), None, Arc::new(Metrics::new()));
        let (ip, other): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let alice: Arc<str> = "alice".into();
        let a = l.admit(l.node_place().unwrap(), Some(ip), &alice).unwrap();
        // Refused by a later cap: the node place it took is given back.
        assert_eq!(l.admit(l.node_place().unwrap(), Some(ip), &alice).unwrap_err(), Refusal::SessionsPerIp(1));
        let _b = l.admit(l.node_place().unwrap(), Some(other), &alice).unwrap();
        assert_eq!(l.node_place().unwrap_err(), Refusal::NodeFull(2));
        drop(a);
        assert!(l.node_place().is_ok());
        assert!(limits(off()).node_place().is_ok(), "no cap: always a place");
    }

    #[test]
    fn caps_count_open_sessions_and_give_places_back() {
        let l = limits(LimitSettings { sessions_per_ip: Some(2), sessions_per_user: Some(3), ..off() });
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let alice: Arc<str> = "alice".into();
        let a = l.admit(SessionPermits::default(), Some(ip), &alice).unwrap();
        let b = l.admit(SessionPermits::default(), Some(ip), &alice).unwrap();
        assert_eq!(l.admit(SessionPermits::default(), Some(ip), &alice).unwrap_err(), Refusal::SessionsPerIp(2));
        // The refused attempt took nothing from the user's count.
        let c = l.admit(SessionPermits::default(), Some("10.0.0.2".parse().unwrap()), &alice).unwrap();
        assert_eq!(
            l.admit(SessionPermits::default(), Some("10.0.0.3".parse().unwrap()), &alice).unwrap_err(),
            Refusal::SessionsPerUser(3)
        );
        drop(a);
        let _d = l.admit(SessionPermits::default(), Some(ip), &"bob".into()).unwrap();
        drop((b, c));
        assert_eq!(l.per_ip.as_ref().unwrap().open(&ip), 1);
        assert_eq!(l.per_user.as_ref().unwrap().open(&alice), 0);
        assert!(!l.per_user.as_ref().unwrap().open.contains_key(&alice), "keys at zero are removed");
    }

    #[test]
    fn the_client_ip_comes_from_a_trusted_proxy_only() {
        let l = limits(LimitSettings {
            trusted_proxies: vec!["127.0.0.0/8".parse().unwrap(), "10.1.0.0/16".parse().unwrap()],
            ..off()
        });
        let mut headers = HeaderMap::new();
        headers.append("x-forwarded-for", "6.6.6.6, 203.0.113.9".parse().unwrap());
        headers.append("x-forwarded-for", "10.1.2.3".parse().unwrap());
        let untrusted: IpAddr = "198.51.100.7".parse().unwrap();
        assert_eq!(l.client_ip(Some(untrusted), &headers), Some(untrusted));
        let proxy: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(l.client_ip(Some(proxy), &headers), Some("203.0.113.9".parse().unwrap()));
        assert_eq!(l.client_ip(Some(proxy), &HeaderMap::new()), Some(proxy));
        let mut garbled = HeaderMap::new();
        garbled.insert("x-forwarded-for", "1.2.3.4, nonsense".parse().unwrap());
        assert_eq!(l.client_ip(Some(proxy), &garbled), Some(proxy));
    }

    #[test]
    fn api_keys_are_named_by_a_hash() {
        assert_eq!(key_id("secret-key").len(), 24);
        assert_ne!(key_id("secret-key"), key_id("secret-kez"));
        assert!(!key_id("secret-key").contains("secret"));
    }
}
