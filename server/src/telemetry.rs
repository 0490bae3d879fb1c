//! Logs and metrics.
//!
//! Logs go to stderr through `tracing` (`HERALD_LOG` filter, `text` or `json`
//! lines). No token, `Authorization` header or `access_token` query is ever
//! recorded: handlers log paths, never URIs or headers.
//!
//! Metrics are `herald_<thing>_<unit>[_total]` in one registry per node
//! (so several nodes can live in one test process), labelled only from small
//! fixed sets — never a user id.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Metric, Registry};

use crate::config::{LogFormat, Settings};
use crate::store::GroupCommits;

/// Installs the global tracing subscriber (once per process; the binary
/// calls it): log lines to stderr filtered by `HERALD_LOG`, and, when an OTLP
/// endpoint is configured, Herald's `info` spans exported as OpenTelemetry
/// traces (whatever `HERALD_LOG` says). Keep the returned guard until exit: dropping it
/// flushes the spans still queued.
pub fn init_tracing(settings: &Settings) -> TracingGuard {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;

    let (provider, failed) =
        match settings.otel_endpoint.as_deref().map(|e| trace_export::provider(e, &settings.node_id)) {
            None => (None, None),
            Some(Ok(provider)) => (Some(provider), None),
            Some(Err(e)) => (None, Some(e)),
        };
    // One global filter (per-layer filters lose spans when sqlx and Herald
    // log at debug together): with export on, Herald's spans are enabled at
    // `info` at least, so `HERALD_LOG=warn` also prints Herald's info lines.
    let directives = match provider {
        Some(_) if !settings.log.split(',').any(|d| d.trim().starts_with("herald_server")) => {
            format!("{},herald_server=info", settings.log)
        }
        _ => settings.log.clone(),
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&directives).unwrap_or_else(|_| "info".into());
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi);
    let logs = match settings.log_format {
        LogFormat::Json => logs.json().flatten_event(true).boxed(),
        LogFormat::Text => logs.boxed(),
    };
    let spans = provider.as_ref().map(|p| {
        use opentelemetry::trace::TracerProvider;
        tracing_opentelemetry::layer().with_tracer(p.tracer("herald"))
    });
    let _ = tracing_subscriber::registry().with(filter).with(logs).with(spans).try_init();
    if let Some(e) = failed {
        tracing::error!(error = %e, "OpenTelemetry export is off: the OTLP exporter could not be built");
    }
    TracingGuard { provider }
}

/// Flushes and stops trace export when dropped.
pub struct TracingGuard {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for TracingGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            if let Err(e) = provider.shutdown_with_timeout(std::time::Duration::from_secs(5)) {
                eprintln!("flushing traces at exit failed: {e}");
            }
        }
    }
}

/// OpenTelemetry: the OTLP/HTTP exporter and W3C trace context.
///
/// A `traceparent` on a publish becomes the parent of its `http.request`
/// span; the `traceparent` of the span that hands the notification to the
/// broker travels in the Redis message, and the receiving node's
/// `broker.deliver` span continues the trace — one trace from publish to
/// delivery on another node.
pub mod trace_export {
    use axum::http::HeaderMap;
    use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
    use opentelemetry::trace::TraceContextExt;
    use opentelemetry_otlp::WithExportConfig;
    use opentelemetry_sdk::propagation::TraceContextPropagator;
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use opentelemetry_sdk::Resource;
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    /// A batch exporter to `endpoint` (the standard `OTEL_*` variables —
    /// headers, timeout, `OTEL_BSP_*`, `OTEL_TRACES_SAMPLER` — apply).
    pub(super) fn provider(endpoint: &str, node_id: &str) -> Result<SdkTracerProvider, String> {
        let mut exporter = opentelemetry_otlp::SpanExporter::builder().with_http();
        if std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_none() {
            // Set in the config file: the variable's meaning, spelled out.
            exporter = exporter.with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')));
        }
        let exporter = exporter.build().map_err(|e| e.to_string())?;
        let resource = Resource::builder()
            .with_service_name("herald")
            .with_attribute(opentelemetry::KeyValue::new("service.instance.id", node_id.to_string()))
            .with_attribute(opentelemetry::KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .build();
        Ok(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build())
    }

    struct Headers<'a>(&'a HeaderMap);

