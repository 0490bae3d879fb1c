//! `herald-loadtest`: the load generator for Herald.
//!
//! - `check`: one publish read back over a WebSocket.
//! - `ping-under-fanout`: ping round trips with and without a large fan-out
//!   job running (the worker-pool benchmark, see docs/BENCHMARKS.md).
//!
//! The other scenarios (`idle`, `unicast`, `fanout`, `storm`, `slow`) arrive
//! with the load-test issue.

mod ping;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "herald-loadtest", about = "Load generator for Herald")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::PingUnderFanout { url, api_key, jwt_secret, sessions, interval_ms, seconds, audience } => {
            ping::run(ping::Args {
                url,
                api_key,
                jwt_secret,
                sessions,
                interval: std::time::Duration::from_millis(interval_ms),
                seconds,
                audience,
            })
            .await
        }
        Command::Check { url, api_key, token, user } => {
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
    }
}
