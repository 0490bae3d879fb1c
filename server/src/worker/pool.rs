//! The worker pool: CPU-heavy steps run on OS threads of its own, never on
//! the async runtime that drives the sockets and never on tokio's blocking
//! pool (DNS and file I/O share that one).
//!
//! **Guarantees.** At most `threads` steps run at once; at most `queue` more
//! wait, and a caller that finds the queue full waits (asynchronously) for
//! room — backpressure, not unbounded memory. A step that panics fails only
//! its own call ([`PoolError::Panicked`]); the thread survives.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use tokio::sync::oneshot;

use crate::telemetry::Metrics;

type Step = Box<dyn FnOnce() + Send + 'static>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    #[error("the worker pool is shut down")]
    Closed,
    #[error("a worker step panicked: {0}")]
    Panicked(String),
}

/// A cheap handle; clones share the threads.
#[derive(Clone)]
pub struct Pool {
    queue: async_channel::Sender<Step>,
    metrics: Arc<Metrics>,
    threads: usize,
}

impl Pool {
    /// Starts `threads` threads named `herald-worker-N` behind a queue of `queue` steps.
    pub fn new(threads: usize, queue: usize, metrics: Arc<Metrics>) -> Pool {
        let (tx, rx) = async_channel::bounded::<Step>(queue.max(1));
        for n in 0..threads.max(1) {
            let rx = rx.clone();
            let metrics = metrics.clone();
            std::thread::Builder::new()
                .name(format!("herald-worker-{n}"))
                .spawn(move || {
                    while let Ok(step) = rx.recv_blocking() {
                        metrics.worker_queue_depth.set(rx.len() as i64);
                        metrics.workers_busy.inc();
                        step();
                        metrics.workers_busy.dec();
                    }
                })
                .expect("spawning a worker thread");
        }
        Pool { queue: tx, metrics, threads: threads.max(1) }
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `step` on a worker thread and returns its result.
    pub async fn run<T, F>(&self, step: F) -> Result<T, PoolError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let wrapped: Step = Box::new(move || {
            let outcome = catch_unwind(AssertUnwindSafe(step)).map_err(|panic| {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                PoolError::Panicked(message)
            });
            let _ = tx.send(outcome);
        });
        self.queue.send(wrapped).await.map_err(|_| PoolError::Closed)?;
        self.metrics.worker_queue_depth.set(self.queue.len() as i64);
        rx.await.map_err(|_| PoolError::Closed)?
    }

    /// Stops taking steps; threads finish what is queued and exit.
    pub fn close(&self) {
        self.queue.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn steps_run_off_the_runtime_and_a_panic_fails_only_its_call() {
        let pool = Pool::new(2, 4, Arc::new(Metrics::new()));
        let name = pool.run(|| std::thread::current().name().map(str::to_string)).await.unwrap();
        assert!(name.unwrap().starts_with("herald-worker-"));
        let err = pool.run(|| -> u32 { panic!("boom") }).await.unwrap_err();
        assert_eq!(err, PoolError::Panicked("boom".into()));
        assert_eq!(pool.run(|| 2 + 2).await.unwrap(), 4);
        // More steps than threads + queue: callers wait for room, all finish.
        let runs = (0..32).map(|i| {
            let pool = pool.clone();
            async move { pool.run(move || i * 2).await.unwrap() }
        });
        let sum: u64 = futures_util::future::join_all(runs).await.into_iter().sum();
        assert_eq!(sum, (0..32u64).map(|i| i * 2).sum::<u64>());
        pool.close();
        assert_eq!(pool.run(|| ()).await, Err(PoolError::Closed));
    }
}