    impl Extractor for Headers<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            self.0.get(key).and_then(|v| v.to_str().ok())
        }

        fn keys(&self) -> Vec<&str> {
            self.0.keys().map(|k| k.as_str()).collect()
        }
    }

    struct One(Option<String>);

    impl Extractor for One {
        fn get(&self, key: &str) -> Option<&str> {
            (key == "traceparent").then_some(self.0.as_deref()).flatten()
        }

        fn keys(&self) -> Vec<&str> {
            vec!["traceparent"]
        }
    }

    impl Injector for One {
        fn set(&mut self, key: &str, value: String) {
            if key == "traceparent" {
                self.0 = Some(value);
            }
        }
    }

    /// Makes `span` continue the trace of an incoming `traceparent` header, if any.
    pub fn continue_from_headers(span: &tracing::Span, headers: &HeaderMap) {
        if headers.contains_key("traceparent") {
            let _ = span.set_parent(TraceContextPropagator::new().extract(&Headers(headers)));
        }
    }

    /// Makes `span` continue a `traceparent` carried by a broker message.
    pub fn continue_from(span: &tracing::Span, traceparent: &str) {
        let _ = span.set_parent(TraceContextPropagator::new().extract(&One(Some(traceparent.to_string()))));
    }

    /// The current span's `traceparent`, when it is being traced.
    pub fn current() -> Option<String> {
        let cx = tracing::Span::current().context();
        if !cx.span().span_context().is_valid() {
            return None;
        }
        let mut out = One(None);
        TraceContextPropagator::new().inject_context(&cx, &mut out);
        out.0
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub outcome: &'static str,
}

/// Client frame kinds (a fixed set).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FrameKind {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreOp {
    pub op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolState {
    pub state: &'static str,
}

/// `route` is the matched template (or `unmatched`), never a raw path.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpRequest {
    pub route: String,
    pub status: u16,
}

fn store_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 14))
}

/// Which abuse limit (see [`crate::limit`]).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Limit {
    pub limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CloseCode {
    pub code: u16,
}

