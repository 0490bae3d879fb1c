//! The clients, spread over worker processes.
//!
//! One process may hold at most ~20,000 sockets (the file limit), and one
//! source address ~28,000 ephemeral ports, so the coordinator re-executes
//! itself as `herald-loadtest worker` children, each holding a share of the
//! clients and binding its own source addresses (`--source-ips`). [`Fleet`]
//! is the coordinator's handle on them: it sends [`Command`]s, keeps each
//! worker's latest [`Stats`], and merges their [`Report`]s.

pub mod client;
pub mod frame;
pub mod protocol;
pub mod worker;

use std::net::IpAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin};
use tokio::sync::{mpsc, watch, Mutex};

use protocol::Event;
pub use protocol::{Command, Report, Stats, WorkerSpec};

/// How to spread the clients.
#[derive(Debug, Clone)]
pub struct FleetSpec {
    pub connections: usize,
    pub processes: usize,
    pub urls: Vec<String>,
    pub source_ips: Vec<IpAddr>,
    pub prefix: String,
    pub jwt_secret: String,
    pub max_inflight: usize,
}

struct Worker {
    child: Mutex<Child>,
    stdin: Mutex<ChildStdin>,
    stats: watch::Receiver<Stats>,
    /// Only answers to `Sync` (the periodic stats must not overwrite them).
    synced: watch::Receiver<Stats>,
    reports: Mutex<mpsc::Receiver<Report>>,
}

/// The coordinator's handle on its workers.
pub struct Fleet {
    workers: Vec<Worker>,
    next_sync: AtomicU64,
}

