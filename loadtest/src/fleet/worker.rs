//! A worker process (`herald-loadtest worker`, started by the coordinator):
//! it holds its share of the clients, obeys commands from stdin and writes
//! events to stdout. It runs on a single-threaded runtime: the coordinator
//! starts as many workers as the connection count needs.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use hdrhistogram::Histogram;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::Instant;

use super::protocol::{Buckets, Command, Event, Report, Stats, WorkerSpec};
use crate::procstat;

/// What every client of the worker watches.
#[derive(Debug, Clone, Default)]
pub struct Control {
    /// Bumped by every `Connect`.
    pub connect_gen: u64,
    pub connect_at_ns: u64,
    /// Bumped by every `Drop`.
    pub drop_gen: u64,
    /// Bumped by `Pause`/`Resume` (the flags are in [`Table::paused`]).
    pub pause_epoch: u64,
    pub quit: bool,
}

/// Per-client cells the report reads.
pub struct Table {
    pub start: Vec<AtomicI64>,
    pub last: Vec<AtomicI64>,
    pub paused: Vec<AtomicBool>,
    /// Ever paused: such a client's deliveries are not latency samples.
    pub stalled: Vec<AtomicBool>,
    pub last_close: Vec<AtomicU32>,
    pub closed: Vec<AtomicU32>,
}

#[derive(Default)]
pub struct Counters {
    pub open: AtomicU64,
    pub handshakes: AtomicU64,
    pub failures: AtomicU64,
    pub drops: AtomicU64,
    pub delivered: AtomicU64,
    pub advanced: AtomicU64,
    pub duplicates: AtomicU64,
    pub gaps: AtomicU64,
    pub caught_up: AtomicU64,
    pub last_delivery_ns: AtomicU64,
    pub last_caught_up_ns: AtomicU64,
}

/// Histograms in µs.
pub struct Hists {
    pub latency: Mutex<Histogram<u64>>,
    pub handshake: Mutex<Histogram<u64>>,
    pub catch_up: Mutex<Histogram<u64>>,
    pub catch_up_since_command: Mutex<Histogram<u64>>,
}

/// Spaces handshakes out to a rate.
pub struct Pacer {
    interval: Mutex<Duration>,
    next: Mutex<Instant>,
}

impl Pacer {
    fn set_rate(&self, per_sec: f64) {
        let interval = if per_sec > 0.0 { Duration::from_secs_f64(1.0 / per_sec) } else { Duration::ZERO };
        *self.interval.lock().unwrap() = interval;
        *self.next.lock().unwrap() = Instant::now();
    }

    pub async fn wait(&self) {
        let interval = *self.interval.lock().unwrap();
        if interval.is_zero() {
            return;
        }
        let slot = {
            let mut next = self.next.lock().unwrap();
            let slot = (*next).max(Instant::now());
            *next = slot + interval;
            slot
        };
        tokio::time::sleep_until(slot).await;
    }
}

pub struct Shared {
    pub spec: WorkerSpec,
    /// The nodes' socket addresses, by node index.
    pub addrs: Vec<SocketAddr>,
    pub control: watch::Sender<Control>,
    pub table: Table,
    pub counters: Counters,
    pub hists: Hists,
    pub closes: Mutex<BTreeMap<u16, u64>>,
    pub failure_kinds: Mutex<BTreeMap<String, u64>>,
    pub pacer: Pacer,
    pub inflight: Semaphore,
}

impl Shared {
    pub fn record(&self, hist: &Mutex<Histogram<u64>>, micros: u64) {
        hist.lock().unwrap().saturating_record(micros.max(1));
    }

    fn stats(&self, sync: Option<u64>) -> Stats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            sync,
            open: get(&c.open),
            handshakes: get(&c.handshakes),
            failures: get(&c.failures),
            drops: get(&c.drops),
            delivered: get(&c.delivered),
            advanced: get(&c.advanced),
            duplicates: get(&c.duplicates),
            gaps: get(&c.gaps),
            caught_up: get(&c.caught_up),
            last_delivery_ns: get(&c.last_delivery_ns),
            last_caught_up_ns: get(&c.last_caught_up_ns),
            rss_kib: procstat::self_rss_kib(),
            cpu_ticks: procstat::cpu_ticks("self").unwrap_or(0),
        }
    }

    fn report(&self) -> Report {
        let buckets = |h: &Mutex<Histogram<u64>>| -> Buckets {
            h.lock().unwrap().iter_recorded().map(|v| (v.value_iterated_to(), v.count_at_value())).collect()
        };
        let load = |v: &Vec<AtomicI64>| v.iter().map(|a| a.load(Ordering::Relaxed)).collect();
        Report {
            stats: self.stats(None),
            latency: buckets(&self.hists.latency),
            handshake: buckets(&self.hists.handshake),
            catch_up: buckets(&self.hists.catch_up),
            catch_up_since_command: buckets(&self.hists.catch_up_since_command),
            closes: self.closes.lock().unwrap().iter().map(|(k, v)| (*k, *v)).collect(),
            failure_kinds: self.failure_kinds.lock().unwrap().clone(),
            clients: self.spec.clients().map(|j| j as u32).collect(),
            start: load(&self.table.start),
            last: load(&self.table.last),
            last_close: self.table.last_close.iter().map(|a| a.load(Ordering::Relaxed) as u16).collect(),
            closed: self.table.closed.iter().map(|a| a.load(Ordering::Relaxed)).collect(),
        }
    }

    /// Sets the pause flag of those `clients` that are this worker's.
    fn set_paused(&self, clients: &[u32], paused: bool) {
        let p = self.spec.processes;
        for &j in clients {
            let j = j as usize;
            if j % p == self.spec.worker && j < self.spec.connections {
                self.table.paused[j / p].store(paused, Ordering::Relaxed);
                if paused {
                    self.table.stalled[j / p].store(true, Ordering::Relaxed);
                }
            }
        }
        self.control.send_modify(|c| c.pause_epoch += 1);
    }
}