pub struct Metrics {
    registry: Registry,
    pub sessions_active: Gauge,
    pub sessions_max: Gauge,
    pub connections_open: Gauge,
    pub connections_max: Gauge,
    pub accept_waits: Counter,
    pub handshakes: Family<Outcome, Counter>,
    pub sessions_closed: Family<CloseCode, Counter>,
    pub notifications_published: Counter,
    pub notifications_delivered: Counter,
    pub notifications_replayed: Counter,
    pub gap_repairs: Counter,
    pub outbox_overflows: Counter,
    pub notifications_purged: Counter,
    pub notifications_erased: Counter,
    pub publish_commit_seconds: Histogram,
    pub group_commits: GroupCommits,
    pub broker_published: Counter,
    pub broker_received: Counter,
    pub broker_dropped: Counter,
    pub broker_resyncs: Counter,
    pub broker_connected: Gauge,
    pub broker_presence_ok: Gauge,
    pub repair_heads: Counter,
    pub runtime_lag_seconds: Histogram,
    pub worker_queue_depth: Gauge,
    pub workers_busy: Gauge,
    pub jobs_running: Gauge,
    pub jobs_done: Counter,
    pub jobs_failed: Counter,
    pub job_seconds: Histogram,
    pub digests_closed: Counter,
    pub rate_limited: Family<Limit, Counter>,
    pub rate_limit_fallbacks: Family<Limit, Counter>,
    pub frames_received: Family<FrameKind, Counter>,
    pub frames_sent: Counter,
    pub truncations: Counter,
    pub fork_resumes: Counter,
    pub store_seconds: Family<StoreOp, Histogram, fn() -> Histogram>,
    pub db_pool_connections: Family<PoolState, Gauge>,
    pub revoked_users: Gauge,
    pub revoked_tokens: Gauge,
    pub http_requests: Family<HttpRequest, Counter>,
    pub jwks_fetches: Family<Outcome, Counter>,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut r = Registry::default();
        Metrics {
            sessions_active: registered(
                &mut r,
                "herald_sessions_active",
                "WebSocket sessions open on this node",
                Gauge::default(),
            ),
            sessions_max: registered(
                &mut r,
                "herald_sessions_max",
                "Most WebSocket sessions this node takes (HERALD_MAX_SESSIONS; 0: no cap of its own)",
                Gauge::default(),
            ),
            connections_open: registered(
                &mut r,
                "herald_connections_open",
                "Client connections (HTTP and WebSocket) holding a slot, sampled at scrape",
                Gauge::default(),
            ),
            connections_max: registered(
                &mut r,
                "herald_connections_max",
                "Most client connections this node holds (HERALD_MAX_CONNECTIONS; 0: no cap)",
                Gauge::default(),
            ),
            accept_waits: registered(
                &mut r,
                "herald_accept_waits",
                "Times the accept loop found every connection slot taken and waited for one",
                Counter::default(),
            ),
            handshakes: registered(&mut r, "herald_handshakes", "WebSocket handshakes by outcome", Family::default()),
            sessions_closed: registered(
                &mut r,
                "herald_sessions_closed",
                "Sessions closed, by close code",
                Family::default(),
            ),
            notifications_published: registered(
                &mut r,
                "herald_notifications_published",
                "Notifications committed by publishes",
                Counter::default(),
            ),
            notifications_delivered: registered(
                &mut r,
                "herald_notifications_delivered",
                "Notification frames written to sessions",
                Counter::default(),
            ),
            notifications_replayed: registered(
                &mut r,
                "herald_notifications_replayed",
                "Notifications sent from the store on resume",
                Counter::default(),
            ),
            gap_repairs: registered(
                &mut r,
                "herald_gap_repairs",
                "Live gaps filled from the store",
                Counter::default(),
            ),
            outbox_overflows: registered(
                &mut r,
                "herald_outbox_overflows",
                "Sessions whose outbox overflowed (closed 1013)",
                Counter::default(),
            ),
            notifications_purged: registered(
                &mut r,
                "herald_notifications_purged",
                "Notifications removed by retention",
                Counter::default(),
            ),
            notifications_erased: registered(
                &mut r,
                "herald_notifications_erased",
                "Notifications removed by DELETE /v1/users/{id}/notifications",
                Counter::default(),
            ),
            publish_commit_seconds: registered(
                &mut r,
                "herald_publish_commit_seconds",
                "From receiving a publish to its commit",
                Histogram::new(exponential_buckets(0.000_25, 2.0, 16)),
            ),
            group_commits: {
                let unregistered = GroupCommits::default();
                GroupCommits {
                    size: registered(
                        &mut r,
                        "herald_store_group_commit_size",
                        "Notifications per group commit (its count: the groups committed)",
                        unregistered.size,
                    ),
                    seconds: registered(
                        &mut r,
                        "herald_store_group_commit_seconds",
                        "A committed group's transaction, without the queue before it",
                        unregistered.seconds,
                    ),
                    failed: registered(
                        &mut r,
                        "herald_store_group_commits_failed",
                        "Group commits that failed (each refused every publish in it)",
                        unregistered.failed,
                    ),
                }
            },
            broker_published: registered(
                &mut r,
                "herald_broker_published",
                "Events this node published to Redis",
                Counter::default(),
            ),
            broker_received: registered(
                &mut r,
                "herald_broker_received",
                "Events from other nodes received through Redis",
                Counter::default(),
            ),
            broker_dropped: registered(
                &mut r,
                "herald_broker_dropped",
                "Events not published or not received (full queue, Redis down); repaired from the store",
                Counter::default(),
            ),
            broker_resyncs: registered(
                &mut r,
                "herald_broker_resyncs",
                "Re-subscriptions after the Redis subscriber reconnected, each followed by a repair of every local user",
                Counter::default(),
            ),
            broker_connected: registered(
                &mut r,
                "herald_broker_connected",
                "1 while the Redis subscriber is connected and subscribed",
                Gauge::default(),
            ),
            broker_presence_ok: registered(
                &mut r,
                "herald_broker_presence_ok",
                "0 while this node's presence writes to Redis keep failing (presence answers 503), else 1",
                Gauge::default(),
            ),
            repair_heads: registered(
                &mut r,
                "herald_repair_heads",
                "Users found behind the store by the periodic check and told to catch up",
                Counter::default(),
            ),
            runtime_lag_seconds: registered(
                &mut r,
                "herald_runtime_lag_seconds",
                "How late a task woken every 100 ms runs (the async runtime's scheduling delay)",
                Histogram::new(exponential_buckets(0.000_1, 2.0, 16)),
            ),
            worker_queue_depth: registered(
                &mut r,
                "herald_worker_queue_depth",
                "Steps waiting for a worker thread",
                Gauge::default(),
            ),
            workers_busy: registered(&mut r, "herald_workers_busy", "Worker threads running a step", Gauge::default()),
            jobs_running: registered(&mut r, "herald_jobs_running", "Jobs this node is running", Gauge::default()),
            jobs_done: registered(&mut r, "herald_jobs_done", "Jobs this node finished", Counter::default()),
            jobs_failed: registered(
                &mut r,
                "herald_jobs_failed",
                "Jobs given up on (kept as failed with their reason)",
                Counter::default(),
            ),
            job_seconds: registered(
                &mut r,
                "herald_job_seconds",
                "From claiming a job to finishing it",
                Histogram::new(exponential_buckets(0.01, 2.0, 14)),
            ),
            digests_closed: registered(
                &mut r,
                "herald_digests_closed",
                "Digest windows closed into a notification",
                Counter::default(),
            ),
            rate_limited: registered(
                &mut r,
                "herald_rate_limited",
                "Handshakes, frames and publishes refused by an abuse limit, by limit",
                Family::default(),
            ),
            rate_limit_fallbacks: registered(
                &mut r,
                "herald_rate_limit_fallbacks",
                "Cluster-wide limit checks decided locally because Redis failed or was slow",
                Family::default(),
            ),
            frames_received: registered(
                &mut r,
                "herald_frames_received",
                "Client WebSocket frames, by type (ping, read, refresh, bad, control)",
                Family::default(),
            ),
            frames_sent: registered(&mut r, "herald_frames_sent", "WebSocket frames written to clients", Counter::default()),
            truncations: registered(
                &mut r,
                "herald_truncations",
                "Resumes whose `since` was older than retention (welcome with truncated)",
                Counter::default(),
            ),
            fork_resumes: registered(
                &mut r,
                "herald_fork_resumes",
                "Resumes whose cursor, from an earlier store epoch (before a restore), went back to the fork",
                Counter::default(),
            ),
            store_seconds: registered(
                &mut r,
                "herald_store_seconds",
                "Store reads and writes outside the publish path, by operation",
                Family::new_with_constructor(store_histogram as fn() -> Histogram),
            ),
            db_pool_connections: registered(
                &mut r,
                "herald_db_pool_connections",
                "Store pool connections by state (idle, busy), sampled at scrape",
                Family::default(),
            ),
            revoked_users: registered(
                &mut r,
                "herald_revoked_users",
                "Users with a token revocation this node knows of (every node should agree), sampled at scrape",
                Gauge::default(),
            ),
            revoked_tokens: registered(
                &mut r,
                "herald_revoked_tokens",
                "Single tokens revoked by jti that this node knows of (every node should agree), sampled at scrape",
                Gauge::default(),
            ),
            http_requests: registered(
                &mut r,
                "herald_http_requests",
                "HTTP requests by route template and status code",
                Family::default(),
            ),
            jwks_fetches: registered(
                &mut r,
                "herald_jwks_fetches",
                "Fetches of the JWKS at HERALD_JWT_JWKS_URL, `ok` or `failed` (a failure keeps the keys in use)",
                Family::default(),
            ),
            registry: r,
        }
    }

    /// Runs `fut` (a store call), timing it as `op`.
    pub async fn store_op<T>(&self, op: &'static str, fut: impl std::future::Future<Output = T>) -> T {
        let started = std::time::Instant::now();
        let out = fut.await;
        self.store_seconds.get_or_create(&StoreOp { op }).observe(started.elapsed().as_secs_f64());
        out
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// Logs a repeated event at most once per period for each key: [`sample`]
/// answers `Some(n)` when this occurrence is to be logged, `n` of the same
/// key having gone unlogged since the last one, and `None` otherwise. A
/// cheap handle.
///
/// [`sample`]: LogSampler::sample
#[derive(Clone)]
pub struct LogSampler {
    every: std::time::Duration,
    keys: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<&'static str, Sampled>>>,
}

struct Sampled {
    logged_at: std::time::Instant,
    unlogged: u64,
}

impl LogSampler {
    pub fn new(every: std::time::Duration) -> LogSampler {
        LogSampler { every, keys: std::sync::Arc::default() }
    }

    pub fn sample(&self, key: &'static str, now: std::time::Instant) -> Option<u64> {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        match keys.get_mut(key) {
            Some(seen) if now.duration_since(seen.logged_at) < self.every => {
                seen.unlogged += 1;
                None
            }
            Some(seen) => {
                seen.logged_at = now;
                Some(std::mem::take(&mut seen.unlogged))
            }
            None => {
                keys.insert(key, Sampled { logged_at: now, unlogged: 0 });
                Some(0)
            }
        }
    }
}