impl Fleet {
    /// Starts the worker processes (nothing connects until [`Fleet::connect`]).
    pub async fn start(spec: FleetSpec) -> anyhow::Result<Arc<Fleet>> {
        let exe = std::env::current_exe().context("locating herald-loadtest")?;
        let mut workers = Vec::new();
        for k in 0..spec.processes {
            let worker_spec = WorkerSpec {
                worker: k,
                processes: spec.processes,
                connections: spec.connections,
                urls: spec.urls.clone(),
                source_ips: source_ips_of(&spec.source_ips, k, spec.processes),
                prefix: spec.prefix.clone(),
                jwt_secret: spec.jwt_secret.clone(),
                max_inflight: spec.max_inflight,
            };
            let mut child = tokio::process::Command::new(&exe)
                .arg("worker")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .context("starting a worker process")?;
            let mut stdin = child.stdin.take().expect("piped");
            let mut line = serde_json::to_vec(&worker_spec)?;
            line.push(b'\n');
            stdin.write_all(&line).await?;
            let stdout = child.stdout.take().expect("piped");
            let (stats_tx, stats) = watch::channel(Stats::default());
            let (synced_tx, synced) = watch::channel(Stats::default());
            let (reports_tx, reports) = mpsc::channel(1);
            tokio::spawn(async move {
                let mut lines = BufReader::new(stdout).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    match serde_json::from_str::<Event>(&line) {
                        Ok(Event::Stats(s)) => {
                            if s.sync.is_some() {
                                synced_tx.send_replace(s.clone());
                            }
                            stats_tx.send_replace(s)
                        }
                        Ok(Event::Report(r)) => {
                            let _ = reports_tx.send(*r).await;
                            continue;
                        }
                        Err(e) => {
                            eprintln!("worker {k}: unreadable event ({e}): {line}");
                            continue;
                        }
                    };
                }
            });
            workers.push(Worker {
                child: Mutex::new(child),
                stdin: Mutex::new(stdin),
                stats,
                synced,
                reports: Mutex::new(reports),
            });
        }
        Ok(Arc::new(Fleet { workers, next_sync: AtomicU64::new(1) }))
    }

    async fn send(&self, worker: &Worker, command: &Command) -> anyhow::Result<()> {
        let mut line = serde_json::to_vec(command)?;
        line.push(b'\n');
        let mut stdin = worker.stdin.lock().await;
        stdin.write_all(&line).await.context("a worker process is gone")?;
        Ok(())
    }

    pub async fn broadcast(&self, command: &Command) -> anyhow::Result<()> {
        for w in &self.workers {
            self.send(w, command).await?;
        }
        Ok(())
    }

    /// Opens every client that is not open, at `rate` handshakes/s in all.
    pub async fn connect(&self, rate: f64) -> anyhow::Result<()> {
        let per_worker = rate / self.workers.len() as f64;
        self.broadcast(&Command::Connect { rate: per_worker, at_ns: worker::unix_ns() }).await
    }

    /// The latest counters, summed (at most 250 ms old).
    pub fn stats(&self) -> Stats {
        let mut total = Stats::default();
        for w in &self.workers {
            total.add(&w.stats.borrow());
        }
        total
    }

    /// Exact counters: every worker answers after what it has done so far.
    pub async fn sync(&self) -> anyhow::Result<Stats> {
        let id = self.next_sync.fetch_add(1, Ordering::Relaxed);
        self.broadcast(&Command::Sync { id }).await?;
        let mut total = Stats::default();
        for w in &self.workers {
            let mut rx = w.synced.clone();
            let s = tokio::time::timeout(Duration::from_secs(30), rx.wait_for(|s| s.sync >= Some(id)))
                .await
                .context("a worker did not answer")?
                .context("a worker process is gone")?
                .clone();
            total.add(&s);
        }
        Ok(total)
    }

    /// Every worker's report.
    pub async fn reports(&self) -> anyhow::Result<Vec<Report>> {
        self.broadcast(&Command::Report).await?;
        let mut all = Vec::new();
        for w in &self.workers {
            let mut rx = w.reports.lock().await;
            let r = tokio::time::timeout(Duration::from_secs(60), rx.recv())
                .await
                .context("a worker did not report")?
                .context("a worker process is gone")?;
            all.push(r);
        }
        Ok(all)
    }

    /// Sends `command` for these clients to the workers that hold them.
    pub async fn to_clients(&self, clients: &[u32], make: impl Fn(Vec<u32>) -> Command) -> anyhow::Result<()> {
        let p = self.workers.len();
        let mut by_worker = vec![Vec::new(); p];
        for &j in clients {
            by_worker[j as usize % p].push(j);
        }
        for (w, list) in self.workers.iter().zip(by_worker) {
            if !list.is_empty() {
                self.send(w, &make(list)).await?;
            }
        }
        Ok(())
    }

    /// Waits until `done(stats)`, up to `limit`, or until nothing has moved for `stall`.
    pub async fn wait_until(
        &self,
        limit: Duration,
        stall: Duration,
        done: impl Fn(&Stats) -> bool,
    ) -> anyhow::Result<Stats> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut last_change = tokio::time::Instant::now();
        let mut previous = None;
        loop {
            let s = self.sync().await?;
            if done(&s) {
                return Ok(s);
            }
            let key = (s.handshakes, s.failures, s.advanced, s.caught_up, s.drops);
            if previous != Some(key) {
                previous = Some(key);
                last_change = tokio::time::Instant::now();
            }
            let now = tokio::time::Instant::now();
            if now >= deadline || now.duration_since(last_change) >= stall {
                return Ok(s);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Closes every session with 1000 and waits for the workers to exit.
    pub async fn quit(&self) -> anyhow::Result<()> {
        self.broadcast(&Command::Quit).await?;
        for w in &self.workers {
            let mut child = w.child.lock().await;
            if tokio::time::timeout(Duration::from_secs(15), child.wait()).await.is_err() {
                let _ = child.kill().await;
            }
        }
        Ok(())
    }
}

/// The source addresses worker `k` of `p` binds: its share of the list, or
/// (fewer addresses than workers) one address shared round robin.
pub fn source_ips_of(all: &[IpAddr], k: usize, p: usize) -> Vec<IpAddr> {
    if all.is_empty() {
        return Vec::new();
    }
    let mine: Vec<IpAddr> = all.iter().copied().skip(k).step_by(p).collect();
    if mine.is_empty() {
        vec![all[k % all.len()]]
    } else {
        mine
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_addresses_are_shared_out() {
        let ips: Vec<IpAddr> = (2..=7).map(|i| format!("127.0.0.{i}").parse().unwrap()).collect();
        assert_eq!(source_ips_of(&ips, 0, 2), vec![ips[0], ips[2], ips[4]]);
        assert_eq!(source_ips_of(&ips, 1, 2), vec![ips[1], ips[3], ips[5]]);
        assert_eq!(source_ips_of(&ips[..2], 3, 8), vec![ips[1]]);
        assert!(source_ips_of(&[], 0, 1).is_empty());
    }
}
