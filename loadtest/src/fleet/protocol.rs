//! What the coordinator and its worker processes say to each other: one
//! JSON object per line, commands on the worker's stdin, events on its stdout.
//!
//! Client `j` (0-based, `0..connections`) is user `<prefix>-<j>`; worker `k`
//! of `P` holds the clients with `j % P == k`, and client `j` talks to node
//! `j % nodes`.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// Everything a worker needs, sent as its first line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerSpec {
    pub worker: usize,
    pub processes: usize,
    /// Clients across all workers.
    pub connections: usize,
    /// The nodes' `ws://host:port` bases.
    pub urls: Vec<String>,
    /// Source addresses this worker binds, round robin; empty: the kernel picks.
    pub source_ips: Vec<IpAddr>,
    pub prefix: String,
    pub jwt_secret: String,
    /// Handshakes in flight at once in this worker.
    pub max_inflight: usize,
}

impl WorkerSpec {
    /// The global indexes of this worker's clients.
    pub fn clients(&self) -> impl Iterator<Item = usize> {
        (self.worker..self.connections).step_by(self.processes)
    }
}

/// The user of client `j`.
pub fn user_id(prefix: &str, j: usize) -> String {
    format!("{prefix}-{j}")
}

/// Coordinator → worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Command {
    /// Open every client that is not open, at `rate` handshakes/s (0: no pacing).
    /// Clients that were open before resume with `since`. `at_ns` (unix ns)
    /// is when the coordinator sent it: catch-up times are also measured from it.
    Connect { rate: f64, at_ns: u64 },
    /// Drop every connection at once (no close frame), as a network failure would.
    Drop,
    /// Stop reading these clients' sockets (they stay open).
    Pause { clients: Vec<u32> },
    /// Read them again; a client the server closed meanwhile reconnects with `since`.
    Resume { clients: Vec<u32> },
    /// Answer with a [`Stats`] carrying this id (a barrier).
    Sync { id: u64 },
    /// Answer with a [`Report`].
    Report,
    /// Close every session with 1000 and exit.
    Quit,
}

/// Worker → coordinator.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "ev", rename_all = "snake_case")]
pub enum Event {
    Stats(Stats),
    Report(Box<Report>),
}

/// A worker's counters, pushed every 250 ms and on [`Command::Sync`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Stats {
    pub sync: Option<u64>,
    /// Sessions open now (welcome received, not closed).
    pub open: u64,
    pub handshakes: u64,
    pub failures: u64,
    /// Sessions that ended without being told to (server close, error, EOF).
    pub drops: u64,
    /// Notification frames with a new seq.
    pub delivered: u64,
    /// Sum over clients of `last seq - first welcome's last_seq`: equals the
    /// notifications published to them once everything has arrived.
    pub advanced: u64,
    /// Frames whose seq was at or below the client's last one.
    pub duplicates: u64,
    /// Seqs skipped over (a frame ahead of `last + 1`).
    pub gaps: u64,
    /// Reconnected clients that have received everything up to their welcome's `last_seq`.
    pub caught_up: u64,
    /// Unix ns of the newest delivery.
    pub last_delivery_ns: u64,
    /// Unix ns at which the last reconnected client caught up.
    pub last_caught_up_ns: u64,
    /// This worker's resident memory.
    pub rss_kib: u64,
    /// This worker's CPU time, clock ticks.
    pub cpu_ticks: u64,
}

impl Stats {
    pub fn add(&mut self, o: &Stats) {
        self.open += o.open;
        self.handshakes += o.handshakes;
        self.failures += o.failures;
        self.drops += o.drops;
        self.delivered += o.delivered;
        self.advanced += o.advanced;
        self.duplicates += o.duplicates;
        self.gaps += o.gaps;
        self.caught_up += o.caught_up;
        self.last_delivery_ns = self.last_delivery_ns.max(o.last_delivery_ns);
        self.last_caught_up_ns = self.last_caught_up_ns.max(o.last_caught_up_ns);
        self.rss_kib += o.rss_kib;
        self.cpu_ticks += o.cpu_ticks;
    }
}

/// HDR histogram contents as (value, count) pairs.
pub type Buckets = Vec<(u64, u64)>;

/// Everything a worker measured, on [`Command::Report`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    pub stats: Stats,
    /// Publish → deliver, µs, live deliveries only.
    pub latency: Buckets,
    /// TCP connect → welcome, µs.
    pub handshake: Buckets,
    /// Per reconnect: connect start → caught up to the welcome's `last_seq`, µs.
    pub catch_up: Buckets,
    /// Per reconnect: the last `Connect` command's time → caught up, µs.
    pub catch_up_since_command: Buckets,
    /// Close codes the server sent (1006: the connection ended without one),
    /// with counts. (Not a map: integer keys do not survive the tagged enum.)
    pub closes: Vec<(u16, u64)>,
    /// Handshake failures by kind.
    pub failure_kinds: BTreeMap<String, u64>,
    /// Per client: global index, first welcome's `last_seq` (-1: never
    /// connected), last seq received.
    pub clients: Vec<u32>,
    pub start: Vec<i64>,
    pub last: Vec<i64>,
    /// Per client: the last close code the server ended a session with (0: none).
    pub last_close: Vec<u16>,
    /// Per client: sessions the server ended.
    pub closed: Vec<u32>,
}