/// Registers `metric` (a cheap handle) and returns it.
fn registered<M: Metric + Clone>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M {
    registry.register(name, help, metric.clone());
    metric
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// How often the lag probe wakes.
const LAG_TICK: std::time::Duration = std::time::Duration::from_millis(100);
/// Samples per window (10 s) over which p99 is judged.
const LAG_WINDOW: usize = 100;
/// A window whose p99 passes this logs a warning.
const LAG_WARN: std::time::Duration = std::time::Duration::from_millis(50);

/// The event-loop-lag probe: sleeps 100 ms at a time and records how late it
/// woke. A busy or blocked runtime shows here before heartbeats time out.
/// Runs until `stop` is cancelled.
pub async fn runtime_lag_probe(metrics: std::sync::Arc<Metrics>, stop: tokio_util::sync::CancellationToken) {
    let mut window = Vec::with_capacity(LAG_WINDOW);
    loop {
        let asked = tokio::time::Instant::now() + LAG_TICK;
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep_until(asked) => {}
        }
        let lag = tokio::time::Instant::now().saturating_duration_since(asked);
        metrics.runtime_lag_seconds.observe(lag.as_secs_f64());
        window.push(lag);
        if window.len() == LAG_WINDOW {
            let p99 = p99(&mut window);
            if p99 > LAG_WARN {
                tracing::warn!(
                    p99_ms = p99.as_millis() as u64,
                    "the async runtime is lagging: sessions and heartbeats are delayed"
                );
            }
            window.clear();
        }
    }
}

