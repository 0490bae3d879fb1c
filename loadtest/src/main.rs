//! `herald-loadtest`: the load generator for Herald.
//!
//! Scenarios (each writes `result.json`, `summary.md` and a chart under
//! `--out`, default `target/loadtest/<scenario>-<timestamp>/`, and prints a
//! progress line every second):
//!
//! - `idle`: hold N authenticated connections; handshakes/s, drops, server RSS per connection.
//! - `unicast`: open-loop publishing to random users; publish → deliver latency, deliveries/s.
//! - `fanout`: large-audience jobs (202) and bursts; deliveries/s, time to the last delivery.
//! - `storm`: everyone drops, misses M notifications, reconnects with `since`; catch-up times.
//! - `slow`: some clients stop reading; they get 1013 and recover; the others' latency.
//!
//! And three tools: `check` (one publish read back), `ping-under-fanout`
//! (the worker-pool benchmark in docs/BENCHMARKS.md) and `crash` (a
//! crash-consistency soak: SIGKILL mid-publishing, restart, nothing
//! acknowledged lost).
//!
//! Layout: [`fleet`] holds the clients in worker processes (this binary
//! re-executed as `herald-loadtest worker`); [`publish`] drives the HTTP
//! API; [`verify`] checks every user's seqs; [`report`], [`chart`] and
//! [`progress`] are the output.

mod args;
mod chart;
mod cli;
mod crash;
mod fleet;
mod hist;
mod ping;
mod procstat;
mod progress;
mod publish;
mod report;
mod scenario;
mod scrape;
mod verify;

use clap::Parser;

/// mimalloc, as herald itself: the load generator shares the box with the
/// server, and glibc's malloc was an eighth of its publishing process's CPU
/// (docs/BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let cli = cli::Cli::parse();
    if let cli::Command::Worker = cli.command {
        // One thread per worker process: the coordinator starts as many as needed.
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let result = runtime.block_on(fleet::worker::main());
        // Do not wait for the blocking thread parked on stdin.
        runtime.shutdown_background();
        return result;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let code = runtime.block_on(cli::run(cli.command))?;
    runtime.shutdown_background();
    std::process::exit(code);
}
