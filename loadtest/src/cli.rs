//! The command line: one subcommand per scenario.

use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::args::{Clients, Common};
use crate::publish::Plan;
use crate::scenario;

#[derive(Parser)]
#[command(name = "herald-loadtest", about = "Load generator for Herald")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct Publishing {
    /// Concurrent HTTP publishers (keep-alive connections).
    #[arg(long, default_value_t = 32)]
    pub publishers: usize,
    /// Filler bytes added to each payload.
    #[arg(long, default_value_t = 0)]
    pub payload_bytes: usize,
}

#[derive(Subcommand)]
pub enum Command {
    /// Open and hold N authenticated connections.
    Idle {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        clients: Clients,
        /// How long to hold them.
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        duration: Duration,
    },
    /// Open-loop publishing to random connected users; latency and order.
    Unicast {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        clients: Clients,
        #[command(flatten)]
        publishing: Publishing,
        /// Notifications per second (a publish to --batch users counts --batch).
        #[arg(long, default_value_t = 1000.0)]
        rate: f64,
        /// Users per publish (`user_ids`); 1 publishes with `user_id`.
        #[arg(long, default_value_t = 1)]
        batch: usize,
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Publish through the node after the user's (with several nodes and Redis).
        #[arg(long)]
        cross_node: bool,
        /// Stop early when publishes fall this far behind schedule.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        max_lag: Duration,
    },
    /// Large-audience publishes (202 jobs) and bursts of batched publishes.
    Fanout {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        clients: Clients,
        #[command(flatten)]
        publishing: Publishing,
        /// Users per job: the connected ones plus offline ones up to this many.
        #[arg(long)]
        audience: Option<usize>,
        /// Jobs, one after the other.
        #[arg(long, default_value_t = 3)]
        jobs: usize,
        /// Bursts: every connected user once, in publishes of --batch users sent together.
        #[arg(long, default_value_t = 3)]
        bursts: usize,
        #[arg(long, default_value_t = 1000)]
        batch: usize,
    },
    /// Everyone drops, misses M notifications each, and reconnects with `since`.
    Storm {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        clients: Clients,
        #[command(flatten)]
        publishing: Publishing,
        /// Notifications per user published while they are away.
        #[arg(long, default_value_t = 50)]
        missed: usize,
        /// Users per publish while they are away.
        #[arg(long, default_value_t = 1000)]
        batch: usize,
        /// Reconnects per second, all together (0: all at once).
        #[arg(long, default_value_t = 0.0)]
        reconnect_rate: f64,
    },
    /// A fraction of clients stop reading; they must get 1013 and recover.
    Slow {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        clients: Clients,
        #[command(flatten)]
        publishing: Publishing,
        /// Share of the clients that stop reading (every round(1/f)-th client).
        #[arg(long, default_value_t = 0.1)]
        slow_fraction: f64,
        /// Notifications per second to the readers (measured).
        #[arg(long, default_value_t = 1000.0)]
        rate: f64,
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Notifications per second sent to the stalled clients until the server closes them.
        #[arg(long, default_value_t = 20_000.0)]
        flood_rate: f64,
        /// Payload filler of the flood.
        #[arg(long, default_value_t = 1024)]
        flood_bytes: usize,
        /// Longest the stalled clients wait to be closed by the server.
        #[arg(long, default_value = "100s", value_parser = humantime::parse_duration)]
        slow_timeout: Duration,
    },
    /// Publish one notification and read it back over a WebSocket.
    Check {
        /// The node, e.g. http://127.0.0.1:8080.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        #[arg(long)]
        api_key: String,
        /// A user token for `--user`.
        #[arg(long)]
        token: String,
        #[arg(long, default_value = "alice")]
        user: String,
    },
    /// WebSocket ping round trips, idle and while a large-audience job runs.
    PingUnderFanout {
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        #[arg(long)]
        api_key: String,
        /// The node's HERALD_JWT_SECRET, to mint the sessions' tokens.
        #[arg(long)]
        jwt_secret: String,
        #[arg(long, default_value_t = 200)]
        sessions: usize,
        #[arg(long, default_value_t = 100)]
        interval_ms: u64,
        /// Length of the idle phase.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long, default_value_t = 100_000)]
        audience: usize,
    },
    /// Crash-consistency soak: start herald, publish, SIGKILL it at a random
    /// moment, restart it on the same store and check that nothing
    /// acknowledged was lost, round after round.
    Crash {
        /// The herald binary to run.
        #[arg(long, default_value = "target/release/herald")]
        herald_bin: std::path::PathBuf,
        /// The store (e.g. a fresh postgres://… database); default a SQLite file in --out.
        #[arg(long)]
        database_url: Option<String>,
        /// More settings for herald, KEY=VALUE (repeat).
        #[arg(long = "herald-env", value_parser = key_value)]
        herald_env: Vec<(String, String)>,
        #[arg(long, default_value_t = 8)]
        rounds: usize,
        /// Stop starting new rounds after this long.
        #[arg(long, value_parser = humantime::parse_duration)]
        until: Option<Duration>,
        /// Each round kills herald at a random moment between --kill-min and --kill-max.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        kill_min: Duration,
        #[arg(long, default_value = "8s", value_parser = humantime::parse_duration)]
        kill_max: Duration,
        #[arg(long, default_value_t = 2000)]
        users: usize,
        /// Users per publish (1: single-user publishes).
        #[arg(long, default_value_t = 100)]
        batch: usize,
        #[arg(long, default_value_t = 16)]
        publishers: usize,
        /// Result folder; default target/loadtest/crash-<timestamp>.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// A worker process holding clients (started by the scenarios themselves).
    #[command(hide = true)]
    Worker,
}

/// Runs a command; the result is the process exit status.
pub async fn run(command: Command) -> anyhow::Result<i32> {
    match command {
        Command::Idle { common, clients, duration } => {
            scenario::idle::run(scenario::idle::Args { common, clients, duration }).await
        }
        Command::Unicast { common, clients, publishing, rate, batch, duration, cross_node, max_lag } => {
            let plan = Plan {
                rate,
                batch: batch.max(1),
                duration,
                concurrency: publishing.publishers,
                pad: publishing.payload_bytes,
                cross_node,
                max_lag,
            };
            scenario::unicast::run(scenario::unicast::Args { common, clients, plan }).await
        }
        Command::Fanout { common, clients, publishing, audience, jobs, bursts, batch } => {
            let args = scenario::fanout::Args { common, clients, publishing, audience, jobs, bursts, batch };
            scenario::fanout::run(args).await
        }
        Command::Storm { common, clients, publishing, missed, batch, reconnect_rate } => {
            let args = scenario::storm::Args { common, clients, publishing, missed, batch, reconnect_rate };
            scenario::storm::run(args).await
        }
        Command::Slow {
            common,
            clients,
            publishing,
            slow_fraction,
            rate,
            duration,
            flood_rate,
            flood_bytes,
            slow_timeout,
        } => {
            let args = scenario::slow::Args {
                common,
                clients,
                publishing,
                slow_fraction,
                rate,
                duration,
                flood_rate,
                flood_bytes,
                slow_timeout,
            };
            scenario::slow::run(args).await
        }
        Command::Check { url, api_key, token, user } => check(url, api_key, token, user).await.map(|()| 0),
        Command::PingUnderFanout { url, api_key, jwt_secret, sessions, interval_ms, seconds, audience } => {
            let args = crate::ping::Args {
                url,
                api_key,
                jwt_secret,
                sessions,
                interval: Duration::from_millis(interval_ms),
                seconds,
                audience,
            };
            crate::ping::run(args).await.map(|()| 0)
        }
        Command::Crash {
            herald_bin,
            database_url,
            herald_env,
            rounds,
            until,
            kill_min,
            kill_max,
            users,
            batch,
            publishers,
            out,
        } => {
            let args = crate::crash::Args {
                herald_bin,
                database_url,
                herald_env,
                rounds,
                until,
                kill_after: (kill_min, kill_max.max(kill_min)),
                users: users.max(1),
                batch,
                publishers,
                out,
            };
            crate::crash::run(args).await
        }
        Command::Worker => unreachable!("main runs workers on their own runtime"),
    }
}

async fn check(url: String, api_key: String, token: String, user: String) -> anyhow::Result<()> {
    let ws = url.replacen("http", "ws", 1);
    let mut session = herald_client::Connect::new(ws, token).connect().await?;
    let published = herald_client::Publisher::new(&url, api_key)
        .publish_one(&user, "loadtest.check", serde_json::json!({"check": true}))
        .await?;
    let started = std::time::Instant::now();
    loop {
        if let herald_client::ServerFrame::Notification(n) = session.next_frame().await? {
            if n.seq == published.seq {
                println!("seq {} delivered in {:?}", n.seq, started.elapsed());
                return Ok(());
            }
        }
    }
}

/// `KEY=VALUE`.
fn key_value(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {text:?}"))
}