fn p99(samples: &mut [std::time::Duration]) -> std::time::Duration {
    samples.sort_unstable();
    let index = ((samples.len() * 99).div_ceil(100)).saturating_sub(1);
    samples.get(index).copied().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_run_of_503s_is_one_warn_line_per_code_and_period_with_the_count_between() {
        use std::time::Instant;
        let every = crate::api::error::UNAVAILABLE_LOG_EVERY;
        let log = super::LogSampler::new(every);
        let start = Instant::now();
        assert_eq!(log.sample("node_full", start), Some(0));
        assert_eq!(log.sample("node_full", start + Duration::from_secs(1)), None);
        assert_eq!(log.sample("node_full", start + Duration::from_secs(9)), None);
        // Another code has its own period.
        assert_eq!(log.sample("store_unavailable", start + Duration::from_secs(9)), Some(0));
        assert_eq!(log.sample("node_full", start + every), Some(2));
        assert_eq!(log.sample("node_full", start + every * 3), Some(0));
    }

    use std::time::Duration;

    #[test]
    fn p99_is_the_99th_percentile() {
        let mut samples: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(super::p99(&mut samples), Duration::from_millis(99));
        assert_eq!(super::p99(&mut [Duration::from_millis(7)]), Duration::from_millis(7));
    }
}
