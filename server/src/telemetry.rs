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

/// Installs the global tracing subscriber (once per process; the binary calls it).
pub fn init_tracing(settings: &Settings) {
    let filter = tracing_subscriber::EnvFilter::try_new(&settings.log).unwrap_or_else(|_| "info".into());
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    let _ = match settings.log_format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CloseCode {
    pub code: u16,
}

pub struct Metrics {
    registry: Registry,
    pub sessions_active: Gauge,
    pub handshakes: Family<Outcome, Counter>,
    pub sessions_closed: Family<CloseCode, Counter>,
    pub notifications_published: Counter,
    pub notifications_delivered: Counter,
    pub notifications_replayed: Counter,
    pub gap_repairs: Counter,
    pub outbox_overflows: Counter,
    pub notifications_purged: Counter,
    pub publish_commit_seconds: Histogram,
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
            publish_commit_seconds: registered(
                &mut r,
                "herald_publish_commit_seconds",
                "From receiving a publish to its commit",
                Histogram::new(exponential_buckets(0.000_25, 2.0, 16)),
            ),
            registry: r,
        }
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
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