pub fn unix_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// A latency histogram in µs: 1 µs to an hour, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds")
}

/// The worker's main: the spec on the first stdin line, then commands.
pub async fn main() -> anyhow::Result<()> {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let first = lines.next_line().await?.context("no worker spec on stdin")?;
    let spec: WorkerSpec = serde_json::from_str(&first).context("bad worker spec")?;
    let mut addrs = Vec::new();
    for url in &spec.urls {
        let host = url.split_once("://").map_or(url.as_str(), |(_, rest)| rest).trim_end_matches('/');
        let addr = tokio::net::lookup_host(host).await?.next().with_context(|| format!("cannot resolve {host}"))?;
        addrs.push(addr);
    }
    let n = spec.clients().count();
    let cells = |v: i64| (0..n).map(|_| AtomicI64::new(v)).collect::<Vec<_>>();
    let flags = || (0..n).map(|_| AtomicBool::new(false)).collect::<Vec<_>>();
    let counts = || (0..n).map(|_| AtomicU32::new(0)).collect::<Vec<_>>();
    let shared = Arc::new(Shared {
        addrs,
        control: watch::Sender::new(Control::default()),
        table: Table {
            start: cells(-1),
            last: cells(-1),
            paused: flags(),
            stalled: flags(),
            last_close: counts(),
            closed: counts(),
        },
        counters: Counters::default(),
        hists: Hists {
            latency: Mutex::new(histogram()),
            handshake: Mutex::new(histogram()),
            catch_up: Mutex::new(histogram()),
            catch_up_since_command: Mutex::new(histogram()),
        },
        closes: Mutex::default(),
        failure_kinds: Mutex::default(),
        pacer: Pacer { interval: Mutex::new(Duration::ZERO), next: Mutex::new(Instant::now()) },
        inflight: Semaphore::new(spec.max_inflight.max(1)),
        spec,
    });
    let clients: Vec<_> = (0..n).map(|i| tokio::spawn(super::client::run(shared.clone(), i))).collect();

    let (out, mut queue) = mpsc::unbounded_channel::<Event>();
    let writer = tokio::spawn(async move {
        let mut stdout = tokio::io::stdout();
        while let Some(event) = queue.recv().await {
            let mut line = serde_json::to_vec(&event).expect("events serialize");
            line.push(b'\n');
            if stdout.write_all(&line).await.is_err() || stdout.flush().await.is_err() {
                break;
            }
        }
    });
    let ticker = {
        let (shared, out) = (shared.clone(), out.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tick.tick().await;
                if out.send(Event::Stats(shared.stats(None))).is_err() {
                    return;
                }
            }
        })
    };

    while let Some(line) = lines.next_line().await? {
        let command: Command = serde_json::from_str(&line).with_context(|| format!("bad command {line}"))?;
        match command {
            Command::Connect { rate, at_ns } => {
                shared.pacer.set_rate(rate);
                shared.control.send_modify(|c| {
                    c.connect_gen += 1;
                    c.connect_at_ns = at_ns;
                });
            }
            Command::Drop => shared.control.send_modify(|c| c.drop_gen += 1),
            Command::Pause { clients } => shared.set_paused(&clients, true),
            Command::Resume { clients } => shared.set_paused(&clients, false),
            Command::Sync { id } => {
                let _ = out.send(Event::Stats(shared.stats(Some(id))));
            }
            Command::Report => {
                let _ = out.send(Event::Report(Box::new(shared.report())));
            }
            Command::Quit => break,
        }
    }
    shared.control.send_modify(|c| c.quit = true);
    let _ = tokio::time::timeout(Duration::from_secs(5), futures_util::future::join_all(clients)).await;
    ticker.abort();
    drop(out);
    let _ = writer.await;
    Ok(())
}
